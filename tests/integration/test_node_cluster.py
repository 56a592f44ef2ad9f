"""A stream through 4 local nodes with a device killed and restarted, against the exact simulation;
and the `robustdice cluster` command itself."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import node_helpers as nh  # noqa: E402

from robustdice.node.lab.faults import parse_faults  # noqa: E402
from robustdice.node.lab.localcluster import LocalCluster  # noqa: E402
from robustdice.node.lab.streaming import stream  # noqa: E402
from robustdice.partitioner.core.runtime import Cluster as Simulation  # noqa: E402
from robustdice.partitioner.experiments.evaluate import predictions  # noqa: E402
from robustdice.partitioner.zoo.data import evaluation_split  # noqa: E402

pytestmark = [pytest.mark.usefixtures("leak_check"), pytest.mark.slow]

VICTIM = 2
# 12 FPS: the stream must stay below what 4 nodes serve on a shared 2-core machine on a slow
# day, or latency grows without bound and the test measures the machine, not the node (one
# origin served 17 frames/s at 1 in flight and 42 at 32 on a day this machine ran AlexNet in
# 29 ms instead of 15; 25 FPS then overran it and frames were refused as "node busy").
# Kill at 3 s, restart at 7 s: "failed" frames are those answered between detection and the
# restart. A node takes 3-11 s to start here, so it is back long before the stream ends at 22 s.
N_FRAMES, RATE_FPS, KILL_AT, RESTART_AT = 264, 12.0, 36, 84
MIN_FRAMES_PER_PHASE = 20


def zero_filled_fraction(plan_dir, x, failed):
    """What a node reports as `zero_filled_fraction` for `x` with `failed` down (neuron-weighted)."""
    sim = Simulation(plan_dir)
    masks = {}
    sim.simulate(x, failed, zero_masks=masks)
    neurons = [s.neurons for s in sim.plan.stages]
    return float(sum(masks[i].float().sum() for i in range(len(neurons))) / sum(neurons))


@pytest.mark.timeout(240)
def test_stream_with_kill_and_restart_equals_simulation(digits_plan):
    images, labels, _ = evaluation_split("digits_cnn")
    images = images.numpy().astype(np.float32)
    labels = labels.numpy()
    healthy = predictions(digits_plan, [])["predictions"]
    degraded = predictions(digits_plan, [VICTIM])["predictions"]
    assert healthy != degraded  # otherwise the failed phase would prove nothing
    faults = parse_faults([f"{VICTIM}@{KILL_AT}"], [f"{VICTIM}@{RESTART_AT}"], [], 4)
    with LocalCluster(digits_plan) as cluster:
        nh.start_cluster(cluster)
        report = stream(cluster, images, labels, n_frames=N_FRAMES, rate_fps=RATE_FPS, faults=faults)
        config = cluster.config
        ids = cluster.ids
    frames = report["frames"]
    assert report["frames_submitted"] == N_FRAMES
    assert report["frames_answered"] == N_FRAMES, [(f["index"], f["error"]) for f in frames if f["prediction"] is None]
    assert report["frames_failed"] == 0
    by_phase = {p: [f for f in frames if f["phase"] == p] for p in ("before", "detecting", "failed", "rejoining",
                                                                     "rejoined")}
    counts = {p: len(v) for p, v in by_phase.items()}
    for phase in ("before", "failed", "rejoined"):
        assert counts[phase] >= MIN_FRAMES_PER_PHASE, counts
    survivors = [n for n in ids if n != ids[VICTIM]]
    for phase, expected, participants in (("before", healthy, ids), ("failed", degraded, survivors),
                                          ("rejoined", healthy, ids)):
        wrong = [(f["index"], f["sample"], f["prediction"], expected[f["sample"]]) for f in by_phase[phase]
                 if f["prediction"] != expected[f["sample"]]]
        assert not wrong, f"{phase}: (frame, sample, node, simulation) differ: {wrong[:10]} ({len(wrong)})"
        assert all(f["participants"] == participants for f in by_phase[phase]), \
            {f["index"]: f["participants"] for f in by_phase[phase] if f["participants"] != participants}
    x = torch.from_numpy(images[:1])
    assert all(f["zero_filled_fraction"] == 0.0 for f in by_phase["before"] + by_phase["rejoined"])
    lost = zero_filled_fraction(digits_plan, x, [VICTIM])
    assert lost > 0
    assert all(f["zero_filled_fraction"] == pytest.approx(lost) for f in by_phase["failed"])

    [detection] = report["detections"]
    assert detection["device"] == VICTIM and detection["fault"] == "kill"
    bound_ms = config.peer_timeout_ms + config.heartbeat_interval_ms + nh.DETECTION_SLACK_MS
    assert detection["detected_after_ms"] is not None, detection
    assert 0 < detection["detected_after_ms"] <= bound_ms, detection
    assert set(detection["per_node_ms"]) == set(survivors)
    assert all(ms is not None and 0 < ms <= bound_ms for ms in detection["per_node_ms"].values()), detection
    [rejoin] = report["rejoins"]
    assert rejoin["device"] == VICTIM and rejoin["rejoined_after_ms"] is not None, rejoin
    print(f"\nphases {counts}; detected after {detection['detected_after_ms']:.0f} ms, "
          f"rejoined after {rejoin['rejoined_after_ms']:.0f} ms")


@pytest.fixture(scope="module")
def cluster_cli_run(digits_plan, tmp_path_factory):
    """`robustdice cluster` once, short: 4 nodes, 120 frames at 15 FPS (below what a slow day's
    machine serves, see RATE_FPS), device 1 killed at frame 40."""
    folder = tmp_path_factory.mktemp("cluster-cli")
    png, workdir = folder / "timeline.png", folder / "cluster"
    cmd = nh.robustdice_cli() + ["cluster", "--plan", str(digits_plan), "--frames", "120", "--rate", "15",
                                 "--kill", "1@40", "--json", "--plot", str(png), "--workdir", str(workdir)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=200)
    return out, png, workdir


@pytest.mark.timeout(240)
def test_cluster_cli_json_and_plot(cluster_cli_run):
    out, png, workdir = cluster_cli_run
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("frames_submitted", "frames_answered", "frames", "phases", "detections", "rejoins"):
        assert key in report, key
    assert report["frames_submitted"] == 120
    assert report["frames_answered"] == report["frames_submitted"]
    assert len(report["frames"]) == 120
    for i, f in enumerate(report["frames"]):
        for key in ("index", "label", "prediction", "latency_ms", "zero_filled_fraction", "phase"):
            assert f.get(key) is not None, (key, f)
        assert f["index"] == i
        assert f["latency_ms"] > 0
        assert f["phase"] in ("before", "detecting", "failed")
    assert "before" in report["phases"] and "failed" in report["phases"], report["phases"]
    [detection] = report["detections"]
    assert detection["device"] == 1 and detection["detected_after_ms"] is not None, detection
    assert report["rejoins"] == []
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not nh.processes_mentioning(str(workdir)), "nodes of the cluster command are still running"


@pytest.mark.timeout(240)
def test_cluster_cli_frames_before_any_failure_count_on_every_node(cluster_cli_run):
    """No device has failed yet, so every "before" frame runs on all four nodes, zero-filled nowhere.

    `robustdice cluster` must wait until every node counts every other in new frames (a peer is a
    participant only once the link works both ways, a little after it is first seen alive), not
    merely until every node sees every other alive; else its first frames run without the last
    node to join and are zero-filled, yet reported as "before".
    """
    out, _, _ = cluster_cli_run
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    before = [f for f in report["frames"] if f["phase"] == "before"]
    assert before
    partial = [(f["index"], f["participants"], f["zero_filled_fraction"]) for f in before
               if f["participants"] != ["n0", "n1", "n2", "n3"] or f["zero_filled_fraction"] != 0.0]
    assert not partial, f"frames run without every node before any failure: {partial}"
