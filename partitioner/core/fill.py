"""What stands in for a lost neuron: fill values and BatchNorm statistics per failed set.

The paper zero-fills a neuron that no surviving device delivers. A zero is far from what the
next layer expects when the neuron's output is usually positive (ReLU after BatchNorm), and
dozens of stages compound the error. Two offline rules, chosen by `--fill`:

mean      A lost neuron's output (after its stage's followers) is replaced by its expected value
          over calibration data with no failure: one number per neuron, in every shard.
mean+bn   mean, and for every set F of failed devices (2^N - 2 of them, or those of at most
          --max-failed devices: failed_sets; each node knows which one it runs under) the
          BatchNorm statistics of every stage are measured anew on the calibration data as
          the cluster computes it under F; a larger F runs with the model's own statistics.
          The next layers are then normalised with the statistics of the inputs they
          actually get, which is what switchable BatchNorm does for the sub-networks of a
          slimmable network. What is kept is the change F causes, applied to the model's own
          statistics (see recalibrated_stats), so that a few calibration photos do not
          replace an ImageNet model's population statistics. A stage whose input no loss
          under F reaches keeps its own statistics, so whatever is exact stays exact.

The statistics are measured on the whole model with a plan's losses applied (`run_masked`),
which computes what Cluster.simulate computes (tests assert it), one stage at a time, the
stages in order, so that stage i is normalised with its recalibrated statistics before stage
i+1's are measured.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from robustdice.partitioner.core.plan import FILLS, FillSpec, StagePlan
from robustdice.partitioner.core.stages import Stage, StagedModel, compute_linear, slice_params
from robustdice.partitioner.errors import PartitionerError

# Beyond this many failed sets the per-set statistics are refused (every set of N = 8 devices).
MAX_FILL_SETS = 254
# --max-failed's default: every set up to N - 1 while they number at most this (N <= 6: 62 sets),
# else sets of up to DEFAULT_MAX_FAILED_LARGE_N devices (N = 8: 36 sets instead of 254).
ALL_SETS_UP_TO = 62
DEFAULT_MAX_FAILED_LARGE_N = 2


def default_max_failed(devices: int) -> int:
    """--max-failed's default for N devices (see ALL_SETS_UP_TO)."""
    if 2 ** devices - 2 <= ALL_SETS_UP_TO:
        return max(devices - 1, 0)
    return min(DEFAULT_MAX_FAILED_LARGE_N, devices - 1)


def check_max_failed(devices: int, max_failed: Optional[int]) -> int:
    """The bound on failed-set sizes: max_failed, or its default; a PartitionerError naming
    --max-failed when it is outside 1..N-1."""
    if max_failed is None:
        return default_max_failed(devices)
    if not 1 <= max_failed <= devices - 1:
        raise PartitionerError(f"--max-failed must lie in 1..{devices - 1} (N - 1) for {devices} devices, "
                               f"got {max_failed}")
    return max_failed


def failed_sets(devices: int, max_failed: Optional[int] = None) -> List[Tuple[int, ...]]:
    """Every non-empty set of at most max_failed failed devices (default: default_max_failed)
    that leaves one alive, by size then lexically."""
    k_max = check_max_failed(devices, max_failed) if devices > 1 else 0
    count = sum(math.comb(devices, k) for k in range(1, k_max + 1))
    if count > MAX_FILL_SETS:
        raise PartitionerError(f"--fill mean+bn keeps statistics for every failed set: {count} sets of up to "
                               f"{k_max} of {devices} devices is over {MAX_FILL_SETS}; lower --max-failed")
    return [f for k in range(1, k_max + 1) for f in itertools.combinations(range(devices), k)]


def lost_masks(stages: Sequence[StagePlan], failed) -> List[torch.Tensor]:
    """Per stage, the boolean mask of data neurons lost under `failed` (after parity recovery)."""
    out = []
    for sp in stages:
        mask = torch.zeros(sp.neurons, dtype=torch.bool)
        lost = sp.lost(failed)
        if lost:
            mask[torch.as_tensor(lost)] = True
        out.append(mask)
    return out


def _full_params(stage: Stage) -> Dict[str, torch.Tensor]:
    return slice_params(stage, range(stage.n_neurons), with_followers=True)


def _reduce_dims(y: torch.Tensor, channel_dim: int) -> List[int]:
    cd = channel_dim % y.dim()
    return [d for d in range(y.dim()) if d != cd]


def _fill_lost(y: torch.Tensor, lost: torch.Tensor, fill: Optional[torch.Tensor], channel_dim: int) -> torch.Tensor:
    if not bool(lost.any()):
        return y
    cd = channel_dim % y.dim()
    shape = [1] * y.dim()
    shape[cd] = -1
    keep = (~lost).to(y.dtype).reshape(shape)
    value = (fill if fill is not None else torch.zeros(lost.shape[0], dtype=y.dtype)).to(y.dtype)
    return y * keep + (value * lost.to(y.dtype)).reshape(shape)


