"""`robustdice cluster`: one node per device on loopback, a camera-like stream, and failures.

    robustdice cluster --plan DIR [--frames F] [--rate FPS] [--kill D@FRAME] [--restart D@FRAME]
                       [--pause D@FRAME:FRAME] [--json] [--plot FILE.png]

It makes keys and a peers.yaml in a temporary folder, starts `robustdice-node` for every device
(each in its own process group, so a kill takes the whole node: supervisor, handler, engine),
streams the evaluation split in order at --rate frames per second (frame i is sample i mod the
split's size) to a node that the schedule leaves up, and applies the faults when the stream
reaches their frame: kill = SIGKILL, pause = SIGSTOP … SIGCONT, restart = a fresh process.

Phases of a frame, from the nodes' own membership events (wall clock, same machine):
  before     answered before the first failure
  detecting  in flight while a failure was being detected (between the fault and the moment
             every survivor had declared the device dead)
  failed     submitted after detection, answered before the device came back
  rejoining  in flight while the device was coming back (restart or SIGCONT until every node
             counts it again)
  rejoined   submitted after the rejoin
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import NodeError

log = logging.getLogger(__name__)

PHASES = ("before", "detecting", "failed", "rejoining", "rejoined")
READY_TIMEOUT_S = 120.0
ANSWER_GRACE_S = 10.0


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str          # kill | restart | pause | resume
    device: int
    frame: int


def parse_faults(kills: Sequence[str], restarts: Sequence[str], pauses: Sequence[str],
                 devices: Optional[int]) -> List[Fault]:
    """The fault schedule, checked; device indices are checked against `devices` unless None."""
    faults: List[Fault] = []
    for kind, specs in (("kill", kills), ("restart", restarts)):
        for spec in specs:
            m = re.fullmatch(r"(\d+)@(\d+)", spec.strip())
            if not m:
                raise NodeError(f"--{kind} {spec!r}: expected DEVICE@FRAME, e.g. 2@150")
            faults.append(Fault(kind, int(m.group(1)), int(m.group(2))))
    for spec in pauses:
        m = re.fullmatch(r"(\d+)@(\d+):(\d+)", spec.strip())
        if not m or int(m.group(3)) <= int(m.group(2)):
            raise NodeError(f"--pause {spec!r}: expected DEVICE@FROM:TO with TO > FROM, e.g. 1@100:200")
        faults += [Fault("pause", int(m.group(1)), int(m.group(2))), Fault("resume", int(m.group(1)), int(m.group(3)))]
    for f in faults:
        if devices is not None and not 0 <= f.device < devices:
            option = "pause" if f.kind == "resume" else f.kind
            raise NodeError(f"--{option}: device {f.device} is not in the plan (0..{devices - 1})")
    for f in faults:
        if f.kind == "restart" and not any(k.kind == "kill" and k.device == f.device and k.frame < f.frame for k in faults):
            raise NodeError(f"--restart {f.device}@{f.frame}: device {f.device} is not killed before frame {f.frame}")
    return sorted(faults, key=lambda f: (f.frame, f.kind != "kill"))


def free_ports(n: int) -> List[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


class LocalCluster:
    """N robustdice-node processes on 127.0.0.1 with generated keys and peers.yaml."""

    def __init__(self, plan_dir, workdir=None, *, threads: int = 1, workers: int = 2,
                 heartbeat_interval_ms: int = 100, peer_timeout_ms: int = 500, sync_timeout_ms: int = 1000,
                 log_level: str = "INFO", insecure: bool = False) -> None:
        from robustdice.partitioner.plan import load_plan, plan_dir as to_plan_dir
        self.plan_dir = to_plan_dir(Path(plan_dir)).resolve()
        self.plan = load_plan(self.plan_dir)
        self._tmp = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="rdc-")
            workdir = self._tmp.name
        # Absolute: peers.yaml's relative paths are resolved against its own folder.
        self.workdir = Path(workdir).resolve()
        self.threads, self.workers, self.log_level = threads, workers, log_level
        self.ids = [f"n{d}" for d in range(self.plan.devices)]
        self.procs: Dict[int, subprocess.Popen] = {}
        self.logs: Dict[int, Path] = {}
        self.peers_path = self._write_config(heartbeat_interval_ms, peer_timeout_ms, sync_timeout_ms, insecure)

    def _write_config(self, heartbeat_ms: int, timeout_ms: int, sync_ms: int, insecure: bool) -> Path:
        from robustdice.mesh.config import ClientKey, PeerConfig, PeersConfig, write_peers
        from robustdice.mesh.keys import make_keypairs
        keys_dir = self.workdir / "keys"
        publics = {} if insecure else make_keypairs(keys_dir, self.ids + ["client"])
        ports = free_ports(2 * len(self.ids))
        peers = tuple(PeerConfig(nid, "127.0.0.1", ports[2 * d], publics.get(nid), ports[2 * d + 1])
                      for d, nid in enumerate(self.ids))
        config = PeersConfig(
            peers=peers, plan=self.plan_dir, heartbeat_interval_ms=heartbeat_ms, peer_timeout_ms=timeout_ms,
            sync_timeout_ms=sync_ms, insecure=insecure,
            secret_key_file=None if insecure else str(keys_dir / "{id}.key_secret"),
            clients=() if insecure else (ClientKey("client", publics["client"]),), base_dir=self.workdir)
        self.config = config
        self.key_path = None if insecure else keys_dir / "client.key_secret"
        return write_peers(self.workdir / "peers.yaml", config)

    # ------------------------------------------------------------ processes
    def start_node(self, device: int) -> subprocess.Popen:
        log_path = self.workdir / f"{self.ids[device]}.log"
        argv = [sys.executable, "-m", "robustdice.node.supervisor", "--peers", str(self.peers_path),
                "--id", self.ids[device], "--threads", str(self.threads), "--workers", str(self.workers),
                "--log-level", self.log_level]
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[device] = proc
        self.logs[device] = log_path
        return proc

    def _signal(self, device: int, sig: int) -> None:
        proc = self.procs[device]
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self, device: int) -> None:
        self._signal(device, signal.SIGKILL)
        self.procs[device].wait()

    def pause(self, device: int) -> None:
        self._signal(device, signal.SIGSTOP)

    def resume(self, device: int) -> None:
        self._signal(device, signal.SIGCONT)

    def stop(self, timeout_s: float = 8.0) -> None:
        for d, proc in self.procs.items():
            if proc.poll() is None:
                self._signal(d, signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for d, proc in self.procs.items():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("node %s did not stop in time: killing its process group", self.ids[d])
                self._signal(d, signal.SIGKILL)
                proc.wait()
            # The children die with their parent (PDEATHSIG); make sure nothing of the group is left.
            self._signal(d, signal.SIGKILL)

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ views
    def status(self, timeout_s: float = 2.0) -> List[Dict]:
        from .client import status_all
        return status_all(self.config, self.key_path, timeout_s)

    def wait_until(self, predicate, timeout_s: float, what: str, interval_s: float = 0.05) -> List[Dict]:
        deadline = time.monotonic() + timeout_s
        views: List[Dict] = []
        while time.monotonic() < deadline:
            for d, proc in self.procs.items():
                if proc.poll() is not None and proc.returncode not in (-signal.SIGKILL,):
                    raise NodeError(f"node {self.ids[d]} exited with {proc.returncode} while waiting for {what}; "
                                    f"log: {self.logs[d]}\n{self.tail(d)}")
            views = self.status(timeout_s=min(1.0, max(0.1, deadline - time.monotonic())))
            if predicate(views):
                return views
            time.sleep(interval_s)  # polling the nodes' status: the condition is theirs, not ours
        raise NodeError(f"timed out after {timeout_s:.0f} s waiting for {what}")

    def all_alive(self, devices: Optional[Sequence[int]] = None):
        """A predicate: every node in `devices` sees every other alive *and* would run a frame
        submitted now on all of them (a peer counts for new frames only after the handler's
        participant grace, so "alive" alone would let the first frames be zero-filled)."""
        devices = list(range(len(self.ids))) if devices is None else list(devices)
        names = {self.ids[d] for d in devices}

        def check(views: List[Dict]) -> bool:
            up = [v for v in views if not v.get("unreachable") and v["node"] in names]
            return len(up) == len(names) and all(
                v["members"][n]["state"] == "alive" and n in v.get("participants", ())
                for v in up for n in names if n != v["node"])
        return check

    def tail(self, device: int, lines: int = 20) -> str:
        try:
            return "\n".join(self.logs[device].read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# ------------------------------------------------------------------ streaming
def _event_times(views: List[Dict], kind: str, peer: str, after_wall_s: float) -> List[float]:
    return [e["wall_s"] for v in views if not v.get("unreachable") for e in v.get("events", [])
            if e["peer"] == peer and e["kind"] in kind.split("|") and e["wall_s"] >= after_wall_s]


def classify(frames: List[Dict], windows: List[Tuple[str, float, float]]) -> None:
    """Set each frame's phase from its submit/answer wall times and the fault windows."""
    first_fault = min((w[1] for w in windows if w[0] == "detecting"), default=float("inf"))
    for f in frames:
        start, end = f["submitted_wall_s"], f.get("answered_wall_s") or float("inf")
        phase = "before" if end < first_fault else "failed"
        for name, lo, hi in windows:
            if name == "detecting" and start < hi and end > lo:
                phase = "detecting"
                break
            if name == "rejoining" and start < hi and end > lo:
                phase = "rejoining"
                break
            if name == "rejoined" and start >= lo:
                phase = "rejoined"
        f["phase"] = phase


