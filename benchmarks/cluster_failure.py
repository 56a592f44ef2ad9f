"""Cluster benchmark: latency before/while/after a node is killed, detection time, memory per node.

    python benchmarks/cluster_failure.py --json [--frames 120] [--rate 4] [--full-scores] [--restart-at FRAME]
                                         [--out benchmarks/results/cluster_failure.json]

alexnet (--weights none) partitioned with method robust over 4 devices (scores s1 unless
--full-scores: s1,s2,s3); 4 loopback nodes, 1 torch thread each (LocalCluster(plan, threads=1)),
a stream of real photos (the Debian packages' crops, via calibration_batch("alexnet", n=16), cycled) at
--rate FPS to node 0, and SIGKILL of device 2's whole node at frame F/3 (no restart unless
--restart-at). Figures:
  latency_ms_p50            per phase (before / detecting / failed [/ rejoining / rejoined]), the
                            nodes' own latency_ms, and failed_over_before_p50 (target <= 1.1)
  detection                 detected_after_ms per survivor and the max (every survivor's `died`)
  rss_per_node_bytes        supervisor + handler + engine RSS of each node from its status(),
                            taken after warm-up frames, before the kill; engine_rss_bytes alone
  single_process_rss_bytes  a subprocess that builds alexnet (weights none, 1 thread), runs
                            batch-1 forward passes and reports its RSS (psutil), like the nodes
  shard_bytes               per-device parameter bytes from the partition summary
"Labels" are the single process's predictions, so accuracy is agreement with the whole model.
The last stdout line is the JSON object (with --json).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from _results import write_result
from robustdice.node.process import process_role

MODEL = "alexnet"
DEVICES = 4
VICTIM = 2


def role_single(images_path: str) -> None:
    """Whole model in one process: build, forward each image at batch 1, report RSS + predictions."""
    import torch

    from robustdice.partitioner.zoo.models import build_model
    torch.set_num_threads(1)
    images = np.load(images_path)
    model = build_model(MODEL, weights="none", seed=0)
    preds = []
    with torch.inference_mode():
        for i in range(len(images)):
            preds.append(int(model(torch.from_numpy(images[i:i + 1])).argmax()))
    rss = psutil.Process().memory_info().rss
    print(json.dumps({"rss_bytes": rss, "maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "predictions": preds}))


def role_of(pid: int) -> str:
    try:
        name = psutil.Process(pid).name()
    except psutil.Error:
        return "gone"
    return process_role(name) or "other"


def pct(values, q):
    return None if not values else round(float(np.percentile(values, q)), 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the JSON object as the last line")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "cluster_failure.json"))
    parser.add_argument("--frames", type=int, default=120)
    parser.add_argument("--rate", type=float, default=4.0, help="frames per second (the 2-core machine sustains 4)")
    parser.add_argument("--kill-at", type=int, help="frame of the kill (default frames // 3)")
    parser.add_argument("--restart-at", type=int, help="restart device 2 at this frame (default: no restart)")
    parser.add_argument("--full-scores", action="store_true", help="score with s1,s2,s3 (default s1 only, faster)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed frames before the RSS reading and the stream")
    parser.add_argument("--role", choices=["single"], help=argparse.SUPPRESS)
    parser.add_argument("--images", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "single":
        role_single(args.images)
        return 0

    from robustdice.node.client import NodeClient
    from robustdice.node.lab.faults import Fault
    from robustdice.node.lab.localcluster import LocalCluster
    from robustdice.node.lab.streaming import stream
    from robustdice.partitioner.core.partition import DEFAULT_SCORES, PartitionRequest, partition
    from robustdice.partitioner.zoo.data import calibration_batch

    kill_at = args.frames // 3 if args.kill_at is None else args.kill_at
    faults = [Fault("kill", VICTIM, kill_at)]
    if args.restart_at is not None:
        if args.restart_at <= kill_at:
            parser.error("--restart-at must come after the kill")
        faults.append(Fault("restart", VICTIM, args.restart_at))
    scores = tuple(DEFAULT_SCORES) if args.full_scores else ("s1",)

    with tempfile.TemporaryDirectory(prefix="rdc-failure-") as tmp:
        images = calibration_batch(MODEL, n=16).numpy().astype(np.float32)
        np.save(Path(tmp) / "images.npy", images)
        single = subprocess.run([sys.executable, __file__, "--role", "single", "--images", str(Path(tmp) / "images.npy")],
                                check=True, capture_output=True, text=True)
        single = json.loads(single.stdout.strip().splitlines()[-1])
        labels = np.array(single["predictions"], dtype=np.int64)

        t0 = time.monotonic()
        summary = partition(PartitionRequest(model=MODEL, devices=DEVICES, method="robust", out=Path(tmp) / "plan",
                                             weights="none", scores=scores, show_progress=False))
        partition_s = time.monotonic() - t0
        print(f"partitioned {MODEL} (robust, {','.join(scores)}) over {DEVICES} devices in {partition_s:.1f} s; "
              f"replication {summary['replication_factor']}", file=sys.stderr)

        with LocalCluster(summary["plan"], threads=1) as cluster:
            t0 = time.monotonic()
            for d in range(DEVICES):
                cluster.start_node(d)
            cluster.wait_until(cluster.all_alive(), 180.0, "every node to see every other alive")
            up_s = time.monotonic() - t0
            with NodeClient(cluster.config, cluster.ids[0], cluster.key_path) as client:
                for i in range(args.warmup):
                    reply = client.submit(images[i % len(images)][None], timeout_s=60.0)
                    if "error" in reply.meta:
                        raise RuntimeError(f"warm-up frame failed: {reply.meta['error']}")
            views = cluster.status()
            rss_per_node, engine_rss, rss_detail = [], [], {}
            for v in sorted(views, key=lambda v: v.get("device", 0)):
                if v.get("unreachable"):
                    raise RuntimeError(f"node {v['node']} unreachable before the kill")
                per_role = {}
                for key, rss in v["rss_bytes"].items():
                    role = role_of(int(key.split(":")[0]))
                    per_role[role] = per_role.get(role, 0) + rss
                rss_detail[v["node"]] = per_role
                rss_per_node.append(int(v["rss_total_bytes"]))
                engine_rss.append(int(per_role.get("engine", 0)))
            print(f"cluster up in {up_s:.1f} s; streaming {args.frames} frames at {args.rate:g} FPS, kill device "
                  f"{VICTIM} at frame {kill_at}", file=sys.stderr)
            report = stream(cluster, images, labels, args.frames, args.rate, faults)
            # Our own reading of every node's membership events for the victim (a cross-check of
            # the report's detection, which is built from stream()'s final status call).
            kill_wall = next(a["wall_s"] for a in report["faults"] if a["kind"] == "kill")
            # One node at a time with its own deadline: status_all() shares one deadline across the
            # nodes, so the dead node uses it up and the nodes listed after it read as unreachable.
            own_views = []
            for d, nid in enumerate(cluster.ids):
                if d == VICTIM:
                    continue
                with NodeClient(cluster.config, nid, cluster.key_path) as c:
                    v = c.status(timeout_s=5.0)
                ev = [] if v is None else [e for e in v.get("events", []) if e["peer"] == cluster.ids[VICTIM]]
                own_views.append({"node": nid, "unreachable": v is None,
                                  "victim_events": [{"kind": e["kind"], "after_kill_ms": round(1000 * (e["wall_s"] - kill_wall), 1)}
                                                    for e in ev]})

    phases = report["phases"]
    frames = report["frames"]
    by_phase = {}
    for f in frames:
        if f["latency_ms"] is not None:
            by_phase.setdefault(f["phase"], []).append(f)
    latency = {p: {"frames": s["frames"], "p50": round(s["latency_ms_p50"], 1), "p99": round(s["latency_ms_p99"], 1),
                   "max": round(max(f["latency_ms"] for f in by_phase[p]), 1),
                   "fps": None if s["fps"] is None else round(s["fps"], 2),
                   "agreement": round(s["accuracy"], 3), "zero_filled_fraction": round(s["zero_filled_fraction"], 4),
                   "participants": sorted({len(f["participants"] or []) for f in by_phase[p]})}
               for p, s in phases.items()}
    before = phases.get("before", {}).get("latency_ms_p50")
    failed = phases.get("failed", {}).get("latency_ms_p50")
    detection = report["detections"][0] if report["detections"] else {}
    per_node = {k: (None if v is None else round(v, 1)) for k, v in detection.get("per_node_ms", {}).items()}
    for v in own_views:  # fill in survivors that the report's status_all() missed
        died = [e["after_kill_ms"] for e in v["victim_events"] if e["kind"] == "died" and e["after_kill_ms"] >= 0]
        if per_node.get(v["node"]) is None and died:
            per_node[v["node"]] = min(died)
    single_rss = int(single["rss_bytes"])
    result = {
        "model": MODEL, "method": "robust", "scores": list(scores), "devices": DEVICES, "threads_per_node": 1,
        "frames": args.frames, "rate_fps": args.rate,
        "kill": {"device": VICTIM, "frame": kill_at},
        "restart": None if args.restart_at is None else {"device": VICTIM, "frame": args.restart_at},
        "frames_submitted": report["frames_submitted"], "frames_answered": report["frames_answered"],
        "frames_failed": report["frames_failed"],
        "latency_ms": latency,
        "latency_ms_p50_before": None if before is None else round(before, 1),
        "latency_ms_p50_detecting": latency.get("detecting", {}).get("p50"),
        "latency_ms_p50_failed": None if failed is None else round(failed, 1),
        "failed_over_before_p50": None if not (before and failed) else round(failed / before, 3),
        "failed_over_before_target": 1.1,
        "detection": {"report_detected_after_ms": None if detection.get("detected_after_ms") is None
                      else round(detection["detected_after_ms"], 1),
                      "per_node_ms": per_node,
                      "all_survivors_detected": all(v is not None for v in per_node.values()),
                      "max_ms": max((v for v in per_node.values() if v is not None), default=None)},
        "detection_report": report["detections"],
        "victim_events_per_node": own_views,
        "peer_timeout_ms": cluster.config.peer_timeout_ms,
        "heartbeat_interval_ms": cluster.config.heartbeat_interval_ms,
        "sync_timeout_ms": cluster.config.sync_timeout_ms,
        "rejoins": report["rejoins"],
        "rss_per_node_bytes": rss_per_node,
        "engine_rss_bytes": engine_rss,
        "rss_by_role_bytes": rss_detail,
        "single_process_rss_bytes": single_rss,
        "single_process_maxrss_bytes": int(single["maxrss_bytes"]),
        "rss_per_node_over_single": [round(r / single_rss, 3) for r in rss_per_node],
        "engine_rss_over_single": [round(r / single_rss, 3) for r in engine_rss],
        "rss_all_nodes_over_single": round(sum(rss_per_node) / single_rss, 3),
        "shard_bytes": summary["per_device_param_bytes"],
        "full_param_bytes": summary["full_param_bytes"],
        "shard_over_full": [round(b / summary["full_param_bytes"], 3) for b in summary["per_device_param_bytes"]],
        "replication_factor": summary["replication_factor"],
        "partition_s": round(partition_s, 1), "cluster_up_s": round(up_s, 1),
        "latency_ms_per_frame": [None if f["latency_ms"] is None else round(f["latency_ms"], 1) for f in frames],
        "phase_per_frame": [f["phase"] for f in frames],
    }
    print(f"{report['frames_answered']}/{report['frames_submitted']} frames answered at {args.rate:g} FPS")
    for p, s in latency.items():
        print(f"  {p:<10} {s['frames']:>4} frames  p50 {s['p50']:>7.1f} ms  p99 {s['p99']:>7.1f} ms  "
              f"agreement {100 * s['agreement']:.0f}%  zero-filled {100 * s['zero_filled_fraction']:.1f}%  "
              f"participants {s['participants']}")
    print(f"failed/before p50: {result['failed_over_before_p50']} (target <= 1.1)")
    print(f"detection: max {result['detection']['max_ms']} ms over survivors {per_node}")
    print(f"RSS per node {[round(r / 2**20) for r in rss_per_node]} MiB (engine {[round(r / 2**20) for r in engine_rss]}"
          f" MiB) vs single process {single_rss / 2**20:.0f} MiB; shards "
          f"{[round(b / 1e6, 1) for b in summary['per_device_param_bytes']]} MB of {summary['full_param_bytes'] / 1e6:.1f} MB")
    write_result(result, args.out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
