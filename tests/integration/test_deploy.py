"""deploy/site.yml run for real on this machine: two "boards" under two roots, then their nodes.

`robustdice inventory --local ROOT` puts every host under ROOT/<id>/ with a local connection.
The play runs without building the package (the boards use this venv) and without systemctl
(systemd is not PID 1 here); everything else is the real deploy: one shard and one key per
board, the shared peers.yaml, the unit, and `robustdice-node --check` on the board's files.
Board n0 also gets an extra wheel (robustdice_extra_packages), made here and installed into this
venv, from which the fixture removes it again.

Run as root (as here), the service user is `nobody` (the play creates its user only under /),
so that the owners it sets can be told apart: root's code and config, the service user's key
and state directory (docs/security-board.md).
"""
import base64
import grp
import hashlib
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import node_helpers as nh  # noqa: E402

from robustdice.mesh.config import load_peers  # noqa: E402
from robustdice.node.client import NodeClient, status_all  # noqa: E402
from robustdice.node.lab.localcluster import LocalCluster  # noqa: E402
from robustdice.partitioner.zoo.data import evaluation_split  # noqa: E402
from robustdice.partitioner.zoo.models import build_model  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PLAYBOOK = shutil.which("ansible-playbook", path=str(BIN)) or shutil.which("ansible-playbook")
PROBE = "rd_deploy_probe"  # the extra package: a name nothing else uses
# Who should own what on a board. Run as root, the service user is one that root is not; run as
# anyone else, the play can only give everything to that user.
ADMIN = pwd.getpwuid(os.geteuid())
SERVICE = pwd.getpwnam("nobody") if os.geteuid() == 0 else ADMIN
SERVICE_GROUP = grp.getgrgid(SERVICE.pw_gid)

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(PLAYBOOK is None, reason="ansible-core is not installed (test extra, Python >= 3.11)")]


def play(inventory: Path, *extra: str):
    proc = subprocess.run(
        [PLAYBOOK, "-i", str(inventory), str(REPO / "deploy" / "site.yml"), *extra,
         "-e", "robustdice_install_package=false", "-e", f"robustdice_venv={sys.prefix}",
         "-e", f"ansible_python_interpreter={sys.executable}",
         "-e", f"robustdice_user={SERVICE.pw_name}", "-e", f"robustdice_group={SERVICE_GROUP.gr_name}"],
        capture_output=True, text=True, timeout=240, env=dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0",
                                                           ANSIBLE_CONFIG=str(REPO / "deploy" / "ansible.cfg")))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return {line.split(":")[0].strip(): line for line in proc.stdout.splitlines() if "ok=" in line and "changed=" in line}


