"""Throughput and latency of 4 loopback nodes, closed loop, nothing failed (the dataflow node).

    python benchmarks/throughput.py --json [--models digits_cnn,alexnet,efficientnet_lite0]
                                    [--frames 300] [--windows 1,2,4,8,16]
                                    [--results benchmarks/results]   (throughput_<model>[_float16].json)

Each model is partitioned (robust; alexnet with --weights none and efficientnet_lite0 with its
real weights, both with score s1 so that the partition takes seconds) over 4 devices and run by
LocalCluster with 1 torch thread per node on this machine. Clients are threads of this process,
each keeping W frames in flight at its own node (node/client.py closed_loop). Figures, per model:
  plain_forward_ms_p50    one process running the plain model (1 torch thread, batch 1), timed
                          in blocks that alternate with the cluster's 1-in-flight blocks, so that
                          both see the same machine; `ratio_to_plain` = cluster p50 / plain p50
  latency_1_in_flight     p50 of the nodes' own latency_ms, 1 origin, 1 frame in flight; and
                          compute_ms p50 (the origin engine's compute for the frame)
  per_stage_overhead_ms   (p50 latency - p50 compute) / stages
  cpu_ms_per_stage_per_node   CPU time of the handlers and of the engines over the 1-in-flight
                          blocks, per answered frame, per stage, per node: the machinery's cost
                          of one stage against the compute it distributes
  fps_1_origin / fps_4_origins   frames answered per second for each in-flight window W, and
                          the best of them ("max"); 4 origins = one client per node
  compute_bound_fps       cores / (all engines' compute per frame), the engines' compute taken
                          from the nodes' status (engine_busy_ms) over the 4-origin runs: what
                          the cluster could do if nothing but the convolutions cost time
  cpu_ms_per_frame_*      CPU time (user + system) of all handlers and of all engines per
                          answered frame, over the runs of each label: the cost the node's own
                          machinery adds (handler) beside the computing (engine); unlike the
                          wall-clock figures it hardly moves when other jobs share the machine
  slice_bytes_per_frame   bytes of slices all nodes sent per frame (the mesh's slice_bytes_sent),
                          in the --dtype the cluster computes and sends (float16 halves it)
  zero_filled, errors     over every run (must be 0 with nothing failed); when not, bad_answers
                          holds the first 5 such answers and node_warnings each node's last
                          30 log lines (WARNING and above), also printed to stderr
The last stdout line is the JSON object (with --json).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from _results import write_result

DEVICES = 4
LATENCY_BLOCKS = 5      # alternating blocks of plain forwards and cluster frames
# Frames per run, as a fraction of --frames: a Lite0 frame costs ~20 digits frames.
FRAMES_SCALE = {"digits_cnn": 1.0, "alexnet": 0.5, "efficientnet_lite0": 0.2}
PARTITION_KWARGS = {"digits_cnn": {}, "alexnet": {"weights": "none", "scores": ("s1",)},
                    "efficientnet_lite0": {"scores": ("s1",)}}


def inputs_for(model: str) -> np.ndarray:
    from robustdice.partitioner.zoo.data import calibration_batch, evaluation_split
    if model == "digits_cnn":
        images, _, _ = evaluation_split(model)
    else:
        images = calibration_batch(model, n=16)
    return images.numpy().astype(np.float32)


def run_clients(cluster, nodes, images, frames, window):
    """One closed-loop client per node in `nodes`; returns (records, seconds)."""
    from robustdice.node.client import NodeClient, closed_loop
    records = {n: [] for n in nodes}

    def client(node, first):
        with NodeClient(cluster.config, node, cluster.key_path) as c:
            closed_loop(c, images, frames, window, first=first, timeout_s=60.0, records=records[node])

    threads = [threading.Thread(target=client, args=(n, 37 * k)) for k, n in enumerate(nodes)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for n in nodes for r in records[n]], time.monotonic() - t0


def engine_busy_ms(cluster) -> float:
    return sum(v.get("engine_busy_ms", 0.0) for v in cluster.status(timeout_s=10.0) if not v.get("unreachable"))


def cpu_seconds(cluster) -> dict:
    """CPU time (user + system) so far of every node's handler and engine processes, summed by
    role: what a frame costs the machine, which time-sharing with other jobs barely changes
    (wall-clock figures on this shared machine do)."""
    import psutil
    out = {"handler": 0.0, "engine": 0.0}
    for device in cluster.procs:
        try:
            processes = cluster.node_processes(device)
        except psutil.NoSuchProcess:
            continue
        for role, proc in processes.items():
            try:
                times = proc.cpu_times()
            except psutil.NoSuchProcess:
                continue
            out[role] += times.user + times.system
    return out


def slice_bytes(cluster) -> int:
    return sum(v["counters"].get("slice_bytes_sent", 0) for v in cluster.status(timeout_s=10.0)
               if not v.get("unreachable"))


def plain_forward(model: str, weights: str):
    """A timer of the plain model in this process, batch 1, 1 torch thread: ms per forward."""
    import torch
    from robustdice.partitioner.zoo.models import build_model
    net = build_model(model, weights).eval()

    def time_ms(images: np.ndarray, n: int):
        torch.set_num_threads(1)
        out = []
        with torch.inference_mode():
            for i in range(n):
                x = torch.from_numpy(images[i % len(images)][None])
                t0 = time.perf_counter()
                net(x)
                out.append((time.perf_counter() - t0) * 1000.0)
        return out
    return time_ms


def bench_model(model: str, frames: int, windows, tmp: Path, dtype: str = "float32") -> dict:
    from robustdice.node.lab.localcluster import LocalCluster
    from robustdice.partitioner.core.partition import PartitionRequest, partition

    kwargs = PARTITION_KWARGS.get(model, {"weights": "none", "scores": ("s1",)})
    frames = max(10, int(frames * FRAMES_SCALE.get(model, 1.0)))
    summary = partition(PartitionRequest(model=model, devices=DEVICES, method="robust", out=tmp / model,
                                         show_progress=False, **kwargs))
    images = inputs_for(model)
    plain = plain_forward(model, kwargs.get("weights", "DEFAULT"))
    out = {"model": model, "devices": DEVICES, "replication": summary["replication_factor"], "threads_per_node": 1,
           "cores": os.cpu_count(), "dtype": dtype}
    zero_filled = errors = 0
    bad_answers = []   # the first few answers zero-filled or failed with nothing failed: what they said

    def tally(records):
        nonlocal zero_filled, errors
        for r in records:
            meta = r["meta"] or {"error": "no answer"}
            errors += "error" in meta
            zero_filled += bool(meta.get("zero_filled_fraction"))
            if ("error" in meta or meta.get("zero_filled_fraction")) and len(bad_answers) < 5:
                bad_answers.append({k: meta.get(k) for k in ("error", "node", "latency_ms", "participants",
                                                            "failed_by_stage", "zero_filled_fraction") if k in meta})

    with LocalCluster(summary["plan"], threads=1, log_level="WARNING", dtype=dtype) as cluster:
        for d in range(DEVICES):
            cluster.start_node(d)
        cluster.wait_until(cluster.all_alive(), 180.0, "every node to count on every other")
        stages = len(cluster.plan.stages)
        run_clients(cluster, cluster.ids[:1], images, 10, 1)  # warm-up
        plain(images, 5)
        bytes_before = slice_bytes(cluster)
        cpu_before = cpu_seconds(cluster)
        records, plain_ms = [], []
        per_block = max(4, frames // LATENCY_BLOCKS)
        for _ in range(LATENCY_BLOCKS):
            plain_ms += plain(images, per_block)
            block, _ = run_clients(cluster, cluster.ids[:1], images, per_block, 1)
            records += block
        cpu_after = cpu_seconds(cluster)
        tally(records)
        answered = [r for r in records if r["meta"] and "error" not in r["meta"]]
        out["slice_bytes_per_frame"] = (slice_bytes(cluster) - bytes_before) / max(1, len(records))
        lat = [r["meta"]["latency_ms"] for r in answered]
        comp = [r["meta"]["compute_ms"] for r in answered]
        out["stages"] = stages
        out["latency_1_in_flight_ms_p50"] = float(np.median(lat))
        out["compute_ms_p50"] = float(np.median(comp))
        out["plain_forward_ms_p50"] = float(np.median(plain_ms))
        out["ratio_to_plain"] = out["latency_1_in_flight_ms_p50"] / out["plain_forward_ms_p50"]
        out["per_stage_overhead_ms"] = (out["latency_1_in_flight_ms_p50"] - out["compute_ms_p50"]) / stages
        out["cpu_ms_per_stage_per_node"] = {
            role: 1000.0 * (cpu_after[role] - cpu_before[role]) / max(1, len(answered)) / stages / DEVICES
            for role in cpu_after}
        print(f"{model}: {stages} stages; 1 in flight p50 {out['latency_1_in_flight_ms_p50']:.1f} ms against the "
              f"plain forward's {out['plain_forward_ms_p50']:.2f} ms ({out['ratio_to_plain']:.1f}x); CPU per stage "
              f"per node: handler {out['cpu_ms_per_stage_per_node']['handler']:.2f} ms, engine "
              f"{out['cpu_ms_per_stage_per_node']['engine']:.2f} ms", file=sys.stderr)
        for label, nodes in (("1_origin", cluster.ids[:1]), ("4_origins", cluster.ids)):
            fps = {}
            busy_ms = answered = 0.0
            cpu_before = cpu_seconds(cluster)
            for w in windows:
                before = engine_busy_ms(cluster)
                records, seconds = run_clients(cluster, nodes, images, frames // len(nodes) * 2 if len(nodes) > 1
                                               else frames, w)
                tally(records)
                done = sum(1 for r in records if r["meta"] and "error" not in r["meta"])
                fps[str(w)] = done / seconds
                answered += done
                if len(nodes) > 1:
                    busy_ms += engine_busy_ms(cluster) - before
                print(f"{model}: {label}, {w} in flight: {fps[str(w)]:.1f} frames/s", file=sys.stderr)
            out[f"fps_{label}"] = {"by_in_flight": fps, "max": max(fps.values())}
            cpu_after = cpu_seconds(cluster)
            # Every node's processes together, per answered frame, over this label's windows.
            out[f"cpu_ms_per_frame_{label}"] = {role: 1000.0 * (cpu_after[role] - cpu_before[role]) / max(1, answered)
                                                for role in cpu_after}
        per_frame_ms = busy_ms / max(answered, 1)
        out["engine_compute_ms_per_frame_all_devices"] = per_frame_ms
        out["compute_bound_fps"] = 1000.0 * out["cores"] / per_frame_ms if per_frame_ms else None
        if bad_answers:
            # With nothing failed these are defects: keep the nodes' own account (they log at
            # WARNING here) before the cluster's folder is deleted.
            out["bad_answers"] = bad_answers
            out["node_warnings"] = {cluster.ids[d]: cluster.tail(d, 30).splitlines() for d in range(DEVICES)}
            for node, lines in out["node_warnings"].items():
                print("\n".join(f"{node}: {line}" for line in lines), file=sys.stderr)
    out["zero_filled_frames"], out["errors"] = zero_filled, errors
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print each model's JSON object as a line")
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="folder of throughput_<model>.json (throughput_<model>_float16.json with --dtype float16)")
    parser.add_argument("--models", default="digits_cnn,alexnet,efficientnet_lite0")
    parser.add_argument("--frames", type=int, default=300,
                        help="frames per run (default 300; alexnet takes half, efficientnet_lite0 a fifth)")
    parser.add_argument("--windows", default="1,2,4,8,16", help="frames in flight per client to try")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                        help="what the nodes compute in and send (default float32)")
    args = parser.parse_args(argv)
    windows = [int(w) for w in args.windows.split(",")]
    with tempfile.TemporaryDirectory(prefix="rd-throughput-") as tmp:
        for model in args.models.split(","):
            r = bench_model(model, args.frames, windows, Path(tmp), args.dtype)
            print(f"{model}: p50 {r['latency_1_in_flight_ms_p50']:.1f} ms at 1 in flight (compute "
                  f"{r['compute_ms_p50']:.1f} ms, {r['per_stage_overhead_ms']:.2f} ms per stage); max "
                  f"{r['fps_1_origin']['max']:.1f} frames/s with 1 origin, {r['fps_4_origins']['max']:.1f} with 4; "
                  f"compute bound {r['compute_bound_fps'] or 0:.1f}; zero-filled {r['zero_filled_frames']}, "
                  f"errors {r['errors']}")
            cpu = r["cpu_ms_per_frame_4_origins"]
            print(f"{model}: CPU per frame with 4 origins, all nodes: handlers {cpu['handler']:.1f} ms, "
                  f"engines {cpu['engine']:.1f} ms")
            suffix = "" if args.dtype == "float32" else f"_{args.dtype}"
            # One file per model, written as each finishes: a later model's failure loses nothing.
            write_result(r, args.results / f"throughput_{model}{suffix}.json", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
