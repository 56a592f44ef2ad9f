"""A new plan rolled out to live nodes while frames flow (node/plans.py, node/rollout.py).

Every frame is answered, on the plan it was admitted under (its answer equals that plan's
simulation), none zero-filled with nothing failed; a node that fails in the middle of the
roll-out rejoins on the plan the cluster runs, and a node restarted after it starts on that plan.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from robustdice.node.cli import main as cli_main
from robustdice.node.client import CameraStream, NodeClient, ask_all
from robustdice.node.client_cli import cmd_status
from robustdice.node.errors import NodeError
from robustdice.node.lab.localcluster import LocalCluster
from robustdice.node.plans import ROLLOUT_PREPARE, ROLLOUT_SWITCH
from robustdice.node.rollout import rollout
from robustdice.partitioner.core.plan import load_plan
from robustdice.partitioner.core.runtime import Cluster
from robustdice.partitioner.zoo.data import evaluation_split

sys.path.insert(0, str(Path(__file__).resolve().parent))
import node_helpers as nh  # noqa: E402

pytestmark = [pytest.mark.usefixtures("leak_check"), pytest.mark.timeout(300)]

RATE_FPS = 8          # per camera, two cameras: a steady stream on 2 cores
# A camera's send time and the node's admission time differ by the queueing, up to a loop that a
# loaded 2-core machine left unscheduled for a few hundred ms: frames this close to the switch may
# run on either plan (each is still checked against its own plan's simulation).
SWITCH_SLACK_MS = 1000
# The old plan retires a frame timeout after the switch: shorter than the default 10 s, so that
# the test does not wait for nothing (frames here take tens of ms).
FRAME_TIMEOUT_MS = 3000


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    # The new plan also brings other weights (an operator rolls out a retrained model): both
    # plans are exact with nothing failed, so only different weights tell their answers apart.
    old = nh.make_plan(tmp_path_factory, "digits_cnn", 4, "robust")
    new = nh.make_plan(tmp_path_factory, "digits_cnn", 4, "robust+cdc", weights="none", seed=7)
    return old, new


@pytest.fixture(scope="module")
def digits():
    images, _, _ = evaluation_split("digits_cnn")
    return images[:16].numpy().astype(np.float32)


def simulated(plan_dir, x):
    """Per sample, the logits of the plan's simulation with nothing failed."""
    return Cluster(plan_dir).simulate(torch.from_numpy(x)).numpy()


def test_a_plan_rolled_out_under_a_steady_stream_answers_every_frame_on_its_own_plan(plans, digits, capsys):
    old, new = plans
    old_hash, new_hash = load_plan(old).plan_hash, load_plan(new).plan_hash
    assert old_hash != new_hash
    expected = {old_hash: simulated(old, digits), new_hash: simulated(new, digits)}
    # The two plans must answer differently somewhere, or the check below could not tell them apart.
    assert np.abs(expected[old_hash] - expected[new_hash]).max() > 0.1
    with LocalCluster(old, frame_timeout_ms=FRAME_TIMEOUT_MS) as cluster:
        cluster.sign(new)
        nh.start_cluster(cluster)
        cameras = [CameraStream(cluster.config, node, cluster.key_path, digits, RATE_FPS) for node in ("n0", "n2")]
        for camera in cameras:
            camera.start()
        try:
            nh.wait_for(lambda: all(sum(r["meta"] is not None for r in c.records) >= 8 for c in cameras), 60,
                        "8 answers per camera on the old plan")
            capsys.readouterr()   # the command as a user runs it (in this process: argparse, the JSON line)
            assert cli_main(["rollout", "--peers", str(cluster.peers_path), "--plan", str(new), "--key",
                             str(cluster.key_path), "--switch-in-ms", "1000", "--json"]) == 0
            done = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
            assert done["plan_hash"] == new_hash and done["nodes"] == cluster.ids
            nh.wait_for(lambda: all(sum((r["meta"] or {}).get("plan_hash") == new_hash for r in c.records) >= 8
                                    for c in cameras), 60, "8 answers per camera on the new plan")
        finally:
            for camera in cameras:
                camera.stop.set()
            for camera in cameras:
                camera.join(30)
        views = cluster.status()
    switch_ms = done["switch_ms"]
    on = {old_hash: 0, new_hash: 0}
    for camera in cameras:
        assert camera.records
        for r in camera.records:
            meta = r["meta"]
            assert meta is not None, f"a frame sent at {r['sent_s']:.3f} to {camera.node_id} was never answered"
            assert "error" not in meta, meta
            plan = meta["plan_hash"]
            on[plan] += 1
            sent_ms = r["sent_s"] * 1000
            if sent_ms < switch_ms - SWITCH_SLACK_MS:
                assert plan == old_hash, (sent_ms - switch_ms, meta)
            elif sent_ms > switch_ms + SWITCH_SLACK_MS:
                assert plan == new_hash, (sent_ms - switch_ms, meta)
            assert meta["zero_filled_fraction"] == 0 and not meta["degraded"], meta
            np.testing.assert_allclose(r["logits"], expected[plan][r["sample"]: r["sample"] + 1], rtol=1e-4,
                                       atol=1e-4 * float(np.abs(expected[plan]).max()))
    assert on[old_hash] >= 16 and on[new_hash] >= 16, on
    for v in views:   # the old plan is gone everywhere, and no node was asked for a plan it lacked
        assert v["plan_hash"] == new_hash and v["next_plan"] is None, v
        assert v["retired_plans"] == [old_hash] and v["switch_ms"] == switch_ms
        assert v["counters"].get("input_unknown_plan", 0) == 0, v["counters"]


