"""Boards of different speed through the real partitioner (issue 27 item 3): equal capacities
give today's plans byte for byte for every method; unequal ones deal work by speed within
memory, and the plan is still the model (verify) and records what it was made for; `robustdice
profile` measures a board and merges the boards' files."""
import dataclasses
import json

import pytest

from cli_runner import run as robustdice, run_node
from robustdice.partitioner.core.capacity import Capacities, CapacityError, DeviceCapacity, write_capacities
from robustdice.partitioner.experiments.evaluate import verify_plan
from robustdice.partitioner.core.partition import PartitionRequest, partition
from robustdice.partitioner.core.plan import load_plan
from robustdice.partitioner.core.runtime import shard_path

DEVICES = 4
EQUAL = Capacities(tuple(DeviceCapacity(2.5, 10 ** 12, f"n{d}") for d in range(DEVICES)))
SLOW_LAST = Capacities(tuple(DeviceCapacity(s) for s in (3.0, 3.0, 3.0, 1.0)))
# Every method a capacity file changes; uniform needs a budget, the scored ones s1 alone (fast).
REQUESTS = {
    "robust": {}, "robust+cdc": {}, "lop": {}, "cdc": {}, "nmr": {}, "uniform": {"replication": 2.0},
    "robust mean+bn": {"method": "robust", "fill": "mean+bn", "memory": 0.5},
}



def request(name, out, capacities=None):
    options = dict(REQUESTS[name])
    method = options.pop("method", name)
    return PartitionRequest(model="digits_cnn", devices=DEVICES, method=method, out=out, scores=("s1",),
                            show_progress=False, capacities=capacities, **options)


def files(out):
    return {"plan.json": (out / "plan.json").read_bytes(),
            **{f"shard {d}": shard_path(out, d).read_bytes() for d in range(DEVICES)}}


def data_copies(plan):
    return sorted((s.name, sorted(n for ids in s.assignment for n in ids)) for s in plan.stages)


@pytest.mark.parametrize("name", list(REQUESTS))
def test_equal_capacities_give_todays_plan_byte_for_byte(tmp_path, name):
    today = partition(request(name, tmp_path / "today"))
    equal = partition(request(name, tmp_path / "equal", EQUAL))
    assert equal["plan_hash"] == today["plan_hash"]
    assert files(tmp_path / "equal") == files(tmp_path / "today")
    assert "capacities" not in json.loads((tmp_path / "equal" / "plan.json").read_text())


@pytest.mark.parametrize("name", ["robust", "robust+cdc", "lop", "cdc", "uniform"])
def test_a_slow_device_gets_its_share_and_the_plan_is_still_the_model(tmp_path, name):
    summary = partition(request(name, tmp_path / "p", SLOW_LAST))
    plan = load_plan(tmp_path / "p")
    assert plan.version == 4 and plan.capacities == tuple({"speed": s} for s in (3.0, 3.0, 3.0, 1.0))
    rows = summary["capacities"]["rows_share"]
    assert rows[3] < 0.16 and min(rows[:3]) > 0.26, rows     # a tenth of the work, not a quarter
    assert summary["capacities"]["bound_by"] == ["speed"] * DEVICES
    partition(request(name, tmp_path / "today"))
    # the same data copies, dealt elsewhere (robust+cdc's parity rows may grow: a row takes one
    # single copy of each device, and the fast devices now hold more of them)
    assert data_copies(load_plan(tmp_path / "today")) == data_copies(plan)
    check = verify_plan(tmp_path / "p")
    assert check["allclose"], check
    if name == "lop":   # a fine-tuned plan keeps the deal and the capacities it was made for
        from robustdice.partitioner.experiments.finetune import finetune
        finetune(tmp_path / "p", tmp_path / "tuned", epochs=1, progress=False)
        tuned = load_plan(tmp_path / "tuned")
        assert tuned.capacities == plan.capacities and tuned.stages == plan.stages


