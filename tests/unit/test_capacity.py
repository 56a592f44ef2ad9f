"""Capacity-aware deals (capacity.py): equal weights give today's functions exactly; unequal
ones give each device work in proportion to its weight, never two copies of a neuron on one
device, within memory; the capacity file's loader names the bad field."""
import random

import pytest

from robustdice.partitioner.core.capacity import (Capacities, CapacityError, DeviceCapacity, cdc_by_speed, deal_by_speed,
                                             deal_weights, load_capacities, memory_shares, merge_capacities,
                                             parse_capacities, split_by_speed, write_capacities)
from robustdice.partitioner.core.cluster import cdc_layout, lop_assignment, replicate_and_deal, rotated_parity
from robustdice.partitioner.core.plan import Plan, PlanError, StagePlan, plan_from_json
from robustdice.partitioner.zoo.inputs import InputSpec


def random_groups(rng, n_neurons):
    perm = list(range(n_neurons))
    rng.shuffle(perm)
    groups, i = [], 0
    while i < n_neurons:
        k = rng.randint(1, 9)
        groups.append(perm[i:i + k])
        i += k
    return groups


def test_equal_weights_are_todays_deals_exactly():
    rng = random.Random(0)
    for _ in range(300):
        n, c = rng.randint(1, 7), rng.randint(1, 60)
        groups = random_groups(rng, c)
        w = [rng.randint(1, 5)] * n
        assert deal_by_speed(groups, w) == replicate_and_deal(groups, n)
        assert split_by_speed(c, w) == lop_assignment(c, n)
        if n >= 2:
            assert cdc_by_speed(c, w) == cdc_layout(c, n)
            a = replicate_and_deal(groups, n)
            assert rotated_parity(a, c, w) == rotated_parity(a, c)


def test_unequal_deal_is_proportional_without_duplicates():
    rng = random.Random(1)
    for _ in range(200):
        n, c = rng.randint(2, 6), rng.randint(1, 80)
        groups = random_groups(rng, c)
        w = [rng.randint(1, 10) for _ in range(n)]
        a = deal_by_speed(groups, w)
        assert all(len(ids) == len(set(ids)) for ids in a), "two copies of a neuron on one device"
        # the same copies as today's deal: only where they go moves
        assert sorted(x for ids in a for x in ids) == sorted(x for ids in replicate_and_deal(groups, n) for x in ids)
    # one big group: shares track the weights to within a row
    a = deal_by_speed([list(range(4000))], [3, 3, 3, 1])
    assert [len(x) for x in a] == [1200, 1200, 1200, 400]
    # credit carries across groups: many groups of one neuron (padded to N copies) stay equal,
    # since a device takes at most one copy of each neuron
    a = deal_by_speed([[i] for i in range(10)], [3, 3, 3, 1])
    assert [len(x) for x in a] == [10, 10, 10, 10]
    # groups of 5 over 4 devices (8 copies): the slow device gets a tenth of the layer, not a quarter
    a = deal_by_speed([list(range(5 * g, 5 * g + 5)) for g in range(50)], [3, 3, 3, 1])
    assert abs(len(a[3]) / 400 - 0.1) < 0.01


def test_split_and_cdc_by_speed():
    assert split_by_speed(20, [3, 3, 3, 1]) == [list(range(0, 6)), list(range(6, 12)), list(range(12, 18)),
                                                 [18, 19]]
    layout = cdc_by_speed(20, [3, 3, 3, 1])
    data = layout.data
    assert sorted(x for ids in data for x in ids) == list(range(20))
    assert data[layout.parity_device] == []
    assert layout.rows == max(len(ids) for ids in data)
    # one lost data device is recovered by subtraction: every row holds at most one neuron of each
    for members in layout.members:
        owners = [next(d for d, ids in enumerate(data) if m in ids) for m in members]
        assert len(owners) == len(set(owners))
    assert len(data[3]) < len(data[0]), "the slow device computes least"


def test_parity_by_speed_spares_the_slow_device():   # cluster.rotated_parity with weights
    a = deal_by_speed([list(range(40))], [3, 3, 3, 1])
    rp = rotated_parity(a, 40, [3, 3, 3, 1])
    for members, d in zip(rp.members, rp.devices):
        assert not set(members) & set(a[d])
    assert sorted(m for row in rp.members for m in row) == list(range(40))
    work = [len(a[d]) + rp.devices.count(d) for d in range(4)]
    assert work[3] <= max(work[:3]) / 3 + 1, work


