"""A rocoin plan on a node: the one stage it is served as (serving_stages.py) and one device's
runtime (rocoin_device.py) against the simulation (RocoinCluster.simulate), on a small plan
made in memory: digits_cnn's cut, untrained students, no distillation."""
import itertools

import pytest
import torch

from robustdice.partitioner.zoo.architecture import encode, trace
from robustdice.partitioner.zoo.checkpoint import state_digest
from robustdice.partitioner.errors import PlanError
from robustdice.partitioner.zoo.inputs import InputSpec
from robustdice.partitioner.zoo.models import build_model
from robustdice.partitioner.core.plan import FillSpec, Plan, RocoinGroup, RocoinSpec, StagePlan
from robustdice.partitioner.core.rocoin_device import RocoinDeviceRuntime
from robustdice.partitioner.core.rocoin_runtime import RocoinCluster, teacher_cut
from robustdice.partitioner.core.runtime import Assembler
from robustdice.partitioner.core.serving_stages import serving_stages
from robustdice.partitioner.zoo.students import Student, shape_of

DEVICES = 4
INPUT = (1, 8, 8)
# Each group's channels in its student's output order, deliberately not sorted: a runtime that
# placed a student's rows by sorted channel ids would put them in the wrong channels.
GROUPS = ((0, 1), (2, 3))
CHANNELS = tuple(tuple(torch.randperm(128, generator=torch.Generator().manual_seed(3))[part].tolist())
                 for part in (slice(0, 50), slice(50, 128)))


def small_plan(fill: str):
    """A rocoin plan over 4 devices (groups 0-1 and 2-3) and its shards, in memory."""
    torch.manual_seed(0)
    cut = teacher_cut(build_model("digits_cnn", "none", seed=1), INPUT)
    students = [Student(INPUT, len(c), cut.feature_shape[1:], shape_of("w8d1")).eval() for c in CHANNELS]
    for s in students:   # BatchNorm statistics other than 0 and 1, so that a student is not trivially small
        for m in s.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    names = [f"w8d1-k{len(c)}" for c in CHANNELS]
    spec = RocoinSpec(cut.layer, cut.feature_shape,
                      tuple(RocoinGroup(g, c, n, state_digest(s.state_dict()))
                            for g, c, n, s in zip(GROUPS, CHANNELS, names, students)),
                      {n: {"architecture": encode(trace(s, n)), "flops": 1, "param_bytes": 1}
                       for n, s in zip(names, students)},
                      encode(cut.head))
    plan = Plan(model="digits_cnn", weights="none", seed=1, weights_digest="sha256:t", devices=DEVICES,
                method="rocoin", scores=(), stages=(), input=InputSpec(INPUT, (0.0,), (1.0,), "stretch"),
                fill=FillSpec(fill), rocoin=spec)
    plan = Plan(**{**plan.__dict__, "plan_hash": plan.compute_hash()})
    mean = torch.rand(cut.feature_shape) + 1.0   # far from zero: a zero fill in its place shows
    shards = []
    for d in range(DEVICES):
        g = spec.device_groups[d]
        shard = {"student": {k: v.clone() for k, v in students[g].state_dict().items()},
                 "head": {k: v.clone() for k, v in cut.head.state_dict().items()}}
        if fill == "mean":
            shard["fill"] = mean.clone()
        shards.append(shard)
    return plan, shards


@pytest.fixture(scope="module", params=["mean", "zero"])
def small(request):
    return small_plan(request.param)


def test_a_rocoin_plan_is_served_as_one_stage_of_its_final_convolutions_channels(small):
    plan, _ = small
    [stage] = serving_stages(plan)
    assert isinstance(stage, StagePlan)
    assert stage.name == "features.7" and stage.neurons == 128 and stage.total_ids == 128
    assert stage.kind == "conv" and stage.channel_dim == 1 and stage.parity is None
    # device d holds its group's channels in its student's order: the members of a group are replicas
    assert [tuple(stage.holders(d)) for d in range(DEVICES)] == [CHANNELS[0], CHANNELS[0], CHANNELS[1], CHANNELS[1]]
    assert stage.lost([0]) == [] and stage.lost([0, 2]) == []
    assert stage.lost([0, 1]) == sorted(CHANNELS[0]) and stage.lost([1, 2, 3]) == sorted(CHANNELS[1])