def test_memory_binds_and_a_plan_that_cannot_fit_is_refused(tmp_path):
    lop = partition(request("lop", tmp_path / "lop"))
    fixed = min(lop["per_device_param_bytes"])
    # the fast first device has room for little more than what every device holds anyway
    tight = Capacities((DeviceCapacity(3.0, int(lop["per_device_param_bytes"][0] * 0.5 + fixed * 0.6)),)
                       + SLOW_LAST.devices[1:])
    summary = partition(request("robust", tmp_path / "tight", tight))
    assert summary["capacities"]["bound_by"] == ["memory", "speed", "speed", "speed"]
    assert summary["per_device_param_bytes"][0] <= tight.devices[0].memory_bytes
    assert load_plan(tmp_path / "tight").capacities[0]["memory_bytes"] == tight.devices[0].memory_bytes
    tiny = Capacities(tuple(dataclasses.replace(d, memory_bytes=fixed) for d in SLOW_LAST.devices))
    with pytest.raises(CapacityError, match="no deal fits|does not hold"):
        partition(request("robust", tmp_path / "tiny", tiny))
    with pytest.raises(CapacityError, match="nmr puts every neuron"):
        partition(request("nmr", tmp_path / "nmr", Capacities(
            (DeviceCapacity(1.0, int(fixed * 1.5)),) + SLOW_LAST.devices[1:])))


def test_profile_merge_and_partition_through_the_cli(tmp_path):
    for d in range(2):
        proc = robustdice("profile", "--model", "digits_cnn", "--out", tmp_path / f"b{d}.yaml", "--id", f"n{d}",
                          "--runs", 2, "--warmup", 1, "--threads", 1, "--json")
        assert proc.returncode == 0, proc.stderr
        entry = json.loads(proc.stdout.strip().splitlines()[-1])["devices"][0]
        assert entry["compute"] == "cpu" and entry["speed"] > 0 and entry["memory_bytes"] > 0
        assert set(entry["stage_ms"]) == {"features.0", "features.3", "features.7", "classifier.2", "classifier.5"}
        speed = entry["speed"]
    write_capacities(Capacities((DeviceCapacity(speed / 3),)), tmp_path / "slow.json")
    proc = robustdice("profile", "--merge", tmp_path / "b0.yaml", tmp_path / "b1.yaml", tmp_path / "slow.json",
                      tmp_path / "slow.json", "--out", tmp_path / "caps.yaml")
    assert proc.returncode == 0, proc.stderr
    assert f"device 3: speed {speed / 3:g}" in proc.stdout
    proc = robustdice("partition", "--model", "digits_cnn", "--devices", DEVICES, "--method", "robust", "--scores",
                      "s1", "--capacities", tmp_path / "caps.yaml", "--out", tmp_path / "plan")
    assert proc.returncode == 0, proc.stderr
    assert "capacities: share of the rows per device" in proc.stdout
    shares = [float(v) for v in proc.stdout.split("share of the rows per device ")[1].split(" (")[0].split()]
    assert shares[2] < shares[0] and shares[3] < shares[0]
    proc = robustdice("partition", "--model", "digits_cnn", "--devices", 3, "--method", "lop",
                      "--capacities", tmp_path / "caps.yaml", "--out", tmp_path / "bad")
    assert proc.returncode != 0 and "lists 4 devices, the plan has 3" in proc.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("devices:\n- speed: 1\n- speed: -2\n")
    proc = robustdice("partition", "--model", "digits_cnn", "--devices", 2, "--method", "lop",
                      "--capacities", bad, "--out", tmp_path / "bad")
    assert proc.returncode != 0 and "devices[1].speed: -2 is not a positive number" in proc.stderr


def test_rocoin_groups_alike_devices_and_matches_students_to_their_speed(tmp_path):
    from robustdice.partitioner.core.rocoin_plan import RocoinOptions, partition_rocoin

    def rocoin(out, capacities):
        return dataclasses.replace(request("lop", out, capacities), method="rocoin", scores=("s1", "s2", "s3"),
                                   fill="mean", rocoin=RocoinOptions(epochs=1))

    # devices 0 and 2 are fast, 1 and 3 slow: groups of alike boards, not of neighbours
    alike = Capacities(tuple(DeviceCapacity(s) for s in (3.0, 1.0, 3.0, 1.0)))
    today = partition_rocoin(rocoin(tmp_path / "today", None))
    assert today["rocoin"]["groups"] == [[0, 1], [2, 3]]
    equal = partition_rocoin(rocoin(tmp_path / "equal", EQUAL))
    assert equal["plan_hash"] == today["plan_hash"]
    assert (tmp_path / "equal" / "plan.json").read_bytes() == (tmp_path / "today" / "plan.json").read_bytes()
    assert partition_rocoin(rocoin(tmp_path / "alike", alike))["rocoin"]["groups"] == [[0, 2], [1, 3]]
    plan = load_plan(tmp_path / "alike")
    assert plan.capacities == tuple({"speed": s} for s in (3.0, 1.0, 3.0, 1.0)) and plan.version == 4
    assert plan.rocoin.device_groups == (0, 1, 0, 1)