def test_memory_shares_water_fill_and_refuse():
    shares, bound = memory_shares([1, 1, 1, 1 / 3], [float("inf")] * 4, 1000)
    assert bound == ["speed"] * 4
    assert shares == pytest.approx([0.3, 0.3, 0.3, 0.1])
    shares, bound = memory_shares([1, 1, 1, 1], [float("inf"), float("inf"), float("inf"), 100], 1000)
    assert bound == ["speed", "speed", "speed", "memory"]
    assert shares == pytest.approx([0.3, 0.3, 0.3, 0.1])
    with pytest.raises(CapacityError, match="no deal fits"):
        memory_shares([1, 1], [100, 200], 1000)
    assert deal_weights([0.3, 0.3, 0.3, 0.1]) == [1_000_000, 1_000_000, 1_000_000, 333_333]
    assert len(set(deal_weights([0.25] * 4))) == 1


def test_capacity_file_round_trip_and_merge(tmp_path):
    a = Capacities((DeviceCapacity(10.0, 1000, "n0", "cpu", 100.0, (("features.0", 1.5),)),))
    b = Capacities((DeviceCapacity(3.5),))
    write_capacities(a, tmp_path / "a.yaml")
    write_capacities(b, tmp_path / "b.json")
    merged = merge_capacities([load_capacities(tmp_path / "a.yaml"), load_capacities(tmp_path / "b.json")])
    assert merged.devices == (a.devices[0], b.devices[0])
    assert not merged.uniform
    assert Capacities((DeviceCapacity(2.0, 5), DeviceCapacity(2.0, 5, "other"))).uniform
    write_capacities(merged, tmp_path / "m.yaml")
    with pytest.raises(CapacityError, match="lists 2 devices, the plan has 4"):
        load_capacities(tmp_path / "m.yaml", devices=4)


@pytest.mark.parametrize("data, field", [
    ({"devices": [{"speed": 0}]}, "devices[0].speed"),
    ({"devices": [{"speed": 1}, {"speed": "fast"}]}, "devices[1].speed"),
    ({"devices": [{"speed": 1, "memory_bytes": -3}]}, "devices[0].memory_bytes"),
    ({"devices": [{"memory_bytes": 3}]}, "devices[0].speed is missing"),
    ({"devices": [{"speed": 1, "sped": 2}]}, "devices[0].sped: unknown field"),
    ({"devices": []}, "devices: expected a non-empty list"),
    ({"format": "other", "devices": [{"speed": 1}]}, "format"),
    ({"version": 9, "devices": [{"speed": 1}]}, "version"),
    ({"devices": [{"speed": True}]}, "devices[0].speed"),
    ({"devices": [{"speed": 1, "stage_ms": {"a": -1}}]}, "devices[0].stage_ms.a"),
    ([1, 2], "expected a mapping"),
])
def test_capacity_errors_name_the_field(data, field):
    with pytest.raises(CapacityError, match=field.replace("[", r"\[").replace("]", r"\]")):
        parse_capacities(data)


def test_load_capacities_errors(tmp_path):
    with pytest.raises(CapacityError, match="no file"):
        load_capacities(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("devices: [speed: 1\n")
    with pytest.raises(CapacityError, match="not valid YAML"):
        load_capacities(bad)


def _plan(capacities):
    stage = StagePlan("l", "linear", 4, -1, (), ((0, 1, 2), (3,)), None)
    extra = {} if capacities is None else {"capacities": capacities, "version": 4}
    plan = Plan(model="digits_cnn", weights="none", seed=0, weights_digest="x", devices=2, method="lop", scores=(),
                stages=(stage,), input=InputSpec((1, 8, 8), (0.0,), (1.0,)), **extra)
    return Plan(**{**plan.__dict__, "plan_hash": plan.compute_hash()})


def test_plan_records_capacities_inside_its_hash():
    caps = ({"speed": 3.0}, {"speed": 1.0, "memory_bytes": 10})
    plan = _plan(caps)
    body = plan.to_json()
    assert body["capacities"] == [{"speed": 3.0}, {"speed": 1.0, "memory_bytes": 10}] and body["version"] == 4
    assert plan_from_json(body).capacities == caps
    assert plan.plan_hash != _plan(({"speed": 3.0}, {"speed": 2.0, "memory_bytes": 10})).plan_hash
    assert "capacities" not in _plan(None).to_json()
    edited = dict(body, capacities=[{"speed": 3.0}, {"speed": 1.0, "memory_bytes": 11}])
    with pytest.raises(PlanError, match="plan_hash"):
        plan_from_json(edited)
    with pytest.raises(PlanError, match="capacities"):
        plan_from_json(dict(body, capacities=[{"speed": 3.0}]))
    with pytest.raises(PlanError, match=r"capacities\[1\]"):
        plan_from_json(dict(body, capacities=[{"speed": 3.0}, {"speed": -1}]))
