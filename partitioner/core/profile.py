"""`robustdice profile`: measure this board for a capacity file (capacity.py).

Each stage's forward (its layer on the whole input, with the channel-local followers: what the
board computes of it alone) is timed on the board's compute device, batch 1, after a few warm-up
runs, and so is the whole model's forward, back to back for --runs forwards and at least
MIN_TIMED_S; the speed written is frames per second of that forward (1000 / forward_ms, the
mean), so ratios between boards are ratios of their speeds on this model.
Free memory: psutil's available memory on a CPU, torch.cuda.mem_get_info's free bytes on a GPU.

Weights do not change the time of a dense forward, so the model is built with random weights
(or from a plan's stored graph): a board needs no weights file to be profiled.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

from robustdice.partitioner.core.capacity import DeviceCapacity

DEFAULT_RUNS = 10
DEFAULT_WARMUP = 3
# Timed forwards go on until this long has passed too: a board held to a share of a CPU (cgroup
# cpu.cfs_quota_us, a period of 100 ms by default) runs short forwards at full speed within a
# period and then waits, so only many periods measure what it sustains.
MIN_TIMED_S = 1.0


def compute_device(name: str) -> torch.device:
    """auto: cuda when torch sees a GPU, else cpu (as the node's engine chooses)."""
    from robustdice.partitioner.errors import PartitionerError
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise PartitionerError("--compute cuda: torch sees no CUDA device")
    return torch.device(name)


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil
    return int(psutil.virtual_memory().available)


def model_for(model_name: Optional[str], plan_dir=None):
    """(name, model with random weights) of --model, or of --plan's model (its stored graph)."""
    from robustdice.partitioner.zoo.models import build_model
    if plan_dir is not None:
        from robustdice.partitioner.core.plan import load_plan
        plan = load_plan(plan_dir)
        if plan.architecture is not None:
            from robustdice.partitioner.zoo.architecture import build
            return plan.model, build(plan.architecture), plan.input_shape
        return plan.model, build_model(plan.model, weights="none", seed=plan.seed), plan.input_shape
    from robustdice.partitioner.core.partition import PartitionRequest
    spec = PartitionRequest(model=model_name, devices=1, method="lop", out=".").input_spec()
    return model_name, build_model(model_name, weights="none"), spec.shape


def time_stages(staged, x: torch.Tensor, runs: int, warmup: int, sync: Callable[[], None],
                progress: Callable[[], None] = lambda: None, min_s: float = MIN_TIMED_S) -> Dict[str, object]:
    """Milliseconds per forward after `warmup` forwards: the mean over back-to-back forwards
    (at least `runs` of them and `min_s` of time: what the board sustains), and each stage's
    median."""
    from robustdice.partitioner.core.stages import full_stage_output

    per_stage: List[List[float]] = [[] for _ in staged.stages]
    totals: List[float] = []

    def timed(i: int, t: torch.Tensor) -> torch.Tensor:
        sync()
        start = time.perf_counter()
        out = full_stage_output(staged.stages[i], t)
        sync()
        per_stage[i].append(1e3 * (time.perf_counter() - start))
        return out

    with torch.inference_mode():
        for _ in range(warmup):
            staged.run(x, timed)
            progress()
        per_stage = [[] for _ in staged.stages]
        sync()
        began = time.perf_counter()
        while len(totals) < runs or time.perf_counter() - began < min_s:
            start = time.perf_counter()
            staged.run(x, timed)
            sync()
            totals.append(1e3 * (time.perf_counter() - start))
            if len(totals) <= runs:
                progress()
    return {"forward_ms": sum(totals) / len(totals),
            "stage_ms": {s.name: statistics.median(v) for s, v in zip(staged.stages, per_stage)}}


def profile(model_name: Optional[str] = None, plan_dir=None, compute: str = "auto", runs: int = DEFAULT_RUNS,
            warmup: int = DEFAULT_WARMUP, threads: Optional[int] = None, device_id: Optional[str] = None,
            show_progress: bool = False) -> DeviceCapacity:
    """This board's capacity entry for the model (see the module docstring)."""
    from tqdm import tqdm

    from robustdice.partitioner.core.stages import trace_stages

    if threads is not None:
        torch.set_num_threads(threads)
    device = compute_device(compute)
    _, model, shape = model_for(model_name, plan_dir)
    model = model.to(device).eval()
    staged = trace_stages(model)
    x = torch.randn(1, *shape, device=device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    with tqdm(total=warmup + runs, desc="profile forward", unit="run", disable=not show_progress, leave=False) as bar:
        timing = time_stages(staged, x, runs, warmup, sync, bar.update)
    forward_ms = float(timing["forward_ms"])
    return DeviceCapacity(speed=round(1e3 / forward_ms, 4), memory_bytes=free_memory_bytes(device), id=device_id,
                          compute=device.type, forward_ms=round(forward_ms, 4),
                          stage_ms=tuple((k, round(float(v), 4)) for k, v in timing["stage_ms"].items()))