def summarise(frames: List[Dict]) -> Dict[str, Dict]:
    out = {}
    for phase in PHASES:
        sel = [f for f in frames if f["phase"] == phase and f.get("prediction") is not None]
        if not sel:
            continue
        lat = np.array([f["latency_ms"] for f in sel])
        span = max(f["answered_wall_s"] for f in sel) - min(f["submitted_wall_s"] for f in sel)
        out[phase] = {"frames": len(sel),
                      "accuracy": float(np.mean([f["prediction"] == f["label"] for f in sel])),
                      "fps": len(sel) / span if span > 0 else None,
                      "latency_ms_p50": float(np.percentile(lat, 50)), "latency_ms_p99": float(np.percentile(lat, 99)),
                      "zero_filled_fraction": float(np.mean([f["zero_filled_fraction"] for f in sel]))}
    return out


def format_phases(phases: Dict[str, Dict]) -> str:
    header = f"{'phase':<10} {'frames':>6} {'accuracy':>9} {'FPS':>6} {'p50 ms':>8} {'p99 ms':>8} {'zero-filled':>11}"
    lines = [header, "-" * len(header)]
    for name, s in phases.items():
        fps = "-" if s["fps"] is None else f"{s['fps']:.1f}"
        lines.append(f"{name:<10} {s['frames']:>6} {100 * s['accuracy']:>8.1f}% {fps:>6} {s['latency_ms_p50']:>8.1f} "
                     f"{s['latency_ms_p99']:>8.1f} {100 * s['zero_filled_fraction']:>10.1f}%")
    return "\n".join(lines)


