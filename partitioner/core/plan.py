"""The plan: which device computes which neurons of which stage, and how it is stored.

plan.json (human-readable, versioned) holds the model, a digest of its weights, N, the method,
and per stage: the layer's fx name, its followers, the per-device neuron ids and, for cdc, the
parity layout. For a user's own model (`package.module:factory`) it also holds the model's
traced graph (`architecture`, see zoo/architecture.py), which the boards build it from.
`plan_hash` is the SHA-256 of the canonical JSON of everything except itself and
the `shards` table (the shards embed the hash, so they cannot be inside it). The `shards` table
records each shard file and its SHA-256, so that a corrupt or foreign shard is caught.

Neuron ids of a stage are 0..C−1. For cdc, parity row j has id C + j, so that the parity
device's output travels and is gathered like any other neuron's; `StagePlan.holders(d)` gives
every id device d produces.

A rocoin plan has no stages: its `rocoin` section (RocoinSpec) says which group each device is
in, which student the group runs (its graph stored as zoo/architecture.py stores a model, and the
digest of its weights), which channels of the teacher's final convolution that student gives,
and the teacher's head; each shard holds its device's student and the head.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from robustdice.partitioner.core.signing import SIGNATURE_FILE, signature_document, verify_document
from robustdice.partitioner.errors import PlanError
from robustdice.partitioner.zoo.inputs import InputSpec

PLAN_FORMAT = "robustdice-plan"
PLAN_VERSION = 3  # 2: the input specification; 3: the fill rule, parity rows on any device
READABLE_VERSIONS = (2, 3, 4)  # a version-2 plan is a version-3 plan with zero-fill and one parity device
# A plan dealt for boards of different speed (capacity.py) records their capacities and is written
# as version 4, so that a board too old to know them refuses it by its version; plans for equal
# boards stay version 3, byte for byte as before.
CAPACITY_PLAN_VERSION = 4
METHODS = ("robust", "lop", "nmr", "cdc")
# Methods added for issue 13: `random` replicates like robust with importance-blind groups (the
# control that shows what the scores earn); `robust+cdc` adds parity rows to robust's single
# copies, so that any one lost device is recovered exactly.
METHODS += ("random", "robust+cdc")
# `uniform` (the same replication in every layer, copies to neurons drawn at random) is the plan a
# budget buys without any scores: the second control, blind to importance between layers too.
METHODS += ("uniform",)
# `rocoin` (RoCoIn, papers/rocoin-paper.txt): no stages; students distilled from the teacher, one
# per group of devices, each giving one partition of the final convolution's channels, and the
# teacher's head on their concatenation: one gather per frame. Its plan has a `rocoin` section.
METHODS += ("rocoin",)
# How a neuron that no surviving device delivers is filled (after its stage's followers):
#   zero     the paper's zero-fill;
#   mean     its expected output on calibration data, one value per neuron;
#   mean+bn  mean, and BatchNorm statistics recalibrated offline for each set of failed devices
#            (2^N - 2 of them), chosen by the frame's failed set (switchable BatchNorm).
FILLS = ("zero", "mean", "mean+bn")
PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class ParityPlan:
    device: int
    members: Tuple[Tuple[int, ...], ...]   # row j sums these data neurons
    # The device of each row when rows are spread over devices (robust+cdc); None: all on `device`.
    row_devices: Optional[Tuple[int, ...]] = None

    def row_device(self, j: int) -> int:
        return self.device if self.row_devices is None else self.row_devices[j]

    def rows_on(self, device: int) -> List[int]:
        """Indices j of the parity rows that `device` computes."""
        if self.row_devices is None:
            return list(range(len(self.members))) if device == self.device else []
        return [j for j, d in enumerate(self.row_devices) if d == device]


@dataclass(frozen=True)
class FillSpec:
    """The fill rule of a plan (see FILLS); `sets` lists the failed sets that have recalibrated
    BatchNorm statistics, in the order of the shards' `recal` rows (mean+bn only)."""

    rule: str = "zero"
    sets: Tuple[Tuple[int, ...], ...] = ()

    def set_index(self, failed) -> Optional[int]:
        """Row of the recalibrated statistics for the frame's failed set, None for the base ones."""
        key = tuple(sorted(failed))
        if not key or self.rule != "mean+bn":
            return None
        try:
            return self.sets.index(key)
        except ValueError:
            return None


