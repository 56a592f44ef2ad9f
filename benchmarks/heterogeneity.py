"""Boards of different speed (issue 27 item 4): one node of four throttled to a third of a core,
the equal plan against the capacity-aware one, on a model whose compute dominates.

    python benchmarks/heterogeneity.py --json [--model alexnet] [--quota 0.3333] [--fast-quota C]
                                      [--windows 1,4] [--frames 24] [--rounds 3] [--speeds 1,1,1,0.3333]
                                      [--out benchmarks/results/heterogeneity_alexnet.json]

1. Capacities: `robustdice profile` of the model with 1 torch thread, once as is and once inside
   a cgroup v1 (cpu.cfs_quota_us = cfs_period_us x --quota), merged as devices 0-2 and device 3;
   --speeds deals by given relative speeds instead (the profile is still recorded): on a machine
   whose other jobs hold every process below the quota anyway, the profile measures no gap.
2. Plans: robust over 4 devices (--weights none, score s1: the partition takes a minute), once
   without capacities ("equal") and once with them ("capacity"). Both record their rows per
   device; the equal plan's `first_copy_share` is the share of the slow device's rows that
   another device also holds: what "the first copy wins" (a gather ends once every neuron has
   one copy) spares it from waiting on.
3. Live: one LocalCluster per plan, 4 nodes with 1 torch thread each, both up at once; device 3's
   engine process of each is moved into its own cgroup with that quota. Closed-loop clients, one
   per node (node/client.py closed_loop), at each in-flight window, in blocks that alternate
   between the plans (--rounds of them), so that both see the same machine; one block of the
   equal plan with the throttle lifted gives the unthrottled reference. Per plan and window:
   frames/s, p50/p99 of the client's latency (submitted to answered) and the nodes' own.
4. Accuracy: `partitioner.evaluate` of both plans under every set of k failed devices, on a few
   of the model's calibration/evaluation images (agreement with the plan's no-failure top-1, as
   weights are random).
The cgroups are removed in `finally`, whatever happens (the engines are moved back first).
Root and cgroup v1's cpu controller at /sys/fs/cgroup/cpu are needed.

On a machine with fewer cores than nodes the fast nodes share cores too: on 2 cores each of four
engines gets half a core at most, so a third of a core makes device 3 only 1.5 times slower, and
no deal can gain more than that. `--fast-quota C` makes the four boards explicit: every fast
engine gets its own cgroup of C cores (the profile of the fast board too), so that `--quota C/3`
is a board three times slower, as the issue means (on this machine: --fast-quota 0.5 --quota
0.1667, 1.67 cores for the engines and the rest for handlers and clients). Other jobs move every
wall-clock figure: the JSON records the machine's load (`measured`) beside the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from _results import write_result
from throughput import run_clients

DEVICES = 4
SLOW = 3                        # the throttled device
CGROUP_CPU = Path("/sys/fs/cgroup/cpu")


# --- the cgroup: a thin shell, cleaned up whatever happens -------------------------------------

def quota_us(period_us: int, cores: float) -> int:
    """cfs_quota_us that gives `cores` of a CPU per period (at least the kernel's 1000 us)."""
    return max(1000, int(round(period_us * cores)))


class Throttle:
    """A cgroup v1 cpu group holding processes to `cores` CPUs; `close` moves them back to the
    root group and removes it (also on exceptions: use it as a context manager)."""

    def __init__(self, name: str, cores: float, root: Path = CGROUP_CPU) -> None:
        self.root, self.path, self.cores = root, root / name, cores
        if not (root / "cpu.cfs_quota_us").exists():
            raise RuntimeError(f"no cgroup v1 cpu controller at {root} (needs root and cgroup v1)")
        self.path.mkdir(exist_ok=True)
        try:
            self.period_us = int((self.path / "cpu.cfs_period_us").read_text())
            self.set(cores)
        except BaseException:
            self.close()
            raise

    def set(self, cores: Optional[float]) -> None:
        """Hold the group to `cores` CPUs; None lifts the limit."""
        value = -1 if cores is None else quota_us(self.period_us, cores)
        (self.path / "cpu.cfs_quota_us").write_text(f"{value}\n")

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(f"{pid}\n")

    def pids(self) -> List[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def close(self) -> None:
        for pid in self.pids():
            try:
                (self.root / "cgroup.procs").write_text(f"{pid}\n")
            except OSError:
                pass   # gone already
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)   # a process still leaving the group
        print(f"warning: could not remove {self.path}", file=sys.stderr)

    def __enter__(self) -> "Throttle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def engine_pid(cluster, device: int) -> int:
    engine = cluster.node_processes(device).get("engine")
    if engine is None:
        raise RuntimeError(f"node {cluster.ids[device]} has no engine process")
    return engine.pid


# --- capacities ---------------------------------------------------------------------------------

def profile(model: str, out: Path, throttle: Optional[Throttle], device_id: str) -> Dict:
    """`robustdice profile` of `model` (1 thread), inside `throttle`'s group when given."""
    argv = [sys.executable, "-m", "robustdice.node.cli", "profile", "--model", model, "--threads", "1",
            "--runs", "10", "--warmup", "3", "--id", device_id, "--out", str(out), "--json"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if throttle is not None:
        throttle.add(proc.pid)
    stdout, stderr = proc.communicate(timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(f"robustdice profile failed: {stderr}")
    return json.loads(stdout.strip().splitlines()[-1])["devices"][0]


def capacities_file(model: str, tmp: Path, quota: float, speeds: Optional[Sequence[float]],
                    fast_quota: Optional[float] = None) -> Dict:
    from robustdice.partitioner.core.capacity import Capacities, DeviceCapacity, write_capacities
    path = tmp / "capacities.yaml"
    with (nullcontext() if fast_quota is None else Throttle(f"robustdice-profile-fast-{os.getpid()}", fast_quota)) as t:
        fast = profile(model, tmp / "fast.yaml", t, "fast")
    with Throttle(f"robustdice-profile-{os.getpid()}", quota) as t:
        slow = profile(model, tmp / "slow.yaml", t, "slow")
    measured = [fast["speed"]] * DEVICES
    measured[SLOW] = slow["speed"]
    profiled = {"measured_speeds": measured, "measured_ratio": round(slow["speed"] / fast["speed"], 4),
                "forward_ms": {"fast": fast["forward_ms"], "slow": slow["forward_ms"]}}
    used = list(speeds) if speeds is not None else measured
    write_capacities(Capacities(tuple(DeviceCapacity(float(s), id=f"n{d}") for d, s in enumerate(used))), path)
    return {"file": str(path), "speeds": used, **profiled,
            "source": "given (--speeds); the profile is recorded beside them" if speeds is not None else
            "robustdice profile, device 3's run under the same quota"}


# --- plans --------------------------------------------------------------------------------------

def make_plan(model: str, out: Path, capacities: Optional[Path], weights: str = "none") -> Dict:
    from robustdice.partitioner.core.capacity import load_capacities
    from robustdice.partitioner.core.partition import PartitionRequest, partition
    t0 = time.monotonic()
    summary = partition(PartitionRequest(
        model=model, devices=DEVICES, method="robust", out=out, weights=weights, scores=("s1",), show_progress=False,
        capacities=None if capacities is None else load_capacities(capacities, DEVICES)))
    summary["partition_s"] = round(time.monotonic() - t0, 1)
    return summary


def plan_rows(plan_dir: Path) -> Dict:
    """Rows per device, and the share of the slow device's rows another device also holds."""
    from robustdice.partitioner.core.plan import load_plan
    plan = load_plan(plan_dir)
    rows = [sum(len(s.holders(d)) for s in plan.stages) for d in range(DEVICES)]
    shared = 0
    for s in plan.stages:
        elsewhere = {n for d in range(DEVICES) if d != SLOW for n in s.assignment[d]}
        shared += sum(1 for n in s.assignment[SLOW] if n in elsewhere)
    return {"rows_per_device": rows, "rows_share": [round(r / sum(rows), 4) for r in rows],
            "first_copy_share": round(shared / max(1, rows[SLOW]), 4)}


# --- live ---------------------------------------------------------------------------------------

def summarise(records: List[Dict], seconds: float) -> Dict:
    answered = [r for r in records if r["meta"] and "error" not in r["meta"]]
    client_ms = [1000.0 * (r["answered_wall_s"] - r["submitted_wall_s"]) for r in answered]
    node_ms = [r["meta"]["latency_ms"] for r in answered if "latency_ms" in r["meta"]]
    return {
        "frames": len(records), "answered": len(answered), "seconds": round(seconds, 2),
        "fps": len(answered) / seconds if seconds > 0 else 0.0,
        "client_ms": client_ms, "node_ms": node_ms,
        "zero_filled": sum(1 for r in answered if r["meta"].get("zero_filled_fraction")),
        "errors": len(records) - len(answered),
    }


def pooled(blocks: List[Dict]) -> Dict:
    client = [v for b in blocks for v in b["client_ms"]]
    node = [v for b in blocks for v in b["node_ms"]]
    seconds = sum(b["seconds"] for b in blocks)
    answered = sum(b["answered"] for b in blocks)

    def pct(values, q):
        return round(float(np.percentile(values, q)), 1) if values else None
    return {"fps": round(answered / seconds, 3) if seconds else 0.0,
            "fps_by_block": [round(b["fps"], 3) for b in blocks],
            "latency_ms_p50": pct(client, 50), "latency_ms_p99": pct(client, 99),
            "node_latency_ms_p50": pct(node, 50), "node_latency_ms_p99": pct(node, 99),
            "answered": answered, "zero_filled": sum(b["zero_filled"] for b in blocks),
            "errors": sum(b["errors"] for b in blocks)}


def live(plans: Dict[str, Path], model: str, quota: float, windows: Sequence[int], frames: int, rounds: int,
         log=print, fast_quota: Optional[float] = None) -> Dict:
    from contextlib import ExitStack

    from robustdice.node.lab.localcluster import LocalCluster
    from throughput import inputs_for

    images = inputs_for(model)
    blocks: Dict[str, Dict[str, List[Dict]]] = {name: {str(w): [] for w in windows} for name in plans}
    blocks["equal_unthrottled"] = {str(w): [] for w in windows}
    with ExitStack() as stack:
        clusters, throttles = {}, {}
        for name, plan in plans.items():
            # One after the other: a cluster's free ports are free until its nodes bind them.
            cluster = stack.enter_context(LocalCluster(plan, threads=1, log_level="WARNING"))
            for d in range(DEVICES):
                cluster.start_node(d)
            clusters[name] = cluster
            cluster.wait_until(cluster.all_alive(), 300.0, f"every node of the {name} plan to count on every other")
            throttle = stack.enter_context(Throttle(f"robustdice-hetero-{os.getpid()}-{name}", quota))
            throttle.add(engine_pid(cluster, SLOW))
            throttles[name] = throttle
            if fast_quota is not None:   # each fast engine a board of its own
                for d in range(DEVICES):
                    if d != SLOW:
                        board = stack.enter_context(Throttle(f"robustdice-hetero-{os.getpid()}-{name}-{d}", fast_quota))
                        board.add(engine_pid(cluster, d))
            run_clients(cluster, cluster.ids, images, 2, 1)   # warm-up, throttled
        per_client = max(2, frames // DEVICES)
        for w in windows:
            # the unthrottled reference: the equal plan with its slow engine as fast as the others
            throttles["equal"].set(fast_quota)
            records, seconds = run_clients(clusters["equal"], clusters["equal"].ids, images, per_client, w)
            blocks["equal_unthrottled"][str(w)].append(summarise(records, seconds))
            throttles["equal"].set(quota)
            for r in range(rounds):
                order = list(plans) if r % 2 == 0 else list(reversed(list(plans)))
                for name in order:
                    cluster = clusters[name]
                    records, seconds = run_clients(cluster, cluster.ids, images, per_client, w)
                    block = summarise(records, seconds)
                    blocks[name][str(w)].append(block)
                    log(f"{name}, {w} in flight per client, round {r + 1}: {block['fps']:.2f} frames/s, "
                        f"p50 {np.median(block['client_ms']) if block['client_ms'] else float('nan'):.0f} ms")
    return {name: {w: pooled(bs) for w, bs in by_w.items()} for name, by_w in blocks.items()}


def accuracy(plan_dir: Path, limit: int) -> Dict:
    from robustdice.partitioner.experiments.evaluate import evaluate_plan
    r = evaluate_plan(plan_dir, limit=limit)
    return {"metric": r["metric"], "data": r["data"], "samples": r["samples"],
            "by_failed": {k: {m: round(v[m], 4) for m in ("mean", "min", "max")} for k, v in r["by_failed"].items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the JSON object as the last line")
    parser.add_argument("--model", default="alexnet")
    parser.add_argument("--quota", type=float, default=1 / 3, help="CPUs the slow engine gets (default 1/3)")
    parser.add_argument("--fast-quota", type=float,
                        help="CPUs each fast engine gets, in a cgroup of its own (default: no limit; see above)")
    parser.add_argument("--speeds", help="relative speeds of the 4 devices instead of profiling, e.g. 1,1,1,0.333")
    parser.add_argument("--windows", default="1,4", help="frames in flight per client (default 1,4)")
    parser.add_argument("--frames", type=int, default=24, help="frames per block, over the 4 clients (default 24)")
    parser.add_argument("--rounds", type=int, default=3, help="blocks per plan and window (default 3)")
    parser.add_argument("--eval-images", type=int, default=8, help="images for the accuracy under failures")
    parser.add_argument("--weights", default="none",
                        help="the model's weights (default none: random, as ImageNet weights are not here)")
    parser.add_argument("--note", help="a note stored with the figures (what else ran on the machine)")
    parser.add_argument("--out", help="default benchmarks/results/heterogeneity_<model>.json")
    args = parser.parse_args(argv)
    # SIGTERM ends the run through the `finally`s, so that the cgroups and the nodes go too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out = args.out or str(Path(__file__).resolve().parent / "results" / f"heterogeneity_{args.model}.json")
    speeds = None if args.speeds is None else [float(s) for s in args.speeds.split(",")]
    if speeds is not None and len(speeds) != DEVICES:
        parser.error(f"--speeds needs {DEVICES} values")
    windows = [int(w) for w in args.windows.split(",")]
    log = (lambda *a: print(*a, file=sys.stderr))
    result: Dict = {"model": args.model, "devices": DEVICES, "slow_device": SLOW, "slow_cores": args.quota,
                    "fast_cores": args.fast_quota,
                    "cores": os.cpu_count(), "threads_per_node": 1, "method": "robust", "scores": ["s1"],
                    **({"note": args.note} if args.note else {}),
                    "weights": args.weights, "windows": windows, "rounds": args.rounds, "frames_per_block": args.frames}
    with tempfile.TemporaryDirectory(prefix="rd-hetero-") as tmp:
        tmp = Path(tmp)
        result["capacities"] = capacities_file(args.model, tmp, args.quota, speeds, args.fast_quota)
        log(f"capacities: {result['capacities']}")
        plans = {"equal": tmp / "equal", "capacity": tmp / "capacity"}
        result["plans"] = {}
        for name, path in plans.items():
            summary = make_plan(args.model, path, None if name == "equal" else Path(result["capacities"]["file"]),
                                args.weights)
            result["plans"][name] = {"plan_hash": summary["plan_hash"], "partition_s": summary["partition_s"],
                                     "replication": summary["replication_factor"],
                                     "per_device_param_bytes": summary["per_device_param_bytes"],
                                     **plan_rows(path)}
            log(f"{name} plan: rows share {result['plans'][name]['rows_share']}")
        result["live"] = live(plans, args.model, args.quota, windows, args.frames, args.rounds, log, args.fast_quota)
        result["accuracy"] = {name: accuracy(path, args.eval_images) for name, path in plans.items()}
    # The headline: the largest window, where closed-loop clients keep every node busy.
    eq, cap = (result["live"][name][str(max(windows))] for name in ("equal", "capacity"))
    result["fps_ratio"] = round(cap["fps"] / eq["fps"], 3) if eq["fps"] else None
    result["p99_ratio"] = (round(cap["latency_ms_p99"] / eq["latency_ms_p99"], 3)
                           if eq["latency_ms_p99"] and cap["latency_ms_p99"] else None)
    result["per_window_ratios"] = {w: {"fps": round(result["live"]["capacity"][w]["fps"] /
                                                    max(1e-9, result["live"]["equal"][w]["fps"]), 3),
                                       "p99": round(result["live"]["capacity"][w]["latency_ms_p99"] /
                                                    max(1e-9, result["live"]["equal"][w]["latency_ms_p99"] or 0), 3)
                                       if result["live"]["capacity"][w]["latency_ms_p99"] else None}
                                   for w in map(str, windows)}
    result["target"] = (f"capacity fps >= 1.5 x equal, capacity p99 <= 0.7 x equal ({max(windows)} in flight per "
                        f"client, the largest window)")
    for name, by_w in result["live"].items():
        for w, v in by_w.items():
            print(f"{name:18s} {w} in flight: {v['fps']:.2f} frames/s, p50 {v['latency_ms_p50']} ms, "
                  f"p99 {v['latency_ms_p99']} ms, zero-filled {v['zero_filled']}, errors {v['errors']}")
    for name, acc in result["accuracy"].items():
        print(f"{name} plan, {acc['metric']} by failed devices: "
              + ", ".join(f"k={k} {100 * v['mean']:.1f}%" for k, v in acc["by_failed"].items()))
    print(f"capacity / equal: {result['fps_ratio']}x frames/s, p99 {result['p99_ratio']}x")
    write_result(result, out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
