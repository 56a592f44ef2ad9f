"""What a board trusts in a plan: nothing in it runs as code, and it runs only what the operator signed.

Each case is an attack by someone who can write a plan folder (and so can recompute the unkeyed
`plan_hash` and the shard digests): the board must refuse it with one line naming the field,
and the attacker's code must not have run. The payloads write a marker file; they contain no dot
and no quote of their own, so that every field's syntax lets them through to where code used to
be generated.
"""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustdice.mesh.config import PeerConfig, PeersConfig, write_peers
from robustdice.partitioner.core.partition import PartitionRequest, partition
from robustdice.partitioner.core.plan import PLAN_FILE, load_plan, save_plan, sha256_file
from robustdice.partitioner.core.plan import sign_plan
from robustdice.partitioner.core.runtime import Cluster, load_shard, shard_path
from robustdice.partitioner.core.signing import make_operator_key
from robustdice.partitioner.errors import PlanError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))
from cli_runner import run_node  # noqa: E402

MODULE = __name__


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.max_pool2d(x, 2)
        return self.head(torch.flatten(x, 1))


def tiny_net():
    return TinyNet()


tiny_net.robustdice_input = {"shape": [1, 8, 8]}


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "plan"
    partition(PartitionRequest(f"{MODULE}:tiny_net", 2, "lop", out, weights="none", show_progress=False))
    return out


@pytest.fixture(scope="module")
def digits_lop(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "plan"
    partition(PartitionRequest("digits_cnn", 2, "lop", out, show_progress=False))
    return out


def _chars(text: str) -> str:
    return "+".join(f"chr({ord(c)})" for c in text)


def payload(marker: Path) -> str:
    """Python that creates `marker` when evaluated: no dot, no quote."""
    return f"getattr(__import__({_chars('os')}),{_chars('system')})({_chars('touch ' + str(marker))})"


def copy_plan(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    (dst / "shards").mkdir()
    for f in [PLAN_FILE] + [f"shards/{p.name}" for p in (src / "shards").iterdir()]:
        (dst / f).write_bytes((src / f).read_bytes())
    return dst


def restamp(directory: Path, **changes) -> None:
    """What an attacker with write access does: change the plan, recompute its hash, stamp the
    shards with it and record their new digests."""
    plan = dataclasses.replace(load_plan(directory), **changes)
    plan = dataclasses.replace(plan, plan_hash=plan.compute_hash())
    shards = {}
    for device in range(plan.devices):
        path = shard_path(directory, device)
        shard = torch.load(path, weights_only=True)
        shard["plan_hash"] = plan.plan_hash
        torch.save(shard, path)
        shards[str(device)] = {"file": f"shards/{path.name}", "sha256": sha256_file(path)}
    save_plan(dataclasses.replace(plan, shards=shards), directory)


def inject_placeholder_default(arch: dict, code: str) -> str:
    node = next(n for n in arch["nodes"] if n["op"] == "placeholder")
    node["target"] = f"x={code}"
    return "nodes[0].target"


def inject_kwargs_key(arch: dict, code: str) -> str:
    i, node = next((i, n) for i, n in enumerate(arch["nodes"]) if n.get("target") == "torch.nn.functional.relu")
    node["kwargs"] = {f"inplace=False) if {code} else torch.relu(x": False}
    return f"nodes[{i}].kwargs"


def inject_module_path(arch: dict, code: str) -> str:
    bad = f'0") if {code} else getattr(self, "0'
    arch["modules"][f"stem.{bad}"] = arch["modules"].pop("stem.1")
    for node in arch["nodes"]:
        if node.get("target") == "stem.1":
            node["target"] = f"stem.{bad}"
    return "modules.stem."


INJECTIONS = {"placeholder default": inject_placeholder_default, "kwargs key": inject_kwargs_key,
              "module path": inject_module_path}


def crafted(tiny_plan: Path, folder: Path, how: str) -> tuple:
    directory = copy_plan(tiny_plan, folder / "plan")
    marker = folder / "ran"
    arch = json.loads(json.dumps(load_plan(directory).architecture))
    field = INJECTIONS[how](arch, payload(marker))
    restamp(directory, architecture=arch)
    return directory, marker, field


def insecure_peers(folder: Path, plan: Path, devices: int, operator_public_key=None) -> Path:
    peers = tuple(PeerConfig(f"n{d}", "127.0.0.1", 47000 + 2 * d, None, 47001 + 2 * d) for d in range(devices))
    signed = {} if operator_public_key is None else {"operator_public_key": operator_public_key}
    return write_peers(folder / "peers.yaml", PeersConfig(peers, plan, insecure=True, **signed))


def check(peers: Path, timeout_s: float = 120) -> subprocess.CompletedProcess:
    """`robustdice-node --check` in a process of its own (forked warm: tests/integration/cli_runner.py),
    with this folder on its PYTHONPATH, where an import-path model would be found."""
    return run_node("--peers", peers, "--id", "n0", "--check", timeout=timeout_s, env=dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent)]
                                               + os.environ.get("PYTHONPATH", "").split(os.pathsep))))


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    return errors[0]


# --- 1. nothing in a plan is executed ------------------------------------------------------------

@pytest.mark.parametrize("how", sorted(INJECTIONS))
def test_an_injected_graph_is_refused_naming_the_field_and_runs_nothing(tiny_plan, tmp_path, how):
    directory, marker, field = crafted(tiny_plan, tmp_path, how)
    with pytest.raises(PlanError) as err:
        Cluster(directory).simulate(torch.zeros(1, 1, 8, 8))  # build, trace into stages, forward
    assert f"plan field architecture.{field}" in str(err.value)
    assert not marker.exists(), "the plan's code ran"