def test_a_node_that_fails_mid_rollout_rejoins_on_the_plan_the_cluster_runs(plans, digits, capsys):
    old, new = plans
    new_hash = load_plan(new).plan_hash
    expected = simulated(new, digits[:2])
    with LocalCluster(old, frame_timeout_ms=FRAME_TIMEOUT_MS) as cluster:
        nh.start_cluster(cluster)
        # Not signed by this cluster's operator: every node refuses it, and nothing changes.
        with pytest.raises(NodeError, match="n0 refused the plan: .*sig"):
            rollout(cluster.config, cluster.key_path, new, timeout_s=30, say=lambda _: None)
        assert all(v["next_plan"] is None and v["rollout_error"] is None for v in cluster.status())
        cluster.sign(new)
        # The roll-out's steps by hand, so that n3 dies between the prepare and the switch. First a
        # prepare that is cancelled: the command with the current plan's folder drops it everywhere.
        for attempt in ("cancelled", "kept"):
            replies = ask_all(cluster.config, cluster.key_path, ROLLOUT_PREPARE, {"plan_dir": str(new)}, 5.0)
            assert all(v.get("ok") for v in replies), replies
            cluster.wait_until(lambda views: all((v.get("next_plan") or {}).get("ready") for v in views), 60,
                               "every node to load the new plan")
            if attempt == "cancelled":
                assert rollout(cluster.config, cluster.key_path, old, timeout_s=30, say=lambda _: None)["switch_ms"] is None
                assert all(v["next_plan"] is None for v in cluster.status())
        capsys.readouterr()
        cmd_status(argparse.Namespace(peers=cluster.peers_path, key=str(cluster.key_path), timeout=5.0, json=False))
        shown = capsys.readouterr().out
        assert shown.count(f"roll-out: plan {new_hash[:12]} loaded beside it; frames admitted from not agreed yet") == 4
        cluster.kill(3)
        switch_ms = int(time.time() * 1000) + 500
        replies = ask_all(cluster.config, cluster.key_path, ROLLOUT_SWITCH, {"plan_hash": new_hash,
                                                                             "switch_ms": switch_ms}, 5.0, nodes=["n0"])
        assert replies[0].get("ok"), replies   # the others learn the switch from n0's heartbeats
        cluster.wait_until(lambda views: all(v.get("switch_ms") == switch_ms for v in views[:3]), 30,
                           "n1 and n2 to adopt n0's switch time")
        # n3 comes back with the configured old plan and no record of the switch it never heard:
        # it learns the plan from its peers and joins the frames.
        cluster.start_node(3)
        cluster.wait_until(lambda views: all(v.get("plan_hash") == new_hash and v.get("next_plan") is None
                                             for v in views), 90, "every node to run only the new plan")
        cluster.wait_until(cluster.all_alive(), 60, "every node to count on every other")
        with NodeClient(cluster.config, "n0", cluster.key_path) as client:
            reply = client.submit(digits[:2], timeout_s=30.0)
        assert "error" not in reply.meta, reply.meta
        assert reply.meta["plan_hash"] == new_hash and reply.meta["participants"] == cluster.ids, reply.meta
        np.testing.assert_allclose(reply.arrays[0], expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))
        assert "roll-out: loading plan" in cluster.tail(3, 400)   # it adopted the plan, as it was not told
        # n1 restarted after the switch starts on the new plan at once, from its state record.
        cluster.kill(1)
        cluster.start_node(1)
        cluster.wait_until(cluster.all_alive(), 60, "n1 back")
        assert "which a roll-out brought" in cluster.tail(1, 400)
        assert cluster.status()[1]["plan_hash"] == new_hash
