"""Subcommands of the offline half: `partition`, `verify`, `evaluate`.

Registered into the `robustdice` console script by robustdice.node.cli. torch is imported only
when a subcommand runs, so that `robustdice --help` and the mesh's commands start fast.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def register(sub) -> None:
    p = sub.add_parser("partition", help="score, cluster, replicate and distribute a model's neurons",
                       description="Partition a model's neurons over N devices; writes DIR/plan.json "
                                   "and DIR/shards/<device>.pt.")
    p.add_argument("--model", required=True,
                   help="digits_cnn, alexnet, vgg16_bn, convnext_tiny, efficientnet_lite0, or your own "
                        "CNN as package.module:factory (importable here; the boards need only the plan)")
    p.add_argument("--input-shape", metavar="C,H,W",
                   help="with --model package.module:factory: one image's shape, e.g. 3,32,32 "
                        "(default: the factory's robustdice_input['shape'])")
    p.add_argument("--preprocess", metavar="SPEC",
                   help="with --model package.module:factory: 'imagenet', or mean=M,std=S,resize=crop|stretch "
                        "with per-channel values split by '/', e.g. mean=0.5,std=0.25/0.25/0.25 (default: the "
                        "factory's robustdice_input, else mean=0,std=1,resize=stretch)")
    p.add_argument("--devices", "-n", type=positive_int, required=True, help="number of devices N")
    p.add_argument("--method", default="robust", choices=("robust", "lop", "nmr", "cdc"),
                   help="robust: RobustDiCE Algorithm 1; lop: equal split; nmr: full "
                        "replication; cdc: equal split over N-1 devices plus a parity device (default robust)")
    t = p.add_mutually_exclusive_group()
    t.add_argument("--threshold", type=_threshold, help="one clustering threshold t for every layer (default 0.1)")
    t.add_argument("--thresholds", type=Path, help="YAML mapping fx layer names (and 'default') to t")
    p.add_argument("--scores", default="s1,s2,s3", help="importance scores to use, e.g. s1,s3 (default s1,s2,s3)")
    p.add_argument("--weights", default="DEFAULT",
                   help="DEFAULT: pretrained (digits_cnn: the shipped weights; your own model: what its "
                        "factory returns); FILE: a state_dict; none: random, seeded by --seed (default DEFAULT)")
    p.add_argument("--seed", type=int, default=0, help="seed for --weights none and calibration sampling (default 0)")
    p.add_argument("--calib", type=Path, help="image folder for s2/s3 (default: the model's own data)")
    p.add_argument("--calib-size", type=positive_int, help="calibration images (default 16; digits_cnn 256)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_partition)

    v = sub.add_parser("verify", help="check a plan's no-failure simulation against the plain model")
    v.add_argument("--plan", type=Path, action="append", required=True, help="plan folder (repeatable)")
    v.add_argument("--json", action="store_true", help="print one JSON object per plan")
    v.set_defaults(func=cmd_verify)

    e = sub.add_parser("evaluate", help="accuracy with every set of k = 0..N-1 failed devices")
    e.add_argument("--plan", type=Path, action="append", required=True, help="plan folder (repeatable)")
    e.add_argument("--data", type=Path, help="ImageFolder for evaluation (default: digits test split)")
    e.add_argument("--limit", type=positive_int, help="evaluate on at most this many images")
    e.add_argument("--plot", type=Path, help="write a PNG: accuracy against failed devices")
    e.add_argument("--failed", help="with --predictions: the failed devices, e.g. 2 or 2,3")
    e.add_argument("--predictions", type=Path, help="write labels and predictions for --failed to this JSON")
    e.add_argument("--json", action="store_true", help="print one JSON object (a list for several plans)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_evaluate)


def cmd_partition(args) -> int:
    from .partition import PartitionRequest, load_thresholds, partition
    from .scores import parse_scores
    from .usermodel import parse_shape

    request = PartitionRequest(
        model=args.model, devices=args.devices, method=args.method, out=args.out,
        threshold=args.threshold,
        thresholds=load_thresholds(args.thresholds) if args.thresholds else None,
        scores=tuple(parse_scores(args.scores)), weights=args.weights, seed=args.seed,
        calib=args.calib, calib_size=args.calib_size,
        show_progress=not args.no_progress and not args.json and sys.stderr.isatty(),
        input_shape=None if args.input_shape is None else parse_shape(args.input_shape),
        preprocess=args.preprocess,
    )
    summary = partition(request)
    if args.json:
        print(json.dumps(summary))
        return 0
    mb = [f"{b / 1e6:.2f}" for b in summary["per_device_param_bytes"]]
    print(f"{summary['model']} over {summary['devices']} devices, method {summary['method']}: "
          f"plan {summary['plan_hash'][:12]} in {summary['plan']}")
    print(f"  replication factor {summary['replication_factor']:.2f}; "
          f"parameters per device (MB): {' '.join(mb)} of {summary['full_param_bytes'] / 1e6:.2f} in full")
    return 0


def cmd_verify(args) -> int:
    from .evaluate import verify_plan

    results = [verify_plan(p) for p in args.plan]
    for r in results:
        if args.json:
            print(json.dumps(r))
        else:
            verdict = "ok" if r["allclose"] else "MISMATCH"
            print(f"{r['plan']}: {r['model']} {r['method']} N={r['devices']}: "
                  f"max abs diff {r['max_abs_diff']:.3g} (outputs up to {r['reference_max_abs']:.3g}) {verdict}")
    return 0 if all(r["allclose"] for r in results) else 1


def cmd_evaluate(args) -> int:
    from .errors import PartitionerError
    from .evaluate import evaluate_plan, format_table, parse_failed, plot_accuracy, predictions, write_json

    if (args.failed is None) != (args.predictions is None):
        raise PartitionerError("--failed and --predictions go together")
    if args.predictions is not None:
        if len(args.plan) != 1:
            raise PartitionerError("--predictions takes exactly one --plan")
        out = predictions(args.plan[0], parse_failed(args.failed), args.data, args.limit)
        write_json(out, args.predictions)
        if not args.json:
            correct = sum(p == y for p, y in zip(out["predictions"], out["labels"]))
            print(f"wrote {args.predictions}: {len(out['labels'])} samples, failed {out['failed']}, "
                  f"accuracy {100 * correct / max(1, len(out['labels'])):.2f}%")
        else:
            print(json.dumps({"predictions_file": str(args.predictions), "failed": out["failed"]}))
        return 0
    progress = not args.no_progress and not args.json and sys.stderr.isatty()
    results = [evaluate_plan(p, args.data, args.limit, progress=progress) for p in args.plan]
    if args.plot:
        plot_accuracy(results, args.plot)
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results))
        return 0
    first = results[0]
    print(f"{first['model']}: top-1 accuracy on {first['samples']} evaluation samples, "
          f"mean (min–max) over every set of failed devices")
    print(format_table(results))
    if args.plot:
        print(f"plot: {args.plot}")
    return 0
