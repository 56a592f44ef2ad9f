"""Membership benchmark: does it matter *which* neurons get the copies?

    python benchmarks/membership.py [--models fashion_vgg] [--fills zero,mean+bn]
        [--budget-ratio 0.5] [--limit 2000] [--random-seeds 3] [--json]
        [--results benchmarks/results]   (writes membership_<model>.json per model)

`--method random` keeps robust's thresholds and group sizes and draws the neurons at random, so
robust minus random measures what the importance scores earn by choosing the members of the
groups. Where that difference is within noise, two causes are possible: the scores choose badly,
or membership cannot matter there. This tells them apart. Per model and fill, at a per-device
budget of R x NMR's (budget.py picks robust's thresholds), four plans with exactly the same
groups' sizes in every layer, hence the same memory and the same number of copies per layer:

  robust     Algorithm 1: complete-linkage clusters of the normalised (s1, s2, s3) scores
  best       the same sizes, members by s3 rank: the highest s3 in the smallest groups (the
             most copies each), the lowest in the largest (one copy)
  worst      the reverse: the highest s3 in the largest groups (single copies)
  random     the same sizes, members drawn at random (--random-seeds draws, averaged)

s3 is the plan's own fill's (zero ablates to zero, mean and mean+bn to the mean output). If
best and worst are within noise of each other at some k, then no choice of members moves the
accuracy there, whatever the scores: random ties robust by construction. Each plan is simulated
exactly (Cluster.simulate) on every set of k = 1..3 failed devices of N = 4; the figures are the
mean top-1 accuracy over the sets (min and max), and robust minus each other plan with a paired
standard error and a verdict (as in robustness.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Sequence

import numpy as np
import torch

from robustdice.partitioner.argtypes import positive_int
from robustdice.partitioner.core.cluster import cluster_neurons, normalise_scores, replicate_and_deal
from robustdice.partitioner.core.partition import (DEFAULT_SCORES, PartitionRequest, default_calib_size, partition,
                                                   plan_stages, request_scores, write_plan)
from robustdice.partitioner.core.plan import load_plan
from robustdice.partitioner.core.stages import trace_stages
from robustdice.partitioner.experiments.evaluate import evaluate_plan
from robustdice.partitioner.zoo.data import calibration_batch
from robustdice.partitioner.zoo.models import build_model

from _results import START_COMMIT, write_result
from robustness import DEVICES, THREADS, budget_ratio_arg, by_k_per_image, format_versus, over_seeds, versus

RESULTS = Path(__file__).resolve().parent / "results"
ORDERED = ("best", "worst")
S3 = list(DEFAULT_SCORES).index("s3")


def ranked_members(groups: Sequence[Sequence[int]], importance: np.ndarray, worst: bool) -> List[List[int]]:
    """Groups of the same sizes, in the same order, filled by rank of `importance`: the most
    important neurons in the smallest groups (each of their members gets the most copies), or the
    reverse with `worst`. Groups of equal size are filled in their given order."""
    neurons = [int(n) for g in groups for n in g]
    order = sorted(neurons, key=lambda n: (-importance[n], n))
    if worst:
        order.reverse()
    out: List[List[int]] = [[] for _ in groups]
    start = 0
    for i in sorted(range(len(groups)), key=lambda i: len(groups[i])):
        out[i] = order[start: start + len(groups[i])]
        start += len(groups[i])
    return out


def refilled_plan(model, staged, scores, robust_dir: Path, out: Path, fill: str, worst: bool) -> dict:
    """robust's plan in `robust_dir` with every layer's members chosen by s3 rank (ranked_members)."""
    thresholds = {s.name: s.threshold for s in load_plan(robust_dir).stages}
    # Its plan.json says "random": robust's thresholds and sizes, members not robust's clusters.
    request = PartitionRequest(model=model, devices=DEVICES, method="random", out=out, fill=fill,
                               thresholds=thresholds, show_progress=False)
    stages = []
    for stage, sp in zip(staged.stages, plan_stages(staged, dataclasses.replace(request, method="robust"), scores)):
        clusters = cluster_neurons(normalise_scores(scores[stage.name]), thresholds[stage.name])   # robust's groups
        members = ranked_members(clusters, scores[stage.name][:, S3], worst)
        stages.append(dataclasses.replace(sp, assignment=tuple(tuple(a) for a in replicate_and_deal(members, DEVICES))))
    return write_plan(build_model(model, "DEFAULT"), staged, stages, request)


def run(model: str, fill: str, root: Path, ratio: float, limit, seeds: int, log) -> dict:
    started = time.perf_counter()
    staged = trace_stages(build_model(model, "DEFAULT"))
    calib = calibration_batch(model, n=default_calib_size(model), seed=0)
    partition(PartitionRequest(model=model, devices=DEVICES, method="nmr", out=root / "nmr", show_progress=False))
    nmr_bytes = float(max(evaluate_plan(root / "nmr", None, 1)["per_device_param_bytes"]))
    scores = request_scores(staged, calib, PartitionRequest(model=model, devices=DEVICES, method="robust", out=root,
                                                            fill=fill, show_progress=False))
    budget_mb = ratio * nmr_bytes / 1e6
    rows, per_image = [], {}
    for name in ("robust",) + ORDERED + ("random",):
        results = []
        for seed in (range(seeds) if name == "random" else (0,)):
            where = root / f"{name}_{seed}"
            if name in ORDERED:
                refilled_plan(model, staged, scores, root / "robust_0", where, fill, worst=name == "worst")
            else:
                partition(PartitionRequest(model=model, devices=DEVICES, method=name, out=where, fill=fill,
                                           show_progress=False, seed=seed, budget_mb=budget_mb), scores=scores)
            results.append(evaluate_plan(where, None, limit, per_image=True))
        per_image[(name, fill)] = by_k_per_image(results)
        r = over_seeds(results)
        rows.append({"method": name, "fill": fill, "budget_ratio": ratio, "by_failed": r["by_failed"],
                     "memory_ratio": max(r["per_device_param_bytes"]) / nmr_bytes,
                     "replication": r["replication_factor"]})
        log(f"  {name:<7} {fill:<8} mem {rows[-1]['memory_ratio']:.3f} of nmr | " + " | ".join(
            f"{k}: {100 * b['mean']:5.2f} ({100 * b['min']:.1f}-{100 * b['max']:.1f})"
            for k, b in sorted(r["by_failed"].items())))
    result = {"model": model, "fill": fill, "samples": r["samples"], "metric": r["metric"], "data": r["data"],
              "budget_ratio": ratio, "limit": limit, "random_seeds": seeds, "rows": rows,
              "elapsed_s": round(time.perf_counter() - started, 1), "commit": START_COMMIT}
    result["versus"] = {other: versus(result, per_image, "robust", other)[fill] for other in ORDERED + ("random",)}
    result["versus"]["best - worst"] = versus(result, per_image, "best", "worst")[fill]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="fashion_vgg")
    parser.add_argument("--fills", default="zero,mean+bn")
    parser.add_argument("--budget-ratio", type=budget_ratio_arg, default=0.5)
    parser.add_argument("--limit", type=positive_int, default=2000, help="evaluate on at most this many images")
    parser.add_argument("--random-seeds", type=positive_int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of membership_<model>.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)

    def log(text):
        print(text, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="membership_") as tmp:
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            results = []
            for fill in [f.strip() for f in args.fills.split(",") if f.strip()]:
                log(f"{model}, {fill} fill, {args.budget_ratio:g} of NMR's memory:")
                r = run(model, fill, Path(tmp) / model / fill, args.budget_ratio, args.limit, args.random_seeds, log)
                for other, v in r["versus"].items():
                    label = other if " - " in other else f"robust - {other}"
                    print("\n".join(format_versus({fill: v}, f"{model} {label}")))
                results.append(r)
            # One file per model, written as each model finishes.
            write_result({"model": model, "devices": DEVICES, "threads": THREADS, "results": results},
                         args.results / f"membership_{model}.json", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
