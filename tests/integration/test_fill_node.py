"""Live nodes on a mean+bn plan answer exactly as the simulation of the same failed set.

A mean+bn plan fills a lost neuron with its expected value and normalises with BatchNorm
statistics recalibrated for the failed set it runs under. The engine learns that set from each
gather (the devices whose slices did not come) and must hand it to the runtime: an engine that
ignored it would fill the lost neurons but keep the no-failure statistics, which the second
check below tells apart.
"""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from robustdice.node.client import NodeClient
from robustdice.node.lab.localcluster import LocalCluster
from robustdice.partitioner.core.runtime import Cluster
from robustdice.partitioner.zoo.data import evaluation_split

sys.path.insert(0, str(Path(__file__).resolve().parent))
import node_helpers as nh  # noqa: E402

pytestmark = [pytest.mark.usefixtures("leak_check"), pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def mean_bn_plan(tmp_path_factory):
    return nh.make_plan(tmp_path_factory, "digits_cnn", 4, "robust", fill="mean+bn")


@pytest.fixture(scope="module")
def digits():
    images, _, _ = evaluation_split("digits_cnn")
    return images[:16].numpy().astype(np.float32)


@pytest.mark.parametrize("running", [(0, 1, 2), (0, 1)], ids=["n3-down", "n2-n3-down"])
def test_mean_bn_plan_on_live_nodes_equals_its_simulation(mean_bn_plan, digits, running):
    failed = sorted(set(range(4)) - set(running))
    x = torch.from_numpy(digits)
    sim = Cluster(mean_bn_plan)
    expected = sim.simulate(x, failed=failed).numpy()

    # What an engine would compute that kept the no-failure statistics: it must differ, or this
    # test could not see the failed set being dropped.
    for runtime in sim.devices:
        runtime.params = lambda i, failed=(), own=runtime.params: own(i)   # ignores `failed`
    unrecalibrated = sim.simulate(x, failed=failed).numpy()
    assert np.abs(unrecalibrated - expected).max() > 1e-3

    with LocalCluster(mean_bn_plan) as cluster:
        nh.start_cluster(cluster, running)
        with NodeClient(cluster.config, "n0", cluster.key_path) as client:
            reply = client.submit(digits, timeout_s=30.0)
    assert "error" not in reply.meta, reply.meta
    assert reply.meta["participants"] == [f"n{d}" for d in running], reply.meta
    np.testing.assert_allclose(reply.arrays[0], expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))