def probe_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel (zip, metadata, RECORD), made without a build backend."""
    files = {f"{PROBE}/__init__.py": "VALUE = 42\n",
             f"{PROBE}-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: rd-deploy-probe\nVersion: 0.1\n",
             f"{PROBE}-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
                     f"{len(text.encode())}\n" for name, text in files.items())
    files[f"{PROBE}-0.1.dist-info/RECORD"] = record + f"{PROBE}-0.1.dist-info/RECORD,,\n"
    path = folder / f"{PROBE}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
    return path


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
    inventory_path = tmp / "inventory" / "inventory.yaml"
    inventory = yaml.safe_load(inventory_path.read_text())
    # One board only: both share this venv, and two pips must not install into it at once.
    inventory["robustdice_nodes"]["hosts"]["n0"]["robustdice_extra_packages"] = [str(probe_wheel(tmp))]
    inventory_path.write_text(yaml.safe_dump(inventory))
    try:
        first = play(inventory_path)
        # Idempotence on n0, the board with every optional task (the extra wheel): a play costs
        # ~50 s of CPU here, and n1 runs the same tasks with other values.
        second = play(inventory_path, "--limit", "n0")
        yield controller, tmp / "boards", first, second
    finally:
        controller.close()
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", "rd-deploy-probe"],
                       capture_output=True, timeout=120)


def test_play_lays_out_each_board_and_is_idempotent(deployed):
    _, boards, first, second = deployed
    assert set(first) == {"n0", "n1"} and set(second) == {"n0"}
    for node in ("n0", "n1"):
        assert "changed=0" not in first[node], first[node]
    assert "changed=0" in second["n0"] and "failed=0" in second["n0"], second["n0"]
    for device, node in enumerate(("n0", "n1")):
        etc = boards / node / "etc" / "robustdice"
        assert sorted(p.name for p in (etc / "plan" / "shards").iterdir()) == [f"{device}.pt"]
        assert sorted(p.name for p in (etc / "keys").iterdir()) == [f"{node}.key_secret"]
        assert (etc / "keys" / f"{node}.key_secret").stat().st_mode & 0o777 == 0o600
        unit = boards / node / "etc" / "systemd" / "system"
        assert (unit / "robustdice-node.service").read_text() == (REPO / "systemd" / "robustdice-node.service").read_text()
        assert "ROBUSTDICE_THREADS=0" in (unit / "robustdice-node.service.d" / "10-deploy.conf").read_text()
        sysctl = boards / node / "etc" / "sysctl.d" / "60-robustdice.conf"
        assert "net.ipv4.neigh.*.retrans_time_ms = 250" in sysctl.read_text()
    assert (boards / "n0" / "etc/robustdice/peers.yaml").read_text() == (boards / "n1" / "etc/robustdice/peers.yaml").read_text()


def board_layout(node: str, device: int):
    """{path under the board's root: (owner uid, group gid, mode)} for everything the play writes."""
    admin, service = (ADMIN.pw_uid, ADMIN.pw_gid), (SERVICE.pw_uid, SERVICE_GROUP.gr_gid)
    layout = {
        "opt/robustdice": (*admin, 0o755),
        "etc/robustdice": (*admin, 0o755),
        "etc/robustdice/peers.yaml": (*admin, 0o644),
        "etc/robustdice/plan": (*admin, 0o755),
        "etc/robustdice/plan/plan.json": (*admin, 0o644),
        "etc/robustdice/plan/shards": (*admin, 0o755),
        f"etc/robustdice/plan/shards/{device}.pt": (*admin, 0o644),
        # root's, listable by the service group only; the key itself the service user's alone
        "etc/robustdice/keys": (ADMIN.pw_uid, SERVICE_GROUP.gr_gid, 0o750),
        f"etc/robustdice/keys/{node}.key_secret": (*service, 0o600),
        "var/lib/robustdice": (*service, 0o700),
        "etc/systemd/system/robustdice-node.service": (*admin, 0o644),
        "etc/systemd/system/robustdice-node.service.d": (*admin, 0o755),
        "etc/systemd/system/robustdice-node.service.d/10-deploy.conf": (*admin, 0o644),
        "etc/sysctl.d/60-robustdice.conf": (*admin, 0o644),
    }
    if node == "n0":
        layout["opt/robustdice/wheels"] = (*admin, 0o755)
        layout[f"opt/robustdice/wheels/{PROBE}-0.1-py3-none-any.whl"] = (*admin, 0o644)
    return layout


def test_owners_and_modes_on_each_board(deployed):
    """Code, config, plan and peers.yaml (the public keys) are root's and read-only to the
    service user; it owns only its secret key (0600) and its state directory (0700)."""
    _, boards, _, _ = deployed
    for device, node in enumerate(("n0", "n1")):
        root = boards / node
        for rel, (uid, gid, mode) in board_layout(node, device).items():
            st = (root / rel).lstat()
            found = (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
            assert found == (uid, gid, mode), f"{node}:/{rel}: (uid, gid, mode) {found}, expected {(uid, gid, mode)}"
        # Nothing else in the tree is the service user's, and nothing is writable by group or others.
        service_owned = {f"etc/robustdice/keys/{node}.key_secret", "var/lib/robustdice"}
        for path in [root, *root.rglob("*")]:
            if path.is_symlink():  # a link's own mode is always 0777 and means nothing
                continue
            st = path.lstat()
            rel = str(path.relative_to(root))
            if SERVICE.pw_uid != ADMIN.pw_uid:
                assert (st.st_uid == SERVICE.pw_uid) == (rel in service_owned), f"{node}:/{rel} owner {st.st_uid}"
            assert not stat.S_IMODE(st.st_mode) & 0o022, f"{node}:/{rel} is {stat.S_IMODE(st.st_mode):04o}"
        dropin = (root / "etc/systemd/system/robustdice-node.service.d/10-deploy.conf").read_text()
        assert f"User={SERVICE.pw_name}\n" in dropin and f"Group={SERVICE_GROUP.gr_name}\n" in dropin, dropin
        assert "MemoryMax=75%\n" in dropin, dropin


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_deployed_unit_with_its_drop_in_stays_sandboxed(deployed):
    """The drop-in's user, groups and devices keep the exposure within issue 25's bound (3.0)."""
    _, boards, _, _ = deployed
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", f"--root={boards / 'n0'}",
                             "robustdice-node.service"], capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for robustdice-node\.service: (\d+\.\d+)", result.stdout)
    if found is None and "offline" in result.stderr:
        pytest.skip(f"this systemd-analyze has no --offline (systemd >= 250 has): {result.stderr.strip()}")
    assert found, result.stdout[-2000:] + result.stderr
    assert float(found.group(1)) <= 3.0, result.stdout


def test_extra_packages_are_copied_and_installed(deployed):
    _, boards, _, _ = deployed
    wheels = boards / "n0" / "opt" / "robustdice" / "wheels"
    assert sorted(p.name for p in wheels.iterdir()) == [f"{PROBE}-0.1-py3-none-any.whl"]
    assert not (boards / "n1" / "opt" / "robustdice" / "wheels").exists()  # n1's list is empty
    probe = subprocess.run([sys.executable, "-c", f"import {PROBE}; print({PROBE}.VALUE)"],
                           capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "42", probe.stderr


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


ROLE = REPO / "deploy" / "roles" / "robustdice_node"


@pytest.mark.skipif(os.geteuid() != 0 or not all(shutil.which(c) for c in ("unshare", "ip", "sysctl")),
                    reason="needs root, unshare, ip and sysctl")
def test_sysctl_applies_inside_a_container():
    """The play's own sysctl command, on the role's file, in a fresh network namespace as a
    container board has one (benchmarks/deploy_nspawn.py found it): there is no
    net.ipv4.neigh.default there, which failed the play, and the interface the mesh uses must get
    250 ms all the same."""
    tasks = yaml.safe_load((ROLE / "tasks" / "main.yml").read_text())
    apply = next(t for t in tasks if t.get("name", "").startswith("Apply it now"))
    argv = [str(ROLE / "files" / "60-robustdice.conf") if a == "/etc/sysctl.d/60-robustdice.conf" else a
            for a in apply["ansible.builtin.command"]["argv"]]
    script = ("ip link add rdsys0 type veth peer name rdsys1 && " + " ".join(argv) + " && "
              "cat /proc/sys/net/ipv4/neigh/rdsys0/retrans_time_ms")
    proc = subprocess.run(["unshare", "--net", "sh", "-c", script], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    # retrans_time_ms is kept in jiffies: 250 reads back as 252 at HZ=250
    assert abs(int(proc.stdout.split()[-1]) - 250) <= 10, proc.stdout

