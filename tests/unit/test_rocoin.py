"""RoCoIn's knowledge assignment (partitioner/core/rocoin.py) and the rocoin section of a plan: pure
values, no training."""
import copy
import hashlib
import itertools
import json

import numpy as np
import pytest

from robustdice.partitioner.core.plan import METHODS, FillSpec, Plan, RocoinGroup, RocoinSpec, plan_from_json
from robustdice.partitioner.core.rocoin import (DeviceProfile, StudentOption, activation_affinity, choose_student,
                                                group_devices, groups_for_count, match_groups, partition_filters)
from robustdice.partitioner.errors import PartitionerError, PlanError
from robustdice.partitioner.zoo.inputs import InputSpec

EQUAL = DeviceProfile()


# --- device grouping --------------------------------------------------------------------------

@pytest.mark.parametrize("n, k, expected", [
    (4, 2, [(0, 1), (2, 3)]),                 # the default: N // 2 groups of two
    (4, 1, [(0, 1, 2, 3)]),
    (4, 4, [(0,), (1,), (2,), (3,)]),         # no copies at all: NoNN's layout
    (6, 3, [(0, 1), (2, 3), (4, 5)]),
    (5, 2, [(0, 1, 4), (2, 3)]),              # the remainder joins a group, it does not stand alone
])
def test_equal_devices_make_the_asked_number_of_groups(n, k, expected):
    assert groups_for_count([EQUAL] * n, k) == expected


def test_every_count_gives_k_groups_that_cover_every_device_once():
    for n in range(1, 9):
        for k in range(1, n + 1):
            groups = groups_for_count([EQUAL] * n, k)
            assert len(groups) == k
            assert sorted(d for g in groups for d in g) == list(range(n))


def test_a_count_outside_the_devices_is_refused():
    with pytest.raises(PartitionerError, match="--groups must lie in 1..4"):
        groups_for_count([EQUAL] * 4, 5)


def test_devices_of_similar_capacity_are_grouped_together():
    fast, slow = DeviceProfile(flops_per_s=10.0), DeviceProfile(flops_per_s=1.0)
    assert groups_for_count([fast, slow, fast, slow], 2) == [(0, 2), (1, 3)]
    big, small = DeviceProfile(memory_bytes=8e6), DeviceProfile(memory_bytes=1e6)
    assert groups_for_count([small, big, big, small], 2) == [(0, 3), (1, 2)]


def test_a_group_stops_growing_once_it_is_reliable_enough():
    # follow-the-leader: a group takes devices while every copy failing is likelier than 1e-2
    steady, flaky = DeviceProfile(outage=0.001), DeviceProfile(outage=0.2)
    groups = group_devices([steady, flaky, flaky, flaky, flaky], similarity_threshold=10.0, failure_threshold=1e-2)
    assert groups == [(0,), (1, 2, 3), (4,)]   # 0.2^3 < 1e-2: three flaky devices make a group


def test_devices_too_unlike_the_group_lead_their_own():
    fast, slow = DeviceProfile(flops_per_s=10.0), DeviceProfile(flops_per_s=1.0)
    groups = group_devices([fast, slow, fast, slow], similarity_threshold=0.1, failure_threshold=1e-6)
    assert groups == [(0, 2), (1, 3)]


# --- knowledge partition ----------------------------------------------------------------------

def test_the_affinity_is_the_activation_hub_rule():
    a = np.array([[1.0, 3.0, 0.0], [2.0, 2.0, 1.0]])   # two images, three filters
    w = activation_affinity(a)
    raw = np.zeros((3, 3))
    for i, j in itertools.permutations(range(3), 2):
        raw[i, j] = sum(x[i] * x[j] * abs(x[i] - x[j]) for x in a)
    np.testing.assert_allclose(w, raw / raw.max())
    assert np.allclose(w, w.T) and np.all(np.diag(w) == 0)


def test_normalized_cut_finds_two_communities():
    # filters 0-3 are strongly tied to each other, 4-7 likewise, weakly across
    w = np.full((8, 8), 0.01)
    w[:4, :4] = w[4:, 4:] = 1.0
    np.fill_diagonal(w, 0)
    assert partition_filters(w, 2, seed=0) == [(0, 1, 2, 3), (4, 5, 6, 7)]


def test_partitions_cover_every_filter_once_even_with_dead_filters():
    rng = np.random.default_rng(0)
    activity = rng.random((64, 20))
    activity[:, 5] = 0   # a filter that is never active has no edge at all
    parts = partition_filters(activation_affinity(activity), 3, seed=0)
    assert len(parts) == 3 and all(parts)
    assert sorted(c for p in parts for c in p) == list(range(20))
    assert parts == partition_filters(activation_affinity(activity), 3, seed=0)   # reproducible


# --- student assignment -----------------------------------------------------------------------

SMALL = StudentOption("small", flops=100, param_bytes=1_000)
MID = StudentOption("mid", flops=400, param_bytes=4_000)
BIG = StudentOption("big", flops=1_600, param_bytes=16_000)


def test_the_fastest_student_that_meets_the_requirement_is_chosen():
    student, meets, _ = choose_student([0], [EQUAL], [BIG, SMALL, MID], 0, 3_000, 0)
    assert student is MID and meets


def test_without_one_that_meets_it_the_largest_that_fits_is_chosen():
    tight = DeviceProfile(memory_bytes=5_000)
    student, meets, _ = choose_student([0], [tight], [BIG, SMALL, MID], 500, 10_000, 0)
    assert student is MID and not meets   # BIG does not fit; MID with the head (4.5 kB) does
    assert choose_student([0], [DeviceProfile(memory_bytes=1_000)], [SMALL], 500, 10, 0) is None


