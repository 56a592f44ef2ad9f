"""What every benchmark does last: write its JSON results file, and echo it when asked.

The scripts run as `python benchmarks/NAME.py`, so this folder is on sys.path.

Every result carries `measured`: when, at which commit (HEAD when the run started, with
"-dirty" if tracked files differed from it), and how much of this machine the run had. A
shared virtual machine's speed swings from run to run (here 0 % to 44 % of the CPU time was
stolen by other guests on different days), so a figure is only comparable with figures taken
under similar conditions. `cpu_stolen_pct` and `cpu_idle_pct` cover the whole run: from
the import of this module (the script's start) to the write. `python_mops` is this machine's
speed at the write: millions of iterations per second of a plain Python loop (`s += i`), which
moves with the host's clock and its neighbours even when nothing is stolen (1.0 to 1.7 s for
10 million on the same day here).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional


def _cpu_times() -> Optional[List[int]]:
    """The aggregate `cpu` line of /proc/stat (user nice system idle iowait irq softirq steal), or
    None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    return [int(v) for v in fields[1:9]] if fields and fields[0] == "cpu" else None


def _commit() -> Optional[str]:
    """HEAD's short hash, with "-dirty" when tracked files differ from it; None outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


_START_TIMES = _cpu_times()
_START_S = time.monotonic()
# The code a run measures is the code it loaded at its start: a commit made while a long run
# goes on (robustness.py runs for hours) must not be credited with its figures.
START_COMMIT = _commit()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def python_mops(iterations: int = 2_000_000) -> float:
    """Millions of `s += i` iterations per second, best of 3 (a 0.2-0.6 s probe)."""
    best = float("inf")
    for _ in range(3):
        start, total = time.perf_counter(), 0
        for i in range(iterations):
            total += i
        best = min(best, time.perf_counter() - start)
    return round(iterations / best / 1e6, 2)


def measured() -> Dict:
    """When and where this run was measured, and the share of the CPU it had."""
    out: Dict = {"utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "commit": START_COMMIT, "cores": os.cpu_count(), "cpu_model": _cpu_model(),
                 "run_s": round(time.monotonic() - _START_S, 1), "python_mops": python_mops()}
    end = _cpu_times()
    if _START_TIMES is not None and end is not None:
        delta = [b - a for a, b in zip(_START_TIMES, end)]
        total = sum(delta)
        if total > 0:
            out["cpu_stolen_pct"] = round(100.0 * delta[7] / total, 1)
            out["cpu_idle_pct"] = round(100.0 * (delta[3] + delta[4]) / total, 1)
    return out


def write_result(result: Dict, out, echo_json: bool, measured_now: bool = True) -> Path:
    """Write `result` to `out` (creating its folder), with `measured` added; with `echo_json`
    print it as the last line. `measured_now=False` keeps the `measured` that `result` carries
    (a file rewritten from stored figures was measured when they were)."""
    if measured_now or "measured" not in result:
        result = {**result, "measured": measured()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results written to {out}")
    if echo_json:
        print(json.dumps(result))
    return out
