"""Partitioner benchmark: time to partition a model with every score, and each score alone.

    python benchmarks/partition_time.py [--model alexnet|efficientnet_lite0] [--repeat K] [--json]
        [--out benchmarks/results/partition_time_<model>.json]

Setting: AlexNet with random weights (`--weights none`), or efficientnet_lite0 with its real
ImageNet weights, 16 calibration images at 224² from the default source (crops of the Debian packages'
photos, partitioner/zoo/photos.py), scores s1+s2+s3 (s3 --s3 auto: exact ablations where they are cheap, the
second-order estimate elsewhere; for AlexNet that is exact everywhere), method robust, zero
fill, N = 4, two torch threads (the budget of the 2-core boards this targets). Figures
(median over --repeat runs):
  total_s     `partition()` end to end: model build, calibration batch, scoring, clustering,
              writing plan.json and the shards
  scores_s    s1, s2 and s3 each timed alone through scores.py on the same model and batch
  target_s    the budget total_s should stay under
The last stdout line is the JSON object (with --json); benchmarks/results/partition_time_<model>.json
is always written.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from robustdice.partitioner.allocator import keep_freed_memory
from robustdice.partitioner.core.partition import PartitionRequest, partition
from robustdice.partitioner.core.scores import compute_scores
from robustdice.partitioner.core.stages import trace_stages
from robustdice.partitioner.zoo.data import calibration_batch
from robustdice.partitioner.zoo.models import build_model

from _results import write_result

DEVICES = 4
CALIB_IMAGES = 16
THREADS = 2
# model -> (weights, target seconds): issue 13 asks efficientnet_lite0 in 5 minutes on 2 cores
MODELS = {"alexnet": ("none", 120), "efficientnet_lite0": ("DEFAULT", 300)}
RESULTS = Path(__file__).resolve().parent / "results"


def time_partition(model: str) -> float:
    with tempfile.TemporaryDirectory(prefix="partition_time_") as out:
        start = time.perf_counter()
        partition(PartitionRequest(model=model, devices=DEVICES, method="robust", out=Path(out),
                                   scores=("s1", "s2", "s3"), weights=MODELS[model][0], calib_size=CALIB_IMAGES,
                                   show_progress=False))
        return time.perf_counter() - start


def time_scores(model: str) -> dict:
    staged = trace_stages(build_model(model, weights=MODELS[model][0]))
    calib = calibration_batch(model, n=CALIB_IMAGES)
    timings = {}
    for name in ("s1", "s2", "s3"):
        start = time.perf_counter()
        compute_scores(staged, calib, [name], show_progress=False, s3_mode="auto")
        timings[name] = time.perf_counter() - start
    return timings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="alexnet", choices=sorted(MODELS))
    parser.add_argument("--repeat", type=int, default=1, help="runs; figures are medians (default 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--out", type=Path, help="JSON results file (default benchmarks/results/"
                        "partition_time_<model>.json)")
    args = parser.parse_args(argv)
    model = args.model
    target_s = MODELS[model][1]
    if args.out is None:
        args.out = RESULTS / f"partition_time_{model}.json"
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    torch.set_num_threads(THREADS)
    keep_freed_memory()   # as the robustdice commands do (partitioner/allocator.py)
    neurons = sum(s.n_neurons for s in trace_stages(build_model(model, weights="none")).stages)

    totals, per_score = [], []
    for run in range(args.repeat):
        totals.append(time_partition(model))
        per_score.append(time_scores(model))
        print(f"run {run + 1}/{args.repeat}: partition {totals[-1]:.1f} s; "
              + ", ".join(f"{k} {v:.2f} s" for k, v in per_score[-1].items()), file=sys.stderr)

    result = {
        "model": model,
        "devices": DEVICES,
        "method": "robust",
        "s3": "auto",
        "total_s": round(statistics.median(totals), 3),
        "scores_s": {k: round(statistics.median(r[k] for r in per_score), 3) for k in ("s1", "s2", "s3")},
        "target_s": target_s,
        "neurons": neurons,
        "threads": THREADS,
        "calib_images": CALIB_IMAGES,
        "repeat": args.repeat,
    }
    print(f"{model}, {neurons} neurons, N={DEVICES}, robust s1+s2+s3, {CALIB_IMAGES} images, "
          f"{THREADS} threads: partition {result['total_s']:.1f} s (target {target_s} s); "
          + ", ".join(f"{k} {v:.2f} s" for k, v in result["scores_s"].items()))
    write_result(result, args.out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
