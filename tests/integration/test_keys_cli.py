"""`robustdice keys` prints a peers.yaml fragment that a node accepts for a plan of that many devices.

Clients (`--clients`, default `client`) go under `clients:`, never under `peers:`: a client listed
as a peer would make peers.yaml one device longer than the plan, and every node would refuse it.
"""
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import node_helpers as nh  # noqa: E402

from robustdice.mesh.config import load_peers  # noqa: E402
from robustdice.mesh.keys import load_secret  # noqa: E402
from robustdice.partitioner.core.plan import sign_plan  # noqa: E402
from robustdice.partitioner.core.signing import make_operator_key  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def keys(*args):
    return subprocess.run(nh.robustdice_cli() + ["keys", *map(str, args)], capture_output=True, text=True, timeout=60)


def test_fragment_is_a_valid_peers_yaml_for_the_plan(tmp_path_factory, tmp_path):
    plan = nh.make_plan(tmp_path_factory, "digits_cnn", 2, "lop")
    out = keys("--out", tmp_path / "keys", "--ids", "n0,n1", "--clients", "client,camera")
    assert out.returncode == 0, out.stderr
    fragment = yaml.safe_load(out.stdout)
    assert [p["id"] for p in fragment["peers"]] == ["n0", "n1"]
    assert [c["name"] for c in fragment["clients"]] == ["client", "camera"]
    for client in fragment["clients"]:  # each listed key is the one written for that client
        public, _ = load_secret(tmp_path / "keys" / f"{client['name']}.key_secret")
        assert public.decode() == client["public_key"]

    for peer in fragment["peers"]:
        peer["host"] = "127.0.0.1"
    # Boards run only plans the operator signed: sign a copy (the shared plan stays as it was).
    signed = tmp_path / "plan"
    shutil.copytree(plan, signed)
    _, operator_secret, fragment["operator_public_key"] = make_operator_key(tmp_path / "operator")
    sign_plan(signed, operator_secret)
    fragment["plan"] = str(signed)
    peers = tmp_path / "peers.yaml"
    peers.write_text(yaml.safe_dump(fragment))
    config = load_peers(peers)
    assert len(config.peers) == 2 and [c.name for c in config.clients] == ["client", "camera"]
    # The node's own start-up check: peers against the plan's devices, its key, its shard.
    check = subprocess.run([sys.executable, "-m", "robustdice.node.supervisor", "--peers", str(peers),
                            "--id", "n1", "--check"], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    assert check.stdout.startswith("ok: node n1 is device 1 of 2"), check.stdout


def test_default_client_and_names_listed_twice(tmp_path):
    out = keys("--out", tmp_path / "a", "--ids", "n0,n1")
    assert out.returncode == 0, out.stderr
    fragment = yaml.safe_load(out.stdout)
    assert [c["name"] for c in fragment["clients"]] == ["client"]  # what submit/status find by default
    assert (tmp_path / "a" / "client.key_secret").exists()

    out = keys("--out", tmp_path / "b", "--ids", "n0,n1,client")  # the old way to ask for a client key
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "robustdice keys: error: --ids: 'client' is also a client (--clients client); --ids names the nodes only"]
    assert not (tmp_path / "b").exists()  # refused before any key is written

    out = keys("--out", tmp_path / "c", "--ids", "n0", "--clients", "")
    assert out.returncode == 0 and "clients" not in yaml.safe_load(out.stdout)


def test_a_closed_pipe_ends_the_command_quietly(tmp_path):
    """`robustdice keys ... | head -0`: the reader is gone before the first line is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(nh.robustdice_cli() + ["keys", "--out", str(tmp_path / "keys"), "--ids", "n0,n1"],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert proc.returncode == 141, proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr


def test_keys_folder_is_the_owners_alone(tmp_path):
    """Like ~/.ssh: `robustdice keys` makes its folder 0700, and closes one that was left open."""
    def run_under_umask_022(folder, ids):
        return subprocess.run(["/bin/sh", "-c", 'umask 022 && exec "$@"', "sh"]
                              + nh.robustdice_cli() + ["keys", "--out", str(folder), "--ids", ids, "--clients", ""],
                              capture_output=True, text=True, timeout=60)

    out = run_under_umask_022(tmp_path / "new", "n0")
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "new" / "n0.key_secret").stat().st_mode) == 0o600

    (tmp_path / "open").mkdir(mode=0o755)
    out = run_under_umask_022(tmp_path / "open", "n0")
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE((tmp_path / "open").stat().st_mode) == 0o700

