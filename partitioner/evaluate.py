"""Accuracy under failures: every failed set of k = 0..N−1 devices, simulated exactly."""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .errors import PartitionerError
from .models import build_model
from .runtime import Cluster, weights_digest

EVAL_BATCH = 64


def _predict(cluster: Cluster, images: torch.Tensor, failed: Sequence[int]) -> torch.Tensor:
    preds = [cluster.simulate(images[i: i + EVAL_BATCH], failed).argmax(1)
             for i in range(0, images.shape[0], EVAL_BATCH)]
    return torch.cat(preds)


def evaluate_plan(directory, data_dir=None, limit: Optional[int] = None, progress: bool = False) -> Dict:
    """Accuracy with no failure and, per k, mean/min/max over every set of k failed devices."""
    from tqdm import tqdm

    from .data import evaluation_split

    cluster = Cluster(directory)
    plan = cluster.plan
    images, labels, _ = evaluation_split(plan.model, data_dir, limit=limit, spec=plan.input)
    sets = [f for k in range(plan.devices) for f in itertools.combinations(range(plan.devices), k)]
    accuracy: Dict[tuple, float] = {}
    for failed in tqdm(sets, desc=f"evaluate {plan.method}", unit="set", disable=not progress, leave=False):
        accuracy[failed] = float((_predict(cluster, images, failed) == labels).float().mean())
    by_failed = {}
    for k in range(plan.devices):
        values = [a for f, a in accuracy.items() if len(f) == k]
        by_failed[str(k)] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values),
                             "sets": len(values)}
    return {
        "plan": str(directory),
        "model": plan.model,
        "method": plan.method,
        "devices": plan.devices,
        "plan_hash": plan.plan_hash,
        "samples": int(labels.shape[0]),
        "accuracy_no_failure": by_failed["0"]["mean"],
        "by_failed": by_failed,
        "by_set": {",".join(map(str, f)) or "-": a for f, a in accuracy.items()},
        "per_device_param_bytes": cluster.shard_bytes,
    }


def predictions(directory, failed: Sequence[int], data_dir=None, limit: Optional[int] = None) -> Dict:
    """Labels and predictions of the evaluation split with exactly `failed` devices down."""
    from .data import evaluation_split

    cluster = Cluster(directory)
    bad = [d for d in failed if not 0 <= d < cluster.plan.devices]
    if bad:
        raise PartitionerError(f"--failed: device {bad[0]} is not in the plan (0..{cluster.plan.devices - 1})")
    if len(set(failed)) >= cluster.plan.devices:
        raise PartitionerError("--failed: at least one device must survive")
    images, labels, indices = evaluation_split(cluster.plan.model, data_dir, limit=limit,
                                               spec=cluster.plan.input)
    preds = _predict(cluster, images, failed)
    return {"failed": sorted(set(failed)), "indices": [int(i) for i in indices],
            "labels": [int(v) for v in labels], "predictions": [int(p) for p in preds]}


def verify_plan(directory, batch: int = 2, seed: int = 0) -> Dict:
    """No-failure simulation against the plain model on random input."""
    cluster = Cluster(directory)
    plan = cluster.plan
    model = build_model(plan.model, weights=plan.weights, seed=plan.seed)
    if weights_digest(model) != plan.weights_digest:
        raise PartitionerError(f"the weights {plan.weights!r} (seed {plan.seed}) differ from those the "
                               f"plan was made from ({plan.weights_digest[:19]}…)")
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
    header = ["method", "devices", "max shard MB"] + [f"{k} failed" for k in range(n)]
    rows = []
    for r in results:
        row = [r["method"], str(r["devices"]), f"{max(r['per_device_param_bytes']) / 1e6:.3f}"]
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
        label = f"{r['method']} (max shard {max(r['per_device_param_bytes']) / 1e6:.2f} MB)"
        line, = ax.plot(ks, mean, marker="o", label=label)
        ax.fill_between(ks, lo, hi, color=line.get_color(), alpha=0.15)
    first = results[0]
    ax.set_title(f"{first['model']} over {first['devices']} devices: accuracy under failures")
    ax.set_xlabel("failed devices (mean over every set; band: min–max)")
    ax.set_ylabel("top-1 accuracy (%)")
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
