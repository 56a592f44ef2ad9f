"""`robustdice partition --method rocoin`: teacher → groups, partitions, students → plan + shards.

The shell around rocoin.py's pure cores (the paper's Algorithm 1) and zoo/students.py's training:

1. cut the teacher after its final convolution and that layer's channel-local followers
   (BatchNorm, activation, pooling: stages.py's stage): `features` (input → (C, h, w)) and
   `head` (the rest: the FC layers), both torch.fx graphs;
2. measure each filter's average activity on calibration images from the training data;
3. group the devices (equal ones until a capacity file is read: --groups K, default N // 2),
   cut the filters into one partition per group, and match groups, partitions and students
   under each device's memory (--budget-mb or --memory: student and head per device);
4. distil one student per group (students.distill, --epochs);
5. write plan.json (method rocoin, a `rocoin` section, no stages) and one shard per device:
   its group's student's weights, the head's, and for --fill mean (the CLI's default for
   rocoin) the teacher's mean features.

Training data: digits_cnn's and fashion_vgg's own training splits, or --train DIR (an
ImageFolder) for any model.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from robustdice.partitioner.core.rocoin import (DeviceProfile, Match, StudentOption, activation_affinity,
                                                groups_for_count, match_groups, partition_filters)
from robustdice.partitioner.core.rocoin_runtime import TeacherCut, teacher_cut
from robustdice.partitioner.errors import PartitionerError

# Fills a rocoin plan knows: a lost partition's channels are zero, or the teacher's mean
# features there (measured on the calibration images). The CLI's default is mean: with the same
# students of fashion_vgg on 2000 test images, the mean over every 2 and 3 failed devices is
# 89.2 % and 82.4 % with the mean, 81.5 % and 59.2 % with zeros (no failure: 92.6 %).
ROCOIN_FILLS = ("zero", "mean")
CALIB_IMAGES = 2048
DEFAULT_EPOCHS = {"digits_cnn": 30, "fashion_vgg": 2}
OTHER_EPOCHS = 5
# Constraint (1h): a student learns its partition when its parameters reach this share of the
# teacher's feature extractor's, in proportion to the partition's share of the channels. At 0.5
# fashion_vgg's two 64-channel partitions get w16d2 students (0.30 MB, 5.7 M MACs of the
# teacher's 29 M), which kept 92.6 % of 2000 test images after 2 epochs (the teacher: 94.5 %).
STUDENT_SHARE = 0.5


@dataclass(frozen=True)
class RocoinOptions:
    """What --method rocoin adds to a PartitionRequest."""

    groups: Optional[int] = None        # --groups K (None: N // 2, at least 1)
    epochs: Optional[int] = None        # --epochs (None: DEFAULT_EPOCHS, else OTHER_EPOCHS)
    train: Optional[Path] = None        # --train DIR: an ImageFolder of training images


@dataclass
class Design:
    """Everything decided before training (Algorithm 1's outcome), and what it was decided on."""

    request: Any                      # the PartitionRequest
    teacher: nn.Module
    cut: TeacherCut
    spec: Any                         # the input specification
    groups: List[Tuple[int, ...]]
    partitions: List[Tuple[int, ...]]
    matches: List[Match]
    feature_mean: torch.Tensor        # (C, h, w): the mean fill
    feature_scale: torch.Tensor       # (C,): each channel's spread, the unit of the feature error
    nonnegative: bool
    images: torch.Tensor
    labels: Optional[torch.Tensor]
    epochs: int
    design_s: float


def training_images(request) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    options = request.rocoin or RocoinOptions()
    if options.train is not None:
        from robustdice.partitioner.zoo.data import load_image_folder
        return load_image_folder(options.train, request.input_spec())
    from robustdice.partitioner.zoo.data import training_data
    try:
        images, labels, _, _ = training_data(request.model)
    except PartitionerError:
        raise PartitionerError(f"--method rocoin trains students on {request.model}'s training images, which are not "
                               f"here: give --train DIR (an ImageFolder)") from None
    return images, labels


def check_request(request) -> None:
    if request.devices < 1:
        raise PartitionerError(f"--devices must be >= 1, got {request.devices}")
    if request.fill not in ROCOIN_FILLS:
        raise PartitionerError(f"--method rocoin fills a lost partition with zero or mean, not {request.fill!r} "
                               f"(no BatchNorm runs after its one gather)")
    for option, value in (("--threshold", request.threshold), ("--thresholds", request.thresholds),
                          ("--replication", request.replication)):
        if value is not None:
            raise PartitionerError(f"{option} sizes robust's clusters; --method rocoin takes --groups, and "
                                   f"--budget-mb or --memory for each device's memory")
    if request.capacities is not None and len(request.capacities.devices) != request.devices:
        raise PartitionerError(f"--capacities lists {len(request.capacities.devices)} devices and --devices is "
                               f"{request.devices}: give one entry per device, in the plan's order")
    groups = (request.rocoin or RocoinOptions()).groups
    if groups is not None and not 1 <= groups <= request.devices:
        raise PartitionerError(f"--groups must lie in 1..{request.devices} (the devices), got {groups}")


def device_memory(request, teacher: nn.Module) -> float:
    """Each device's memory for its student and the head, in bytes (unbounded by default)."""
    if request.budget_mb is not None:
        return request.budget_mb * 1e6
    if request.memory is not None:
        from robustdice.partitioner.core.partition import nmr_per_device_bytes
        from robustdice.partitioner.core.stages import trace_stages
        return request.memory * nmr_per_device_bytes(trace_stages(teacher), request)
    return float("inf")


def family_options(input_shape: Sequence[int], out_channels: int, out_hw: Tuple[int, int],
                   nonnegative: bool = True) -> List[StudentOption]:
    """The student family (students.FAMILY) for a partition of `out_channels` filters, with each
    member's cost: what choose_student weighs."""
    from robustdice.partitioner.zoo.students import FAMILY, Student, count_macs, option_name, state_bytes

    out = []
    for shape in FAMILY:
        model = Student(input_shape, out_channels, out_hw, shape, nonnegative)
        out.append(StudentOption(option_name(shape, out_channels), count_macs(model, input_shape), state_bytes(model)))
    return out


def device_profiles(request, memory: float) -> List[DeviceProfile]:
    """Each device's resource profile: equal ones with `memory`, or --capacities' speed and the
    lesser of `memory` and its memory_bytes (students are matched to them, rocoin.match_groups)."""
    caps = request.capacities
    if caps is None or caps.uniform:
        return [DeviceProfile(memory_bytes=memory if caps is None or caps.devices[0].memory_bytes is None
                              else min(memory, caps.devices[0].memory_bytes))] * request.devices
    return [DeviceProfile(flops_per_s=c.speed, memory_bytes=memory if c.memory_bytes is None
                          else min(memory, float(c.memory_bytes))) for c in caps.devices]


def design(request) -> Design:
    """Algorithm 1 for `request` (a PartitionRequest with method rocoin): no training yet."""
    from robustdice.partitioner.zoo.models import build_model
    from robustdice.partitioner.zoo.students import state_bytes

    check_request(request)
    started = time.perf_counter()
    spec = request.input_spec()
    images, labels = training_images(request)   # before the teacher: no data fails fast
    teacher = build_model(request.model, weights=request.weights, seed=request.seed)
    cut = teacher_cut(teacher, spec.shape)
    if tuple(images.shape[1:]) != tuple(spec.shape):
        raise PartitionerError(f"training images of shape {list(images.shape[1:])} do not fit {request.model}'s "
                               f"input {list(spec.shape)}")
    generator = torch.Generator().manual_seed(request.seed)
    calib = images[torch.randperm(len(images), generator=generator)[:CALIB_IMAGES]]
    with torch.no_grad():
        feats = torch.cat([cut.features(calib[i:i + 512]) for i in range(0, len(calib), 512)])
    activity = feats.flatten(2).mean(2).double().numpy()   # a_i(x): each filter's average activity
    c = cut.feature_shape[0]
    options = request.rocoin or RocoinOptions()
    k = options.groups or max(1, request.devices // 2)
    profiles = device_profiles(request, device_memory(request, teacher))
    groups = groups_for_count(profiles, k)
    partitions = partition_filters(activation_affinity(activity), k, request.seed)
    nonnegative = bool(feats.min() >= 0)
    out_hw = cut.feature_shape[1:]
    fill = request.fill == "mean"
    head_bytes = state_bytes(cut.head) + (feats[0].numel() * 4 if fill else 0)
    extractor_bytes = state_bytes(cut.features)
    matches = match_groups(
        groups, partitions, profiles,
        [family_options(spec.shape, len(p), out_hw, nonnegative) for p in partitions], head_bytes,
        [STUDENT_SHARE * extractor_bytes * len(p) / c for p in partitions],
        [len(p) * out_hw[0] * out_hw[1] * 4 for p in partitions])
    epochs = options.epochs or DEFAULT_EPOCHS.get(request.model, OTHER_EPOCHS)
    return Design(request, teacher, cut, spec, groups, partitions, matches, feats.mean(0),
                  feats.transpose(0, 1).flatten(1).std(1), nonnegative, images, labels, epochs,
                  time.perf_counter() - started)


def train(d: Design) -> Tuple[List[nn.Module], float]:
    """One student per group, distilled; and the seconds it took."""
    from robustdice.partitioner.zoo.students import Student, distill, shape_of

    started = time.perf_counter()
    torch.manual_seed(d.request.seed)
    out_hw = d.cut.feature_shape[1:]
    students = [Student(d.spec.shape, len(d.partitions[m.partition]), out_hw, shape_of(m.student), d.nonnegative)
                for m in d.matches]
    distilled = distill(students, [d.partitions[m.partition] for m in d.matches], d.cut.features, d.cut.head,
                        d.images, d.labels, seed=d.request.seed, epochs=d.epochs, feature_scale=d.feature_scale,
                        progress=d.request.show_progress, desc=f"distil {len(students)} students")
    return list(distilled.students), time.perf_counter() - started


def write(d: Design, students: Sequence[nn.Module], out: Optional[Path] = None, fill: Optional[str] = None,
          training_s: float = 0.0) -> Dict[str, Any]:
    """plan.json and the shards for trained `students` (one per group); the summary `--json`
    prints. `out` and `fill` default to the request's (a benchmark writes one training twice)."""
    from robustdice.partitioner.core.capacity import plan_fields
    from robustdice.partitioner.core.plan import FillSpec, Plan, RocoinGroup, RocoinSpec, save_plan, sha256_file
    from robustdice.partitioner.core.runtime import save_shard, weights_digest
    from robustdice.partitioner.core.stages import param_bytes
    from robustdice.partitioner.zoo.architecture import encode, trace
    from robustdice.partitioner.zoo.students import count_macs, state_bytes
    from robustdice.partitioner.zoo.usermodel import is_import_path

    request = d.request if out is None and fill is None else replace(
        d.request, out=out or d.request.out, fill=fill or d.request.fill)
    check_request(request)
    groups, stored = [], {}
    for g, (m, student) in enumerate(zip(d.matches, students)):
        stored[m.student] = {"architecture": encode(trace(student, f"student {m.student}")),
                             "flops": count_macs(student, d.spec.shape), "param_bytes": state_bytes(student)}
        groups.append(RocoinGroup(tuple(d.groups[g]), tuple(d.partitions[m.partition]), m.student,
                                  weights_digest(student)))
    rocoin = RocoinSpec(d.cut.layer, tuple(d.cut.feature_shape), tuple(groups), stored, encode(d.cut.head))
    plan = Plan(
        model=request.model, weights=str(request.weights), seed=request.seed, weights_digest=weights_digest(d.teacher),
        devices=request.devices, method="rocoin", scores=(), stages=(), input=request.input_spec(),
        fill=FillSpec(request.fill), architecture=encode(d.teacher) if is_import_path(request.model) else None,
        rocoin=rocoin, **plan_fields(request.capacities))
    plan_hash = plan.compute_hash()
    out_dir = Path(request.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    head_state = {k: v.detach().clone() for k, v in d.cut.head.state_dict().items()}
    records, per_device = {}, []
    for device in range(request.devices):
        g = rocoin.device_groups[device]
        shard: Dict[str, Any] = {"student": {k: v.detach().clone() for k, v in students[g].state_dict().items()},
                                 "head": head_state}
        if request.fill == "mean":
            shard["fill"] = d.feature_mean.detach().clone().float()
        per_device.append(param_bytes(shard))
        path = save_shard(shard, plan_hash, device, out_dir)
        records[str(device)] = {"file": str(path.relative_to(out_dir)), "sha256": sha256_file(path)}
    plan = replace(plan, shards=records, plan_hash=plan_hash)
    save_plan(plan, out_dir)
    return {
        "method": "rocoin", "devices": request.devices, "model": request.model, "plan_hash": plan_hash,
        "plan": str(out_dir), "full_param_bytes": param_bytes(d.teacher.state_dict()),
        "per_device_param_bytes": per_device, "replication_factor": rocoin.replication, "fill": request.fill,
        "thresholds": {},
        "rocoin": {
            "feature_layer": d.cut.layer, "feature_shape": list(d.cut.feature_shape),
            "groups": [list(g) for g in d.groups], "partitions": [list(p) for p in d.partitions],
            "students": [{"group": m.group, "partition": m.partition, "student": m.student,
                          "meets_requirement": m.meets_requirement, "flops": stored[m.student]["flops"],
                          "param_bytes": stored[m.student]["param_bytes"]} for m in d.matches],
            "teacher_flops": count_macs(d.teacher, d.spec.shape), "epochs": d.epochs,
            "training_images": int(len(d.images)), "design_s": round(d.design_s, 1),
            "training_s": round(training_s, 1), "gathers_per_frame": 1,
        },
    }


def partition_rocoin(request) -> Dict[str, Any]:
    """The whole of `robustdice partition --method rocoin` (partition.partition's counterpart,
    which the CLI and dse call for that method); returns the summary."""
    d = design(request)
    students, training_s = train(d)
    return write(d, students, training_s=training_s)
