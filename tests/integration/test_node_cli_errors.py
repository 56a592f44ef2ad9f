"""Bad arguments to the node's commands: exit 2 with one line on stderr that names the problem."""
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mesh_procs as mp  # noqa: E402
from cli_runner import run as robustdice, run_node  # noqa: E402

pytestmark = pytest.mark.timeout(60)



def run(cmd, *args, env=None):
    """Each command in a process of its own, forked warm (cli_runner.py); test_cli_help.py runs
    the installed scripts themselves."""
    runner = {"robustdice": robustdice, "robustdice-node": run_node}[cmd]
    return runner(*args, timeout=30, env=dict(os.environ, **(env or {})))


def assert_one_line_error(proc, *words):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("usage:")
             and not line.startswith(" ")]
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize("args, env, words", [
    (["--peers", "PEERS", "--threads", "-2"], None, ["--threads", ">= 1"]),
    (["--peers", "PEERS"], {"ROBUSTDICE_THREADS": "two"}, ["ROBUSTDICE_THREADS", "two"]),
    (["--peers", "PEERS", "--log-level", "LOUD"], None, ["--log-level", "LOUD"]),
    (["--peers", "MISSING"], None, ["peers.yaml", "MISSING"]),
])
def test_node_refuses_bad_arguments(tmp_path, args, env, words):
    peers = tmp_path / "peers.yaml"
    peers.write_text("version: 1\npeers: []\n")
    args = [str(peers) if a == "PEERS" else str(tmp_path / "MISSING") if a == "MISSING" else a for a in args]
    assert_one_line_error(run("robustdice-node", *args, env=env), *words)


@pytest.mark.parametrize("args, words", [
    (["--frames", "0"], ["--frames", ">= 1"]),
    (["--rate", "0"], ["--rate"]),
    (["--rate", "nan"], ["--rate"]),
    (["--peer-timeout-ms", "-5"], ["--peer-timeout-ms"]),
    (["--kill", "two@150"], ["--kill", "two@150"]),
])
def test_cluster_refuses_bad_arguments(tmp_path, args, words):
    # The plan folder need not exist: arguments are checked first, or the plan error is named.
    proc = run("robustdice", "cluster", "--plan", tmp_path / "noplan", *args)
    assert_one_line_error(proc, *words)


def test_node_with_another_nodes_secret_key_is_refused_before_starting(tmp_path):
    config = mp.make_config(tmp_path, ["n0", "n1"])
    (tmp_path / "keys" / "n0.key_secret").write_bytes((tmp_path / "keys" / "n1.key_secret").read_bytes())
    proc = run("robustdice-node", "--peers", config, "--id", "n0")
    assert_one_line_error(proc, "secret_key_file", "n0")


def test_inventory_needs_a_plan_in_peers_yaml(tmp_path):
    config = mp.make_config(tmp_path, ["n0", "n1"])  # a mesh-only peers.yaml: no plan: field
    proc = run("robustdice", "inventory", "--peers", config, "--out", tmp_path / "inv")
    assert_one_line_error(proc, "plan")
    assert not (tmp_path / "inv" / "inventory.yaml").exists()