def run_masked(staged: StagedModel, stages: Sequence[StagePlan], x: torch.Tensor,
               losses: Sequence[torch.Tensor], fills: Optional[Sequence[Optional[torch.Tensor]]] = None,
               stats: Optional[Mapping[Tuple[int, int], Tuple[torch.Tensor, torch.Tensor]]] = None,
               measure: Optional[Callable[[int, int, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]] = None,
               params: Optional[Sequence[Mapping[str, torch.Tensor]]] = None) -> torch.Tensor:
    """The whole model with stage i's `losses[i]` filled by `fills[i]` (None: zeros).

    BatchNorm follower j of stage i normalises with `stats[(i, j)]` = (mean, var) when given;
    `measure(i, j, input)` may return fresh (mean, var) from the input itself instead (and
    record them). Follows the cluster's arithmetic per channel: linear part, followers, fill.
    """
    params = params or [_full_params(s) for s in staged.stages]

    def stage_fn(i: int, t: torch.Tensor) -> torch.Tensor:
        stage = staged.stages[i]
        y = compute_linear(stage, params[i], t)
        for j, f in enumerate(stage.followers):
            if f.behaviour != "batchnorm":
                y = f.fn(y, *f.args, **f.kwargs)
                continue
            mean, var = params[i][f"f{j}.running_mean"], params[i][f"f{j}.running_var"]
            if measure is not None:
                got = measure(i, j, y)
                if got is not None:
                    mean, var = got
            elif stats is not None and (i, j) in stats:
                mean, var = stats[(i, j)]
            y = F.batch_norm(y, mean, var, params[i][f"f{j}.weight"], params[i][f"f{j}.bias"], False, 0.0, f.fn.eps)
        return _fill_lost(y, losses[i], None if fills is None else fills[i], stage.channel_dim)

    return staged.run(x, stage_fn)


def mean_outputs(staged: StagedModel, calib: torch.Tensor) -> List[torch.Tensor]:
    """Per stage, every neuron's mean output (after its followers) over `calib`, no failure."""
    means: List[Optional[torch.Tensor]] = [None] * len(staged.stages)
    params = [_full_params(s) for s in staged.stages]

    def stage_fn(i: int, t: torch.Tensor) -> torch.Tensor:
        stage = staged.stages[i]
        y = compute_linear(stage, params[i], t)
        for j, f in enumerate(stage.followers):
            if f.behaviour == "batchnorm":
                y = F.batch_norm(y, params[i][f"f{j}.running_mean"], params[i][f"f{j}.running_var"],
                                 params[i][f"f{j}.weight"], params[i][f"f{j}.bias"], False, 0.0, f.fn.eps)
            else:
                y = f.fn(y, *f.args, **f.kwargs)
        means[i] = y.double().mean(dim=_reduce_dims(y, stage.channel_dim)).float()
        return y

    with torch.inference_mode():
        staged.run(calib, stage_fn)
    return [m for m in means]


Stats = Dict[Tuple[int, int], Tuple[torch.Tensor, torch.Tensor]]


def _batch_stats(y: torch.Tensor, channel_dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    dims = _reduce_dims(y, channel_dim)
    y64 = y.double()
    return y64.mean(dim=dims), y64.var(dim=dims, unbiased=True)


def reference_stats(staged: StagedModel, calib: torch.Tensor) -> Stats:
    """(stage, follower) → (mean, var) of every BatchNorm input over `calib` with no failure."""
    out: Stats = {}

    def measure(i: int, j: int, y: torch.Tensor):
        out[(i, j)] = _batch_stats(y, staged.stages[i].channel_dim)
        return None  # normalise with the model's own statistics

    with torch.inference_mode():
        run_masked(staged, [], calib, [torch.zeros(s.n_neurons, dtype=torch.bool) for s in staged.stages],
                   measure=measure)
    return out


def recalibrated_stats(staged: StagedModel, stages: Sequence[StagePlan], calib: torch.Tensor,
                       fills: Sequence[Optional[torch.Tensor]], failed,
                       reference: Optional[Stats] = None) -> Stats:
    """(stage, follower) → (mean, var) of every BatchNorm input under `failed`, measured stage by
    stage on `calib`; a stage that no earlier loss reaches keeps its own statistics.

    With `reference` (reference_stats of the same calib), the change that the failure causes on
    calib is applied to the model's own statistics: mean + (mean_F − mean_ref), var · var_F /
    var_ref. Calibration images that are not the training population (ten photos for an
    ImageNet model) then move the statistics only as far as the failure does, instead of
    replacing the population's statistics by their own.
    """
    losses = lost_masks(stages, failed)
    first_loss = next((i for i, m in enumerate(losses) if bool(m.any())), len(losses))
    params = [_full_params(s) for s in staged.stages]
    out: Dict[Tuple[int, int], Tuple[torch.Tensor, torch.Tensor]] = {}
    if first_loss == len(losses):   # nothing lost (parity recovered it): every statistic stands
        return {(i, j): (params[i][f"f{j}.running_mean"], params[i][f"f{j}.running_var"])
                for i, s in enumerate(staged.stages) for j, f in enumerate(s.followers) if f.behaviour == "batchnorm"}

    def measure(i: int, j: int, y: torch.Tensor):
        base = (params[i][f"f{j}.running_mean"], params[i][f"f{j}.running_var"])
        # Stages up to the first lossy one see the exact input: their statistics stand.
        if i <= first_loss:
            out[(i, j)] = base
            return base
        mean, var = _batch_stats(y, staged.stages[i].channel_dim)
        if reference is not None:
            ref_mean, ref_var = reference[(i, j)]
            eps = staged.stages[i].followers[j].fn.eps
            mean = base[0].double() + (mean - ref_mean)
            var = base[1].double() * (var + eps) / (ref_var + eps)
        out[(i, j)] = (mean.float(), var.float())
        return out[(i, j)]

    with torch.inference_mode():
        run_masked(staged, stages, calib, losses, fills, measure=measure, params=params)
    return out


@dataclass(frozen=True)
class FillInputs:
    """What every plan of one model computes alike from the fill's calibration images: the mean
    outputs and the no-failure statistics (fill_inputs), for plans that share them."""

    calib: torch.Tensor
    fills: List[torch.Tensor]
    reference: Stats


def fill_inputs(staged: StagedModel, calib: torch.Tensor) -> FillInputs:
    return FillInputs(calib, mean_outputs(staged, calib), reference_stats(staged, calib))


def compute_fill(staged: StagedModel, stages: Sequence[StagePlan], calib: Optional[torch.Tensor], rule: str,
                 devices: int, progress: Optional[Callable[[int], None]] = None, max_failed: Optional[int] = None,
                 shared: Optional[FillInputs] = None) -> Tuple[FillSpec, Dict[str, Dict[str, torch.Tensor]]]:
    """The plan's FillSpec and, per stage name, the tensors shards carry (see runtime.shard_stage_entry).

    mean+bn measures statistics for failed_sets(devices, max_failed); a larger failed set runs
    with the base statistics (runtime.DeviceRuntime.params). `shared`: fill_inputs(staged, calib),
    when already computed."""
    if rule not in FILLS:
        raise PartitionerError(f"--fill {rule!r} is not one of {', '.join(FILLS)}")
    if rule == "zero":
        return FillSpec(), {}
    if calib is None:
        raise PartitionerError(f"--fill {rule} needs calibration data")
    fills = mean_outputs(staged, calib) if shared is None else shared.fills
    tables: Dict[str, Dict[str, torch.Tensor]] = {s.name: {"fill": fills[i]} for i, s in enumerate(staged.stages)}
    if rule == "mean":
        return FillSpec("mean"), tables
    sets = failed_sets(devices, max_failed)
    reference = reference_stats(staged, calib) if shared is None else shared.reference
    per_set = []
    for f in sets:
        per_set.append(recalibrated_stats(staged, stages, calib, fills, f, reference))
        if progress is not None:
            progress(1)
    for i, stage in enumerate(staged.stages):
        # Only the sets whose losses reach this stage's input change its statistics: the
        # others are left out of the tables (their rows would repeat the base statistics).
        changed = [g for g, f in enumerate(sets) if any(bool(m.any()) for m in lost_masks(stages[:i], f))]
        tables[stage.name]["recal_sets"] = torch.as_tensor(changed, dtype=torch.long)
        for j, follower in enumerate(stage.followers):
            if follower.behaviour != "batchnorm":
                continue
            tables[stage.name][f"f{j}.recal_mean"] = torch.stack([per_set[g][(i, j)][0] for g in changed]) \
                if changed else torch.zeros(0, stage.n_neurons)
            tables[stage.name][f"f{j}.recal_var"] = torch.stack([per_set[g][(i, j)][1] for g in changed]) \
                if changed else torch.zeros(0, stage.n_neurons)
    return FillSpec("mean+bn", tuple(sets)), tables


def set_stats(staged: StagedModel, tables: Mapping[str, Mapping[str, torch.Tensor]], g: int) -> Stats:
    """(stage, follower) -> (mean, var) that failed set g of a mean+bn plan's tables (compute_fill)
    normalises with where they differ from the model's own: what run_masked takes as `stats` to
    compute what the cluster computes under that set (runtime.DeviceRuntime.params picks the same)."""
    out: Stats = {}
    for i, stage in enumerate(staged.stages):
        table = tables[stage.name]
        rows = table["recal_sets"].tolist() if "recal_sets" in table else []
        if g not in rows:
            continue
        r = rows.index(g)
        for j, f in enumerate(stage.followers):
            if f.behaviour == "batchnorm":
                out[(i, j)] = (table[f"f{j}.recal_mean"][r], table[f"f{j}.recal_var"][r])
    return out
