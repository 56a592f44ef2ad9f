"""Latency of a rocoin plan against robust's on the same model, 4 loopback nodes, 1 frame in flight.

    python benchmarks/rocoin_latency.py --json [--model digits_cnn] [--frames 200] [--blocks 5]
                                        [--epochs N] [--out benchmarks/results/rocoin_latency_<model>.json]

Both plans are made for 4 devices: robust with the mean+bn fill at 0.5 of NMR's memory per
device (the default plan's budget), and rocoin (N // 2 groups of two students, --epochs of
distillation: the students' quality does not change their cost). Both clusters run at once
(LocalCluster, 1 torch thread per node), and one client at n0 keeps 1 frame in flight, in
blocks that alternate between the two clusters, so that both see the same machine. A rocoin
frame is one gather (the students' features) where robust's is one per stage. Figures per plan:
  stages                  gathers per frame (the stages a node serves), checked on every answer
                          (its `zero_filled` names each stage gathered)
  latency_ms_p50/p99      the origin's latency_ms over every answered frame; block_p50_ms per block
  compute_ms_p50          the origin engine's compute for the frame
  cpu_ms_per_frame        CPU time (user + system) of the 4 handlers and of the 4 engines over that
                          plan's blocks, per answered frame: unlike the wall-clock figures it hardly
                          moves when other jobs share the machine
  slice_bytes_per_frame   bytes of slices all nodes sent per frame
  per_device_param_bytes  the largest shard's parameters
`rocoin_over_robust_p50` is rocoin's p50 over robust's. The last stdout line is the JSON object
(with --json).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from _results import write_result
from throughput import cpu_seconds, run_clients, slice_bytes

DEVICES = 4
ROBUST_MEMORY = 0.5   # the default plan's budget: half of NMR's parameters per device
ROBUST_FILL = "mean+bn"


def make_plans(model: str, tmp: Path, epochs) -> dict:
    """{label: (plan folder, summary)} of the two plans."""
    from robustdice.partitioner.core.partition import PartitionRequest, partition
    from robustdice.partitioner.core.rocoin_plan import RocoinOptions, partition_rocoin

    robust = partition(PartitionRequest(model, DEVICES, "robust", tmp / "robust", fill=ROBUST_FILL,
                                        memory=ROBUST_MEMORY, show_progress=False))
    rocoin = partition_rocoin(PartitionRequest(model, DEVICES, "rocoin", tmp / "rocoin", fill="mean",
                                               show_progress=False, rocoin=RocoinOptions(epochs=epochs)))
    return {"robust": (tmp / "robust", robust), "rocoin": (tmp / "rocoin", rocoin)}


def bench(model: str, frames: int, blocks: int, epochs, tmp: Path) -> dict:
    from robustdice.node.lab.localcluster import LocalCluster
    from robustdice.partitioner.zoo.data import evaluation_split
    from robustdice.partitioner.core.serving_stages import serving_stages

    plans = make_plans(model, tmp, epochs)
    images = evaluation_split(model)[0][:64].numpy().astype(np.float32)
    clusters = {}
    out = {}
    try:
        for label, (folder, _) in plans.items():
            (tmp / f"{label}-nodes").mkdir()
            clusters[label] = LocalCluster(folder, tmp / f"{label}-nodes", threads=1, log_level="WARNING")
        for cluster in clusters.values():
            for d in range(DEVICES):
                cluster.start_node(d)
        for label, cluster in clusters.items():
            cluster.wait_until(cluster.all_alive(), 300.0, f"every {label} node to count on every other")
            run_clients(cluster, cluster.ids[:1], images, 10, 1)   # warm-up
        records = {label: [] for label in clusters}
        block_p50 = {label: [] for label in clusters}
        cpu = {label: {"handler": 0.0, "engine": 0.0} for label in clusters}
        sent = {label: 0 for label in clusters}
        per_block = max(4, frames // blocks)
        for b in range(blocks):
            order = list(clusters) if b % 2 == 0 else list(clusters)[::-1]
            for label in order:
                cluster = clusters[label]
                cpu_before, bytes_before = cpu_seconds(cluster), slice_bytes(cluster)
                block, _ = run_clients(cluster, cluster.ids[:1], images, per_block, 1)
                cpu_after = cpu_seconds(cluster)
                for role in cpu_after:
                    cpu[label][role] += cpu_after[role] - cpu_before[role]
                sent[label] += slice_bytes(cluster) - bytes_before
                records[label] += block
                lat = [r["meta"]["latency_ms"] for r in block if r["meta"] and "error" not in r["meta"]]
                block_p50[label].append(round(float(np.median(lat)), 2) if lat else None)
        for label, cluster in clusters.items():
            folder, summary = plans[label]
            stages = serving_stages(cluster.plan)
            answered = [r["meta"] for r in records[label] if r["meta"] and "error" not in r["meta"]]
            lat = np.array([m["latency_ms"] for m in answered])
            gathers = sorted({len(m["zero_filled"]) for m in answered})
            out[label] = {
                "method": summary["method"], "fill": summary["fill"], "plan_hash": summary["plan_hash"][:12],
                "stages": len(stages), "gathers_per_answer": gathers,
                "frames": len(records[label]), "answered": len(answered),
                "errors": len(records[label]) - len(answered),
                "zero_filled_frames": sum(1 for m in answered if m.get("zero_filled_fraction")),
                "latency_ms_p50": round(float(np.percentile(lat, 50)), 2),
                "latency_ms_p99": round(float(np.percentile(lat, 99)), 2),
                "block_p50_ms": block_p50[label],
                "compute_ms_p50": round(float(np.median([m["compute_ms"] for m in answered])), 3),
                "cpu_ms_per_frame": {role: round(1000.0 * v / max(1, len(answered)), 3) for role, v in cpu[label].items()},
                "slice_bytes_per_frame": round(sent[label] / max(1, len(answered)), 1),
                "per_device_param_bytes": max(summary["per_device_param_bytes"]),
            }
            if label == "robust":
                out[label]["memory"] = ROBUST_MEMORY
            else:
                out[label]["students"] = [s["student"] for s in summary["rocoin"]["students"]]
                out[label]["epochs"] = summary["rocoin"]["epochs"]
            r = out[label]
            print(f"{model} {label}: {r['stages']} gathers per frame; p50 {r['latency_ms_p50']:.2f} ms, p99 "
                  f"{r['latency_ms_p99']:.2f} ms (blocks {r['block_p50_ms']}); CPU per frame, 4 nodes: handlers "
                  f"{r['cpu_ms_per_frame']['handler']:.2f} ms, engines {r['cpu_ms_per_frame']['engine']:.2f} ms; "
                  f"errors {r['errors']}, zero-filled {r['zero_filled_frames']}", file=sys.stderr)
    finally:
        for cluster in clusters.values():
            cluster.close()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the JSON object as the last line")
    parser.add_argument("--model", default="digits_cnn", help="digits_cnn or fashion_vgg (default digits_cnn)")
    parser.add_argument("--frames", type=int, default=200, help="frames per plan, over all blocks (default 200)")
    parser.add_argument("--blocks", type=int, default=5, help="alternating blocks per plan (default 5)")
    parser.add_argument("--epochs", type=int, help="rocoin's distillation passes (default: the partitioner's)")
    parser.add_argument("--note", default="", help="a remark stored with the result (e.g. what else ran)")
    parser.add_argument("--out", help="default benchmarks/results/rocoin_latency_<model>.json")
    args = parser.parse_args(argv)
    out = args.out or str(Path(__file__).resolve().parent / "results" / f"rocoin_latency_{args.model}.json")
    with tempfile.TemporaryDirectory(prefix="rd-rocoin-latency-") as tmp:
        plans = bench(args.model, args.frames, args.blocks, args.epochs, Path(tmp))
    robust, rocoin = plans["robust"], plans["rocoin"]
    result = {"model": args.model, "devices": DEVICES, "threads_per_node": 1, "in_flight": 1, "origin": "n0",
              "blocks": args.blocks, "plans": plans,
              "rocoin_over_robust_p50": round(rocoin["latency_ms_p50"] / robust["latency_ms_p50"], 3),
              "note": args.note}
    print(f"{args.model}: rocoin p50 {rocoin['latency_ms_p50']:.2f} ms against robust's {robust['latency_ms_p50']:.2f} "
          f"ms ({result['rocoin_over_robust_p50']:.2f}x), {rocoin['stages']} gather against {robust['stages']}")
    write_result(result, out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
