"""`robustdice partition`: model → scores → assignment → plan.json + one shard per device."""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import yaml

from robustdice.partitioner.core.cluster import (cdc_layout, cluster_neurons, lop_assignment, nmr_assignment,
                                                 normalise_scores, replicate_and_deal)
from robustdice.partitioner.core.capacity import (capacity_stages, cdc_by_speed, check_memory, deal_by_speed,
                                                  deal_summary, plan_fields, split_by_speed)
from robustdice.partitioner.core.cluster import rotated_parity, shuffled_groups, uniform_groups
from robustdice.partitioner.core.plan import (METHODS, ParityPlan, Plan, StagePlan, assignment_summary, save_plan,
                                              sha256_file)
from robustdice.partitioner.core.plan import FILLS
from robustdice.partitioner.core.runtime import build_shard, save_shard, weights_digest
from robustdice.partitioner.core.stages import StagedModel, param_bytes, trace_stages
from robustdice.partitioner.errors import PartitionerError
from robustdice.partitioner.zoo import usermodel
from robustdice.partitioner.zoo.usermodel import is_import_path

log = logging.getLogger(__name__)

# The robust method's default threshold on normalised score distances (scores in [0, 1] per
# axis, so distances lie in [0, √k] for k scores). Chosen on digits_cnn over 4 devices by a
# sweep of t: 0.1 replicates 2.2× (nmr: 4×) and keeps 86% at one failure; see README.
DEFAULT_THRESHOLD = 0.1
DEFAULT_SCORES = ("s1", "s2", "s3")


def default_calib_size(model: str) -> int:
    # digits are 8×8: many images cost nothing and steady the scores; 224² models use 16.
    return 256 if model == "digits_cnn" else 16


# Methods that cluster neurons by importance scores (random clusters them, then shuffles).
SCORED_METHODS = ("robust", "random", "robust+cdc")
# Methods that --replication and --budget-mb can size: the scored ones choose thresholds, uniform
# how many rows per device each layer gets.
BUDGETED_METHODS = SCORED_METHODS + ("uniform",)


def default_fill_calib_size(model: str) -> int:
    # Mean outputs and BatchNorm statistics are averages over images and pixels: small images
    # are cheap to take by the thousand; 224² images are slow to take (crops of the Debian
    # packages' photos, zoo/photos.py).
    return {"digits_cnn": 1024, "fashion_vgg": 2048}.get(model, 32)


