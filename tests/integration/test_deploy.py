"""deploy/site.yml run for real on this machine: two "boards" under two roots, then their nodes.

`robustdice inventory --local ROOT` puts every host under ROOT/<id>/ with a local connection.
The play runs without building the package (the boards use this venv) and without systemctl
(systemd is not PID 1 here); everything else is the real deploy: one shard and one key per
board, the shared peers.yaml, the unit, and `robustdice-node --check` on the board's files.
"""
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import node_helpers as nh  # noqa: E402

from robustdice.mesh.config import load_peers  # noqa: E402
from robustdice.node.client import NodeClient, status_all  # noqa: E402
from robustdice.node.localcluster import LocalCluster  # noqa: E402
from robustdice.partitioner.data import evaluation_split  # noqa: E402
from robustdice.partitioner.models import build_model  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PLAYBOOK = shutil.which("ansible-playbook", path=str(BIN)) or shutil.which("ansible-playbook")

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(PLAYBOOK is None, reason="ansible-core is not installed (test extra, Python >= 3.11)")]


def play(inventory: Path):
    proc = subprocess.run(
        [PLAYBOOK, "-i", str(inventory), str(REPO / "deploy" / "site.yml"),
         "-e", "robustdice_install_package=false", "-e", f"robustdice_venv={sys.prefix}",
         "-e", f"ansible_python_interpreter={sys.executable}"],
        capture_output=True, text=True, timeout=240, env=dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return {line.split(":")[0].strip(): line for line in proc.stdout.splitlines() if "ok=" in line and "changed=" in line}


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    plan = nh.make_plan(tmp_path_factory, "digits_cnn", 2, "lop")
    tmp = tmp_path_factory.mktemp("deploy")
    # LocalCluster only writes the controller's keys and peers.yaml here (free loopback ports).
    controller = LocalCluster(plan, tmp / "controller")
    out = subprocess.run([str(BIN / "robustdice"), "inventory", "--peers", str(controller.peers_path),
                          "--out", str(tmp / "inventory"), "--local", str(tmp / "boards")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    first = play(tmp / "inventory" / "inventory.yaml")
    second = play(tmp / "inventory" / "inventory.yaml")
    yield controller, tmp / "boards", first, second
    controller.close()


def test_play_lays_out_each_board_and_is_idempotent(deployed):
    _, boards, first, second = deployed
    assert set(first) == set(second) == {"n0", "n1"}
    for node in ("n0", "n1"):
        assert "changed=0" not in first[node], first[node]
        assert "changed=0" in second[node] and "failed=0" in second[node], second[node]
    for device, node in enumerate(("n0", "n1")):
        etc = boards / node / "etc" / "robustdice"
        assert sorted(p.name for p in (etc / "plan" / "shards").iterdir()) == [f"{device}.pt"]
        assert sorted(p.name for p in (etc / "keys").iterdir()) == [f"{node}.key_secret"]
        assert (etc / "keys" / f"{node}.key_secret").stat().st_mode & 0o777 == 0o600
        unit = boards / node / "etc" / "systemd" / "system"
        assert (unit / "robustdice-node.service").read_text() == (REPO / "systemd" / "robustdice-node.service").read_text()
        assert "ROBUSTDICE_THREADS=0" in (unit / "robustdice-node.service.d" / "10-deploy.conf").read_text()
    assert (boards / "n0" / "etc/robustdice/peers.yaml").read_text() == (boards / "n1" / "etc/robustdice/peers.yaml").read_text()


def test_deployed_boards_run_the_plan(deployed):
    controller, boards, _, _ = deployed
    procs, logs = {}, {}
    try:
        for node in ("n0", "n1"):
            logs[node] = boards / f"{node}.log"
            with open(logs[node], "wb") as log:  # a file, not a pipe nobody reads: no stall on a full pipe
                procs[node] = subprocess.Popen(
                    [str(BIN / "robustdice-node"), "--peers", str(boards / node / "etc/robustdice/peers.yaml"),
                     "--id", node, "--threads", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        config = load_peers(boards / "n0" / "etc/robustdice/peers.yaml")

        def both_count_on_each_other():
            for node, proc in procs.items():
                assert proc.poll() is None, f"{node} exited: {logs[node].read_text()[-2000:]}"
            views = status_all(config, controller.key_path, 1.0)
            return all(not v.get("unreachable") and v.get("participants") == ["n0", "n1"] for v in views)
        nh.wait_for(both_count_on_each_other, nh.START_TIMEOUT_S, "the deployed nodes to count on each other")

        images, _, _ = evaluation_split("digits_cnn")
        x = images[:3].numpy().astype(np.float32)
        with torch.inference_mode():
            reference = build_model("digits_cnn", weights="DEFAULT").eval()(torch.from_numpy(x)).numpy()
        with NodeClient(config, "n1", controller.key_path) as client:
            reply = client.submit(x, timeout_s=60.0)
        assert reply.meta["participants"] == ["n0", "n1"] and reply.meta["zero_filled_fraction"] == 0.0, reply.meta
        np.testing.assert_allclose(reply.arrays[0], reference, rtol=1e-4, atol=1e-4 * float(np.abs(reference).max()))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for node, proc in procs.items():
            assert proc.wait(timeout=20) == 0, f"{node}: {logs[node].read_text()[-2000:]}"
