"""robustdice-node processes on 127.0.0.1: exact answers, status, plan refusal, child death, SIGTERM.

Each node is the real supervisor (engine + handler children) with one torch thread.
"""
import enum
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
import node_helpers as nh  # noqa: E402

from robustdice.mesh import wire  # noqa: E402
from robustdice.node.client import NodeClient  # noqa: E402
from robustdice.node.lab.localcluster import LocalCluster  # noqa: E402
from robustdice.partitioner.core.plan import load_plan  # noqa: E402
from robustdice.partitioner.core.runtime import Cluster as Simulation  # noqa: E402
from robustdice.partitioner.experiments.evaluate import predictions  # noqa: E402
from robustdice.partitioner.zoo.models import build_model, input_shape  # noqa: E402

pytestmark = [pytest.mark.usefixtures("leak_check"), pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def digits_cluster(digits_plan):
    # Cold, as systemd starts a board's node: each process a new Python (the other clusters of
    # the suite fork theirs from a warm process, node/lab/warm.py).
    with LocalCluster(digits_plan, warm=False) as cluster:
        nh.start_cluster(cluster)
        yield cluster


def test_local_cluster_workdir_may_be_relative(digits_plan, tmp_path, monkeypatch):
    """`make demo` passes a relative --workdir: peers.yaml's key paths must still resolve."""
    from robustdice.mesh.config import load_peers
    from robustdice.mesh.keys import load_own_keys
    monkeypatch.chdir(tmp_path)
    with LocalCluster(digits_plan, "rel/cluster") as cluster:
        config = load_peers(cluster.peers_path)
        for node in cluster.ids:
            load_own_keys(config, node)  # raises if the path resolves anywhere else
        assert cluster.workdir == tmp_path / "rel" / "cluster"


def check_exact(cluster, x):
    """Submit `x` to every node in turn: each answer's logits are the plain model's."""
    plan = cluster.plan
    model = build_model(plan.model, weights=plan.weights, seed=plan.seed).eval()
    with torch.inference_mode():
        reference = model(torch.from_numpy(x)).numpy()
    scale = float(np.abs(reference).max())
    assert scale > 0
    for d, node in enumerate(cluster.ids):
        with NodeClient(cluster.config, node, cluster.key_path) as client:
            reply = client.submit(x, timeout_s=60.0)
        assert isinstance(reply, wire.Result), reply
        assert "error" not in reply.meta, reply.meta
        assert reply.meta["node"] == node
        assert reply.meta["participants"] == cluster.ids, reply.meta["participants"]
        assert reply.meta["zero_filled_fraction"] == 0.0, reply.meta["zero_filled"]
        logits = reply.arrays[0]
        assert logits.shape == reference.shape
        np.testing.assert_allclose(logits, reference, rtol=1e-4, atol=1e-4 * scale,
                                   err_msg=f"node {node}: distributed logits differ from the plain model")
        assert reply.meta["prediction"] == [int(i) for i in reference.argmax(1)]


@pytest.mark.slow
def test_no_failure_digits_every_node_matches_plain_model(digits_cluster):
    from robustdice.partitioner.zoo.data import evaluation_split
    images, _, _ = evaluation_split("digits_cnn")
    check_exact(digits_cluster, images[:3].numpy().astype(np.float32))  # a batch of 3 real digits


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_no_failure_alexnet_three_nodes_matches_plain_model(tmp_path_factory):
    plan = nh.make_plan(tmp_path_factory, "alexnet", 3, "robust", weights="none", scores=("s1",))
    x = torch.randn((1,) + tuple(input_shape("alexnet")), generator=torch.Generator().manual_seed(3)).numpy()
    with LocalCluster(plan) as cluster:
        nh.start_cluster(cluster)
        check_exact(cluster, x)


@pytest.mark.slow
def test_engine_runs_below_the_handler_cpu_priority(digits_cluster):
    """Compute must not delay the mesh: on a shared core the handler goes first."""
    from robustdice.node.engine import ENGINE_NICE, ENGINE_POLICY
    for d in range(len(digits_cluster.ids)):
        children = nh.node_children(digits_cluster, d)
        assert children["engine"].nice() - children["handler"].nice() == ENGINE_NICE
        # a waking engine must not preempt the handler; the handler keeps the default policy
        assert os.sched_getscheduler(children["engine"].pid) == ENGINE_POLICY
        assert os.sched_getscheduler(children["handler"].pid) == os.SCHED_OTHER


def test_status_cli_json_shows_every_node(digits_cluster):
    cluster = digits_cluster
    x = np.zeros((1,) + tuple(input_shape("digits_cnn")), dtype=np.float32)
    for node in cluster.ids:  # one frame from each node: every node computes all four
        with NodeClient(cluster.config, node, cluster.key_path) as client:
            assert "error" not in client.submit(x, timeout_s=60.0).meta
    # Settled: done, or dropped at the origin's heartbeat after it finished on the replicas' copies.
    cluster.wait_until(lambda views: all(v.get("frames_done", 0) + v.get("frames_pruned", 0) >= 4 for v in views),
                       30, "every node to settle the 4 frames")
    out = subprocess.run(nh.robustdice_cli() + ["status", "--peers", str(cluster.peers_path), "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    views = json.loads(out.stdout.strip().splitlines()[-1])
    assert [v["node"] for v in views] == cluster.ids
    for v in views:
        assert not v.get("unreachable"), v
        assert set(v["members"]) == set(cluster.ids) - {v["node"]}
        assert all(m["state"] == "alive" for m in v["members"].values()), v["members"]
        assert v["frames_done"] + v["frames_pruned"] >= 4
        assert v["frame_errors"] == 0
        assert v["zero_filled_fraction"] == 0.0
        assert isinstance(v["counters"], dict)
        assert v["rss_total_bytes"] > 0
        assert len(v["rss_bytes"]) == 3, v["rss_bytes"]  # supervisor, engine, handler
        assert v["power"] == "n/a" and v["power_mw"] is None
        assert v["plan_hash"] == cluster.plan.plan_hash
        assert v["participants"] == cluster.ids
    # The same views for a person: one block per node, its members, who new frames run on.
    text = subprocess.run(nh.robustdice_cli() + ["status", "--peers", str(cluster.peers_path)],
                          capture_output=True, text=True, timeout=60)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    for node in cluster.ids:
        head = next(i for i, line in enumerate(lines) if line.startswith(f"{node} (device "))
        assert "power n/a" in lines[head] and "p50 n/a" not in lines[head], lines[head]
        assert lines[head + 1].strip() == "engine on cpu in float32", lines[head + 1]
        assert lines[head + 2].strip() == "new frames run on: n0, n1, n2, n3"
        members = [line.split() for line in lines[head + 3:head + 6]]
        assert [(m[0], m[1], m[2]) for m in members] == [(p, "alive", "connected") for p in cluster.ids
                                                         if p != node], members
    assert not any(line.startswith("SPLIT") for line in lines)


@pytest.mark.slow
def test_submit_cli_prints_three_answers(digits_cluster, digits_plan):
    cluster = digits_cluster
    expected = predictions(digits_plan, [])
    out = subprocess.run(nh.robustdice_cli() + ["submit", "--peers", str(cluster.peers_path), "--digits", "0-2"],
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(lines) == 3, out.stdout
    pattern = re.compile(r"^digits\[(\d+)\] \(row \d+\): class (\d+) \(label (\d+), (?:correct|WRONG)\)\s+"
                         r"top-5 \[.*\]\s+(\d+\.\d) ms via (n\d)\s+zero-filled: none$")
    for i, line in enumerate(lines):
        m = pattern.match(line)
        assert m, line
        assert int(m.group(1)) == i
        assert int(m.group(2)) == expected["predictions"][i], line
        assert int(m.group(3)) == expected["labels"][i], line
        assert float(m.group(4)) > 0
        assert m.group(5) in cluster.ids


@pytest.mark.slow
def test_peer_with_other_plan_is_refused(tmp_path_factory, digits_plan, tmp_path):
    other = nh.make_plan(tmp_path_factory, "digits_cnn", 4, "lop")
    hash_a, hash_b = load_plan(digits_plan).plan_hash, load_plan(other).plan_hash
    assert hash_a != hash_b
    notify = nh.NotifySocket(tmp_path)
    with LocalCluster(digits_plan) as cluster:
        nh.start_cluster(cluster, [0, 1, 2])
        nh.start_node_with_plan(cluster, 3, other, env={"NOTIFY_SOCKET": notify.path})
        cluster.wait_until(
            lambda views: all(not v.get("unreachable") and v["members"]["n3"]["state"] == "refused"
                              for v in views[:3]), 90, "n0..n2 to show n3 refused")

        def error_line(d):
            return next((line for line in nh.log_lines(cluster.logs[d])
                         if " ERROR " in line and "refused" in line and "n3" in line and hash_b in line), None)
        for d in range(3):
            line = nh.wait_for(lambda: error_line(d), 10, f"the refusal of n3 in {cluster.logs[d]}")
            assert hash_a in line, line
        # n3 itself refuses the others; it is not a participant of their frames.
        cluster.wait_until(lambda views: not views[3].get("unreachable") and all(
            views[3]["members"][n]["state"] == "refused" for n in cluster.ids[:3]), 30, "n3 to refuse n0..n2")
        x = np.zeros((1,) + tuple(input_shape("digits_cnn")), dtype=np.float32)
        x[0, 0, 2:6, 3:5] = 1.0
        with NodeClient(cluster.config, "n0", cluster.key_path) as client:
            reply = client.submit(x, timeout_s=60.0)
        assert reply.meta["participants"] == ["n0", "n1", "n2"], reply.meta
        expected = Simulation(digits_plan).simulate(torch.from_numpy(x), failed=[3]).numpy()
        np.testing.assert_allclose(reply.arrays[0], expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))
        # The refused node serves nobody alone: every client gets an error naming the mismatch,
        # its status says so, and so does what it tells systemd.
        with NodeClient(cluster.config, "n3", cluster.key_path) as client:
            for _ in range(3):
                error = client.submit(x, timeout_s=60.0).meta.get("error", "")
                assert "plan mismatch" in error and hash_a[:12] in error and hash_b[:12] in error, error
        view = cluster.status()[3]
        assert "plan mismatch" in (view["refused"] or "") and view["frames_done"] == 0
        status = nh.wait_for(lambda: [m for m in notify.receive() if "STATUS=REFUSED" in m], 10, "STATUS=REFUSED")
        assert hash_a[:12] in status[0]
    notify.close()


@pytest.mark.slow
def test_a_restarted_node_answers_no_frame_before_it_has_heard_its_peers(digits_plan):
    """Frames a client sends to a node while it restarts wait until it has heard its peers: none
    is answered by the node alone (measured before this was built: 32 of them, 46 % zero-filled)."""
    from robustdice.partitioner.zoo.data import evaluation_split
    images, _, _ = evaluation_split("digits_cnn")
    x = images[:1].numpy().astype(np.float32)
    with LocalCluster(digits_plan) as cluster:
        nh.start_cluster(cluster)
        cluster.kill(3)
        cluster.wait_until(lambda views: all(v["members"]["n3"]["state"] == "dead" for v in views[:3]), 30,
                           "n3 dead to the others")
        with NodeClient(cluster.config, "n3", cluster.key_path) as client:
            ids = [client.send_input(x) for _ in range(20)]  # queued by ZeroMQ until n3 listens
            cluster.start_node(3)
            replies = {}
            deadline = time.monotonic() + 120
            while len(replies) < len(ids) and time.monotonic() < deadline:
                msg = client.receive(1.0)
                if isinstance(msg, wire.Result):
                    replies[msg.meta["request"]["id"]] = msg.meta
        assert len(replies) == len(ids)
        bad = [m for m in replies.values()
               if "error" in m or m["participants"] != cluster.ids or m["zero_filled_fraction"] != 0.0]
        if bad:
            # Seen in loaded full-suite runs and never alone: print (pytest shows it whole, where an
            # assertion message is cut) what the answers and the nodes saw: who was released, and why.
            for m in bad[:3]:
                print("bad answer:", {k: m.get(k) for k in ("request", "participants", "counted_on",
                                                             "failed_by_stage", "latency_ms", "error")})
            for v in cluster.status(timeout_s=10.0):
                print(v.get("node"), "events:", [(e["kind"], e["peer"], e.get("detail")) for e in v.get("events", [])][-10:],
                      "counters:", v.get("counters"))
            for d in range(4):
                print(f"--- log of n{d}:", *[line for line in cluster.tail(d, 400).splitlines()
                                               if "went on without" in line or "serving" in line
                                               or "peer " in line or "WARNING" in line][-25:], sep="\n")
        assert not bad, f"{len(bad)} of {len(ids)} answers degraded; see the captured output"


def test_sd_notify_ready_watchdog_and_stopping_reach_systemd(digits_plan, tmp_path):
    notify = nh.NotifySocket(tmp_path)
    with LocalCluster(digits_plan) as cluster:
        proc = cluster.start_node(0, env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "200000"})
        ready = nh.wait_for(lambda: [m for m in notify.receive() if "READY=1" in m], 120, "READY=1")
        assert f"MAINPID={proc.pid}" in ready[0] and "STATUS=" in ready[0]
        nh.wait_for(lambda: sum("WATCHDOG=1" in m for m in notify.receive()) >= 3, 10, "three WATCHDOG=1")
        # Alone in the cluster: after the start-up grace it serves, and says so.
        nh.wait_for(lambda: [m for m in notify.receive() if m.startswith("STATUS=serving")], 30, "STATUS=serving")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    assert "STOPPING=1" in notify.receive()[-1]
    notify.close()


@pytest.mark.parametrize("method", ["robust", "nmr"])
def test_node_alone_answers_like_the_simulation_with_every_other_device_failed(tmp_path_factory, method):
    """With no other participant the engine zero-fills on its own (no per-stage trip to the
    handler): the answer must still be the partitioner's simulation of devices 0, 2, 3 failed.
    With nmr the device holds every row of every stage, so that is the plain model."""
    from robustdice.partitioner.zoo.data import evaluation_split
    digits_plan = nh.make_plan(tmp_path_factory, "digits_cnn", 4, method)
    images, _, _ = evaluation_split("digits_cnn")
    x = images[:4].numpy().astype(np.float32)
    with LocalCluster(digits_plan) as cluster:
        cluster.start_node(1)
        cluster.wait_until(lambda views: not views[1].get("unreachable"), nh.START_TIMEOUT_S, "n1 to answer status")
        with NodeClient(cluster.config, "n1", cluster.key_path) as client:
            reply = client.submit(x, timeout_s=60.0)
    assert "error" not in reply.meta, reply.meta
    assert reply.meta["participants"] == ["n1"], reply.meta
    expected = Simulation(digits_plan).simulate(torch.from_numpy(x), failed=[0, 2, 3]).numpy()
    np.testing.assert_allclose(reply.arrays[0], expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))
    if method == "nmr":
        assert reply.meta["zero_filled_fraction"] == 0.0
        with torch.inference_mode():
            plain = build_model("digits_cnn", weights="DEFAULT").eval()(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(reply.arrays[0], plain, rtol=1e-4, atol=1e-4 * float(np.abs(plain).max()))
    else:
        assert 0 < reply.meta["zero_filled_fraction"] < 1


def test_cdc_recovers_a_missing_device_exactly_on_live_nodes(tmp_path_factory):
    """Parity through the real engine and handler: with device 1 absent, every answer is still
    the plain model's (the lost slice is recovered by subtraction, nothing is zero-filled)."""
    from robustdice.partitioner.zoo.data import evaluation_split
    plan = nh.make_plan(tmp_path_factory, "digits_cnn", 4, "cdc")
    images, _, _ = evaluation_split("digits_cnn")
    x = images[:4].numpy().astype(np.float32)
    model = build_model("digits_cnn", weights="DEFAULT").eval()
    with torch.inference_mode():
        reference = model(torch.from_numpy(x)).numpy()
    with LocalCluster(plan) as cluster:
        nh.start_cluster(cluster, [0, 2, 3])
        for node in ("n0", "n3"):
            with NodeClient(cluster.config, node, cluster.key_path) as client:
                reply = client.submit(x, timeout_s=60.0)
            assert reply.meta["participants"] == ["n0", "n2", "n3"], reply.meta
            assert reply.meta["zero_filled_fraction"] == 0.0, reply.meta["zero_filled"]
            np.testing.assert_allclose(reply.arrays[0], reference, rtol=1e-4,
                                       atol=1e-4 * float(np.abs(reference).max()))


class NodeChild(enum.Enum):
    ENGINE = "engine"
    HANDLER = "handler"


@pytest.mark.slow
@pytest.mark.parametrize("victim", list(NodeChild), ids=lambda c: c.value)
def test_child_death_makes_node_exit_non_zero(digits_plan, victim):
    with LocalCluster(digits_plan) as cluster:
        nh.start_cluster(cluster, [0])  # one node is enough: its peers are simply not up
        children = nh.node_children(cluster, 0)
        assert set(children) == {"engine", "handler"}, children
        other = children["handler" if victim is NodeChild.ENGINE else "engine"]
        supervisor = cluster.procs[0]
        children[victim.value].kill()  # SIGKILL
        try:
            code = supervisor.wait(10.0)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the supervisor did not exit within 10 s of its {victim.value}'s death:\n{cluster.tail(0)}")
        assert code != 0, f"the supervisor exited with {code} after its {victim.value} was killed"
        nh.wait_for(lambda: not other.is_running() or other.status() == psutil.STATUS_ZOMBIE, 5,
                    f"the supervisor's other child ({other.pid}) to be gone")
        assert any(f"{victim.value} exited with" in line for line in nh.log_lines(cluster.logs[0])), cluster.tail(0)


class Streamer(threading.Thread):
    """Sends a frame to one node every 20 ms and counts answers, until stopped."""

    def __init__(self, cluster, node):
        super().__init__(daemon=True)
        self.cluster, self.node = cluster, node
        self.stop = threading.Event()
        self.sent = self.answered = 0

    def run(self):
        x = np.zeros((1,) + tuple(input_shape("digits_cnn")), dtype=np.float32)
        with NodeClient(self.cluster.config, self.node, self.cluster.key_path) as client:
            client.sock.sndtimeo = 100  # a node that has stopped must not block the thread
            while not self.stop.is_set():
                try:
                    client.send_input(x)
                except zmq.Again:
                    continue
                self.sent += 1
                while client.receive(0.02) is not None:
                    self.answered += 1


@pytest.mark.slow
def test_sigterm_during_stream_stops_every_node_cleanly(digits_cluster):
    """The module's cluster, stopped for good: this is the last test of the module that uses it."""
    cluster = digits_cluster
    procs = {}
    run_dirs = []
    for d in range(len(cluster.ids)):
        children = nh.node_children(cluster, d)
        assert set(children) == {"engine", "handler"}
        procs[d] = [psutil.Process(cluster.procs[d].pid)] + list(children.values())
        run_dirs.append(nh.run_dir_of(children["engine"]))
    assert all(p.is_dir() for p in run_dirs)
    streamers = [Streamer(cluster, node) for node in cluster.ids[:2]]
    for s in streamers:
        s.start()
    try:
        nh.wait_for(lambda: all(s.answered >= 10 for s in streamers), 60, "answers to the stream")
        t0 = time.monotonic()
        for d in range(len(cluster.ids)):
            cluster.procs[d].send_signal(signal.SIGTERM)
        codes = {}
        for d, proc in cluster.procs.items():
            try:
                codes[d] = proc.wait(max(0.1, t0 + nh.STOP_BUDGET_S - time.monotonic()))
            except subprocess.TimeoutExpired:
                codes[d] = f"still running {nh.STOP_BUDGET_S} s after SIGTERM"
        elapsed = time.monotonic() - t0
    finally:
        for s in streamers:
            s.stop.set()
        for s in streamers:
            s.join(10)
    assert codes == {d: 0 for d in cluster.procs}, (codes, [cluster.tail(d) for d in cluster.procs])
    assert elapsed <= nh.STOP_BUDGET_S
    left = [p for ps in procs.values() for p in ps if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, left
    assert not nh.processes_mentioning(str(cluster.peers_path))
    assert not [p for p in run_dirs if p.exists()], run_dirs