@dataclass(frozen=True)
class PartitionRequest:
    model: str
    devices: int
    method: str
    out: Path
    threshold: Optional[float] = None
    thresholds: Optional[Mapping[str, float]] = None
    scores: Sequence[str] = DEFAULT_SCORES
    weights: str = "DEFAULT"
    seed: int = 0
    calib: Optional[Path] = None
    calib_size: Optional[int] = None
    show_progress: bool = True
    # Only for a user's own model (package.module:factory); see zoo/usermodel.py.
    input_shape: Optional[Tuple[int, int, int]] = None
    preprocess: Optional[str] = None
    fill: str = "zero"
    replication: Optional[float] = None     # --replication: neuron copies per neuron, whole plan
    budget_mb: Optional[float] = None       # --budget-mb: parameters per device, MB (1e6 bytes)
    fill_calib_size: Optional[int] = None
    s3_mode: str = "auto"                   # --s3: exact ablations, quadratic estimate, or per stage
    max_failed: Optional[int] = None        # --max-failed: mean+bn's failed sets (None: fill.default_max_failed)
    memory: Optional[float] = None          # --memory: a budget as a fraction of NMR's per-device bytes
    rocoin: Optional[object] = None         # --method rocoin: rocoin_plan.RocoinOptions (groups, epochs, train)
    capacities: Optional[object] = None     # --capacities: capacity.Capacities, one entry per device
    # How sized_stages dealt by the capacities (capacity.capacity_stages' report), for the summary.
    capacity_deal: Optional[Mapping[str, object]] = None
    # A plan written again (finetune): its recorded input specification, whatever made it.
    input: Optional[object] = None

    def check(self) -> None:
        if self.devices < 1:
            raise PartitionerError(f"--devices must be >= 1, got {self.devices}")
        if self.method not in METHODS:
            raise PartitionerError(f"--method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.method == "rocoin":   # rocoin_plan imports this module, not the other way round
            raise PartitionerError("--method rocoin distils students: rocoin_plan.partition_rocoin makes its plan")
        if self.method == "cdc" and self.devices < 2:
            raise PartitionerError("--method cdc needs --devices >= 2 (N-1 data devices + 1 parity)")
        if self.threshold is not None and not (self.threshold >= 0 and math.isfinite(self.threshold)):
            raise PartitionerError(f"--threshold must be a finite number >= 0, got {self.threshold}")
        if self.capacities is not None and len(self.capacities.devices) != self.devices:
            raise PartitionerError(f"--capacities lists {len(self.capacities.devices)} devices and --devices is "
                                   f"{self.devices}: give one entry per device, in the plan's order")
        if self.calib_size is not None and self.calib_size < 1:
            raise PartitionerError(f"--calib-size must be >= 1, got {self.calib_size}")
        if not is_import_path(self.model):
            for option, value in (("--input-shape", self.input_shape), ("--preprocess", self.preprocess)):
                if value is not None:
                    raise PartitionerError(f"{option} is for your own --model package.module:factory; "
                                           f"{self.model} has its own input specification")
        self.check_levers()

    def input_spec(self):
        from robustdice.partitioner.zoo.models import input_spec
        if self.input is not None:
            return self.input
        if is_import_path(self.model):
            return usermodel.input_spec(self.model, self.input_shape, self.preprocess)
        return input_spec(self.model)

    def check_levers(self) -> None:
        if self.fill not in FILLS:
            raise PartitionerError(f"--fill {self.fill!r} is not one of {', '.join(FILLS)}")
        if self.method == "robust+cdc" and self.devices < 2:
            raise PartitionerError("--method robust+cdc needs --devices >= 2 (parity rows live on another device)")
        budgets = [b for b in (self.replication, self.budget_mb, self.threshold, self.thresholds, self.memory)
                   if b is not None]
        if len(budgets) > 1:
            raise PartitionerError("give one of --threshold, --thresholds, --replication, --budget-mb and --memory")
        if (any(b is not None for b in (self.replication, self.budget_mb, self.memory))
                and self.method not in BUDGETED_METHODS):
            raise PartitionerError(f"--replication, --budget-mb and --memory size a plan: they need --method "
                                   f"{', '.join(BUDGETED_METHODS)}, not {self.method}")
        if self.memory is not None and not (0 < self.memory <= 1):
            raise PartitionerError(f"--memory is a fraction of NMR's per-device memory, in (0, 1], got {self.memory}")
        if self.max_failed is not None:
            from robustdice.partitioner.core.fill import check_max_failed
            check_max_failed(self.devices, self.max_failed)
        if self.method == "uniform":
            if self.threshold is not None or self.thresholds is not None:
                raise PartitionerError("--method uniform does not cluster: give --budget-mb or --replication, "
                                       "not --threshold or --thresholds")
            if self.replication is None and self.budget_mb is None and self.memory is None:
                raise PartitionerError("--method uniform spreads what a budget buys: give --budget-mb, --memory "
                                       "or --replication")
        if self.replication is not None and not (1.0 <= self.replication <= self.devices):
            raise PartitionerError(f"--replication must lie in 1..{self.devices} (copies per neuron), "
                                   f"got {self.replication}")
        if self.budget_mb is not None and not (self.budget_mb > 0 and math.isfinite(self.budget_mb)):
            raise PartitionerError(f"--budget-mb must be a positive number, got {self.budget_mb}")
        if self.fill_calib_size is not None and self.fill_calib_size < 2:
            raise PartitionerError(f"--fill-calib-size must be >= 2, got {self.fill_calib_size}")


def load_thresholds(path) -> Dict[str, float]:
    """--thresholds FILE.yaml: {fx layer name: t}, optionally `default: t` for the rest."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise PartitionerError(f"--thresholds: no file {path}") from None
    except yaml.YAMLError as exc:
        raise PartitionerError(f"--thresholds: {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not data:
        raise PartitionerError(f"--thresholds: {path} must map layer names to thresholds")
    out = {}
    for key, value in data.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or not math.isfinite(value):
            raise PartitionerError(f"--thresholds: {path}: {key}: {value!r} is not a threshold >= 0")
        out[str(key)] = float(value)
    return out


def stage_thresholds(staged: StagedModel, request: PartitionRequest) -> Dict[str, float]:
    names = [s.name for s in staged.stages]
    if request.thresholds is None:
        t = DEFAULT_THRESHOLD if request.threshold is None else request.threshold
        return {n: t for n in names}
    table = dict(request.thresholds)
    default = table.pop("default", None)
    unknown = sorted(set(table) - set(names))
    if unknown:
        raise PartitionerError(f"--thresholds names layers not in {request.model}: {', '.join(unknown)} "
                               f"(layers: {', '.join(names)})")
    missing = [n for n in names if n not in table]
    if missing and default is None:
        raise PartitionerError(f"--thresholds has no value for {', '.join(missing)} and no 'default'")
    return {n: table.get(n, default) for n in names}


def plan_stages(staged: StagedModel, request: PartitionRequest,
                scores: Optional[Mapping[str, np.ndarray]],
                group_counts: Optional[Mapping[str, int]] = None,
                weights: Optional[Sequence[int]] = None) -> List[StagePlan]:
    """group_counts: --method uniform's rows per device of each layer (budget.uniform_group_counts);
    weights: each device's share of the work (capacity.deal_weights), None for equal devices."""
    n = request.devices
    deal = replicate_and_deal if weights is None else (lambda groups, n: deal_by_speed(groups, weights))
    thresholds = stage_thresholds(staged, request) if request.method in SCORED_METHODS else {}
    out = []
    for stage in staged.stages:
        c = stage.n_neurons
        parity = None
        threshold = groups = None
        if request.method in SCORED_METHODS:
            threshold = thresholds[stage.name]
            clusters = cluster_neurons(normalise_scores(scores[stage.name]), threshold)
            if request.method == "random":
                clusters = shuffled_groups(clusters, request.seed + stage.index)
            assignment = deal(clusters, n)
            groups = len(clusters)
            if request.method == "robust+cdc":
                rp = rotated_parity(assignment, c, weights)
                if rp.members:
                    parity = ParityPlan(rp.devices[0], rp.members, rp.devices)
        elif request.method == "uniform":
            clusters = uniform_groups(c, group_counts[stage.name], n, request.seed + stage.index)
            assignment = deal(clusters, n)
            groups = len(clusters)
        elif request.method == "lop":
            assignment = lop_assignment(c, n) if weights is None else split_by_speed(c, weights)
        elif request.method == "nmr":
            assignment = nmr_assignment(c, n)
        else:
            layout = cdc_layout(c, n) if weights is None else cdc_by_speed(c, weights)
            assignment = layout.data
            parity = ParityPlan(layout.parity_device, layout.members)
        out.append(StagePlan(
            name=stage.name, kind=stage.kind, neurons=c, channel_dim=stage.channel_dim,
            followers=tuple(stage.follower_names), assignment=tuple(tuple(a) for a in assignment),
            parity=parity, threshold=threshold, groups=groups,
        ))
    return out


def partition(request: PartitionRequest, scores: Optional[Mapping[str, np.ndarray]] = None) -> Dict[str, object]:
    """Run the whole offline half; returns the summary that `--json` prints.

    `scores`: raw scores already computed for this model, weights and request.scores (the DSE
    partitions one model many times); None computes them.
    """
    from robustdice.partitioner.zoo.data import calibration_batch
    from robustdice.partitioner.zoo.models import build_model

    request.check()
    spec = request.input_spec()  # before building: a missing --input-shape fails fast
    model = build_model(request.model, weights=request.weights, seed=request.seed)
    staged = trace_stages(model)
    if request.method in SCORED_METHODS and scores is None:
        calib = None
        if any(s in request.scores for s in ("s2", "s3")):
            size = request.calib_size or default_calib_size(request.model)
            calib = calibration_batch(request.model, request.calib, n=size, seed=request.seed, spec=spec)
        stage_thresholds(staged, request)  # fail on a bad thresholds file before the long scoring
        scores = request_scores(staged, calib, request)
    request, stages = sized_stages(staged, request, scores)
    return write_plan(model, staged, stages, request)


def sized_stages(staged: StagedModel, request: PartitionRequest,
                 scores: Optional[Mapping[str, np.ndarray]]) -> Tuple[PartitionRequest, List[StagePlan]]:
    """The request with its budget (--memory, --budget-mb, --replication) solved into per-layer
    thresholds or row counts, and its stages."""
    if request.memory is not None:
        request = dataclasses.replace(request, budget_mb=request.memory * nmr_per_device_bytes(staged, request) / 1e6)
    group_counts = None
    if request.method == "uniform":
        from robustdice.partitioner.core.budget import uniform_group_counts
        group_counts = uniform_group_counts(staged, request)
    elif request.replication is not None or request.budget_mb is not None:
        from robustdice.partitioner.core.budget import thresholds_for_budget
        request = thresholds_for_budget(staged, request, scores)  # fixes per-layer thresholds
    stages = plan_stages(staged, request, scores, group_counts)
    if request.capacities is not None and not request.capacities.uniform:
        # (equal capacities: today's plan, byte for byte)
        stages, report = capacity_stages(staged, request, stages,
                                         lambda w: plan_stages(staged, request, scores, group_counts, w))
        request = dataclasses.replace(request, capacity_deal=report)
    return request, stages


def shard_param_bytes(shard: Mapping[str, object]) -> int:
    """What a device holds of a shard (runtime.build_shard): its tensors, less the neuron ids."""
    return param_bytes(shard["shared"]) + sum(
        param_bytes({k: v for k, v in e.items() if k != "ids"}) for e in shard["stages"].values())


def nmr_per_device_bytes(staged: StagedModel, request: PartitionRequest) -> int:
    """The bytes of one device of NMR with the zero fill (every neuron on every device): what
    --memory is a fraction of, as the benchmarks' budget ratios are."""
    nmr = dataclasses.replace(request, method="nmr", fill="zero", threshold=None, thresholds=None,
                              replication=None, budget_mb=None, memory=None)
    stages = plan_stages(staged, nmr, None)
    return shard_param_bytes(build_shard(staged, stages, 0, {}, ()))


def request_scores(staged: StagedModel, calib, request: PartitionRequest,
                   fills: Optional[Sequence] = None) -> Dict[str, np.ndarray]:
    """request.scores of every stage on `calib`, s3 ablating to what request.fill puts in place
    (stand_ins; `fills`: its mean outputs, when already computed): how partition scores, and what
    the DSE and the benchmarks score once for many partitions of one model."""
    from robustdice.partitioner.core.scores import compute_scores

    if fills is None or request.fill == "zero" or "s3" not in request.scores:
        fills = stand_ins(staged, request)
    return compute_scores(staged, calib, list(request.scores), show_progress=request.show_progress,
                          s3_mode=request.s3_mode, fill_values=fills)


def stand_ins(staged: StagedModel, request: PartitionRequest):
    """What s3 puts in place of an ablated neuron: what the plan's fill will put there.

    Under --fill mean (and mean+bn) a lost neuron is replaced by its mean output, so a neuron
    whose output hardly varies costs nothing to lose, however large that output; s3 measured by
    zeroing would call it important and spend copies on it. None (zeroing, as the paper does)
    for --fill zero or when s3 is not among the scores. The same calibration images as _fill.
    """
    from robustdice.partitioner.core.fill import mean_outputs

    if request.fill == "zero" or "s3" not in request.scores:
        return None
    return mean_outputs(staged, fill_calibration(request))


def fill_calibration(request: PartitionRequest):
    """The calibration images of the fill values and per-set statistics (and of stand_ins)."""
    from robustdice.partitioner.zoo.data import calibration_batch

    size = request.fill_calib_size or default_fill_calib_size(request.model)
    return calibration_batch(request.model, request.calib, n=size, seed=request.seed + 1, spec=request.input_spec())


def write_plan(model, staged: StagedModel, stages: Sequence[StagePlan], request: PartitionRequest,
               fill=None) -> Dict[str, object]:
    """Fill tables, plan.json and one shard per device for `stages` of `model` in request.out.

    Also how `finetune` writes a plan: the same stages, the fine-tuned weights. `fill`: the
    (FillSpec, tables) of plan_fill when already computed (the default plan's search).
    """
    from robustdice.partitioner.zoo.architecture import encode

    fill_spec, fill_tables = plan_fill(staged, stages, request) if fill is None else fill
    caps = request.capacities if request.capacities is not None and not request.capacities.uniform else None
    plan = Plan(
        model=request.model, weights=str(request.weights), seed=request.seed,
        weights_digest=weights_digest(model), devices=request.devices, method=request.method,
        scores=tuple(request.scores) if request.method in SCORED_METHODS else (), stages=tuple(stages),
        input=request.input_spec(), fill=fill_spec,
        architecture=encode(model) if is_import_path(request.model) else None,
        **plan_fields(caps),
    )
    plan_hash = plan.compute_hash()
    out = Path(request.out)
    out.mkdir(parents=True, exist_ok=True)
    shard_records = {}
    per_device = []
    for d in range(request.devices):
        shard = build_shard(staged, stages, d, fill_tables, fill_spec.sets)
        per_device.append(shard_param_bytes(shard))
        check_memory(caps, per_device)   # before a shard too large is written (no capacities: nothing)
        path = save_shard(shard, plan_hash, d, out)
        shard_records[str(d)] = {"file": str(path.relative_to(out)), "sha256": sha256_file(path)}
    plan = Plan(**{**plan.__dict__, "shards": shard_records, "plan_hash": plan_hash})
    save_plan(plan, out)
    summary = assignment_summary(stages, request.devices)
    out_summary = {
        "method": request.method,
        "devices": request.devices,
        "model": request.model,
        "plan_hash": plan_hash,
        "plan": str(out),
        "full_param_bytes": param_bytes(model.state_dict()),
        "per_device_param_bytes": per_device,
        "replication_factor": summary["replication_factor"],
        "fill": request.fill,
        "thresholds": {s.name: s.threshold for s in stages if s.threshold is not None},
    }
    if caps is not None:
        out_summary["capacities"] = deal_summary(stages, request.devices, request.capacity_deal)
    return out_summary


def plan_fill(staged: StagedModel, stages: Sequence[StagePlan], request: PartitionRequest, shared=None):
    """The plan's fill spec and the shards' fill tensors (fill.py), from calibration data.

    shared: fill.FillInputs of fill_calibration(request), when several plans of one model share them."""
    from robustdice.partitioner.core.fill import compute_fill, failed_sets

    if request.fill == "zero":
        return compute_fill(staged, stages, None, "zero", request.devices)
    from tqdm import tqdm

    calib = fill_calibration(request) if shared is None else shared.calib
    total = len(failed_sets(request.devices, request.max_failed)) if request.fill == "mean+bn" else 0
    with tqdm(total=total, desc="recalibrate BatchNorm per failed set", unit="set",
              disable=not request.show_progress or not total, leave=False) as bar:
        return compute_fill(staged, stages, calib, request.fill, request.devices, progress=bar.update,
                            max_failed=request.max_failed, shared=shared)
