"""Partitioner benchmark: time to partition AlexNet with every score, and each score alone.

    python benchmarks/partition_time.py [--repeat K] [--json] [--out benchmarks/results/partition_time.json]

Setting: AlexNet with random weights (`--weights none`), 16 calibration images at 224² from the
default source (scikit-image's photos), scores s1+s2+s3, method robust, N = 4, two torch threads
(the budget of the 2-core boards this targets). Figures (median over --repeat runs):
  total_s     `partition()` end to end: model build, calibration batch, scoring, clustering,
              writing plan.json and the shards
  scores_s    s1, s2 and s3 each timed alone through scores.py on the same model and batch
  target_s    the budget total_s should stay under
The last stdout line is the JSON object (with --json); benchmarks/results/partition_time.json
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

from robustdice.partitioner.data import calibration_batch
from robustdice.partitioner.models import build_model
from robustdice.partitioner.partition import PartitionRequest, partition
from robustdice.partitioner.scores import s1_scores, s2_scores, s3_scores
from robustdice.partitioner.stages import trace_stages

from _results import write_result

MODEL = "alexnet"
DEVICES = 4
CALIB_IMAGES = 16
THREADS = 2
TARGET_S = 120
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "partition_time.json"


def time_partition() -> float:
    with tempfile.TemporaryDirectory(prefix="partition_time_") as out:
        start = time.perf_counter()
        partition(PartitionRequest(model=MODEL, devices=DEVICES, method="robust", out=Path(out),
                                   scores=("s1", "s2", "s3"), weights="none", calib_size=CALIB_IMAGES,
                                   show_progress=False))
        return time.perf_counter() - start


def time_scores() -> dict:
    staged = trace_stages(build_model(MODEL, weights="none"))
    calib = calibration_batch(MODEL, n=CALIB_IMAGES)
    timings = {}
    start = time.perf_counter()
    for stage in staged.stages:
        s1_scores(stage)
    timings["s1"] = time.perf_counter() - start
    start = time.perf_counter()
    s2_scores(staged, calib)
    timings["s2"] = time.perf_counter() - start
    start = time.perf_counter()
    s3_scores(staged, calib)
    timings["s3"] = time.perf_counter() - start
    return timings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs; figures are medians (default 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    torch.set_num_threads(THREADS)
    neurons = sum(s.n_neurons for s in trace_stages(build_model(MODEL, weights="none")).stages)

    totals, per_score = [], []
    for run in range(args.repeat):
        totals.append(time_partition())
        per_score.append(time_scores())
        print(f"run {run + 1}/{args.repeat}: partition {totals[-1]:.1f} s; "
              + ", ".join(f"{k} {v:.2f} s" for k, v in per_score[-1].items()), file=sys.stderr)

    result = {
        "model": MODEL,
        "devices": DEVICES,
        "method": "robust",
        "total_s": round(statistics.median(totals), 3),
        "scores_s": {k: round(statistics.median(r[k] for r in per_score), 3) for k in ("s1", "s2", "s3")},
        "target_s": TARGET_S,
        "neurons": neurons,
        "threads": THREADS,
        "calib_images": CALIB_IMAGES,
        "repeat": args.repeat,
    }
    print(f"{MODEL}, {neurons} neurons, N={DEVICES}, robust s1+s2+s3, {CALIB_IMAGES} images, "
          f"{THREADS} threads: partition {result['total_s']:.1f} s (target {TARGET_S} s); "
          + ", ".join(f"{k} {v:.2f} s" for k, v in result["scores_s"].items()))
    write_result(result, args.out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
