"""Accuracy under failures: every failed set of k = 0..N−1 devices, simulated exactly."""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from robustdice.partitioner.core.runtime import Cluster, weights_digest
from robustdice.partitioner.errors import PartitionerError
from robustdice.partitioner.zoo.models import build_model

# Images per simulated batch: as many as keep the largest stage output under this many bytes
# (tensors inside a stage can be larger: Lite0's block-1 expand is 4x its stage's output), so
# that with glibc's defaults, where allocator.keep_freed_memory is not in force, most tensors
# stay under its 32 MiB mmap ceiling and reuse the memory the last batch freed. Evaluating
# Lite0's default plan on 48 photos took 78.5 s (67 s in the kernel, 18.7 M page faults) in one batch, 42.9 s (6.4 s)
# in this rule's 13 and 43.3 s (1.2 s) in batches of 6; fashion_vgg on 2000 images 52-57 s
# (14-17 s) in batches of 500 and 44-48 s (0.8-1.2 s) in this rule's 250 (2026-12-08, the same
# results each way).
EVAL_BATCH_BYTES = 24 * 1024 * 1024
MAX_EVAL_BATCH = 500
# Clusters without stages (rocoin's students) are not measured: small images (digits,
# Fashion-MNIST) go through in MAX_EVAL_BATCH, others in UNMEASURED_EVAL_BATCH.
SMALL_IMAGE_ELEMENTS = 10_000
UNMEASURED_EVAL_BATCH = 64


def eval_batch(cluster: Cluster, images: torch.Tensor) -> int:
    """Images per batch for `cluster` on images like images[0] (see EVAL_BATCH_BYTES)."""
    if images.shape[0] == 0:
        raise PartitionerError("no images to evaluate on")
    if cluster.rocoin is not None:
        return MAX_EVAL_BATCH if images[0].numel() <= SMALL_IMAGE_ELEMENTS else UNMEASURED_EVAL_BATCH
    shapes: Dict[int, torch.Size] = {}
    cluster.simulate(images[:1], (), stage_shapes=shapes)
    element_bytes = torch.empty((), dtype=cluster.dtype).element_size()
    largest = max(math.prod(shape) for shape in shapes.values()) * element_bytes   # one image
    return max(1, min(MAX_EVAL_BATCH, EVAL_BATCH_BYTES // largest))


def _predict(cluster: Cluster, images: torch.Tensor, failed: Sequence[int],
             batch: Optional[int] = None) -> torch.Tensor:
    batch = batch or eval_batch(cluster, images)
    preds = [cluster.simulate(images[i: i + batch], failed).argmax(1)
             for i in range(0, images.shape[0], batch)]
    return torch.cat(preds)


DTYPES = {"float32": torch.float32, "float16": torch.float16}


def evaluate_plan(directory, data_dir=None, limit: Optional[int] = None, progress: bool = False,
                  dtype: str = "float32", per_image: bool = False) -> Dict:
    """Accuracy with no failure and, per k, mean/min/max over every set of k failed devices.

    `per_image`: the result also holds `correct_by_set`, failed set -> a boolean numpy array,
    one entry per image (not JSON), for paired comparisons of two plans on the same images.

    On unlabelled images (see data.evaluation_set) the measure is agreement: the share of
    images whose top-1 is the plan's own top-1 with no failure (in float32, whatever `dtype`).
    With dtype float16 the cluster computes as nodes started with --dtype float16 do, and the
    result also holds the float32 no-failure figure, so the cost of half precision is one
    subtraction away.
    """
    from tqdm import tqdm

    from robustdice.partitioner.zoo.data import evaluation_set

    if dtype not in DTYPES:
        raise PartitionerError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    cluster = Cluster(directory, dtype=DTYPES[dtype])
    plan = cluster.plan
    images, labels, _, described = evaluation_set(plan.model, data_dir, limit=limit, spec=plan.input)
    metric = "accuracy" if labels is not None else "agreement"
    reference32 = None
    if dtype != "float32":
        reference32 = _predict(Cluster(directory), images, ())
        if labels is None:
            labels = reference32
    sets = [f for k in range(plan.devices) for f in itertools.combinations(range(plan.devices), k)]
    batch = eval_batch(cluster, images)
    accuracy: Dict[tuple, float] = {}
    correct: Dict[tuple, object] = {}
    for failed in tqdm(sets, desc=f"evaluate {plan.method} ({plan.fill.rule} fill)", unit="set",
                       disable=not progress, leave=False):
        predicted = _predict(cluster, images, failed, batch)
        if labels is None:  # the first set is the empty one: its predictions are the reference
            labels = predicted
        hits = predicted == labels
        accuracy[failed] = float(hits.float().mean())
        if per_image:
            correct[failed] = hits.numpy()
    by_failed = {}
    for k in range(plan.devices):
        values = [a for f, a in accuracy.items() if len(f) == k]
        by_failed[str(k)] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values),
                             "sets": len(values)}
    extra = {} if reference32 is None else {
        "float32_no_failure": float((reference32 == labels).float().mean())}
    if per_image:
        extra["correct_by_set"] = correct
    return {
        "plan": str(directory),
        "model": plan.model,
        "method": plan.method,
        "fill": plan.fill.rule,
        "dtype": dtype,
        **extra,
        "metric": metric,
        "data": described,
        "devices": plan.devices,
        "plan_hash": plan.plan_hash,
        "samples": int(labels.shape[0]),
        "accuracy_no_failure": by_failed["0"]["mean"],
        "by_failed": by_failed,
        "by_set": {",".join(map(str, f)) or "-": a for f, a in accuracy.items()},
        "per_device_param_bytes": cluster.shard_bytes,
        "replication_factor": replication(plan),
    }


