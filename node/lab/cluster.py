"""`robustdice cluster`: one node per device on loopback, a camera-like stream, and failures.

    robustdice cluster --plan DIR [--frames F] [--rate FPS] [--kill D@FRAME] [--restart D@FRAME]
                       [--pause D@FRAME:FRAME] [--json] [--plot FILE.png]

It makes keys and a peers.yaml in a temporary folder (or --workdir), starts `robustdice-node`
for every device (localcluster.py), streams the evaluation split in order at --rate frames per
second (frame i is sample i mod the split's size; streaming.py) and applies the fault schedule
(faults.py). It prints the per-phase table (phases.py) and can plot the latency timeline.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Dict

import numpy as np

from robustdice.mesh.config import (DEFAULT_HEARTBEAT_INTERVAL_MS, DEFAULT_PEER_TIMEOUT_MS,
                                    DEFAULT_SYNC_TIMEOUT_MS)

from ..errors import NodeError
from .faults import parse_faults
from .localcluster import LocalCluster
from .phases import PHASES, format_phases
from .streaming import stream

READY_TIMEOUT_S = 120.0


def plot_timeline(report: Dict, path, title: str = "") -> Path:
    from robustdice.partitioner.experiments.evaluate import save_figure
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = [f for f in report["frames"] if f["latency_ms"] is not None]
    fig, ax = plt.subplots(figsize=(10, 4.2), dpi=110)
    colors = {"before": "#4c72b0", "detecting": "#dd8452", "failed": "#c44e52", "rejoining": "#8172b3",
              "rejoined": "#55a868"}
    for phase in PHASES:
        sel = [f for f in frames if f["phase"] == phase]
        if not sel:
            continue
        ok = [f for f in sel if f["prediction"] == f["label"]]
        bad = [f for f in sel if f["prediction"] != f["label"]]
        ax.scatter([f["index"] for f in ok], [f["latency_ms"] for f in ok], s=6, color=colors[phase],
                   label=f"{phase} ({len(sel)})")
        ax.scatter([f["index"] for f in bad], [f["latency_ms"] for f in bad], s=18, marker="x", color=colors[phase])
    ymax = max((f["latency_ms"] for f in frames), default=1.0)
    for a in report["faults"]:
        ax.axvline(a["frame"], color="black", ls="--", lw=1)
        ax.text(a["frame"], ymax * 1.02, f"{a['kind']} {a['device']}", fontsize=8, ha="left", va="bottom")
    for d in report["detections"]:
        if d["detected_after_ms"] is not None:
            ax.text(d["frame"], ymax * 0.9, f" detected after {d['detected_after_ms']:.0f} ms", fontsize=8,
                    color="#c44e52")
    for r in report["rejoins"]:
        if r["rejoined_after_ms"] is not None:
            ax.text(r["frame"], ymax * 0.8, f" rejoined after {r['rejoined_after_ms']:.0f} ms", fontsize=8,
                    color="#55a868")
    ax.set_yscale("log")
    ax.set_xlabel("frame (x: wrong prediction)")
    ax.set_ylabel("latency (ms, log)")
    ax.set_title(title or "latency per frame, phases from the nodes' membership events")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", markerscale=2)
    return save_figure(fig, path)


# ------------------------------------------------------------------ CLI
def register(sub) -> None:
    from robustdice.partitioner.argtypes import positive_int
    c = sub.add_parser("cluster", help="run one node per device on loopback, stream frames, inject failures")
    c.add_argument("--plan", required=True, type=Path, help="plan folder; one node per device")
    c.add_argument("--frames", type=positive_int, default=500, help="frames to stream (default %(default)s)")
    c.add_argument("--rate", type=float, default=20.0, help="frames per second, like a camera (default %(default)s)")
    c.add_argument("--kill", action="append", default=[], metavar="D@FRAME",
                   help="SIGKILL device D's node when the stream reaches FRAME (repeatable)")
    c.add_argument("--restart", action="append", default=[], metavar="D@FRAME",
                   help="start killed device D's node again at FRAME (repeatable)")
    c.add_argument("--pause", action="append", default=[], metavar="D@FROM:TO",
                   help="SIGSTOP device D's node from frame FROM, SIGCONT at TO (repeatable)")
    c.add_argument("--threads", type=positive_int, default=1, help="torch threads per node (default %(default)s)")
    c.add_argument("--heartbeat-interval-ms", type=positive_int, default=DEFAULT_HEARTBEAT_INTERVAL_MS,
                   help=f"peers.yaml heartbeat_interval_ms (default {DEFAULT_HEARTBEAT_INTERVAL_MS})")
    c.add_argument("--peer-timeout-ms", type=positive_int, default=DEFAULT_PEER_TIMEOUT_MS,
                   help=f"peers.yaml peer_timeout_ms: silent this long means dead (default {DEFAULT_PEER_TIMEOUT_MS})")
    c.add_argument("--sync-timeout-ms", type=positive_int, default=DEFAULT_SYNC_TIMEOUT_MS,
                   help=f"peers.yaml sync_timeout_ms: how long a gather waits for a peer that shows no progress "
                        f"(default {DEFAULT_SYNC_TIMEOUT_MS})")
    c.add_argument("--data", type=Path, help="ImageFolder to stream (default: the digits evaluation split)")
    c.add_argument("--workdir", type=Path, help="keep keys, peers.yaml and node logs here")
    c.add_argument("--plot", type=Path, help="write the latency timeline PNG")
    c.add_argument("--json", action="store_true", help="last stdout line: one JSON object")
    c.set_defaults(func=cmd_cluster)


def cmd_cluster(args) -> int:
    from robustdice.partitioner.core.plan import load_plan
    from robustdice.partitioner.zoo.data import evaluation_split
    if not args.rate > 0:
        raise NodeError(f"--rate must be > 0 frames per second, got {args.rate}")
    parse_faults(args.kill, args.restart, args.pause, None)  # the schedule's form, before the plan's cost
    plan = load_plan(args.plan)
    faults = parse_faults(args.kill, args.restart, args.pause, plan.devices)
    images, labels, _ = evaluation_split(plan.model, args.data, spec=plan.input)
    images = images.numpy().astype(np.float32)
    labels = labels.numpy()
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"starting {plan.devices} nodes for plan {plan.plan_hash[:12]} ({plan.model}, {plan.method})",
          file=sys.stderr)
    with LocalCluster(args.plan, args.workdir, threads=args.threads,
                      heartbeat_interval_ms=args.heartbeat_interval_ms, peer_timeout_ms=args.peer_timeout_ms,
                      sync_timeout_ms=args.sync_timeout_ms) as cluster:
        cluster_ready_s = time.monotonic()
        for d in range(plan.devices):
            cluster.start_node(d)
        cluster.wait_until(cluster.all_alive(), READY_TIMEOUT_S, "every node to see every other alive")
        print(f"cluster up in {time.monotonic() - cluster_ready_s:.1f} s; streaming {args.frames} frames at "
              f"{args.rate:g} FPS", file=sys.stderr)
        report = stream(cluster, images, labels, args.frames, args.rate, faults)
    report.update(plan=str(args.plan), plan_hash=plan.plan_hash, model=plan.model, method=plan.method,
                  rate_fps=args.rate, peer_timeout_ms=args.peer_timeout_ms,
                  heartbeat_interval_ms=args.heartbeat_interval_ms, sync_timeout_ms=args.sync_timeout_ms)
    print(f"{report['frames_answered']}/{report['frames_submitted']} frames answered")
    print(format_phases(report["phases"]))
    for d in report["detections"]:
        after = d["detected_after_ms"]
        print(f"device {d['device']} ({d['fault']} at frame {d['frame']}): detected by every survivor after "
              f"{'-' if after is None else f'{after:.0f}'} ms")
    for r in report["rejoins"]:
        after = r["rejoined_after_ms"]
        print(f"device {r['device']} ({r['fault']} at frame {r['frame']}): counted again by every node after "
              f"{'-' if after is None else f'{after:.0f}'} ms")
    if args.plot:
        plot_timeline(report, args.plot, f"{plan.model} ({plan.method}) over {plan.devices} nodes at {args.rate:g} FPS")
        print(f"timeline: {args.plot}")
    if args.json:
        print(json.dumps(report))
    return 0 if report["frames_answered"] == report["frames_submitted"] else 1
