"""Subcommands of the offline half: `partition`, `sign`, `verify`, `evaluate`, `finetune`, `profile`, `dse`.

Registered into the `robustdice` console script by robustdice.node.cli. torch is imported only
when a subcommand runs, so that `robustdice --help` and the mesh's commands start fast.
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

from robustdice.partitioner.allocator import keep_freed_memory
from robustdice.partitioner.argtypes import fraction as _fraction, nonnegative, positive_int


def register(sub) -> None:
    p = sub.add_parser("partition", help="score, cluster, replicate and distribute a model's neurons",
                       description="Partition a model's neurons over N devices; writes DIR/plan.json "
                                   "and DIR/shards/<device>.pt.")
    p.add_argument("--model", required=True,
                   help="digits_cnn, fashion_vgg, alexnet, vgg16_bn, convnext_tiny, efficientnet_lite0, or "
                        "your own CNN as package.module:factory (importable here; the boards need only the plan)")
    p.add_argument("--input-shape", metavar="C,H,W",
                   help="with --model package.module:factory: one image's shape, e.g. 3,32,32 "
                        "(default: the factory's robustdice_input['shape'])")
    p.add_argument("--preprocess", metavar="SPEC",
                   help="with --model package.module:factory: 'imagenet', or mean=M,std=S,resize=crop|stretch "
                        "with per-channel values split by '/', e.g. mean=0.5,std=0.25/0.25/0.25 (default: the "
                        "factory's robustdice_input, else mean=0,std=1,resize=stretch)")
    p.add_argument("--devices", "-n", type=positive_int, required=True, help="number of devices N")
    p.add_argument("--method", choices=("robust", "lop", "nmr", "cdc", "random", "robust+cdc", "uniform", "rocoin"),
                   help="robust: RobustDiCE Algorithm 1; lop: equal split; nmr: full "
                        "replication; cdc: equal split over N-1 devices plus a parity device; "
                        "random: robust's replication with importance-blind groups; robust+cdc: "
                        "robust plus parity rows over its single copies, so one failure is exact; "
                        "uniform: what --budget-mb or --replication buys, spread evenly over the layers "
                        "and given to neurons drawn at random (default: with no --fill and no budget either, "
                        "the best of robust and robust+cdc with the mean+bn fill within --memory, chosen by "
                        "simulating both under every failed set on calibration images; otherwise robust); "
                        "rocoin: RoCoIn, students distilled from the teacher, one per group of devices, "
                        "each giving one partition of its final convolution's filters (one gather per frame)")
    p.add_argument("--groups", type=positive_int, metavar="K",
                   help="rocoin: device groups, each running one student (default N // 2: groups of two)")
    p.add_argument("--epochs", type=positive_int,
                   help="rocoin: distillation passes over the training images (default 30 digits_cnn, "
                        "2 fashion_vgg, 5 others)")
    p.add_argument("--train", type=Path, metavar="DIR",
                   help="rocoin: an ImageFolder of training images (default: the model's own training split, "
                        "digits_cnn and fashion_vgg)")
    p.add_argument("--paper", action="store_true",
                   help="the paper's configuration: --method robust --threshold 0.1 --fill zero, no budget")
    t = p.add_mutually_exclusive_group()
    t.add_argument("--memory", type=_fraction, metavar="FRACTION",
                   help="size the plan for this fraction of NMR's per-device memory (its parameters with the "
                        "zero fill), as --budget-mb does in MB (default 0.5 for the default plan; else off)")
    t.add_argument("--threshold", type=nonnegative, help="one clustering threshold t for every layer (default 0.1)")
    t.add_argument("--thresholds", type=Path, help="YAML mapping fx layer names (and 'default') to t")
    t.add_argument("--replication", type=nonnegative,
                   help="size the plan (per-layer thresholds; uniform: rows per layer) for this many neuron copies "
                        "per neuron, 1..N (default: off)")
    t.add_argument("--budget-mb", type=nonnegative,
                   help="size the plan (per-layer thresholds; uniform: rows per layer) for this many MB (1e6 bytes) "
                        "of parameters per device "
                        "(default: off)")
    p.add_argument("--fill", choices=("zero", "mean", "mean+bn"),
                   help="what stands in for a lost neuron: zero (the paper), mean (its expected output), "
                        "mean+bn (also BatchNorm statistics recalibrated for each failed set); s3 scores each "
                        "neuron's loss under this rule (default: mean+bn for the default plan, mean for rocoin, "
                        "else zero)")
    p.add_argument("--max-failed", type=positive_int, metavar="K",
                   help="mean+bn keeps statistics for the failed sets of up to K devices, and the default plan "
                        "is chosen over them (default: N-1 while those sets number 62 or fewer, N <= 6; else 2)")
    p.add_argument("--weigh-k", metavar="W1,W2,...",
                   help="the default plan's choice: the weight of the mean agreement with k = 1, 2, ... "
                        "failed devices, one per k up to --max-failed (default alike, e.g. 1,1,1 for N = 4)")
    p.add_argument("--s3", default="auto", choices=("auto", "exact", "quadratic"),
                   help="s3 by exact ablations, by its second-order estimate (a few backward passes), or "
                        "auto: exact for the stages where ablations are cheap, the estimate elsewhere (default auto)")
    p.add_argument("--fill-calib-size", type=positive_int,
                   help="calibration images for --fill mean / mean+bn (default 1024 digits, 2048 fashion, 32 others)")
    p.add_argument("--scores", default="s1,s2,s3", help="importance scores to use, e.g. s1,s3 (default s1,s2,s3)")
    p.add_argument("--weights", default="DEFAULT",
                   help="DEFAULT: pretrained (digits_cnn: the shipped weights; your own model: what its "
                        "factory returns); FILE: a state_dict; none: random, seeded by --seed (default DEFAULT)")
    p.add_argument("--seed", type=int, default=0, help="seed for --weights none and calibration sampling (default 0)")
    p.add_argument("--calib", type=Path, help="image folder for s2/s3 and the mean fills (default: digits' and "
                   "Fashion-MNIST's train splits; for other models the Debian packages' photos, `make photo-data`)")
    p.add_argument("--calib-size", type=positive_int, help="calibration images (default 16; digits_cnn 256)")
    p.add_argument("--capacities", type=Path, metavar="FILE",
                   help="boards of different speed: a capacity file (robustdice profile) with one entry per device, "
                        "in the plan's order, or the cluster's peers.yaml with a capacity: per peer; each device "
                        "gets work in proportion to its speed, within its memory_bytes (rocoin: groups and students "
                        "by capacity). Equal entries give the plan made without it (default: equal devices)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--sign-key", type=Path, metavar="FILE",
                   help="sign the plan with this operator key (operator.key_secret, made by "
                        "`robustdice sign --new-key DIR`); boards run only plans their peers.yaml's "
                        "operator_public_key signed (default: unsigned)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_offline(cmd_partition))

    s = sub.add_parser("sign", help="make an operator key, or sign a plan with it",
                       description="Boards run only plans signed by the operator key that peers.yaml names "
                                   "(operator_public_key). --new-key DIR makes DIR/operator.key (public) and "
                                   "DIR/operator.key_secret (0600); --plan DIR --key FILE signs DIR/plan.json "
                                   "and, through its digests, every shard (writes DIR/plan.sig).")
    s.add_argument("--new-key", type=Path, metavar="DIR", help="make an operator key pair in DIR (made 0700)")
    s.add_argument("--plan", type=Path, help="plan folder to sign")
    s.add_argument("--key", type=Path, metavar="FILE", help="operator.key_secret to sign with")
    s.set_defaults(func=cmd_sign)

    v = sub.add_parser("verify", help="check a plan's no-failure simulation against the plain model")
    v.add_argument("--plan", type=Path, action="append", required=True, help="plan folder (repeatable)")
    v.add_argument("--json", action="store_true", help="print one JSON object per plan")
    v.set_defaults(func=_offline(cmd_verify))

    e = sub.add_parser("evaluate", help="accuracy with every set of k = 0..N-1 failed devices")
    e.add_argument("--plan", type=Path, action="append", required=True, help="plan folder (repeatable)")
    e.add_argument("--data", type=Path, help="ImageFolder, or a flat folder of unlabelled images (measures "
                   "agreement with the no-failure top-1); default: the model's test split (digits, "
                   "Fashion-MNIST) or scikit-image's photos and crops (unlabelled)")
    e.add_argument("--limit", type=positive_int, help="evaluate on at most this many images")
    e.add_argument("--plot", type=Path, help="write a PNG: accuracy against failed devices")
    e.add_argument("--failed", help="with --predictions: the failed devices, e.g. 2 or 2,3 (default: none)")
    e.add_argument("--predictions", type=Path, help="write labels and predictions (with --failed down) to this JSON")
    e.add_argument("--dtype", default="float32", choices=("float32", "float16"),
                   help="compute in this dtype, as nodes started with --dtype do (default float32)")
    e.add_argument("--json", action="store_true", help="print one JSON object (a list for several plans)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=_offline(cmd_evaluate))

    f = sub.add_parser("finetune", help="train a plan's model under the plan's own failures",
                       description="Fine-tune a plan's model with its device-failure masks drawn at random: "
                                   "digits_cnn and fashion_vgg on their labels, other models by distillation "
                                   "from their own no-failure output on unlabelled photos (`make photo-data`); "
                                   "writes a plan with the same stages and the new weights.")
    f.add_argument("--plan", type=Path, required=True, help="plan folder whose failures to learn")
    f.add_argument("--out", type=Path, required=True, help="folder of the fine-tuned plan (and weights.pt)")
    f.add_argument("--epochs", type=positive_int, help="passes over the labelled training split (default 40 digits, "
                   "4 fashion)")
    f.add_argument("--steps", type=positive_int, help="distillation steps of 16 photo crops, for models without "
                   "labelled data here (default 300)")
    f.add_argument("--lr", type=nonnegative, help="AdamW learning rate (default 1e-3 digits, 5e-4 fashion, "
                   "1e-4 distillation)")
    f.add_argument("--fill", choices=("zero", "mean", "mean+bn"), help="fill rule of the new plan (default: the plan's)")
    f.add_argument("--seed", type=int, default=0, help="seed of the failure draws and batch order (default 0)")
    f.add_argument("--sign-key", type=Path, metavar="FILE", help="sign the new plan with this operator key "
                   "(as for partition; default: unsigned)")
    f.add_argument("--json", action="store_true", help="print the summary as JSON")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    f.set_defaults(func=_offline(cmd_finetune))

    r = sub.add_parser("profile", help="measure this board's speed and free memory for a capacity file",
                       description="Time each stage's forward and the whole model's on this board's compute "
                                   "device and read its free memory; writes a capacity file for this one device. "
                                   "Merge the boards' files in the plan's device order (--merge a.yaml b.yaml ... "
                                   "--out capacities.yaml) and give it to `robustdice partition --capacities`.")
    what = r.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="the model to time (as for partition); random weights time the same")
    what.add_argument("--plan", type=Path, help="time this plan's model")
    what.add_argument("--merge", type=Path, nargs="+", metavar="FILE",
                      help="join these capacity files, in order (device 0 first), into --out")
    r.add_argument("--out", type=Path, required=True, help="capacity file to write (.yaml, or .json)")
    r.add_argument("--id", help="a name for this board in the file (e.g. its peers.yaml id)")
    r.add_argument("--compute", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where to time it, as the node's --compute (default auto: cuda when torch sees a GPU)")
    r.add_argument("--threads", type=positive_int,
                   help="torch threads, as the node's engine is given (default: torch's default)")
    r.add_argument("--runs", type=positive_int, default=10,
                   help="timed forwards, back to back, at least this many and for at least 1 s (default 10)")
    r.add_argument("--warmup", type=int, default=3, help="untimed forwards first (default 3)")
    r.add_argument("--json", action="store_true", help="print the file's content as JSON")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_profile)

    x = sub.add_parser("dse", help="per-device memory against accuracy under failures (Pareto plot)",
                       description="Partition a model with every method at a ladder of memory budgets, "
                                   "evaluate each plan under every failed set, plot and write JSON.")
    x.add_argument("--model", required=True, help="model name, as for partition")
    x.add_argument("--devices", "-n", type=positive_int, default=4, help="number of devices (default 4)")
    x.add_argument("--weights", default="DEFAULT", help="DEFAULT (shipped weights), a file or none (default DEFAULT)")
    x.add_argument("--fill", default="mean+bn", choices=("zero", "mean", "mean+bn"),
                   help="what stands in for a lost neuron (default mean+bn)")
    x.add_argument("--memory-ratios", default="0.3,0.4,0.5,0.6,0.75",
                   help="budgets as fractions of NMR's per-device memory (default 0.3,0.4,0.5,0.6,0.75)")
    x.add_argument("--methods", default="robust,robust+cdc,random",
                   help="methods swept over the budgets, of robust, robust+cdc, random, uniform and rocoin "
                        "(rocoin: each budget is every device's memory, its students distilled anew) "
                        "(default robust,robust+cdc,random)")
    x.add_argument("--epochs", type=positive_int, help="rocoin: distillation passes (default as for partition)")
    x.add_argument("--data", type=Path, help="evaluation data (as for evaluate)")
    x.add_argument("--limit", type=positive_int, help="evaluate on at most this many images")
    x.add_argument("--calib", type=Path, help="calibration images for s2/s3 and the fill (as for partition)")
    x.add_argument("--seed", type=int, default=0, help="seed of the partitions (default 0)")
    x.add_argument("--out", type=Path, required=True, help="folder for the plans, dse.json and pareto.png")
    x.add_argument("--plot", type=Path, help="PNG path (default OUT/pareto.png)")
    x.add_argument("--json", action="store_true", help="print the result as JSON")
    x.add_argument("--no-progress", action="store_true", help="no progress bar")
    x.set_defaults(func=_offline(cmd_dse))


def _offline(command):
    """A command that scores, simulates or trains keeps its freed memory (allocator.py). Not
    `profile`: it runs on the boards, and measures their free memory and speed as a node has them."""
    @functools.wraps(command)
    def run(args):
        keep_freed_memory()
        return command(args)
    return run


def cmd_partition(args) -> int:
    from robustdice.partitioner.core.capacity import load_capacities
    from robustdice.partitioner.core.partition import PartitionRequest, load_thresholds, partition
    from robustdice.partitioner.core.scores import parse_scores
    from robustdice.partitioner.errors import PartitionerError
    from robustdice.partitioner.zoo.usermodel import parse_shape

    if args.sign_key is not None:
        from robustdice.partitioner.core.signing import load_secret_key
        load_secret_key(args.sign_key)  # a bad key fails now, not after the partition's work
    explicit = [name for name, value in (("--method", args.method), ("--fill", args.fill),
                                         ("--threshold", args.threshold), ("--thresholds", args.thresholds),
                                         ("--replication", args.replication), ("--budget-mb", args.budget_mb))
                if value is not None]
    if args.paper and (explicit or args.memory is not None):
        raise PartitionerError(f"--paper is the paper's configuration (robust, threshold 0.1, zero fill, no "
                               f"budget): give it without {(explicit or ['--memory'])[0]}")
    chosen = not explicit and not args.paper   # the default plan: a search (core/choose.py)
    if args.weigh_k is not None and not chosen:
        raise PartitionerError(f"--weigh-k weighs the default plan's candidates: it does nothing with "
                               f"{explicit[0] if explicit else '--paper'}")
    request = PartitionRequest(
        model=args.model, devices=args.devices, method=args.method or "robust", out=args.out,
        threshold=args.threshold,
        thresholds=load_thresholds(args.thresholds) if args.thresholds else None,
        scores=tuple(parse_scores(args.scores)), weights=args.weights, seed=args.seed,
        calib=args.calib, calib_size=args.calib_size,
        show_progress=not args.no_progress and not args.json and sys.stderr.isatty(),
        input_shape=None if args.input_shape is None else parse_shape(args.input_shape),
        preprocess=args.preprocess,
        fill=args.fill or ("mean" if args.method == "rocoin" else "zero"), replication=args.replication,
        budget_mb=args.budget_mb,
        fill_calib_size=args.fill_calib_size, s3_mode=args.s3, max_failed=args.max_failed,
        memory=None if chosen else args.memory,
        rocoin=_rocoin_options(args),
        capacities=None if args.capacities is None else load_capacities(args.capacities, args.devices),
    )
    if chosen:
        from robustdice.partitioner.core.choose import default_plan
        weigh_k = None if args.weigh_k is None else _fractions(args.weigh_k, "--weigh-k")
        summary = default_plan(request, args.memory, weigh_k)
    elif request.method == "rocoin":   # students distilled per device group
        from robustdice.partitioner.core.rocoin_plan import partition_rocoin
        summary = partition_rocoin(request)
    else:
        summary = partition(request)
    if args.sign_key is not None:
        from robustdice.partitioner.core.plan import sign_plan
        summary["signature"] = str(sign_plan(args.out, args.sign_key))
    if args.json:
        print(json.dumps(summary))
        return 0
    if "choice" in summary:
        print(summary["choice"]["line"])
    mb = [f"{b / 1e6:.2f}" for b in summary["per_device_param_bytes"]]
    print(f"{summary['model']} over {summary['devices']} devices, method {summary['method']}: "
          f"plan {summary['plan_hash'][:12]} in {summary['plan']}")
    print(f"  replication factor {summary['replication_factor']:.2f}; "
          f"parameters per device (MB): {' '.join(mb)} of {summary['full_param_bytes'] / 1e6:.2f} in full")
    if "capacities" in summary:
        c = summary["capacities"]
        print("  capacities: share of the rows per device " + " ".join(f"{v:.3f}" for v in c["rows_share"])
              + " (bound by " + ", ".join(c["bound_by"]) + ")")
    if "rocoin" in summary:
        r = summary["rocoin"]
        print(f"  groups {' '.join(map(str, r['groups']))}, students "
              + ", ".join(f"{s['student']} ({s['flops'] / 1e6:.2f} M MACs)" for s in r["students"])
              + f" of the teacher's {r['teacher_flops'] / 1e6:.2f}; one gather per frame; "
                f"distilled for {r['epochs']} epochs in {r['training_s']:.0f} s")
    print(f"  signed: {summary['signature']}" if "signature" in summary else
          "  unsigned: boards with an operator_public_key refuse it (robustdice sign --plan DIR --key FILE)")
    return 0


def _rocoin_options(args):
    """--groups, --epochs and --train, which only --method rocoin takes."""
    from robustdice.partitioner.errors import PartitionerError
    given = [name for name, value in (("--groups", args.groups), ("--epochs", args.epochs), ("--train", args.train))
             if value is not None]
    if args.method != "rocoin":
        if given:
            raise PartitionerError(f"{given[0]} is for --method rocoin")
        return None
    from robustdice.partitioner.core.rocoin_plan import RocoinOptions
    return RocoinOptions(groups=args.groups, epochs=args.epochs, train=args.train)


def cmd_profile(args) -> int:
    from robustdice.partitioner.core.capacity import Capacities, load_capacities, merge_capacities, write_capacities

    if args.merge:
        caps = merge_capacities([load_capacities(f) for f in args.merge])
    else:
        from robustdice.partitioner.core.profile import profile
        entry = profile(args.model, args.plan, compute=args.compute, runs=args.runs, warmup=max(0, args.warmup),
                        threads=args.threads, device_id=args.id,
                        show_progress=not args.no_progress and not args.json and sys.stderr.isatty())
        caps = Capacities((entry,))
    path = write_capacities(caps, args.out)
    if args.json:
        print(json.dumps(caps.to_json()))
        return 0
    for d, c in enumerate(caps.devices):
        memory = "unbounded" if c.memory_bytes is None else f"{c.memory_bytes / 1e9:.2f} GB free"
        timing = "" if c.forward_ms is None else f" ({c.forward_ms:.2f} ms per forward on {c.compute})"
        print(f"device {d}{'' if c.id is None else ' ' + c.id}: speed {c.speed:g}{timing}, {memory}")
    print(f"wrote {path}" + ("" if args.merge else ": merge the boards' files in device order with "
                             "`robustdice profile --merge A B ... --out capacities.yaml`"))
    return 0


def cmd_sign(args) -> int:
    from robustdice.partitioner.core.plan import sign_plan
    from robustdice.partitioner.core.signing import make_operator_key
    from robustdice.partitioner.errors import PartitionerError

    if (args.new_key is None) == (args.plan is None):
        raise PartitionerError("give either --new-key DIR, or --plan DIR with --key FILE")
    if args.new_key is not None:
        public_file, secret_file, public = make_operator_key(args.new_key)
        print(f"wrote {public_file} and {secret_file} (keep it on this machine; boards need only the public key)")
        print(f"peers.yaml:\noperator_public_key: {public}")
        return 0
    if args.key is None:
        raise PartitionerError("--plan needs --key FILE (operator.key_secret)")
    print(f"signed {sign_plan(args.plan, args.key)}")
    return 0


def cmd_verify(args) -> int:
    from robustdice.partitioner.experiments.evaluate import verify_plan

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
    from robustdice.partitioner.errors import PartitionerError
    from robustdice.partitioner.experiments.evaluate import (evaluate_plan, format_table, parse_failed, plot_accuracy,
                                                             predictions, write_json)

    if args.failed is not None and args.predictions is None:
        raise PartitionerError("--failed needs --predictions FILE (evaluate without it covers every failed set)")
    if args.predictions is not None:
        if len(args.plan) != 1:
            raise PartitionerError("--predictions takes exactly one --plan")
        failed = parse_failed(args.failed) if args.failed is not None else []
        out = predictions(args.plan[0], failed, args.data, args.limit, dtype=args.dtype)
        write_json(out, args.predictions)
        if not args.json:
            n = len(out["predictions"])
            if out["labels"] is None:
                measure = "unlabelled"
            else:
                correct = sum(p == y for p, y in zip(out["predictions"], out["labels"]))
                measure = f"accuracy {100 * correct / max(1, n):.2f}%"
            print(f"wrote {args.predictions}: {n} samples, failed {out['failed'] or 'none'}, {measure}")
        else:
            print(json.dumps({"predictions_file": str(args.predictions), "failed": out["failed"]}))
        return 0
    progress = not args.no_progress and not args.json and sys.stderr.isatty()
    results = [evaluate_plan(p, args.data, args.limit, progress=progress, dtype=args.dtype) for p in args.plan]
    if args.plot:
        plot_accuracy(results, args.plot)
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results))
        return 0
    first = results[0]
    measure = "agreement with the no-failure top-1" if first.get("metric") == "agreement" else "top-1 accuracy"
    print(f"{first['model']}: {measure} on {first['data']}, mean (min–max) over every set of failed devices"
          + ("" if args.dtype == "float32" else f", computed in {args.dtype}"))
    print(format_table(results))
    for r in results:
        if "float32_no_failure" in r:
            change = 100 * (r["accuracy_no_failure"] - r["float32_no_failure"])
            print(f"{r['method']}: no failure {100 * r['accuracy_no_failure']:.2f}% in {args.dtype} against "
                  f"{100 * r['float32_no_failure']:.2f}% in float32 ({change:+.2f} points)")
    if args.plot:
        print(f"plot: {args.plot}")
    return 0


def cmd_finetune(args) -> int:
    from robustdice.partitioner.experiments.finetune import finetune

    if args.sign_key is not None:
        from robustdice.partitioner.core.signing import load_secret_key
        load_secret_key(args.sign_key)
    summary = finetune(args.plan, args.out, epochs=args.epochs, lr=args.lr, seed=args.seed, fill=args.fill,
                       progress=not args.no_progress and not args.json and sys.stderr.isatty(), steps=args.steps)
    if args.sign_key is not None:
        from robustdice.partitioner.core.plan import sign_plan
        summary["signature"] = str(sign_plan(args.out, args.sign_key))
    if args.json:
        print(json.dumps(summary))
        return 0
    if summary["training"] == "distillation":
        print(f"distilled {summary['model']} under the failures of {args.plan} ({summary['steps']} steps on "
              f"{summary['training_data']}, {summary['training_s']:.0f} s): no-failure top-1 agrees with the "
              f"original's on {100 * summary['no_failure_agreement_with_teacher']:.1f}% of "
              f"{summary['agreement_data']}; plan {summary['plan_hash'][:12]} in {summary['plan']}")
        return 0
    print(f"fine-tuned {summary['model']} under the failures of {args.plan} ({summary['epochs']} epochs): "
          f"test accuracy with no failure {100 * summary['test_accuracy_before']:.2f}% -> "
          f"{100 * summary['test_accuracy_after']:.2f}%; plan {summary['plan_hash'][:12]} in {summary['plan']}")
    return 0


def _fractions(text: str, option: str):
    from robustdice.partitioner.errors import PartitionerError
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise PartitionerError(f"{option}: {text!r} is not a comma list of numbers") from None


def cmd_dse(args) -> int:
    from robustdice.partitioner.experiments.dse import plot_pareto, sweep, write

    progress = not args.no_progress and not args.json and sys.stderr.isatty()
    result = sweep(args.model, args.devices, args.out, weights=args.weights, fill=args.fill,
                   memory_ratios=_fractions(args.memory_ratios, "--memory-ratios"),
                   methods=[m.strip() for m in args.methods.split(",") if m.strip()],
                   data=args.data, limit=args.limit, seed=args.seed, calib=args.calib, progress=progress,
                   log=(lambda *_: None) if args.json else print, epochs=args.epochs)
    plot = plot_pareto(result, args.plot or args.out / "pareto.png")
    path = write(result, args.out / "dse.json")
    if args.json:
        print(json.dumps(result))
    else:
        print(f"wrote {path} and {plot}")
    return 0
