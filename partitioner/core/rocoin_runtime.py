"""What a rocoin plan computes, simulated exactly in one process (Cluster.simulate for rocoin).

Every device holds its group's student and the teacher's head (its shard: `student`, `head`
and, for the mean fill, `fill`: the teacher's mean features). For a frame, each surviving
device runs its student on the input; per group the first surviving device's output (by
device index) gives that partition's channels; a partition whose whole group failed is
filled (zero, or its mean); the head runs on the concatenation, on the first surviving
device. One gather per frame, whatever the model's depth.

The students and the head are built from the graphs the plan stores (architecture.build):
nothing of the teacher's or the students' code is needed, as on a board. The teacher's cut
(teacher_cut: its features, then its head) is here too: the partitioner takes the head it
ships from it, and verify checks that head against it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple

import torch
import torch.fx as fx
from torch import nn

from robustdice.partitioner.core.plan import Plan
from robustdice.partitioner.errors import ModelError, PlanError
from robustdice.partitioner.zoo.checkpoint import state_digest

SHARD_KEYS = ("student", "head")


@dataclass
class TeacherCut:
    """The teacher cut after its final convolution's stage: features(x) then head(features)
    is the teacher."""

    layer: str
    features: fx.GraphModule
    head: fx.GraphModule
    feature_shape: Tuple[int, int, int]


def teacher_cut(model: nn.Module, input_shape: Sequence[int]) -> TeacherCut:
    """Cut `model` after its last Conv2d and that layer's channel-local followers (the stage
    stages.py makes of them). Raises ModelError when the rest of the model reads anything
    but that output (a skip connection around it), or when it has no convolution."""
    from robustdice.partitioner.core.stages import trace_stages

    staged = trace_stages(model)
    convs = [s for s in staged.stages if s.kind == "conv"]
    if not convs:
        raise ModelError(f"{type(model).__name__} has no Conv2d: rocoin distils its final convolution's filters")
    stage = convs[-1]
    gm = fx.symbolic_trace(model.eval())
    cut = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == stage.name)
    for _ in stage.followers:   # trace_stages took exactly this chain of single users
        cut = next(iter(cut.users))
    features_graph, env = fx.Graph(), {}
    for node in gm.graph.nodes:
        env[node] = features_graph.node_copy(node, lambda n: env[n])
        if node is cut:
            break
    features_graph.output(env[cut])
    features = fx.GraphModule(gm, features_graph, "RocoinFeatures").eval()

    head_graph, env = fx.Graph(), {}
    env[cut] = head_graph.placeholder("features")
    upstream = set()
    for node in gm.graph.nodes:
        upstream.add(node)
        if node is cut:
            break
    after = False
    for node in gm.graph.nodes:
        if node is cut:
            after = True
            continue
        if not after:
            continue
        reads = [a for a in node.all_input_nodes if a not in env]
        if any(a in upstream for a in reads):
            bad = next(a for a in reads if a in upstream)
            raise ModelError(f"{type(model).__name__}: node {node.name} after layer '{stage.name}' reads {bad.name} "
                             f"from before it; rocoin needs a head that reads the final convolution's output only")
        if node.op == "output":
            head_graph.output(env[node.args[0]] if isinstance(node.args[0], fx.Node) else node.args[0])
        else:
            env[node] = head_graph.node_copy(node, lambda n: env[n])
    head = fx.GraphModule(gm, head_graph, "RocoinHead").eval()
    with torch.no_grad():
        shape = tuple(features(torch.zeros((1,) + tuple(input_shape))).shape[1:])
    if len(shape) != 3:
        raise ModelError(f"{type(model).__name__}: the output of '{stage.name}' has shape {list(shape)}, not (C, h, w)")
    return TeacherCut(stage.name, features, head, shape)


def _stored(graph: Mapping, state: Mapping[str, torch.Tensor], where: str, device, dtype) -> torch.nn.Module:
    """A module from a stored graph and its weights, straight onto `device` in `dtype`."""
    from robustdice.partitioner.zoo.architecture import build

    with torch.device("meta"):
        model = build(graph, where)
    try:
        model.load_state_dict(dict(state), strict=True, assign=True)
    except RuntimeError as exc:
        raise PlanError(f"{where}: the shard's weights do not fit its graph: {str(exc).splitlines()[0]}") from None
    return model.to(device=device, dtype=dtype).eval()


def check_shard(shard: Mapping, device: int) -> None:
    for key in SHARD_KEYS:
        if not isinstance(shard.get(key), dict):
            raise PlanError(f"shard of device {device} has no {key} weights: not a rocoin shard")


def shard_bytes(shard: Mapping) -> int:
    tensors = list(shard["student"].values()) + list(shard["head"].values())
    if isinstance(shard.get("fill"), torch.Tensor):
        tensors.append(shard["fill"])
    return sum(t.numel() * t.element_size() for t in tensors)


def device_parts(plan: Plan, shard: Mapping, d: int, device, dtype) -> Tuple[torch.nn.Module, torch.nn.Module,
                                                                             torch.Tensor]:
    """Device d's student, head and fill ((C, h, w): zeros without a `fill` in its shard), built
    from the graphs the plan stores and the shard's weights, on `device` in `dtype`: what the
    simulation holds of every device and a node of its own (rocoin_device.py)."""
    spec = plan.rocoin
    if spec is None:
        raise PlanError("not a rocoin plan")
    check_shard(shard, d)
    group = spec.groups[spec.device_groups[d]]
    if state_digest(shard["student"]) != group.student_weights:
        raise PlanError(f"shard of device {d}: its student's weights are not those plan.json names "
                        f"for group {spec.device_groups[d]}")
    student = _stored(spec.students[group.student]["architecture"], shard["student"], f"device {d}'s student",
                      device, dtype)
    head = _stored(spec.head, shard["head"], f"device {d}'s head", device, dtype)
    c, h, w = spec.feature_shape
    fill = shard.get("fill")
    if fill is None:
        fill = torch.zeros((c, h, w))
    if not isinstance(fill, torch.Tensor) or tuple(fill.shape) != (c, h, w):
        raise PlanError(f"shard of device {d}: fill is not a ({c}, {h}, {w}) tensor")
    return student, head, fill.to(device=device, dtype=dtype)


class RocoinCluster:
    """Every device of a rocoin plan in one process."""

    def __init__(self, plan: Plan, shards: Sequence[Mapping], device="cpu", dtype=torch.float32) -> None:
        spec = plan.rocoin
        if spec is None:
            raise PlanError("not a rocoin plan")
        self.plan, self.spec = plan, spec
        self.device, self.dtype = torch.device(device), dtype
        parts = [device_parts(plan, s, d, self.device, dtype) for d, s in enumerate(shards)]
        self.students = [p[0] for p in parts]
        self.heads = [p[1] for p in parts]
        self.fills: List[torch.Tensor] = [p[2] for p in parts]
        self.index = [torch.as_tensor(g.channels, dtype=torch.long, device=self.device) for g in spec.groups]
        self.shard_bytes = [shard_bytes(s) for s in shards]

    def features(self, x: torch.Tensor, failed: Iterable[int] = ()) -> torch.Tensor:
        """The gathered features (B, C, h, w) of `x` with `failed` down, filled where a whole
        group failed (the fill of the first surviving device, which runs the head)."""
        failed = frozenset(failed)
        alive = [d for d in range(self.plan.devices) if d not in failed]
        if not alive:
            raise PlanError("every device failed: nothing computes")
        x = x.to(device=self.device, dtype=self.dtype)
        full = self.fills[alive[0]].expand((x.shape[0],) + tuple(self.spec.feature_shape)).clone()
        for g, group in enumerate(self.spec.groups):
            first = next((d for d in group.devices if d not in failed), None)
            if first is not None:
                full.index_copy_(1, self.index[g], self.students[first](x))
        return full

    def simulate(self, x: torch.Tensor, failed: Iterable[int] = ()) -> torch.Tensor:
        """Logits for `x` with `failed` down (float32 on the CPU)."""
        failed = frozenset(failed)
        with torch.inference_mode():
            full = self.features(x, failed)
            head = self.heads[min(d for d in range(self.plan.devices) if d not in failed)]
            return head(full).to(device="cpu", dtype=torch.float32)


def verify_rocoin(cluster: RocoinCluster, teacher: nn.Module, directory, batch: int = 2, seed: int = 0) -> Dict:
    """What `robustdice verify` checks of a rocoin plan, on random input, `teacher` being the
    model the plan was made from (evaluate.verify_plan checked its digest):

    - the head, as the plan stores it, on the teacher's own features gives the teacher's
      logits (the teacher was cut in the right place, and its head shipped whole);
    - every failed set that leaves a device in each group gives the no-failure logits (the
      copies of a group agree: losing any of them costs nothing).
    The students approximate the teacher, so the plan's logits are not compared with it here
    (`evaluate` measures what that costs in accuracy).
    """
    import itertools

    plan = cluster.plan
    cut = teacher_cut(teacher, plan.input_shape)
    x = torch.randn((batch,) + tuple(plan.input_shape), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        reference = teacher(x)
        head = cluster.heads[0](cut.features(x).to(cluster.dtype)).float()
        plain = cluster.simulate(x)
        diffs = [float((head - reference).abs().max())]
        covered = [f for k in range(1, plan.devices) for f in itertools.combinations(range(plan.devices), k)
                   if not plan.rocoin.lost_groups(f)]
        diffs += [float((cluster.simulate(x, f) - plain).abs().max()) for f in covered]
    scale = float(reference.abs().max())
    copies_agree = max(diffs[1:] or [0.0]) == 0.0
    ok = bool(torch.allclose(head, reference, rtol=1e-4, atol=1e-5 * max(1.0, scale))) and copies_agree
    return {"plan": str(directory), "model": plan.model, "method": plan.method, "devices": plan.devices,
            "max_abs_diff": max(diffs), "reference_max_abs": scale, "allclose": ok,
            "replica_sets_checked": len(covered)}
