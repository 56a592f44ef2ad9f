"""Robustness benchmark: accuracy kept under failures, per method, fill rule and fine-tuning.

    python benchmarks/robustness.py [--models digits_cnn,fashion_vgg,efficientnet_lite0]
        [--limit K] [--finetune-epochs E] [--distill-steps S] [--no-finetune] [--budget-ratio R] [--json]
        [--run main] [--results benchmarks/results]

Results: one file per model, benchmarks/results/robustness_<model>.json, holding named runs
(`--run`, default "main": the table docs/robustness.md leads with; other runs are the same
benchmark under other conditions, e.g. `--run budget-0.35 --budget-ratio 0.35`). A run replaces
only its own entry; each entry keeps its conditions (budget ratio, images, draws, epochs) and its
own `measured` record, and the file's `measured` is that of the run written last.

Setting: N = 4 devices, every set of k = 0..3 failed devices, each plan simulated exactly
(Cluster.simulate, what the nodes are tested against). Per model, scored once per stand-in
(s1+s2+s3; s3 exact where its ablations are cheap, its second-order estimate elsewhere; s3
ablates to zero for the zero fill, to the mean output for mean and mean+bn):
  lop, cdc                      with each fill (zero, mean, mean+bn)
  nmr                           zero fill (nothing is ever lost)
  robust t=0.1                  the paper's method at the default threshold, each fill
  robust, random, uniform,      at a per-device budget of R x NMR's per-device parameters
  robust+cdc                    (--budget-ratio, default 0.5; thresholds per layer, budget.py;
                                uniform: the same rows per neuron in every layer), each fill;
                                random's and uniform's rows are the mean over --random-seeds
                                draws (seed_means lists each draw's), min and max over all
  fine-tuned: robust and robust+cdc at the budget, mean+bn fill, `finetune` under the plan's
                                own failure masks: on labels where the model's training data is
                                here, else distilled from its own no-failure output on the Debian
                                packages' photos (--distill-steps; never the evaluation photos)
  rocoin (models whose training data is here): RoCoIn's students, N // 2 groups of two, zero
                                and mean fill (one training, two plans); no budget: each
                                device holds its student and the head (`partition --method
                                rocoin`), --rocoin-epochs distillation passes
Figures: per-device parameters (the fullest device) and their ratio to NMR's, replication
(copies per neuron, parity rows included), and per k the mean (min-max) over failed sets of
top-1 accuracy on the model's evaluation split (digits: 360 test images; fashion_vgg: the 10k
Fashion-MNIST test images) or, for efficientnet_lite0, top-1 agreement with its own no-failure
prediction on scikit-image's photos and crops (unlabelled). Retention = accuracy / accuracy
with no failure. Also writes a Pareto PNG per model (per-device memory against the mean at 1,
2 and 3 failed) next to the JSON. Per fill and k, `versus_random` holds robust minus random with
a standard error and a verdict ("wins"/"loses" beyond two standard errors, else "within noise");
`versus_uniform` the same for robust and robust+cdc against uniform; `versus_rocoin` rocoin
(each fill) minus robust at the budget with mean+bn and minus robust fine-tuned, where they ran.
Every row also says how many gathers a frame costs (stages; rocoin: 1).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from robustdice.partitioner.allocator import keep_freed_memory
from robustdice.partitioner.argtypes import positive_int
from robustdice.partitioner.core.partition import (SCORED_METHODS, PartitionRequest, default_calib_size, partition,
                                                   request_scores)
from robustdice.partitioner.core.plan import load_plan
from robustdice.partitioner.core.stages import trace_stages
from robustdice.partitioner.errors import PartitionerError
from robustdice.partitioner.experiments.dse import plot_pareto, point
from robustdice.partitioner.experiments.evaluate import evaluate_plan
from robustdice.partitioner.experiments.finetune import finetune
from robustdice.partitioner.zoo.data import LABELLED_MODELS, calibration_batch, training_data
from robustdice.partitioner.zoo.photos import photos_missing
from robustdice.partitioner.zoo.models import build_model

from _results import measured, write_result

DEVICES = 4
BUDGET_RATIO = 0.5
SWEEP_RATIOS = (0.35, 0.65)
FILLS = ("zero", "mean", "mean+bn")
THREADS = 2
# random and uniform are draws of a distribution: their rows are the mean over this many seeds, so
# that "robust beats random" compares with the expected random plan, not a lucky or unlucky one.
RANDOM_SEEDS = 3
DRAWN_METHODS = ("random", "uniform")
BUDGET_METHODS = ("robust", "random", "uniform", "robust+cdc")
# Methods outside the budget: rocoin distils students instead of splitting the model's layers.
ROCOIN_FILLS = ("zero", "mean")
DEFAULT_METHODS = BUDGET_METHODS + ("rocoin",)
DEFAULT_MODELS = ("digits_cnn", "fashion_vgg", "efficientnet_lite0")
RESULTS = Path(__file__).resolve().parent / "results"
MAIN_RUN = "main"
# The targets: retention at k = 1, 2, 3 failed (None: no target at that k).
TARGETS = {"fashion_vgg": (0.95, 0.85, 0.60), "digits_cnn": (0.95, 0.85, None),
           "efficientnet_lite0": (0.90, None, None)}


def configurations(model: str, finetune_here: bool, fills=FILLS, sweep=True, methods=BUDGET_METHODS,
                   budget_ratio: float = BUDGET_RATIO, rocoin_here: bool = False):
    """(name, method, fill, budget ratio or None, fine-tuned) of every row of the table."""
    rows = [("nmr/zero", "nmr", "zero", None, False)]   # first: the others' memory is measured against it
    rows += [(f"lop/{f}", "lop", f, None, False) for f in fills]
    rows += [(f"cdc/{f}", "cdc", f, None, False) for f in fills]
    rows += [(f"robust-t0.1/{f}", "robust", f, None, False) for f in fills]
    for method in (m for m in methods if m in BUDGET_METHODS):
        rows += [(f"{method}@{budget_ratio:g}/{f}", method, f, budget_ratio, False) for f in fills]
    if finetune_here:
        rows += [(f"{m}@{budget_ratio:g}/mean+bn/finetuned", m, "mean+bn", budget_ratio, True)
                 for m in ("robust", "robust+cdc")]
    if rocoin_here and "rocoin" in methods:   # students are distilled on the model's training data
        rows += [(f"rocoin/{f}", "rocoin", f, None, False) for f in ROCOIN_FILLS]
    # Budget sweep for the Pareto plot (not in the table): other budgets, the mean+bn fill.
    for method in ("robust", "robust+cdc") if sweep else ():
        rows += [(f"{method}@{r:g}/mean+bn", method, "mean+bn", r, False) for r in SWEEP_RATIOS
                 if r != budget_ratio]
    return rows


def per_model(text, cast):
    """'8' (every model) or 'fashion_vgg=2000,efficientnet_lite0=40' -> {model or '*': value}."""
    out = {}
    for part in (text or "").split(","):
        if part.strip():
            key, _, value = part.rpartition("=")
            out[key.strip() or "*"] = cast(value)
    return out


def run_model(model: str, root: Path, limit, finetune_epochs, allow_finetune: bool, log, fills=FILLS,
              sweep=True, methods=DEFAULT_METHODS, random_seeds: int = RANDOM_SEEDS,
              budget_ratio: float = BUDGET_RATIO, rocoin_epochs: Optional[int] = None,
              distill_steps: Optional[int] = None) -> dict:
    started = time.perf_counter()
    staged = trace_stages(build_model(model, "DEFAULT"))
    calib = calibration_batch(model, n=default_calib_size(model), seed=0)
    # s3 ablates a neuron to what its plan's fill puts there (partition.stand_ins): zero, or
    # its mean for both mean and mean+bn, so two scorings serve the three fills.
    scored = {}

    def scores_for(fill: str):
        key = "zero" if fill == "zero" else "mean"
        if key not in scored:
            like = PartitionRequest(model=model, devices=DEVICES, method="robust", out=root, fill=fill,
                                    show_progress=False)
            scored[key] = request_scores(staged, calib, like)
        return scored[key]
    try:
        training_data(model)
        trainable = True
    except PartitionerError:
        trainable = False
    # Without labels a model is fine-tuned by distillation on the Debian packages' photos.
    finetune_here = allow_finetune and (trainable or (model not in LABELLED_MODELS and not photos_missing()))
    rows = []
    nmr_bytes = None
    plans = {}
    per_image = {}   # (method, fill) -> {k: each image's share of correct answers}, for versus_*
    rocoin = {}   # one design and one training serve both fills
    for name, method, fill, ratio, tuned in configurations(model, finetune_here, fills, sweep, methods, budget_ratio,
                                                           rocoin_here=trainable):
        out = root / model / name.replace("/", "_").replace("@", "_at_")
        if method == "rocoin":
            summary = rocoin_plan(model, out, fill, rocoin, rocoin_epochs, log)
            results = [evaluate_plan(out, None, limit, per_image=True)]
            per_image[(method, fill)] = by_k_per_image(results)
            result = results[0]
        elif tuned:
            base = plans.get((method, fill, ratio))
            if base is None:   # its plan was not made: skipped above, or not among --methods
                log(f"  {name}: skipped (no {method}@{ratio:g}/{fill} plan to fine-tune)")
                continue
            if trainable:
                summary = finetune(base, out, epochs=finetune_epochs, progress=False)
                log(f"  fine-tuned {name}: no-failure test accuracy {100 * summary['test_accuracy_before']:.2f}% -> "
                    f"{100 * summary['test_accuracy_after']:.2f}%")
            else:
                summary = finetune(base, out, steps=distill_steps, progress=False)
                log(f"  distilled {name}: {summary['steps']} steps in {summary['training_s']:.0f} s, no-failure "
                    f"top-1 as the original's on {100 * summary['no_failure_agreement_with_teacher']:.1f}%")
        else:
            budget = {} if ratio is None else {"budget_mb": ratio * nmr_bytes / 1e6}
            seeds = range(random_seeds) if method in DRAWN_METHODS else (0,)
            results = []
            try:
                for seed in seeds:
                    where = out if seed == 0 else out.with_name(f"{out.name}_seed{seed}")
                    request = PartitionRequest(model=model, devices=DEVICES, method=method, out=where, fill=fill,
                                               show_progress=False, seed=seed, **budget)
                    partition(request, scores=scores_for(fill) if method in SCORED_METHODS else None)
                    paired = ratio == budget_ratio and method in BUDGET_METHODS
                    results.append(evaluate_plan(where, None, limit, per_image=paired))
            except PartitionerError as exc:  # a sweep budget below what the method needs at least
                log(f"  {name}: skipped ({exc})")
                continue
            plans[(method, fill, ratio)] = out
            if "correct_by_set" in results[0]:
                per_image[(method, fill)] = by_k_per_image(results)
            result = over_seeds(results)
        if tuned:
            result = evaluate_plan(out, None, limit)
        if method == "nmr":
            nmr_bytes = float(max(result["per_device_param_bytes"]))
        label = name.rsplit("/", 1)[0] if not tuned else name.replace("/mean+bn/", " ")
        if ratio is not None and not tuned:
            label = f"{method} (budget)"
        if method == "rocoin":   # one point per fill on the plot
            label = name
        row = point(result, nmr_bytes, name=name, finetuned=tuned, budget_ratio=ratio, label=label,
                    in_table=ratio in (None, budget_ratio), gathers_per_frame=gathers_per_frame(out))
        if method == "rocoin":
            row.update(training_s=summary["rocoin"]["training_s"], design_s=summary["rocoin"]["design_s"],
                       rocoin_epochs=summary["rocoin"]["epochs"], students=summary["rocoin"]["students"],
                       **rocoin_sets(load_plan(out).rocoin, result["by_set"]))
        base_acc = row["by_failed"]["0"]["mean"]
        row["retention"] = {k: (b["mean"] / base_acc if base_acc else None) for k, b in row["by_failed"].items()}
        if tuned and summary["training"] == "labels":
            row["test_accuracy_before_finetune"] = summary["test_accuracy_before"]
            row["test_accuracy_after_finetune"] = summary["test_accuracy_after"]
        elif tuned:   # distilled: what it cost and how close the no-failure network stayed
            row["distillation"] = {k: summary[k] for k in ("steps", "batch", "lr", "temperature", "training_data",
                                                           "training_s", "no_failure_agreement_with_teacher",
                                                           "agreement_data")}
        rows.append(row)
        log(f"  {format_row(row)}")
    out = {"model": model, "devices": DEVICES, "samples": result["samples"], "metric": result["metric"],
           "data": result["data"], "nmr_per_device_mb": nmr_bytes / 1e6, "rows": rows,
           "targets": TARGETS.get(model), "limit": limit, "finetune_epochs": finetune_epochs,
           "random_seeds": random_seeds, "budget_ratio": budget_ratio, "threads": THREADS,
           "elapsed_s": round(time.perf_counter() - started, 1)}
    out["versus_random"] = versus_random(out, per_image)
    out["versus_uniform"] = versus_uniform(out, per_image)
    out["versus_rocoin"] = versus_rocoin(out, per_image)
    return out


def rocoin_plan(model: str, out: Path, fill: str, cache: dict, epochs: Optional[int], log) -> dict:
    """The rocoin plan of `model` with `fill` in `out`; the students are designed and distilled
    once per model (cache) and written once per fill."""
    from robustdice.partitioner.core.rocoin_plan import RocoinOptions, design, train, write

    if "design" not in cache:
        request = PartitionRequest(model=model, devices=DEVICES, method="rocoin", out=out, fill=fill,
                                   show_progress=False, rocoin=RocoinOptions(epochs=epochs))
        cache["design"] = design(request)
        cache["students"], cache["training_s"] = train(cache["design"])
        log(f"  rocoin: students {', '.join(m.student for m in cache['design'].matches)} distilled for "
            f"{cache['design'].epochs} epochs in {cache['training_s']:.0f} s")
    return write(cache["design"], cache["students"], out=out, fill=fill, training_s=cache["training_s"])


def rocoin_sets(spec, by_set: dict) -> dict:
    """A rocoin row's groups (its plan's RocoinSpec) and every failed set's accuracy (evaluate's
    by_set: "-", "0", "0,2", ...), and the mean over the sets that leave every group a member:
    a partition is lost only with its whole group."""
    covered = {key: value for key, value in by_set.items()
               if not spec.lost_groups(set() if key == "-" else {int(d) for d in key.split(",")})}
    return {"groups": [list(g.devices) for g in spec.groups], "by_set": dict(by_set),
            "every_group_served": {"sets": len(covered), "mean": sum(covered.values()) / len(covered),
                                   "min": min(covered.values())}}


def gathers_per_frame(plan_dir: Path) -> int:
    """All-gathers one frame costs: one per stage, rocoin's one (its students' outputs)."""
    plan = load_plan(plan_dir)
    return 1 if plan.rocoin is not None else len(plan.stages)


def versus_rocoin(result: dict, per_image: Optional[dict] = None) -> dict:
    """{fill: {baseline: per k failed, rocoin with that fill minus the baseline row}}, against
    robust at the budget with mean+bn and robust fine-tuned, where the result has them (see
    difference)."""
    ratio = result.get("budget_ratio", BUDGET_RATIO)
    rows = {r["name"]: r for r in result["rows"]}
    baselines = {"robust mean+bn": f"robust@{ratio:g}/mean+bn",
                 "robust mean+bn fine-tuned": f"robust@{ratio:g}/mean+bn/finetuned"}
    images = per_image or {}
    out = {}
    for fill in ROCOIN_FILLS:
        mine = rows.get(f"rocoin/{fill}")
        if mine is None:
            continue
        out[fill] = {label: difference(mine, rows[name], images.get(("rocoin", fill)),
                                       images.get(("robust", "mean+bn")) if "fine" not in label else None,
                                       int(result["samples"]))
                     for label, name in baselines.items() if name in rows}
    return out


def by_k_per_image(results: List[dict]) -> dict:
    """k -> per image, the share of its answers that were right over every set of k failed
    devices and every draw in `results` (one plan, or random's seeds)."""
    out = {}
    for k in sorted({len(f) for r in results for f in r["correct_by_set"]} - {0}):
        columns = [c for r in results for f, c in r["correct_by_set"].items() if len(f) == k]
        out[str(k)] = np.mean(np.stack(columns).astype(np.float64), axis=0)
    for r in results:
        del r["correct_by_set"]   # not JSON, and no longer needed
    return out


def over_seeds(results: List[dict]) -> dict:
    """One row for the plans of several seeds (random's draws): per k, the mean of their means,
    the min of their mins and the max of their maxes; each draw's mean is kept as seed_means."""
    if len(results) == 1:
        return results[0]
    out = dict(results[0])
    out["by_failed"] = {}
    for k, first in results[0]["by_failed"].items():
        means = [r["by_failed"][k]["mean"] for r in results]
        out["by_failed"][k] = {"mean": sum(means) / len(means), "min": min(r["by_failed"][k]["min"] for r in results),
                               "max": max(r["by_failed"][k]["max"] for r in results), "sets": first["sets"],
                               "seed_means": means}
    out["per_device_param_bytes"] = [max(r["per_device_param_bytes"][d] for r in results)
                                     for d in range(len(results[0]["per_device_param_bytes"]))]
    out["seeds"] = len(results)
    return out


def versus_random(result: dict, per_image: Optional[dict] = None) -> dict:
    """Per fill and k failed, robust minus random at the budget (see versus)."""
    return versus(result, per_image, "robust", "random")


def versus_uniform(result: dict, per_image: Optional[dict] = None) -> dict:
    """{method: per fill and k failed, method minus uniform} for robust and robust+cdc, where the
    result has both rows. uniform doubles nearly every neuron at half of NMR's memory, so it is
    close to exact at 1 failed; robust spends the same memory on 2 and 3 failed."""
    methods = {r["method"] for r in result["rows"]}
    return {m: versus(result, per_image, m, "uniform") for m in ("robust", "robust+cdc")
            if m in methods and "uniform" in methods}


def versus(result: dict, per_image: Optional[dict], method: str, baseline: str) -> dict:
    """Per fill and k failed, `method` minus `baseline` at the budget, with a verdict that allows
    for noise: "wins"/"loses" only beyond two standard errors, otherwise "within noise".

    Paired (when `per_image` has both rows, as in a full run): both plans answer the same
    images, so the error is that of the mean of the per-image differences (each image's share
    of right answers over the failed sets, a drawn baseline's averaged over its draws), plus the
    spread of the baseline's draws (the std of the seed means over sqrt(seeds)): a plan drawn at
    random is itself a random variable. Without it (--replot of stored figures): the binomial
    error of each mean over the `samples` images (sqrt(p(1-p)/n)), which ignores the pairing and
    so overstates the error.
    """
    n = max(int(result["samples"]), 1)
    ratio = result.get("budget_ratio", BUDGET_RATIO)   # entries written before --budget-ratio: 0.5
    rows = {(r["method"], r["fill"]): r for r in result["rows"]
            if r.get("budget_ratio") == ratio and not r.get("finetuned")}
    out = {}
    for (name, fill), mine in sorted(rows.items()):
        base = rows.get((baseline, fill))
        if name != method or base is None:
            continue
        images = per_image or {}
        out[fill] = difference(mine, base, images.get((method, fill)), images.get((baseline, fill)), n)
    return out


def difference(mine: dict, base: dict, mine_images: Optional[dict], base_images: Optional[dict], n: int) -> dict:
    """Per k failed (k >= 1), mine minus base with its standard error and verdict (see versus):
    paired when both rows' per-image shares are given, else binomial over `n` images."""
    n = max(n, 1)
    pair = mine_images is not None and base_images is not None
    per_k = {}
    for k, b in sorted(mine["by_failed"].items()):
        if k == "0":
            continue
        a, r = b["mean"], base["by_failed"][k]
        seeds = r.get("seed_means") or [r["mean"]]
        seed_var = (float(np.var(seeds, ddof=1)) / len(seeds)) if len(seeds) > 1 else 0.0
        if pair:
            d = mine_images[k] - base_images[k]
            image_var = float(np.var(d, ddof=1)) / len(d) if len(d) > 1 else 0.0
        else:
            image_var = a * (1 - a) / n + r["mean"] * (1 - r["mean"]) / n
        se = math.sqrt(image_var + seed_var)
        diff = a - r["mean"]
        verdict = "wins" if diff > 2 * se else "loses" if diff < -2 * se else "within noise"
        per_k[k] = {"difference": diff, "standard_error": se, "verdict": verdict,
                    "error": "paired" if pair else "binomial"}
    return per_k


def format_versus(versus: dict, label: str = "robust - random") -> List[str]:
    return [f"  {label} ({fill}): " + " | ".join(
        f"{k}: {100 * v['difference']:+.1f} +- {100 * v['standard_error']:.1f} {v['verdict']}" for k, v in per_k.items())
        + f" ({next(iter(per_k.values()), {}).get('error', 'binomial')} error)"
        for fill, per_k in versus.items()]


def verdict_lines(result: dict) -> List[str]:
    """The printed verdicts of one model: robust against random, then each method against uniform."""
    lines = format_versus(result["versus_random"])
    for method, v in result.get("versus_uniform", {}).items():
        lines += format_versus(v, f"{method} - uniform")
    for fill, per_base in result.get("versus_rocoin", {}).items():
        for base, per_k in per_base.items():
            lines += format_versus({fill: per_k}, f"rocoin - {base}")
    return lines


def format_row(row: dict) -> str:
    cells = [f"{k}: {100 * b['mean']:5.1f} ({100 * b['min']:.1f}-{100 * b['max']:.1f})"
             for k, b in sorted(row["by_failed"].items())]
    n = row.get("gathers_per_frame")
    gathers = "" if n is None else f", {n} gather{'' if n == 1 else 's'}"
    return (f"{row['name']:<34} mem {row['memory_ratio']:.2f} of nmr ({row['per_device_mb']:.3f} MB), "
            f"rep {row['replication']:.2f}{gathers} | " + " | ".join(cells))


def results_file(folder: Path, model: str) -> Path:
    return Path(folder) / f"robustness_{model}.json"


def png_name(model: str, run: str) -> str:
    """robustness_<model>.png for the main run, robustness_<model>_<run>.png for the others."""
    return f"robustness_{model}.png" if run == MAIN_RUN else f"robustness_{model}_{run}.png"


def plot(result: dict, folder: Path, run: str) -> Path:
    """The Pareto PNG of one model's run: the mean+bn rows (and nmr, and rocoin's) by per-device
    memory, at 1, 2 and 3 failed."""
    sweep = {"model": result["model"], "devices": DEVICES, "fill": "mean+bn",
             "nmr_per_device_mb": result["nmr_per_device_mb"],
             "points": [r for r in result["rows"] if r["fill"] == "mean+bn" or r["method"] in ("nmr", "rocoin")]}
    return plot_pareto(sweep, Path(folder) / png_name(result["model"], run), ks=("1", "2", "3"))


def run_label(text: str) -> str:
    """--run: a name for the entry, letters, digits, '.', '-' and '_' (it names a PNG too)."""
    if not text or not all(c.isalnum() or c in "._-" for c in text):
        raise argparse.ArgumentTypeError(f"{text!r}: a run name is letters, digits, '.', '-' or '_'")
    return text


def store_run(folder: Path, model: str, run: str, entry: dict, echo_json: bool) -> Path:
    """Write one model's run into its file, keeping the file's other runs."""
    path = results_file(folder, model)
    runs = json.loads(path.read_text()).get("runs", {}) if path.exists() else {}
    runs[run] = {**entry, "measured": measured()}
    # The file's record is the run just written (the others keep theirs inside).
    return write_result({"model": model, "devices": DEVICES, "runs": runs, "measured": runs[run]["measured"]},
                        path, echo_json, measured_now=False)


def budget_ratio_arg(text: str) -> float:
    """--budget-ratio: a share of NMR's per-device memory, above 0 and at most 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]: a share of NMR's per-device memory")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--limit", help="evaluate on at most this many images: K, or per model "
                        "fashion_vgg=2000,efficientnet_lite0=40")
    parser.add_argument("--finetune-epochs", help="epochs of finetune: E or per model (default: finetune's own)")
    parser.add_argument("--distill-steps", type=positive_int,
                        help="finetune's distillation steps for the models without labels (default: finetune's own)")
    parser.add_argument("--fills", default=",".join(FILLS), help="fill rules of the table")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="methods at the budget, and rocoin (its own memory, no budget)")
    parser.add_argument("--rocoin-epochs", help="rocoin's distillation passes: E or per model (default: partition's)")
    parser.add_argument("--no-sweep", action="store_true", help="no extra budgets for the Pareto plot")
    parser.add_argument("--budget-ratio", type=budget_ratio_arg, default=BUDGET_RATIO,
                        help=f"the table's budget as a share of NMR's per-device memory (default {BUDGET_RATIO:g})")
    parser.add_argument("--random-seeds", type=positive_int, default=RANDOM_SEEDS,
                        help=f"draws of random and uniform averaged in their rows (default {RANDOM_SEEDS})")
    parser.add_argument("--no-finetune", action="store_true")
    parser.add_argument("--workdir", type=Path, help="keep the plans here (default: a temporary folder)")
    parser.add_argument("--json", action="store_true", help="print each model's file as JSON, one line each")
    parser.add_argument("--run", type=run_label, default=MAIN_RUN,
                        help=f"the entry of each model's file this run writes (default {MAIN_RUN}); "
                             "the file's other entries are kept")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="folder of the results files (robustness_<model>.json and their PNGs)")
    parser.add_argument("--replot", action="store_true",
                        help="only redraw the PNGs of --run from the files (and judge robust against random "
                             "where an entry has no paired verdict)")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.replot:
        for model in models:
            path = results_file(args.results, model)
            if not path.exists():
                continue
            data = json.loads(path.read_text())
            result = data["runs"].get(args.run)
            if result is None:
                raise SystemExit(f"{path}: no run {args.run!r} (it holds {', '.join(sorted(data['runs']))})")
            result["pareto_png"] = plot(result, args.results, args.run).name
            print(f"wrote {args.results / result['pareto_png']}")
            stored = result.get("versus_random") or {}
            if not any(v.get("error") == "paired" for per_k in stored.values() for v in per_k.values()):
                result["versus_random"] = versus_random(result)   # a full run's paired figures stay
            print("\n".join([f"{model}:"] + verdict_lines(result)))   # versus_uniform: stored as measured
            write_result(data, path, False, measured_now=False)   # a redraw measures nothing
        return 0
    torch.set_num_threads(THREADS)
    keep_freed_memory()   # as the robustdice commands do (partitioner/allocator.py)

    def log(text):
        print(text, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="robustness_") as tmp:
        root = args.workdir or Path(tmp)
        for model in models:
            log(f"{model}:")
            limits, epochs = per_model(args.limit, int), per_model(args.finetune_epochs, int)
            rocoin_epochs = per_model(args.rocoin_epochs, int)
            r = run_model(model, root, limits.get(model, limits.get("*")), epochs.get(model, epochs.get("*")),
                          not args.no_finetune, log, fills=tuple(f for f in args.fills.split(",") if f),
                          sweep=not args.no_sweep, methods=tuple(m for m in args.methods.split(",") if m),
                          random_seeds=args.random_seeds, budget_ratio=args.budget_ratio,
                          rocoin_epochs=rocoin_epochs.get(model, rocoin_epochs.get("*")),
                          distill_steps=args.distill_steps)
            r["pareto_png"] = plot(r, args.results, args.run).name
            print(f"\n{model} over {DEVICES} devices: {r['metric']} on {r['data']}, mean (min-max) per k failed")
            for row in r["rows"]:
                if row["in_table"]:
                    print("  " + format_row(row))
            print("\n".join(verdict_lines(r)))
            # Each model as it finishes: a model's hours are not lost to a later model's failure.
            store_run(args.results, model, args.run, r, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