def test_the_group_takes_its_smallest_memory_and_slowest_speed():
    profiles = [DeviceProfile(memory_bytes=1e9), DeviceProfile(memory_bytes=2_000)]
    student, _, _ = choose_student([0, 1], profiles, [BIG, SMALL, MID], 0, 100_000, 0)
    assert student is SMALL


def test_kuhn_munkres_finds_the_best_pairing():
    profiles = [DeviceProfile(flops_per_s=s, memory_bytes=m) for s, m in ((1, 1e9), (1, 1e9), (4, 5_000), (4, 5_000))]
    groups = [(0, 1), (2, 3)]
    partitions = [tuple(range(10)), tuple(range(10, 12))]
    options = [[SMALL, MID, BIG], [SMALL, MID, BIG]]
    required = [12_000, 2_000]   # the large partition needs BIG, which only group 0 holds
    matches = match_groups(groups, partitions, profiles, options, 0, required, [0, 0])
    assert [(m.group, m.partition, m.student) for m in matches] == [(0, 0, "big"), (1, 1, "mid")]
    assert all(m.meets_requirement for m in matches)
    best = max(itertools.permutations(range(2)), key=lambda perm: sum(
        choose_student(groups[g], profiles, options[p], 0, required[p], 0)[2] for g, p in enumerate(perm)))
    assert tuple(m.partition for m in matches) == best


def test_a_group_no_student_fits_is_named():
    profiles = [DeviceProfile(memory_bytes=500)] * 2
    with pytest.raises(PartitionerError,
                       match=r"no student fits device group 0 \(devices 0, 1\): its memory is 0.0005 MB"
                             r".*needs 0.001 MB"):
        match_groups([(0, 1)], [(0, 1)], profiles, [[SMALL]], 0, [1], [0])


# --- the plan's rocoin section ----------------------------------------------------------------

def rocoin_plan(**changes) -> Plan:
    graph = {"format": "robustdice-fx-graph", "version": 1, "name": "Student", "modules": {}, "tensors": {},
             "nodes": []}
    spec = RocoinSpec("features.7", (4, 1, 1),
                      (RocoinGroup((0, 1), (0, 3), "s-k2", "sha256:a"),
                       RocoinGroup((2, 3), (1, 2), "s-k2", "sha256:b")),
                      {"s-k2": {"architecture": graph, "flops": 10, "param_bytes": 40}}, graph)
    plan = Plan(model="digits_cnn", weights="DEFAULT", seed=0, weights_digest="sha256:t", devices=4, method="rocoin",
                scores=(), stages=(), input=InputSpec((1, 8, 8), (0.0,), (1.0,), "stretch"), fill=FillSpec("mean"),
                rocoin=spec)
    plan = Plan(**{**plan.__dict__, "plan_hash": plan.compute_hash()})
    data = plan.to_json()
    for path, value in changes.items():
        *keys, last = path.split(".")
        target = data
        for key in keys:
            target = target[int(key)] if isinstance(target, list) else target[key]
        target[int(last) if isinstance(target, list) else last] = value
    if changes:   # rehashed as Plan.compute_hash does, so that only the edit is wrong
        body = {k: v for k, v in data.items() if k not in ("shards", "plan_hash")}
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        data["plan_hash"] = hashlib.sha256(canonical.encode()).hexdigest()
    return data


def test_rocoin_is_a_method_and_its_section_round_trips():
    assert "rocoin" in METHODS
    data = rocoin_plan()
    plan = plan_from_json(copy.deepcopy(data))
    assert plan.rocoin.device_groups == (0, 0, 1, 1)
    assert plan.rocoin.replication == 2.0
    assert plan.rocoin.lost_groups([0, 2]) == [] and plan.rocoin.lost_groups([0, 1, 3]) == [0]
    assert plan.to_json() == data
    assert data["rocoin"]["device_groups"] == [0, 0, 1, 1]


def test_the_plan_hash_covers_the_students_weights():
    data = rocoin_plan()
    data["rocoin"]["groups"][0]["student_weights"] = "sha256:other training"
    with pytest.raises(PlanError, match="plan_hash does not match"):
        plan_from_json(data)


@pytest.mark.parametrize("change, message", [
    ({"rocoin.groups.1.channels": [1]}, "cover 0..3 once"),
    ({"rocoin.groups.1.channels": [1, 2, 3]}, "cover 0..3 once"),
    ({"rocoin.groups.1.devices": [1, 2, 3]}, "exactly one group"),
    ({"rocoin.groups.1.devices": [2]}, "exactly one group"),
    ({"rocoin.groups.0.student": "nobody"}, "is not in rocoin.students"),
    ({"rocoin.groups.0.channels": [0, 9]}, "outside 0..3"),
    ({"rocoin.device_groups": [0, 1, 0, 1]}, "device_groups: does not match"),
    ({"rocoin.feature_shape": [4, 0, 1]}, "feature_shape"),
    ({"rocoin.students.s-k2.flops": "many"}, "flops"),
    ({"method": "robust"}, "only a rocoin plan has one"),
])
def test_a_malformed_rocoin_section_is_refused_naming_the_field(change, message):
    with pytest.raises(PlanError, match=message):
        plan_from_json(rocoin_plan(**change))


def test_the_stage_partitioner_sends_rocoin_to_its_own():
    from pathlib import Path

    from robustdice.partitioner.core.partition import PartitionRequest
    with pytest.raises(PartitionerError, match="rocoin_plan.partition_rocoin makes its plan"):
        PartitionRequest(model="digits_cnn", devices=4, method="rocoin", out=Path("unused")).check()