# --- capacities in peers.yaml -----------------------------------------------------------------

def peers_yaml(path, plan, speeds):
    from robustdice.mesh.config import PeerCapacity, PeerConfig, PeersConfig, write_peers
    peers = tuple(PeerConfig(f"n{d}", "127.0.0.1", 47100 + 2 * d, None, 47101 + 2 * d,
                             capacity=None if s is None else PeerCapacity(s))
                  for d, s in enumerate(speeds))
    return write_peers(path, PeersConfig(peers, plan, insecure=True))


def test_peers_yaml_capacities_deal_as_a_capacity_file_and_a_node_says_when_its_plan_does_not_fit(tmp_path):
    from robustdice.mesh.config import ConfigError, load_peers
    from robustdice.node.config import capacity_mismatch
    from robustdice.partitioner.core.capacity import load_capacities

    by_file = partition(request("robust", tmp_path / "by-file", SLOW_LAST))
    peers = peers_yaml(tmp_path / "peers.yaml", tmp_path / "by-peers", [3.0, 3.0, 3.0, 1.0])
    caps = load_capacities(peers, DEVICES)
    assert [d.speed for d in caps.devices] == [3.0, 3.0, 3.0, 1.0] and caps.devices[0].id == "n0"
    proc = robustdice("partition", "--model", "digits_cnn", "--devices", DEVICES, "--method", "robust", "--scores",
                      "s1", "--capacities", peers, "--out", tmp_path / "by-peers")
    assert proc.returncode == 0, proc.stderr
    assert load_plan(tmp_path / "by-peers").plan_hash == by_file["plan_hash"]

    # A node whose plan fits the boards says nothing; ratios count, not units.
    dealt, equal = load_plan(tmp_path / "by-file"), partition(request("robust", tmp_path / "equal"))
    config = load_peers(peers_yaml(tmp_path / "twice.yaml", tmp_path / "by-file", [6.0, 6.0, 6.0, 2.0]))
    assert capacity_mismatch(dealt, config, "twice.yaml") is None
    # One dealt for equal boards, on boards of 3:3:3:1, warns and says how to mend it.
    config = load_peers(peers)
    said = capacity_mismatch(load_plan(tmp_path / "equal"), config, peers)
    assert said and "equal boards" in said and "3:3:3:1" in said and f"--capacities {peers}" in said
    assert equal["plan_hash"][:12] in said
    proc = run_node("--peers", peers_yaml(tmp_path / "on-equal.yaml", tmp_path / "equal", [3.0, 3.0, 3.0, 1.0]),
                    "--id", "n0", "--check")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("warning: plan ") and "3:3:3:1" in proc.stdout
    partial = load_peers(peers_yaml(tmp_path / "partial.yaml", tmp_path / "by-file", [3.0, 3.0, None, 1.0]))
    assert "not n2" in capacity_mismatch(dealt, partial, "partial.yaml")

    # Bad capacities name their field, in the node's loader and in the partitioner's.
    with pytest.raises(CapacityError, match=r"peers\[2\]\.capacity: missing"):
        load_capacities(tmp_path / "partial.yaml")
    text = (tmp_path / "peers.yaml").read_text()
    for bad, field in (("speed: -1.0", r"peers\[0\]\.capacity\.speed: -1.0 is not a positive number"),
                       ("speed: 3.0\n    watts: 5", r"peers\[0\]\.capacity: unknown key\(s\) watts")):
        (tmp_path / "bad.yaml").write_text(text.replace("speed: 3.0", bad, 1))
        with pytest.raises(ConfigError, match=field):
            load_peers(tmp_path / "bad.yaml")
    (tmp_path / "bad.yaml").write_text(text.replace("speed: 3.0", "speed: -1.0", 1))
    with pytest.raises(CapacityError, match=r"peers\[0\]\.capacity\.speed: -1.0 is not a positive number"):
        load_capacities(tmp_path / "bad.yaml")