@pytest.mark.parametrize("how", sorted(INJECTIONS))
def test_node_check_builds_the_graph_and_refuses_an_injection(tiny_plan, tmp_path, how):
    directory, marker, field = crafted(tiny_plan, tmp_path, how)
    line = one_line_error(check(insecure_peers(tmp_path, directory, 2)))
    assert f"architecture.{field}" in line
    assert not marker.exists(), "the plan's code ran"


def test_node_check_runs_a_forward_of_the_plan(tiny_plan, tmp_path):
    """A graph that builds but cannot run (flatten from dim 0 feeds the head a wrong shape)."""
    directory = copy_plan(tiny_plan, tmp_path / "plan")
    arch = json.loads(json.dumps(load_plan(directory).architecture))
    flatten = next(n for n in arch["nodes"] if n.get("target") == "torch.flatten")
    flatten["args"][1] = 0
    restamp(directory, architecture=arch)
    line = one_line_error(check(insecure_peers(tmp_path, directory, 2)))
    assert "a forward of zeros on device 0 fails" in line


def test_good_plan_passes_the_check(tiny_plan, tmp_path):
    proc = check(insecure_peers(tmp_path, tiny_plan, 2))
    assert proc.returncode == 0, proc.stderr
    assert "a forward of zeros gives logits [2, 3]" in proc.stdout and "UNSIGNED" in proc.stdout


# --- 2. a board never imports what a plan names ----------------------------------------------------

def test_a_board_refuses_an_import_path_model(digits_lop, tmp_path):
    directory = copy_plan(digits_lop, tmp_path / "plan")
    restamp(directory, model="this:d.copy")  # importing `this` prints the Zen of Python
    proc = check(insecure_peers(tmp_path, directory, 2))
    line = one_line_error(proc)
    assert "plan field model: 'this:d.copy' is an import path" in line
    assert "Beautiful is better than ugly" not in proc.stdout + proc.stderr


# --- 4. signed plans ------------------------------------------------------------------------------

@pytest.fixture()
def operator(tmp_path):
    public_file, secret_file, public = make_operator_key(tmp_path / "operator")
    return secret_file, public


def signed_copy(src: Path, folder: Path, secret_file: Path) -> Path:
    directory = copy_plan(src, folder / "plan")
    sign_plan(directory, secret_file)
    return directory


def test_a_signed_plan_loads_and_passes_the_check(digits_lop, tmp_path, operator):
    secret_file, public = operator
    directory = signed_copy(digits_lop, tmp_path, secret_file)
    assert load_plan(directory, public).plan_hash == load_plan(digits_lop).plan_hash
    proc = check(insecure_peers(tmp_path, directory, 2, public))
    assert proc.returncode == 0 and "signed by the operator" in proc.stdout, proc.stderr


def test_a_restamped_plan_is_refused(digits_lop, tmp_path, operator):
    secret_file, public = operator
    directory = signed_copy(digits_lop, tmp_path, secret_file)
    plan = load_plan(directory)
    stages = list(plan.stages)
    stages[0] = dataclasses.replace(stages[0], assignment=(stages[0].assignment[1], stages[0].assignment[0]))
    restamp(directory, stages=tuple(stages))
    with pytest.raises(PlanError, match="signature does not verify"):
        load_plan(directory, public)
    line = one_line_error(check(insecure_peers(tmp_path, directory, 2, public)))
    assert "signature does not verify" in line


def test_a_changed_shard_is_refused_even_with_its_digest_restamped(digits_lop, tmp_path, operator):
    secret_file, public = operator
    directory = signed_copy(digits_lop, tmp_path, secret_file)
    shard = shard_path(directory, 0)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    plan = load_plan(directory)
    shards = {k: dict(v) for k, v in plan.shards.items()}
    shards["0"]["sha256"] = sha256_file(shard)  # the shard table is outside plan_hash
    save_plan(dataclasses.replace(plan, shards=shards), directory)
    with pytest.raises(PlanError, match="signature does not verify"):
        load_shard(load_plan(directory, public), directory, 0)


def test_a_plan_signed_by_another_operator_is_refused(digits_lop, tmp_path, operator):
    _, public = operator
    _, other_secret, _ = make_operator_key(tmp_path / "other")
    directory = signed_copy(digits_lop, tmp_path, other_secret)
    with pytest.raises(PlanError, match="signature does not verify"):
        load_plan(directory, public)


def test_an_unsigned_plan_is_refused_and_curve_without_an_operator_key_is_refused(digits_lop, tmp_path, operator):
    _, public = operator
    line = one_line_error(check(insecure_peers(tmp_path, digits_lop, 2, public)))
    assert "is not signed (no plan.sig)" in line
    from robustdice.mesh.keys import make_keypairs
    publics = make_keypairs(tmp_path / "keys", ["n0", "n1"])
    peers = tuple(PeerConfig(f"n{d}", "127.0.0.1", 47000 + 2 * d, publics[f"n{d}"], 47001 + 2 * d) for d in range(2))
    path = write_peers(tmp_path / "curve.yaml", PeersConfig(peers, digits_lop,
                                                              secret_key_file=str(tmp_path / "keys/{id}.key_secret")))
    line = one_line_error(check(path))
    assert "operator_public_key: missing" in line


def test_an_operator_secret_key_readable_by_others_is_refused(tmp_path, operator, digits_lop):
    secret_file, _ = operator
    assert (secret_file.stat().st_mode & 0o777) == 0o600 and (secret_file.parent.stat().st_mode & 0o777) == 0o700
    os.chmod(secret_file, 0o644)
    from robustdice.partitioner.core.signing import SigningError
    with pytest.raises(SigningError, match=f"run: chmod 600 {secret_file}"):
        sign_plan(digits_lop, secret_file)