def stream(cluster: LocalCluster, images: np.ndarray, labels: np.ndarray, n_frames: int, rate_fps: float,
           faults: List[Fault], answer_timeout_s: float = ANSWER_GRACE_S) -> Dict:
    """Submit frames at `rate_fps`, apply `faults`, collect answers; returns the --json object."""
    from robustdice.mesh import wire

    from .client import NodeClient
    schedule = list(faults)
    touched = {f.device for f in faults}
    candidates = [d for d in range(len(cluster.ids)) if d not in touched] or [0]
    target = candidates[0]
    frames: List[Dict] = []
    by_request: Dict[int, Dict] = {}
    applied: List[Dict] = []
    interval_s = 1.0 / rate_fps if rate_fps > 0 else 0.0
    t0 = time.monotonic()
    with NodeClient(cluster.config, cluster.ids[target], cluster.key_path) as client:
        def collect(until: float) -> None:
            while True:
                msg = client.receive(max(0.0, until - time.monotonic()))
                if msg is None:
                    return
                if isinstance(msg, wire.Result):
                    rec = by_request.pop(msg.meta.get("request", {}).get("id"), None)
                    if rec is not None:
                        rec["answered_wall_s"] = time.time()
                        if "error" in msg.meta:
                            rec["error"] = msg.meta["error"]
                        else:
                            rec.update(prediction=int(msg.meta["prediction"][0]), latency_ms=msg.meta["latency_ms"],
                                       zero_filled_fraction=msg.meta["zero_filled_fraction"],
                                       zero_filled=msg.meta["zero_filled"],
                                       participants=msg.meta.get("participants"))
                if time.monotonic() >= until:
                    return

        for i in range(n_frames):
            while schedule and schedule[0].frame <= i:
                f = schedule.pop(0)
                wall = time.time()
                getattr(cluster, {"kill": "kill", "restart": "start_node", "pause": "pause", "resume": "resume"}[f.kind])(f.device)
                applied.append({"kind": f.kind, "device": f.device, "frame": i, "wall_s": wall})
                log.info("frame %d: %s device %d", i, f.kind, f.device)
            sample = i % len(labels)
            rec = {"index": i, "sample": int(sample), "label": int(labels[sample]), "prediction": None,
                   "latency_ms": None, "zero_filled_fraction": None, "submitted_wall_s": time.time()}
            frames.append(rec)
            by_request[client.send_input(images[sample: sample + 1], {"index": i})] = rec
            collect(t0 + (i + 1) * interval_s)
        deadline = time.monotonic() + answer_timeout_s
        while by_request and time.monotonic() < deadline:
            collect(min(deadline, time.monotonic() + 0.5))
    # The final views carry the membership events the phases come from; a loaded machine can
    # be slow to answer, so this one query gets more time than a liveness probe.
    views = cluster.status(timeout_s=10.0)
    return _report(cluster, frames, applied, views)


