"""`robustdice dse`: per-device memory against accuracy under failures, for every method.

The model is scored once; then robust, robust+cdc and random (and uniform, on request) are
partitioned at a ladder of per-device memory budgets (fractions of NMR's per-device memory,
thresholds chosen per layer by core/budget.py), lop, cdc and nmr once each, every plan with the
same fill rule, and each plan is evaluated under every set of failed devices. The plot shows
per-device memory against the mean accuracy at 1 and at 2 failed devices; the JSON holds every
figure.

rocoin (on request) is swept over the same budgets as each device's memory: its students are
chosen under it (rocoin.match_groups) and distilled anew for every budget, with the mean fill
where the sweep's fill is mean or mean+bn (no BatchNorm runs after rocoin's one gather).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from robustdice.partitioner.errors import PartitionerError

SWEPT_METHODS = ("robust", "robust+cdc", "random", "uniform", "rocoin")
DEFAULT_SWEPT = ("robust", "robust+cdc", "random")   # uniform on request: --methods ...,uniform
FIXED_METHODS = ("lop", "cdc", "nmr")
DEFAULT_MEMORY_RATIOS = (0.3, 0.4, 0.5, 0.6, 0.75)


def point(result: Dict, nmr_bytes: float, **extra) -> Dict:
    """One plan's place on the plot: its memory and its accuracy per number of failed devices."""
    per_device = max(result["per_device_param_bytes"])
    return {
        "method": result["method"], "fill": result.get("fill", "zero"), "plan": result["plan"],
        "per_device_mb": per_device / 1e6, "memory_ratio": per_device / nmr_bytes,
        "replication": result.get("replication_factor"), "metric": result.get("metric", "accuracy"),
        "by_failed": result["by_failed"], **extra,
    }


def sweep(model: str, devices: int, out, weights: str = "DEFAULT", fill: str = "mean+bn",
          memory_ratios: Sequence[float] = DEFAULT_MEMORY_RATIOS, methods: Sequence[str] = DEFAULT_SWEPT,
          data=None, limit: Optional[int] = None, seed: int = 0, calib=None, calib_size: Optional[int] = None,
          progress: bool = True, log=print, epochs: Optional[int] = None) -> Dict:
    """Partition and evaluate every point; returns the JSON-ready result (see the module docstring)."""
    from robustdice.partitioner.core.partition import PartitionRequest, default_calib_size, partition, request_scores
    from robustdice.partitioner.core.stages import trace_stages
    from robustdice.partitioner.experiments.evaluate import evaluate_plan
    from robustdice.partitioner.zoo.data import calibration_batch
    from robustdice.partitioner.zoo.models import build_model

    bad = [m for m in methods if m not in SWEPT_METHODS]
    if bad:
        raise PartitionerError(f"--methods: {bad[0]!r} is not one of {', '.join(SWEPT_METHODS)}")
    if not memory_ratios or not all(0 < r <= 1 for r in memory_ratios):
        raise PartitionerError(f"--memory-ratios must be fractions in (0, 1], got {list(memory_ratios)}")
    out = Path(out)
    model_obj = build_model(model, weights=weights, seed=seed)
    staged = trace_stages(model_obj)
    calib_batch = calibration_batch(model, calib, n=calib_size or default_calib_size(model), seed=seed)
    like = PartitionRequest(model=model, devices=devices, method="robust", out=out, weights=weights, seed=seed,
                            calib=calib, fill=fill, show_progress=progress)
    scores = request_scores(staged, calib_batch, like)

    def run(method: str, name: str, **budget) -> Dict:
        extra = {}
        if method == "rocoin":   # `epochs`: rocoin's distillation passes
            from robustdice.partitioner.core.rocoin_plan import RocoinOptions
            extra = {"fill": "zero" if fill == "zero" else "mean", "rocoin": RocoinOptions(epochs=epochs)}
        request = PartitionRequest(model=model, devices=devices, method=method, out=out / "plans" / name,
                                   weights=weights, seed=seed, calib=calib, calib_size=calib_size,
                                   show_progress=progress, **{"fill": fill, **budget, **extra})
        if method == "rocoin":
            from robustdice.partitioner.core.rocoin_plan import partition_rocoin
            partition_rocoin(request)
        else:
            partition(request, scores=scores if method in SWEPT_METHODS else None)
        return evaluate_plan(request.out, data, limit, progress=progress)

    fixed = {}
    for method in FIXED_METHODS:
        fixed[method] = run(method, method)
        log(f"{method}: {_describe(fixed[method])}")
    nmr_bytes = float(max(fixed["nmr"]["per_device_param_bytes"]))
    points: List[Dict] = [point(fixed[m], nmr_bytes) for m in FIXED_METHODS]
    for method in methods:
        for ratio in memory_ratios:
            name = f"{method}-{ratio:g}"
            try:
                result = run(method, name, budget_mb=ratio * nmr_bytes / 1e6)
            except PartitionerError as exc:  # a budget below the method's cheapest plan
                log(f"{name}: skipped ({exc})")
                continue
            points.append(point(result, nmr_bytes, budget_ratio=ratio))
            log(f"{name}: {_describe(result)}")
    return {"model": model, "devices": devices, "fill": fill, "weights": weights,
            "nmr_per_device_mb": nmr_bytes / 1e6, "points": points}


def _describe(result: Dict) -> str:
    per_k = " ".join(f"{k}:{100 * b['mean']:.1f}%" for k, b in sorted(result["by_failed"].items()))
    return (f"{max(result['per_device_param_bytes']) / 1e6:.3f} MB per device, "
            f"replication {result['replication_factor']:.2f}, {per_k}")


def plot_pareto(result: Dict, path, ks: Sequence[str] = ("1", "2")) -> Path:
    """Per-device memory (MB) against mean accuracy at each number of failed devices in `ks`
    (default 1 and 2), one panel each."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from robustdice.partitioner.experiments.evaluate import save_figure

    ks = [k for k in ks if int(k) < result["devices"]]
    fig, axes = plt.subplots(1, len(ks), figsize=(5.2 * len(ks), 4.2), dpi=120, squeeze=False)
    markers = {"lop": "s", "cdc": "D", "nmr": "*"}
    # Points are grouped by "label" (default: the method); a group of several is a line.
    labels = list(dict.fromkeys(p.get("label", p["method"]) for p in result["points"]))
    for ax, k in zip(axes[0], ks):
        for label in labels:
            pts = sorted((p for p in result["points"] if p.get("label", p["method"]) == label),
                         key=lambda p: p["per_device_mb"])
            marker = markers.get(label, "o")
            ax.plot([p["per_device_mb"] for p in pts], [100 * p["by_failed"][k]["mean"] for p in pts],
                    marker=marker, markersize=9 if label in markers else 6,
                    linestyle="-" if len(pts) > 1 else "none", label=label)
        half = 0.5 * result["nmr_per_device_mb"]
        ax.axvline(half, color="grey", linestyle=":", linewidth=1)
        ax.text(half, 2, " 50% of NMR", color="grey", fontsize=7)
        metric = result["points"][0].get("metric", "accuracy")
        ax.set_title(f"{k} failed device{'s' if k != '1' else ''}")
        ax.set_xlabel("parameters per device (MB)")
        ax.set_ylabel(f"mean top-1 {metric} (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{result['model']} over {result['devices']} devices, {result['fill']} fill")
    return save_figure(fig, path)


def write(result: Dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path
