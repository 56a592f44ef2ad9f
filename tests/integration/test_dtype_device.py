"""Half precision and the compute device (issue 11). float16 runs on the CPU too, so these tests
run everywhere; the CUDA ones are skipped, with the reason, where torch sees no GPU.

Tolerance: float16 carries about 3 significant digits (a unit in the last place is 2^-10 of the
value), and errors add up over the stages, so float16 logits are compared with the float32
model's at rtol 2e-2 and atol 2e-2 of the largest logit; top-1 is compared exactly and the
differences counted."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import node_helpers as nh  # noqa: E402

from robustdice.node.client import NodeClient  # noqa: E402
from robustdice.node.lab.localcluster import LocalCluster  # noqa: E402
from robustdice.partitioner.core.runtime import Cluster  # noqa: E402
from robustdice.partitioner.zoo.data import evaluation_split  # noqa: E402

pytestmark = [pytest.mark.usefixtures("leak_check"), pytest.mark.timeout(240)]

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="torch sees no CUDA device here (no GPU on this machine)")
RTOL = 2e-2


@pytest.fixture(scope="module")
def digits():
    images, labels, _ = evaluation_split("digits_cnn")
    return images, labels


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=RTOL * float(np.abs(b).max()))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_float16_simulation_changes_top1_by_at_most_0_2_points(digits_plan, digits, device):
    images, labels = digits
    full = Cluster(digits_plan).simulate(images)
    half = Cluster(digits_plan, device=device, dtype=torch.float16).simulate(images)
    assert half.dtype == torch.float32 and half.device.type == "cpu"
    close(half.numpy(), full.numpy())
    changed = int((half.argmax(1) != full.argmax(1)).sum())
    acc_full = float((full.argmax(1) == labels).float().mean())
    acc_half = float((half.argmax(1) == labels).float().mean())
    assert abs(acc_half - acc_full) <= 0.002, (acc_full, acc_half, changed)
    # Under failures too: float16 follows float32 through the zero-fill.
    close(Cluster(digits_plan, device=device, dtype=torch.float16).simulate(images[:32], failed=[2]).numpy(),
          Cluster(digits_plan).simulate(images[:32], failed=[2]).numpy())


def test_a_float16_cluster_answers_as_its_simulation_with_half_the_bytes(digits_plan, digits):
    images, _ = digits
    x = images[:4].numpy()
    expected = Cluster(digits_plan, dtype=torch.float16).simulate(torch.from_numpy(x)).numpy()
    sent = {}
    for dtype in ("float32", "float16"):
        with LocalCluster(digits_plan, dtype=dtype) as cluster:
            nh.start_cluster(cluster)
            with NodeClient(cluster.config, "n1", cluster.key_path) as client:
                for k in range(5):
                    reply = client.submit(x, timeout_s=60.0)
                    assert "error" not in reply.meta and reply.meta["zero_filled_fraction"] == 0.0, reply.meta
            if dtype == "float16":
                close(reply.arrays[0], expected)
            # Every node has settled the 5 frames: done, or dropped at the origin's heartbeat once
            # the origin finished them on the replicas' copies (a node that lagged).
            views = cluster.wait_until(lambda vs: all(v.get("frames_done", 0) + v.get("frames_pruned", 0) >= 5
                                                      for v in vs), 30, "5 frames settled on every node")
            sent[dtype] = sum(v["counters"].get("slice_bytes_sent", 0) for v in views)
            assert all(v["engine"]["dtype"] == dtype for v in views)
    # The payload halves; ids and headers do not, so the ratio sits a little above one half.
    assert 0.45 < sent["float16"] / sent["float32"] < 0.6, sent


def test_a_node_on_another_wire_dtype_is_refused_naming_the_dtypes(digits_plan):
    with LocalCluster(digits_plan) as cluster:
        nh.start_cluster(cluster, [0, 1, 2])
        cluster.start_node(3, extra=["--dtype", "float16"])
        views = cluster.wait_until(lambda vs: not vs[3].get("unreachable") and all(
            v["members"]["n3"]["state"] == "refused" for v in vs[:3]), 90, "n0..n2 to refuse n3")
        refused = [e for e in views[0]["events"] if e["kind"] == "refused" and e["peer"] == "n3"]
        assert refused and "wire dtype mismatch: it sends float16 slices, this node sends float32" \
            in refused[0]["detail"], refused
        views = cluster.wait_until(lambda vs: vs[3].get("refused"), 30, "n3 to know it is refused")
        assert "wire dtype mismatch" in views[3]["refused"] and "plan mismatch" not in views[3]["refused"]


@needs_cuda
def test_a_cuda_cluster_answers_as_the_simulation(digits_plan, digits):
    images, _ = digits
    x = images[:4].numpy()
    expected = Cluster(digits_plan).simulate(torch.from_numpy(x)).numpy()
    with LocalCluster(digits_plan) as cluster:
        for d in range(4):
            cluster.start_node(d, extra=["--compute", "cuda"])
        cluster.wait_until(cluster.all_alive(), nh.START_TIMEOUT_S, "every node to count on every other")
        with NodeClient(cluster.config, "n0", cluster.key_path) as client:
            reply = client.submit(x, timeout_s=60.0)
        np.testing.assert_allclose(reply.arrays[0], expected, rtol=1e-3, atol=1e-3 * float(np.abs(expected).max()))
        views = cluster.status()
        assert all(v["engine"]["device"].startswith("cuda") and v["engine"]["gpu_memory_bytes"] > 0 for v in views)