def _report(cluster: LocalCluster, frames: List[Dict], applied: List[Dict], views: List[Dict]) -> Dict:
    windows: List[Tuple[str, float, float]] = []
    detections, rejoins = [], []
    for a in applied:
        peer = cluster.ids[a["device"]]
        if a["kind"] in ("kill", "pause"):
            survivors = [v for v in views if v.get("node") != peer]
            times = [min(_event_times([v], "died", peer, a["wall_s"]), default=None) for v in survivors]
            known = [t for t in times if t is not None]
            detected = max(known) if known else None
            detections.append({"device": a["device"], "fault": a["kind"], "frame": a["frame"],
                               "survivors_reporting": len(known), "survivors": len(survivors),
                               "detected_after_ms": None if detected is None else 1000 * (detected - a["wall_s"]),
                               "per_node_ms": {v["node"]: None if t is None else 1000 * (t - a["wall_s"])
                                               for v, t in zip(survivors, times)}})
            windows.append(("detecting", a["wall_s"], detected if detected is not None else float("inf")))
        else:
            others = [v for v in views if v.get("node") != peer and not v.get("unreachable")]
            times = [min(_event_times([v], "rejoined|joined", peer, a["wall_s"]), default=None) for v in others]
            known = [t for t in times if t is not None]
            back = max(known) if known else None
            rejoins.append({"device": a["device"], "fault": a["kind"], "frame": a["frame"],
                            "rejoined_after_ms": None if back is None else 1000 * (back - a["wall_s"])})
            # New frames count on the device only after the nodes' participant grace (2 heartbeats).
            end = back + 2 * cluster.config.heartbeat_interval_ms / 1000.0 if back is not None else float("inf")
            windows += [("rejoining", a["wall_s"], end), ("rejoined", end, float("inf"))]
    classify(frames, windows)
    phases = summarise(frames)
    answered = sum(1 for f in frames if f.get("prediction") is not None)
    return {"frames_submitted": len(frames), "frames_answered": answered,
            "frames_failed": sum(1 for f in frames if "error" in f),
            "frames": [{k: f.get(k) for k in ("index", "sample", "label", "prediction", "latency_ms",
                                              "zero_filled_fraction", "phase", "participants", "submitted_wall_s")}
                       for f in frames],
            "phases": phases, "detections": detections, "rejoins": rejoins, "faults": applied}


def plot_timeline(report: Dict, path, title: str = "") -> Path:
    from robustdice.partitioner.evaluate import save_figure
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
    from robustdice.partitioner.cli import positive_int
    c = sub.add_parser("cluster", help="run one node per device on loopback, stream frames, inject failures")
    c.add_argument("--plan", required=True, type=Path, help="plan folder; one node per device")
    c.add_argument("--frames", type=positive_int, default=500, help="frames to stream (default %(default)s)")
    c.add_argument("--rate", type=float, default=50.0, help="frames per second, like a camera (default %(default)s)")
    c.add_argument("--kill", action="append", default=[], metavar="D@FRAME",
                   help="SIGKILL device D's node when the stream reaches FRAME (repeatable)")
    c.add_argument("--restart", action="append", default=[], metavar="D@FRAME",
                   help="start killed device D's node again at FRAME (repeatable)")
    c.add_argument("--pause", action="append", default=[], metavar="D@FROM:TO",
                   help="SIGSTOP device D's node from frame FROM, SIGCONT at TO (repeatable)")
    c.add_argument("--threads", type=positive_int, default=1, help="torch threads per node (default %(default)s)")
    c.add_argument("--workers", type=positive_int, default=2, help="frames in flight per node (default %(default)s)")
    c.add_argument("--heartbeat-interval-ms", type=positive_int, default=100,
                   help="peers.yaml heartbeat_interval_ms (default %(default)s)")
    c.add_argument("--peer-timeout-ms", type=positive_int, default=500,
                   help="peers.yaml peer_timeout_ms: silent this long means dead (default %(default)s)")
    c.add_argument("--sync-timeout-ms", type=positive_int, default=1000,
                   help="peers.yaml sync_timeout_ms: a gather waits this long for a live peer (default %(default)s)")
    c.add_argument("--data", type=Path, help="ImageFolder to stream (default: the digits evaluation split)")
    c.add_argument("--workdir", type=Path, help="keep keys, peers.yaml and node logs here")
    c.add_argument("--plot", type=Path, help="write the latency timeline PNG")
    c.add_argument("--json", action="store_true", help="last stdout line: one JSON object")
    c.set_defaults(func=cmd_cluster)


def cmd_cluster(args) -> int:
    from robustdice.partitioner.data import evaluation_split
    from robustdice.partitioner.plan import load_plan
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
    with LocalCluster(args.plan, args.workdir, threads=args.threads, workers=args.workers,
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
