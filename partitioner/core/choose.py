"""The default plan: with no --method, --fill or budget, `partition` tries a few plans within
--memory (a fraction of NMR's per-device bytes, default DEFAULT_MEMORY) and keeps the one that
best keeps the model's answers when devices fail.

Which plan is best depends on the model. At half of NMR's memory over 4 devices, robust mean+bn
keeps 0.997 / 0.964 / 0.730 of fashion_vgg's accuracy at 1 / 2 / 3 failed where robust+cdc
mean+bn keeps 1.000 / 0.945 / 0.490; on efficientnet_lite0 robust+cdc is the only one exact at
1 failed. So each of CANDIDATES is partitioned at the same budget, from scores computed once,
and simulated (agreement_by_set: what runtime.Cluster computes) on calibration images that are
not the evaluation images (calibration_batch with seed + CHOICE_SEED_OFFSET) under every failed
set of up to --max-failed devices. A candidate's score is its mean agreement with the unfailed model's top-1 per k,
averaged over k with --weigh-k's weights (default alike). The highest score wins, the earlier
candidate on a tie; its plan is written to --out, and the summary says why (`choice`).

`weighted_score`, `pick` and `choice_line` are pure; `default_plan` is the shell around them.
Only the winner is written (write_plan); the others' stages and fill tables stay in memory.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

import torch

from robustdice.partitioner.errors import PartitionerError

DEFAULT_MEMORY = 0.5
# calibration_batch's seed for the scores is --seed, for the fill --seed + 1: the choice's
# images are drawn with another one.
CHOICE_SEED_OFFSET = 2


@dataclass(frozen=True)
class Candidate:
    name: str
    method: str
    fill: str


# In order of preference on a tie: robust alone spends the whole budget on copies.
CANDIDATES = (
    Candidate("robust mean+bn", "robust", "mean+bn"),
    Candidate("robust+cdc mean+bn", "robust+cdc", "mean+bn"),
)


def default_choice_size(model: str) -> int:
    # Agreement is a share of images: small images are cheap to simulate by the hundred under
    # every failed set; 224² images are slow (crops of the Debian packages' photos).
    return 256 if model in ("digits_cnn", "fashion_vgg") else 32


def check_weights(weights: Optional[Sequence[float]], k_max: int) -> List[float]:
    """--weigh-k: one weight >= 0 per k = 1..k_max, not all zero (None: alike)."""
    if weights is None:
        return [1.0] * k_max
    weights = [float(w) for w in weights]
    if len(weights) != k_max:
        raise PartitionerError(f"--weigh-k gives {len(weights)} weight{'s' if len(weights) != 1 else ''}; "
                               f"the failed sets go up to k = {k_max} (--max-failed): give one per k = 1..{k_max}")
    if not all(w >= 0 and math.isfinite(w) for w in weights) or not sum(weights) > 0:
        raise PartitionerError(f"--weigh-k needs weights >= 0, not all zero, got {','.join(f'{w:g}' for w in weights)}")
    return weights


def by_k(agreement: Mapping[tuple, float]) -> Dict[int, float]:
    """Failed set -> agreement, to k -> mean agreement over the sets of k failed devices."""
    out: Dict[int, List[float]] = {}
    for failed, value in agreement.items():
        out.setdefault(len(failed), []).append(value)
    return {k: sum(v) / len(v) for k, v in sorted(out.items())}


def weighted_score(per_k: Mapping[int, float], weights: Sequence[float]) -> float:
    """Σ_k w_k · agreement_k / Σ_k w_k, k = 1..len(weights)."""
    return sum(w * per_k[k] for k, w in enumerate(weights, start=1)) / sum(weights)


def pick(scores: Sequence[Optional[float]]) -> int:
    """Index of the highest score, the first on a tie; None marks a candidate that did not fit."""
    best = None
    for i, s in enumerate(scores):
        if s is not None and (best is None or s > scores[best]):
            best = i
    if best is None:
        raise PartitionerError("no candidate plan fits")
    return best


def _per_k_text(per_k: Mapping) -> str:
    return "/".join(f"{v:.3f}" for _, v in sorted(per_k.items(), key=lambda kv: int(kv[0])))


def choice_line(choice: Mapping) -> str:
    """The one line that says which candidate won and why (choice: as default_plan records it)."""
    if choice.get("candidates") is None:
        return f"default plan: {choice['reason']}"
    cands = {c["name"]: c for c in choice["candidates"]}
    won = cands[choice["chosen"]]
    ks = "/".join(str(k) for k in sorted(int(k) for k in won["agreement_by_k"]))
    weights = "" if len(set(choice["weigh_k"])) == 1 else f", weighted {','.join(f'{w:g}' for w in choice['weigh_k'])}"
    others = []
    for c in choice["candidates"]:
        if c["name"] == won["name"]:
            continue
        if c.get("skipped"):
            others.append(f"{c['name']}, which does not fit")
        else:
            others.append(f"{c['name']} {_per_k_text(c['agreement_by_k'])} ({c['score']:.3f})")
    raised = choice.get("memory_raised")
    why = (f" (the default {raised['from']:g} buys no plan over this many devices: raised to the least that buys "
           f"one)" if raised else "")
    return (f"default plan: {won['name']} within {choice['memory']:.3g} x NMR's memory{why} "
            f"({choice['budget_mb']:.3g} MB per device): agreement with no failure at {ks} failed "
            f"{_per_k_text(won['agreement_by_k'])} (mean {won['score']:.3f}{weights}) on "
            f"{choice['calibration_images']} calibration images, against " + "; ".join(others))


def agreement_by_set(staged, stages, fill, sets, images, reference) -> Dict[tuple, float]:
    """Failed set -> the share of `images` whose top-1 under it is `reference` (the unfailed model's).

    What Cluster.simulate computes for a plan of `stages` and `fill` (plan_fill's FillSpec and
    tables), computed once per neuron by fill.run_masked rather than once per copy (tests assert
    the two agree). A set that loses nothing (parity recovers one failure) agrees by construction.
    """
    from robustdice.partitioner.core.fill import lost_masks, run_masked, set_stats

    spec, tables = fill
    fills = [tables[s.name]["fill"] if tables else None for s in staged.stages]
    out = {}
    with torch.inference_mode():
        for failed in sets:
            losses = lost_masks(stages, failed)
            if not any(bool(m.any()) for m in losses):
                out[tuple(failed)] = 1.0
                continue
            g = spec.set_index(failed)
            stats = None if g is None else set_stats(staged, tables, g)
            logits = run_masked(staged, stages, images, losses, fills, stats=stats)
            out[tuple(failed)] = float((logits.argmax(1) == reference).float().mean())
    return out


def default_plan(request, memory: Optional[float] = None, weigh_k: Optional[Sequence[float]] = None,
                 choice_size: Optional[int] = None) -> Dict[str, object]:
    """Make every candidate within `memory`, write the best to request.out; returns its partition
    summary with `choice` (see the module docstring).

    memory None: DEFAULT_MEMORY, raised to the cheapest candidate's least memory where no
    candidate fits it (2 devices: half of NMR's is every neuron once, less than the fill and the
    shared layers need), and said so. A memory the user gave is never raised.

    request: a PartitionRequest whose method, fill and budget are ignored (the candidates' own).
    The candidates share the model, its scores and the fill's calibration outputs, so that the
    chosen plan is byte for byte the one its explicit flags (`choice.same_as`) give.
    """
    from robustdice.partitioner.core.fill import check_max_failed, fill_inputs
    from robustdice.partitioner.core.partition import (default_calib_size, fill_calibration, nmr_per_device_bytes,
                                                       partition, plan_fill, request_scores, sized_stages, write_plan)
    from robustdice.partitioner.core.stages import trace_stages
    from robustdice.partitioner.zoo.data import calibration_batch
    from robustdice.partitioner.zoo.models import build_model

    given = memory is not None
    memory = memory if given else DEFAULT_MEMORY
    base = dataclasses.replace(request, method=CANDIDATES[0].method, fill=CANDIDATES[0].fill, threshold=None,
                               thresholds=None, replication=None, budget_mb=None, memory=memory)
    n = base.devices
    if n == 1:
        paper = dataclasses.replace(base, fill="zero", memory=None)
        paper.check()
        summary = partition(paper)
        summary["choice"] = {"memory": memory, "chosen": "paper", "candidates": None,
                             "reason": "one device: nothing can fail; the paper's plan (robust, zero fill)"}
        summary["choice"]["line"] = choice_line(summary["choice"])
        return summary
    base.check()
    k_max = check_max_failed(n, base.max_failed)
    weights = check_weights(weigh_k, k_max)
    spec = base.input_spec()
    model = build_model(base.model, weights=base.weights, seed=base.seed)
    staged = trace_stages(model)
    calib = None
    if any(s in base.scores for s in ("s2", "s3")):
        calib = calibration_batch(base.model, base.calib, n=base.calib_size or default_calib_size(base.model),
                                  seed=base.seed, spec=spec)
    shared = fill_inputs(staged, fill_calibration(base)) if any(c.fill != "zero" for c in CANDIDATES) else None
    scored: Dict[str, object] = {}

    def scores_for(fill: str):
        # s3 ablates to what the fill puts in place: zero, or the mean under mean and mean+bn.
        key = "zero" if fill == "zero" else "mean"
        if key not in scored:
            scored[key] = request_scores(staged, calib, dataclasses.replace(base, fill=fill),
                                         fills=None if shared is None else shared.fills)
        return scored[key]

    nmr_bytes = nmr_per_device_bytes(staged, base)
    budget_mb = memory * nmr_bytes / 1e6
    size = choice_size or default_choice_size(base.model)
    seed = base.seed + CHOICE_SEED_OFFSET
    images = calibration_batch(base.model, base.calib, n=size, seed=seed, spec=spec)
    with torch.inference_mode():
        reference = model(images).argmax(1)
    sets = [f for k in range(1, k_max + 1) for f in itertools.combinations(range(n), k)]

    def candidates(budget_mb: float):
        records, made = [], []
        for cand in CANDIDATES:
            creq = dataclasses.replace(base, method=cand.method, fill=cand.fill, memory=None, budget_mb=budget_mb)
            record = {"name": cand.name, "method": cand.method, "fill": cand.fill}
            try:
                sized, stages = sized_stages(staged, creq, scores_for(cand.fill))
            except PartitionerError as exc:   # the budget is below this candidate's cheapest plan
                record["skipped"], record["least_mb"] = str(exc), getattr(exc, "least_mb", None)
                records.append(record)
                made.append(None)
                continue
            fill = plan_fill(staged, stages, sized, None if cand.fill == "zero" else shared)
            per_k = by_k(agreement_by_set(staged, stages, fill, sets, images, reference))
            record.update(agreement_by_k={str(k): v for k, v in per_k.items()}, score=weighted_score(per_k, weights))
            records.append(record)
            made.append((sized, stages, fill))
        return records, made

    records, made = candidates(budget_mb)
    raised = None
    least = [r.get("least_mb") for r in records]
    if not given and all(m is None for m in made) and all(v is not None for v in least):
        # The default memory buys no candidate: take the least that buys one, and say so.
        raised = {"from": memory, "to": min(least) * 1e6 / nmr_bytes}
        memory, budget_mb = raised["to"], min(least)
        records, made = candidates(budget_mb)
    try:
        best = pick([r.get("score") for r in records])
    except PartitionerError:
        raise PartitionerError(f"--memory {memory:g} ({budget_mb:.4g} MB per device) is below every default "
                               f"plan of {base.model} over {n} devices: "
                               + "; ".join(f"{r['name']}: {r['skipped']}" for r in records)
                               + "; give a larger --memory") from None
    sized, stages, fill = made[best]
    summary = write_plan(model, staged, stages, sized, fill=fill)
    won = CANDIDATES[best]
    explicit = f"--method {won.method} --fill {won.fill} --budget-mb {budget_mb!r}"
    if base.max_failed is not None:
        explicit += f" --max-failed {base.max_failed}"
    summary["choice"] = {
        "chosen": won.name, "memory": memory, "nmr_per_device_bytes": nmr_bytes, "budget_mb": budget_mb,
        "max_failed": k_max, "weigh_k": weights, "calibration_images": int(len(images)),
        "calibration_seed": seed, "candidates": records, "same_as": explicit, "memory_raised": raised,
    }
    summary["choice"]["line"] = choice_line(summary["choice"])
    return summary