def replication(plan) -> float:
    """Neuron copies (parity rows included) per neuron over the whole plan."""
    from robustdice.partitioner.core.plan import assignment_summary
    if plan.rocoin is not None:   # copies of each student's partition
        return plan.rocoin.replication
    return assignment_summary(plan.stages, plan.devices)["replication_factor"]


def predictions(directory, failed: Sequence[int] = (), data_dir=None, limit: Optional[int] = None,
                dtype: str = "float32") -> Dict:
    """Labels and predictions of the evaluation split with exactly `failed` devices down (none:
    the no-failure predictions). Unlabelled images give labels None."""
    from robustdice.partitioner.zoo.data import evaluation_set

    if dtype not in DTYPES:
        raise PartitionerError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    cluster = Cluster(directory, dtype=DTYPES[dtype])
    bad = [d for d in failed if not 0 <= d < cluster.plan.devices]
    if bad:
        raise PartitionerError(f"--failed: device {bad[0]} is not in the plan (0..{cluster.plan.devices - 1})")
    if len(set(failed)) >= cluster.plan.devices:
        raise PartitionerError("--failed: at least one device must survive")
    images, labels, indices, _ = evaluation_set(cluster.plan.model, data_dir, limit=limit,
                                                spec=cluster.plan.input)
    preds = _predict(cluster, images, failed)
    return {"failed": sorted(set(failed)), "dtype": dtype, "indices": [int(i) for i in indices],
            "labels": None if labels is None else [int(v) for v in labels],
            "predictions": [int(p) for p in preds]}


def plan_weights(plan, directory) -> str:
    """The plan's --weights; a file named relative to the plan's folder (finetune's) resolved."""
    from robustdice.partitioner.core.plan import plan_dir

    local = plan_dir(directory) / str(plan.weights)
    if plan.weights not in ("DEFAULT", "none") and not Path(plan.weights).is_absolute() and local.is_file():
        return str(local)
    return plan.weights


def verify_plan(directory, batch: int = 2, seed: int = 0) -> Dict:
    """No-failure simulation against the plain model on random input."""
    cluster = Cluster(directory)
    plan = cluster.plan
    model = build_model(plan.model, weights=plan_weights(plan, directory), seed=plan.seed)
    if weights_digest(model) != plan.weights_digest:
        raise PartitionerError(f"the weights {plan.weights!r} (seed {plan.seed}) differ from those the "
                               f"plan was made from ({plan.weights_digest[:19]}…)")
    if cluster.rocoin is not None:   # students approximate the teacher: checked otherwise
        from robustdice.partitioner.core.rocoin_runtime import verify_rocoin
        return verify_rocoin(cluster.rocoin, model, directory, batch, seed)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((batch,) + tuple(plan.input_shape), generator=generator)
    with torch.inference_mode():
        reference = model(x)
        simulated = cluster.simulate(x)
    diff = float((reference - simulated).abs().max())
    scale = float(reference.abs().max())
    ok = bool(torch.allclose(simulated, reference, rtol=1e-4, atol=1e-5 * max(1.0, scale)))
    return {"plan": str(directory), "model": plan.model, "method": plan.method, "devices": plan.devices,
            "max_abs_diff": diff, "reference_max_abs": scale, "allclose": ok}


def format_table(results: Sequence[Dict]) -> str:
    """One row per plan: accuracy (mean, min–max) for each number of failed devices."""
    n = max(r["devices"] for r in results)
    header = ["plan", "method", "fill", "devices", "max shard MB"] + [f"{k} failed" for k in range(n)]
    rows = []
    for r in results:
        row = [plan_label(r), r["method"], r.get("fill", "zero"), str(r["devices"]),
               f"{max(r['per_device_param_bytes']) / 1e6:.3f}"]
        for k in range(n):
            b = r["by_failed"].get(str(k))
            row.append("" if b is None else
                       f"{100 * b['mean']:5.1f}% ({100 * b['min']:.1f}–{100 * b['max']:.1f})")
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def plan_label(result: Dict) -> str:
    """A plan's name in tables and plots: its folder's name."""
    return Path(result["plan"]).name or str(result["plan"])


def plot_accuracy(results: Sequence[Dict], path) -> Path:
    """Accuracy against failed devices, one line per plan, min–max as a band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for r in results:
        ks = sorted(int(k) for k in r["by_failed"])
        mean = [100 * r["by_failed"][str(k)]["mean"] for k in ks]
        lo = [100 * r["by_failed"][str(k)]["min"] for k in ks]
        hi = [100 * r["by_failed"][str(k)]["max"] for k in ks]
        label = (f"{plan_label(r)}: {r['method']}, {r.get('fill', 'zero')} fill "
                 f"(max shard {max(r['per_device_param_bytes']) / 1e6:.2f} MB)")
        line, = ax.plot(ks, mean, marker="o", label=label)
        ax.fill_between(ks, lo, hi, color=line.get_color(), alpha=0.15)
    first = results[0]
    ax.set_title(f"{first['model']} over {first['devices']} devices: accuracy under failures")
    ax.set_xlabel("failed devices (mean over every set; band: min–max)")
    ax.set_ylabel("top-1 agreement with no failure (%)" if first.get("metric") == "agreement"
                  else "top-1 accuracy (%)")
    ax.set_xticks(range(max(r["devices"] for r in results)))
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return save_figure(fig, path)


def save_figure(fig, path) -> Path:
    """Lay out, write (creating the folder) and free a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_json(data, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1) + "\n")


def parse_failed(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip() != ""]
    except ValueError:
        raise PartitionerError(f"--failed: {text!r} is not a comma list of device indices") from None
    if not values:
        raise PartitionerError("--failed: give at least one device index")
    return values