@dataclass(frozen=True)
class StagePlan:
    name: str
    kind: str                      # "conv" | "linear"
    neurons: int
    channel_dim: int               # 1 (conv) or -1 (linear)
    followers: Tuple[str, ...]
    assignment: Tuple[Tuple[int, ...], ...]   # per device, data neuron ids
    parity: Optional[ParityPlan] = None
    threshold: Optional[float] = None
    groups: Optional[int] = None

    @property
    def followers_after_gather(self) -> bool:
        """cdc's parity holds only for the linear part, so its followers run after the gather."""
        return self.parity is not None

    @property
    def total_ids(self) -> int:
        return self.neurons + (len(self.parity.members) if self.parity else 0)

    def holders(self, device: int) -> List[int]:
        ids = list(self.assignment[device])
        if self.parity is not None:
            ids += [self.neurons + j for j in self.parity.rows_on(device)]
        return ids

    def lost(self, failed) -> List[int]:
        """Data neurons that no device outside `failed` delivers and parity cannot recover.

        The same rule as runtime.recover_parity, on sets: a parity row whose device survived
        recovers its one missing member. Pure, so that a plan's losses are known without torch.
        """
        failed = set(failed)
        have = set()
        for d, ids in enumerate(self.assignment):
            if d not in failed:
                have.update(ids)
        lost = set(range(self.neurons)) - have
        if self.parity is not None and lost:
            for j, members in enumerate(self.parity.members):
                if self.parity.row_device(j) in failed:
                    continue
                gone = [m for m in members if m in lost]
                if len(gone) == 1:
                    lost.discard(gone[0])
        return sorted(lost)


@dataclass(frozen=True)
class RocoinGroup:
    """One group of a rocoin plan: its devices run the same student, which gives `channels` of
    the teacher's final convolution (in the student's output order)."""

    devices: Tuple[int, ...]
    channels: Tuple[int, ...]
    student: str
    # The digest of the student's trained weights (runtime.weights_digest), so that two trainings
    # give two plans: the plan hash covers what the boards of a group run.
    student_weights: str


@dataclass(frozen=True)
class RocoinSpec:
    """The `rocoin` section of a rocoin plan (see rocoin_plan.py).

    feature_layer  the teacher's final convolution (fx name), whose output after its followers
                   (pooling included) the students reproduce: `feature_shape` (C, h, w) per image
    groups         per group its devices, its partition of the C channels, its student's name and
                   the digest of its student's weights; the partitions of all groups cover 0..C-1 once
    device_groups  each device's group (derived from groups; stored so a reader need not search)
    students       name -> {"architecture": architecture.encode's graph, "flops": MACs per image,
                   "param_bytes": bytes}
    head           the teacher's graph after the features, as architecture.encode stores it
    """

    feature_layer: str
    feature_shape: Tuple[int, int, int]
    groups: Tuple[RocoinGroup, ...]
    students: Mapping[str, Mapping[str, Any]]
    head: Mapping[str, Any]

    @property
    def device_groups(self) -> Tuple[int, ...]:
        owner = {d: g for g, group in enumerate(self.groups) for d in group.devices}
        return tuple(owner[d] for d in sorted(owner))

    @property
    def replication(self) -> float:
        """Copies of each partition: devices per group, on average."""
        return sum(len(g.devices) for g in self.groups) / len(self.groups)

    def lost_groups(self, failed) -> List[int]:
        """Groups whose every device failed: their channels are filled."""
        failed = set(failed)
        return [g for g, group in enumerate(self.groups) if set(group.devices) <= failed]

    def to_json(self) -> Dict[str, Any]:
        return {
            "feature_layer": self.feature_layer,
            "feature_shape": list(self.feature_shape),
            "device_groups": list(self.device_groups),
            "groups": [{"devices": list(g.devices), "channels": list(g.channels), "student": g.student,
                        "student_weights": g.student_weights} for g in self.groups],
            "students": {k: dict(v) for k, v in sorted(self.students.items())},
            "head": self.head,
        }


