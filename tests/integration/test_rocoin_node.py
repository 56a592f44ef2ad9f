"""A rocoin plan on 4 live nodes (groups n0-n1 and n2-n3) answers exactly as its simulation
(RocoinCluster.simulate) with nothing failed, with one node of a group killed (its replica gives
the partition: still exact), with the whole group killed (its partition filled with the
teacher's mean, the answer saying which devices were missing and how much was filled), and
after both come back; every frame is one gather. And `robustdice-node --check` takes the plan."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from robustdice.node.client import NodeClient
from robustdice.node.lab.localcluster import LocalCluster
from robustdice.partitioner.zoo.data import evaluation_split
from robustdice.partitioner.core.runtime import Cluster

sys.path.insert(0, str(Path(__file__).resolve().parent))
import node_helpers as nh  # noqa: E402

pytestmark = [pytest.mark.usefixtures("leak_check")]

DEVICES = 4


@pytest.fixture(scope="module")
def rocoin_plan(tmp_path_factory):
    """digits_cnn distilled into 2 students (groups of 2 devices) for one epoch: seconds."""
    from robustdice.partitioner.core.partition import PartitionRequest
    from robustdice.partitioner.core.rocoin_plan import RocoinOptions, partition_rocoin
    out = tmp_path_factory.mktemp("rocoin-node") / "plan"
    partition_rocoin(PartitionRequest("digits_cnn", DEVICES, "rocoin", out, fill="mean", show_progress=False,
                                      rocoin=RocoinOptions(epochs=1)))
    return out


@pytest.fixture(scope="module")
def digits():
    images, _, _ = evaluation_split("digits_cnn")
    return images[:16].numpy().astype(np.float32)


def dead_to_the_others(cluster, dead):
    """A predicate: every other node counts the nodes in `dead` dead and no longer on new frames."""
    names = {cluster.ids[d] for d in dead}

    def check(views):
        up = [v for v in views if not v.get("unreachable") and v["node"] not in names]
        return len(up) == DEVICES - len(dead) and all(
            v["members"][n]["state"] == "dead" and n not in v.get("participants", ()) for v in up for n in names)
    return check


def answer(cluster, node, x):
    with NodeClient(cluster.config, node, cluster.key_path) as client:
        reply = client.submit(x, timeout_s=60.0)
    assert "error" not in reply.meta, reply.meta
    return reply.meta, reply.arrays[0]


@pytest.mark.timeout(600)
def test_rocoin_on_live_nodes_equals_its_simulation_under_kill_and_restart(rocoin_plan, digits):
    sim = Cluster(rocoin_plan)
    spec = sim.plan.rocoin
    layer = spec.feature_layer
    assert [g.devices for g in spec.groups] == [(0, 1), (2, 3)]
    x = torch.from_numpy(digits)
    healthy = sim.simulate(x).numpy()
    group_lost = sim.simulate(x, (0, 1)).numpy()
    assert np.abs(group_lost - healthy).max() > 1e-3   # else the lost group's phase would prove nothing
    filled = len(spec.groups[0].channels) / spec.feature_shape[0]

    def close(got, expected):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))
        assert (got.argmax(1) == expected.argmax(1)).all()

    with LocalCluster(rocoin_plan) as cluster:
        nh.start_cluster(cluster)
        meta, logits = answer(cluster, "n0", digits)
        close(logits, healthy)
        # one stage gathered: the answer's record has one entry, with nothing missing or filled
        assert meta["participants"] == cluster.ids and meta["zero_filled"] == {layer: 0.0}
        assert meta["failed_by_stage"] == {} and meta["degraded"] is False

        cluster.kill(1)   # n0 still gives group 0's partition
        cluster.wait_until(dead_to_the_others(cluster, [1]), 60, "n1 dead to the others")
        for origin in ("n0", "n2"):
            meta, logits = answer(cluster, origin, digits)
            close(logits, healthy)
            assert meta["participants"] == ["n0", "n2", "n3"] and meta["zero_filled"] == {layer: 0.0}, meta
            assert meta["failed_by_stage"] == {layer: ["n1"]}, meta

        cluster.kill(0)   # group 0 wholly lost: its channels are the teacher's mean
        cluster.wait_until(dead_to_the_others(cluster, [0, 1]), 60, "n0 and n1 dead to the others")
        for origin in ("n2", "n3"):
            meta, logits = answer(cluster, origin, digits)
            close(logits, group_lost)
            assert meta["participants"] == ["n2", "n3"], meta
            assert meta["failed_by_stage"] == {layer: ["n0", "n1"]} and meta["degraded"] is True, meta
            assert meta["zero_filled"] == {layer: pytest.approx(filled)}, meta
            assert meta["zero_filled_fraction"] == pytest.approx(filled)

        cluster.start_node(0)
        cluster.start_node(1)
        cluster.wait_until(cluster.all_alive(), nh.START_TIMEOUT_S, "n0 and n1 back for every node")
        for origin in ("n1", "n3"):
            meta, logits = answer(cluster, origin, digits)
            close(logits, healthy)
            assert meta["participants"] == cluster.ids and meta["zero_filled"] == {layer: 0.0}, meta
        views = cluster.status(timeout_s=10.0, request={"zero_log": True})
    # What each node filled, as (frame, stage, channels): n2 and n3 filled group 0's channels, all
    # at the one stage there is.
    logged = [entry for v in views for entry in v.get("zero_log", [])]
    assert {(stage, n) for _, stage, n in logged} == {(0, len(spec.groups[0].channels))}, logged


@pytest.mark.timeout(300)
def test_robustdice_node_check_runs_a_signed_rocoin_plan(rocoin_plan, tmp_path):
    (tmp_path / "cluster").mkdir()
    cluster = LocalCluster(rocoin_plan, tmp_path / "cluster")   # writes peers.yaml and signs the plan
    try:
        proc = subprocess.run([sys.executable, "-m", "robustdice.node.supervisor", "--peers", str(cluster.peers_path),
                               "--id", "n2", "--check"], capture_output=True, text=True, timeout=240)
    finally:
        cluster.close()
    assert proc.returncode == 0, proc.stderr
    assert "rocoin, signed by the operator" in proc.stdout and "logits [2, 10]" in proc.stdout, proc.stdout
