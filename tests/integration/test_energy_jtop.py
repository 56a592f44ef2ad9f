"""Energy per image on a (stand-in) Jetson: the node's jtop path, live.

tests/integration/jtop_standin/ implements the part of jetson-stats 4.2's `jtop` the node uses;
with it first on PYTHONPATH every node reads a constant 5 W board. Without it (this machine has
no jtop service) the figures are absent, never invented.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import node_helpers as nh  # noqa: E402
from test_node_metrics import get, scraped_when  # noqa: E402

from robustdice.node.client import NodeClient  # noqa: E402
from robustdice.node.lab.localcluster import LocalCluster  # noqa: E402
from robustdice.partitioner.zoo.models import input_shape  # noqa: E402

pytestmark = [pytest.mark.usefixtures("leak_check"), pytest.mark.timeout(240)]
STANDIN = Path(__file__).resolve().parent / "jtop_standin"
POWER_MW = 5000.0


def standin_env():
    path = os.pathsep.join([str(STANDIN)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    return {"PYTHONPATH": path, "ROBUSTDICE_TEST_POWER_MW": str(POWER_MW)}


@pytest.mark.slow
def test_a_jetson_node_integrates_its_power_into_joules_per_frame(tmp_path_factory):
    plan = nh.make_plan(tmp_path_factory, "digits_cnn", 2, "lop")
    x = np.zeros((1,) + tuple(input_shape("digits_cnn")), dtype=np.float32)
    with LocalCluster(plan, metrics=True) as cluster:
        for d in range(2):
            cluster.start_node(d, env=standin_env())
        cluster.wait_until(cluster.all_alive(), nh.START_TIMEOUT_S, "both nodes to count on each other")
        with NodeClient(cluster.config, "n0", cluster.key_path) as client:
            for _ in range(5):
                assert "error" not in client.submit(x, timeout_s=30).meta

        def integrated():
            views = cluster.status(timeout_s=10)
            return views if all((v.get("energy_covered_s") or 0) >= 2.0 for v in views) else None
        views = nh.wait_for(integrated, 30, "two seconds of power readings on both nodes")
        for v in views:
            # A constant 5 W: the trapezoid gives exactly 5 J per second covered.
            assert v["power"] == "5.00 W" and v["energy_j"] == pytest.approx(5.0 * v["energy_covered_s"])
        assert sum(v["answered"] for v in views) == 5
        found = scraped_when(cluster.metrics_url(0), lambda f: (get(f, "robustdice_energy_joules_total") or 0) > 0,
                             "robustdice_energy_joules_total on n0")
        assert get(found, "robustdice_power_watts") == 5.0 and get(found, "robustdice_power_available") == 1
        status = subprocess.run(nh.robustdice_cli() + ["status", "--peers", str(cluster.peers_path)],
                                capture_output=True, text=True, timeout=60)
        assert "energy per answered frame, cluster-wide:" in status.stdout and " J (over 5 answered" in status.stdout


@pytest.mark.slow
def test_off_jetson_the_energy_is_absent_and_says_why(tmp_path_factory):
    plan = nh.make_plan(tmp_path_factory, "digits_cnn", 2, "lop")
    with LocalCluster(plan, metrics=True) as cluster:
        nh.start_cluster(cluster)
        views = cluster.status(timeout_s=10)
        assert all(v["energy_j"] is None and v["power"] == "n/a" and v["power_note"] for v in views)
        found = scraped_when(cluster.metrics_url(0), lambda f: get(f, "robustdice_power_available") == 0,
                             "power_available 0 on n0")
        assert get(found, "robustdice_energy_joules_total") is None
        status = subprocess.run(nh.robustdice_cli() + ["status", "--peers", str(cluster.peers_path)],
                                capture_output=True, text=True, timeout=60)
        assert "cluster-wide: n/a (not available: no power reading on n0, n1)" in status.stdout