def test_a_split_plan_is_served_as_its_own_stages():
    stages = (StagePlan("features.0", "conv", 2, 1, (), ((0,), (1,))),
              StagePlan("classifier", "linear", 3, -1, (), ((0, 1), (2,))))
    plan = Plan(model="digits_cnn", weights="none", seed=0, weights_digest="sha256:t", devices=2, method="lop",
                scores=(), stages=stages, input=InputSpec(INPUT, (0.0,), (1.0,), "stretch"))
    assert serving_stages(plan) == stages


FAILED_SETS = [f for k in range(DEVICES) for f in itertools.combinations(range(DEVICES), k)]


def test_every_device_computes_the_simulations_logits_under_every_failed_set(small):
    """Each surviving device runs its student, the slices are assembled as a node assembles them,
    and every survivor's head gives exactly the simulation's logits; the channels reported
    filled are those of the groups that were wholly lost."""
    plan, shards = small
    cluster = RocoinCluster(plan, shards)
    devices = [RocoinDeviceRuntime(plan, shards[d], d) for d in range(DEVICES)]
    assembler = Assembler(plan)
    x = torch.rand(3, *INPUT)
    with torch.inference_mode():
        healthy = cluster.simulate(x)
        for failed in FAILED_SETS:
            alive = [d for d in range(DEVICES) if d not in failed]
            slices = {d: devices[d].start(x).slice for d in alive}
            expected = cluster.simulate(x, failed)
            lost = sorted(c for g in plan.rocoin.lost_groups(failed) for c in plan.rocoin.groups[g].channels)
            for d in alive:
                run = devices[d].start(x)
                full, missing = assembler.assemble(0, slices)
                assert run.advance(full, missing, failed) is True   # one gather, and the frame is done
                assert torch.equal(run.logits, expected), (failed, d)
                assert torch.nonzero(run.zero_masks[-1]).flatten().tolist() == lost
            if not lost:   # a copy of each student survived: losing the others costs nothing
                assert torch.equal(expected, healthy), failed


def test_a_slice_is_the_students_output_neuron_major_in_its_channels_order(small):
    plan, shards = small
    runtime = RocoinDeviceRuntime(plan, shards[2], 2)
    x = torch.rand(2, *INPUT)
    run = runtime.start(x)
    assert run.stage == 0 and run.ids.tolist() == list(CHANNELS[1])
    with torch.no_grad():
        features = RocoinCluster(plan, shards).features(x)
    assert run.slice.shape == (len(CHANNELS[1]), 2, 1, 1)
    assert torch.equal(run.slice, features[:, list(CHANNELS[1])].movedim(1, 0))


def test_a_lost_group_is_filled_with_the_plans_fill(small):
    plan, shards = small
    runtime = RocoinDeviceRuntime(plan, shards[3], 3)
    x = torch.rand(2, *INPUT)
    assembler = Assembler(plan)
    run = runtime.start(x)
    full, missing = assembler.assemble(0, {3: run.slice})   # devices 0 and 1 (group 0) lost
    captured = {}
    runtime.head.register_forward_pre_hook(lambda _m, args: captured.setdefault("features", args[0]))
    run.advance(full, missing, (0, 1))
    lost = list(CHANNELS[0])
    fill = shards[3].get("fill", torch.zeros(128, 1, 1))
    assert torch.equal(captured["features"][:, lost], fill[lost].expand(2, -1, -1, -1))
    assert plan.fill.rule == "zero" or bool((captured["features"][:, lost] != 0).all())


def test_the_runtime_computes_in_the_engines_dtype(small):
    plan, shards = small
    runtime = RocoinDeviceRuntime(plan, shards[0], 0, "cpu", torch.float16)
    x = torch.rand(2, *INPUT, dtype=torch.float16)
    run = runtime.start(x)
    assert run.slice.dtype == torch.float16
    full, missing = Assembler(plan).assemble(0, {0: run.slice})
    run.advance(full, missing, (2, 3))
    assert run.logits.dtype == torch.float16 and run.logits.shape == (2, 10)
    expected = RocoinCluster(plan, shards).simulate(x.float(), (2, 3))
    torch.testing.assert_close(run.logits.float(), expected, rtol=2e-2, atol=2e-2 * float(expected.abs().max()))


def test_a_shard_with_another_groups_student_is_refused(small):
    plan, shards = small
    with pytest.raises(PlanError, match="student's weights are not those plan.json names for group 0"):
        RocoinDeviceRuntime(plan, shards[2], 0)