@dataclass(frozen=True)
class Plan:
    model: str
    weights: str
    seed: int
    weights_digest: str
    devices: int
    method: str
    scores: Tuple[str, ...]
    stages: Tuple[StagePlan, ...]
    input: Optional[InputSpec] = None   # shape and preprocessing; nodes check inputs against it
    fill: FillSpec = FillSpec()
    version: int = PLAN_VERSION        # as read: a version-2 plan keeps hashing as it was written
    shards: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    plan_hash: str = ""
    # A user's own model (model "package.module:factory"): its traced graph (zoo/architecture.py),
    # so that a board builds it from torch alone. None for the built-in models.
    architecture: Optional[Mapping[str, Any]] = None
    # method rocoin: its groups, partitions, students and head (RocoinSpec); None otherwise.
    rocoin: Optional[RocoinSpec] = None
    # The capacities the plan was dealt for (capacity.Capacities.plan_record: per device its speed
    # and memory_bytes); None for equal devices.
    capacities: Optional[Tuple[Mapping[str, Any], ...]] = None

    def body(self) -> Dict[str, Any]:
        body = {
            "format": PLAN_FORMAT,
            "version": self.version,
            "model": self.model,
            "weights": self.weights,
            "seed": self.seed,
            "weights_digest": self.weights_digest,
            "devices": self.devices,
            "method": self.method,
            "scores": list(self.scores),
            "input": self.input.to_json() if self.input else None,
            "stages": [_stage_to_json(s) for s in self.stages],
            # Only when present, so that the built-in models' plans and hashes stay as they were.
            **({"architecture": self.architecture} if self.architecture is not None else {}),
            **({"rocoin": self.rocoin.to_json()} if self.rocoin is not None else {}),
            **({"capacities": [dict(c) for c in self.capacities]} if self.capacities is not None else {}),
        }
        if self.fill != FillSpec():  # zero-fill plans carry no fill field
            body["fill"] = {"rule": self.fill.rule, "sets": [list(f) for f in self.fill.sets]}
        return body

    def compute_hash(self) -> str:
        canonical = json.dumps(self.body(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_json(self) -> Dict[str, Any]:
        out = self.body()
        out["shards"] = {k: dict(v) for k, v in sorted(self.shards.items())}
        out["plan_hash"] = self.plan_hash
        return out

    @property
    def input_shape(self) -> Tuple[int, int, int]:
        if self.input is None:
            raise PlanError("plan has no input specification")
        return self.input.shape

    def stage(self, name: str) -> StagePlan:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)


def _stage_to_json(s: StagePlan) -> Dict[str, Any]:
    out: Dict[str, Any] = {
        "name": s.name,
        "kind": s.kind,
        "neurons": s.neurons,
        "channel_dim": s.channel_dim,
        "followers": list(s.followers),
        "followers_after_gather": s.followers_after_gather,
        "assignment": {str(d): list(ids) for d, ids in enumerate(s.assignment)},
    }
    if s.parity is not None:
        out["parity"] = {"device": s.parity.device, "members": [list(m) for m in s.parity.members]}
        if s.parity.row_devices is not None:
            out["parity"]["row_devices"] = list(s.parity.row_devices)
    if s.threshold is not None:
        out["threshold"] = s.threshold
    if s.groups is not None:
        out["groups"] = s.groups
    return out


class _Reader:
    """Typed access to a JSON object that names the field when something is wrong."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise PlanError(f"plan field {where or 'top level'}: expected an object")
        self.data = data
        self.where = where

    def get(self, key: str, kind, optional: bool = False):
        path = f"{self.where}.{key}" if self.where else key
        if key not in self.data:
            if optional:
                return None
            raise PlanError(f"plan field {path} is missing")
        value = self.data[key]
        if kind is int and isinstance(value, bool) or not isinstance(value, kind):
            raise PlanError(f"plan field {path}: {value!r} is not {getattr(kind, '__name__', kind)}")
        return value


def _int_list(values: Any, where: str, upper: int) -> Tuple[int, ...]:
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise PlanError(f"plan field {where}: expected a list of integers")
    bad = [v for v in values if v < 0 or v >= upper]
    if bad:
        raise PlanError(f"plan field {where}: neuron id {bad[0]} outside 0..{upper - 1}")
    return tuple(values)


def _stage_from_json(data: Any, index: int, devices: int) -> StagePlan:
    r = _Reader(data, f"stages[{index}]")
    neurons = r.get("neurons", int)
    kind = r.get("kind", str)
    if kind not in ("conv", "linear"):
        raise PlanError(f"plan field stages[{index}].kind: {kind!r} is not conv or linear")
    assignment_raw = r.get("assignment", dict)
    assignment = []
    for d in range(devices):
        if str(d) not in assignment_raw:
            raise PlanError(f"plan field stages[{index}].assignment is missing device {d}")
        assignment.append(_int_list(assignment_raw[str(d)], f"stages[{index}].assignment.{d}", neurons))
    parity = None
    parity_raw = r.get("parity", dict, optional=True)
    if parity_raw is not None:
        p = _Reader(parity_raw, f"stages[{index}].parity")
        device = p.get("device", int)
        if not 0 <= device < devices:
            raise PlanError(f"plan field stages[{index}].parity.device: {device} is not a device")
        members = tuple(_int_list(m, f"stages[{index}].parity.members[{j}]", neurons)
                        for j, m in enumerate(p.get("members", list)))
        row_devices = p.get("row_devices", list, optional=True)
        if row_devices is not None:
            if len(row_devices) != len(members) or not all(
                    isinstance(v, int) and not isinstance(v, bool) and 0 <= v < devices for v in row_devices):
                raise PlanError(f"plan field stages[{index}].parity.row_devices: expected one device "
                                f"0..{devices - 1} per parity row ({len(members)})")
            row_devices = tuple(row_devices)
        parity = ParityPlan(device, members, row_devices)
    followers = r.get("followers", list)
    threshold = r.get("threshold", (int, float), optional=True)
    return StagePlan(
        name=r.get("name", str), kind=kind, neurons=neurons, channel_dim=r.get("channel_dim", int),
        followers=tuple(str(f) for f in followers), assignment=tuple(assignment), parity=parity,
        threshold=None if threshold is None else float(threshold), groups=r.get("groups", int, optional=True),
    )


def plan_from_json(data: Any) -> Plan:
    r = _Reader(data, "")
    fmt = r.get("format", str)
    if fmt != PLAN_FORMAT:
        raise PlanError(f"plan field format: {fmt!r} is not {PLAN_FORMAT!r}")
    version = r.get("version", int)
    if version not in READABLE_VERSIONS:
        raise PlanError(f"plan field version: {version} is not supported "
                        f"(this build reads {', '.join(map(str, READABLE_VERSIONS))})")
    devices = r.get("devices", int)
    if devices < 1:
        raise PlanError(f"plan field devices: {devices} must be >= 1")
    method = r.get("method", str)
    if method not in METHODS:
        raise PlanError(f"plan field method: {method!r} is not one of {', '.join(METHODS)}")
    stages = tuple(_stage_from_json(s, i, devices) for i, s in enumerate(r.get("stages", list)))
    spec = InputSpec.from_json(r.get("input", dict))
    fill = _fill_from_json(r.get("fill", dict, optional=True), devices)
    shards = {str(k): dict(v) for k, v in r.get("shards", dict).items() if isinstance(v, dict)}
    plan = Plan(
        model=r.get("model", str), weights=r.get("weights", str), seed=r.get("seed", int),
        weights_digest=r.get("weights_digest", str), devices=devices, method=method,
        scores=tuple(r.get("scores", list)), stages=stages, input=spec, fill=fill, version=version, shards=shards,
        plan_hash=r.get("plan_hash", str), architecture=r.get("architecture", dict, optional=True),
        rocoin=_rocoin_from_json(r.get("rocoin", dict, optional=True), devices),
        capacities=_capacities_from_json(r.get("capacities", list, optional=True), devices),
    )
    if (method == "rocoin") != (plan.rocoin is not None) or (plan.rocoin is not None and stages):
        raise PlanError("plan field rocoin: a rocoin plan has a rocoin section and no stages, and only a rocoin "
                        f"plan has one (method {method!r}, {len(stages)} stages)")
    if plan.compute_hash() != plan.plan_hash:
        raise PlanError("plan.json is corrupt or was edited: its plan_hash does not match its content")
    if plan.architecture is None and ":" in plan.model:
        # An import path is for the machine that partitions (it has the user's code); a board
        # builds a user's model from the stored graph only, and never imports what a file names.
        raise PlanError(f"plan field model: {plan.model!r} is an import path and the plan has no architecture; "
                        f"a board runs only the built-in models or a plan's stored graph")
    return plan


def _capacities_from_json(data: Any, devices: int) -> Optional[Tuple[Dict[str, Any], ...]]:
    if data is None:
        return None
    if len(data) != devices:
        raise PlanError(f"plan field capacities: {len(data)} entries for {devices} devices")
    out = []
    for d, entry in enumerate(data):
        e = _Reader(entry, f"capacities[{d}]")
        speed = e.get("speed", (int, float))
        memory = e.get("memory_bytes", int, optional=True)
        if isinstance(speed, bool) or not speed > 0 or (memory is not None and memory <= 0) or set(entry) - {
                "speed", "memory_bytes"}:
            raise PlanError(f"plan field capacities[{d}]: expected a positive speed and memory_bytes, got {entry!r:.80}")
        out.append(dict(entry))
    return tuple(out)


def _rocoin_from_json(data: Any, devices: int) -> Optional[RocoinSpec]:
    if data is None:
        return None
    r = _Reader(data, "rocoin")
    shape = r.get("feature_shape", list)
    if len(shape) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape):
        raise PlanError(f"plan field rocoin.feature_shape: {shape!r:.80} is not [C, h, w] of positive sizes")
    channels = shape[0]
    students = r.get("students", dict)
    for name, entry in students.items():
        e = _Reader(entry, f"rocoin.students.{name}")
        e.get("architecture", dict)
        e.get("flops", int)
        e.get("param_bytes", int)
    groups = []
    for g, raw in enumerate(r.get("groups", list)):
        gr = _Reader(raw, f"rocoin.groups[{g}]")
        student = gr.get("student", str)
        if student not in students:
            raise PlanError(f"plan field rocoin.groups[{g}].student: {student!r:.80} is not in rocoin.students")
        groups.append(RocoinGroup(_int_list(gr.get("devices", list), f"rocoin.groups[{g}].devices", devices),
                                  _int_list(gr.get("channels", list), f"rocoin.groups[{g}].channels", channels),
                                  student, gr.get("student_weights", str)))
    if not groups or any(not g.devices or not g.channels for g in groups):
        raise PlanError("plan field rocoin.groups: expected groups, each with devices and channels")
    held = sorted(d for g in groups for d in g.devices)
    if held != list(range(devices)):
        raise PlanError(f"plan field rocoin.groups: every device 0..{devices - 1} must be in exactly one group")
    if sorted(c for g in groups for c in g.channels) != list(range(channels)):
        raise PlanError(f"plan field rocoin.groups: the groups' channels must cover 0..{channels - 1} once each")
    spec = RocoinSpec(r.get("feature_layer", str), tuple(shape), tuple(groups), dict(students), r.get("head", dict))
    if r.get("device_groups", list) != list(spec.device_groups):
        raise PlanError(f"plan field rocoin.device_groups: does not match rocoin.groups ({list(spec.device_groups)})")
    return spec


def _fill_from_json(data: Any, devices: int) -> FillSpec:
    if data is None:
        return FillSpec()
    r = _Reader(data, "fill")
    rule = r.get("rule", str)
    if rule not in FILLS:
        raise PlanError(f"plan field fill.rule: {rule!r} is not one of {', '.join(FILLS)}")
    sets = []
    for j, f in enumerate(r.get("sets", list)):
        sets.append(_int_list(f, f"fill.sets[{j}]", devices))
    return FillSpec(rule, tuple(sets))


def plan_dir(path: Path) -> Path:
    path = Path(path)
    return path.parent if path.name == PLAN_FILE else path


def load_plan(path, operator_public_key: Optional[str] = None) -> Plan:
    """Read and check DIR/plan.json (or the file itself). Raises PlanError with the reason.

    With `operator_public_key` (base64 Ed25519, a board's peers.yaml) the plan must carry that
    operator's signature (signing.py), checked over the very bytes that are then parsed.
    """
    file = plan_dir(path) / PLAN_FILE
    try:
        body = file.read_bytes()
    except FileNotFoundError:
        raise PlanError(f"no plan at {file}") from None
    except OSError as exc:
        raise PlanError(f"cannot read {file}: {exc.strerror}") from None
    if operator_public_key is not None:
        signature = file.parent / SIGNATURE_FILE
        try:
            document = signature.read_text()
        except FileNotFoundError:
            raise PlanError(f"plan {file.parent} is not signed (no {SIGNATURE_FILE}): sign it with "
                            f"`robustdice sign --plan {file.parent} --key operator.key_secret`") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise PlanError(f"{signature} cannot be read: {exc}") from None
        verify_document(body, document, operator_public_key, str(signature))
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PlanError(f"{file} is not valid JSON: {exc}") from None
    return plan_from_json(data)


def sign_plan(directory, secret_key_file) -> Path:
    """Sign DIR/plan.json's bytes with the operator key (signing.py); writes DIR/plan.sig. The
    shards are covered through their digests in plan.json."""
    file = plan_dir(Path(directory)) / PLAN_FILE
    try:
        body = file.read_bytes()
    except OSError as exc:
        raise PlanError(f"no plan to sign at {file}: {exc.strerror}") from None
    document = signature_document(body, secret_key_file)
    out = file.parent / SIGNATURE_FILE
    # Written whole and renamed: a node starting meanwhile reads the old signature or the new one.
    tmp = out.with_name(f".{SIGNATURE_FILE}.{os.getpid()}")
    tmp.write_text(document)
    os.replace(tmp, out)
    return out


def save_plan(plan: Plan, directory) -> Path:
    file = Path(directory) / PLAN_FILE
    file.write_text(json.dumps(plan.to_json(), indent=1) + "\n")
    return file


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def assignment_summary(stages: Sequence[StagePlan], devices: int) -> Dict[str, Any]:
    copies = sum(len(s.holders(d)) for s in stages for d in range(devices))
    neurons = sum(s.neurons for s in stages)
    return {"neuron_copies": copies, "neurons": neurons, "replication_factor": copies / max(neurons, 1)}
