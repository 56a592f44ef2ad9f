"""Mesh benchmark: all-gather throughput vs raw pyzmq, failure detection time, idle heartbeat CPU.

    python benchmarks/mesh_gather.py --json [--out benchmarks/results/mesh_gather.json]

One OS process per node on 127.0.0.1. Figures:
  gather_vs_raw_throughput_ratio  4-node all-gather of 1 MiB slices through the mesh (one gather
                                  at a time, tests/integration/mesh_procs.blocking_gather), vs the
                                  same bytes over raw pyzmq PUSH/PULL (same CURVE setting), same run
  detection_ms                    SIGKILL a node, time until each survivor's `died` event
                                  (median and max over all survivors of >= 10 kills)
  heartbeat_cpu_fraction          an idle node's CPU (fraction of one core) at the default timings
The last stdout line is the JSON object (with --json).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import queue
import time
from pathlib import Path

import numpy as np
import psutil
import zmq

from robustdice.mesh import Mesh, SliceData, load_peers
from robustdice.mesh.config import DEFAULT_HEARTBEAT_INTERVAL_MS, DEFAULT_PEER_TIMEOUT_MS, PeerConfig, PeersConfig, write_peers
from robustdice.mesh.keys import make_keypairs, load_secret
from robustdice.mesh.transport import curve_client, curve_server

from _results import write_result

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
from mesh_procs import blocking_gather  # noqa: E402  (the mesh alone, as the tests drive it)

IDS = ["n0", "n1", "n2", "n3"]
SLICE_BYTES = 1 << 20
TRAILING = 4096  # float32 row of 16 KiB: 64 rows make a 1 MiB slice
ROWS = SLICE_BYTES // (4 * TRAILING)
N_NEURONS = ROWS * len(IDS)
# Untimed rounds first: TCP windows, allocator and page cache settle before the clock starts.
WARMUP_ROUNDS = 10


def emit(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------ node roles (child processes)

def wait_go(poller: zmq.Poller, on_idle) -> None:
    """Serve `on_idle` until the parent writes a line on stdin."""
    fd = sys.stdin.fileno()
    poller.register(fd, zmq.POLLIN)
    while True:
        if fd in dict(poller.poll(20)):
            os.read(fd, 4096)
            poller.unregister(fd)
            return
        on_idle()


def role_mesh(config_path: str, node_id: str, rounds: int, idle: bool) -> None:
    config = load_peers(config_path)
    mesh = Mesh(config, node_id, "bench", on_event=lambda e: emit({"event": e.kind, "peer": e.peer_id, "t": e.now_s}))
    mesh.start()
    try:
        poller = zmq.Poller()
        for s in mesh.sockets:
            poller.register(s, zmq.POLLIN)
        emit({"event": "ready", "pid": os.getpid()})
        if idle:  # serve heartbeats until killed
            while True:
                poller.poll(mesh.next_due(time.monotonic()) * 1000.0)
                mesh.process(time.monotonic())
        while mesh.membership.alive() != set(config.ids) - {node_id}:
            mesh.poll_once(0.05)
        emit({"event": "all_joined"})
        wait_go(poller, lambda: mesh.poll_once(0.01))
        k = IDS.index(node_id)
        holders = {i: np.arange(j * ROWS, (j + 1) * ROWS) for j, i in enumerate(IDS)}
        local = SliceData(holders[node_id], np.full((ROWS, TRAILING), k, np.float32))
        bad = 0
        for r in range(WARMUP_ROUNDS + rounds):
            if r == WARMUP_ROUNDS:
                t0 = time.perf_counter()
            result = blocking_gather(mesh, r, 0, local, holders, N_NEURONS)
            bad += bool(result.uncovered or result.released)
        elapsed = time.perf_counter() - t0
        emit({"event": "done", "elapsed_s": elapsed, "bad": bad, "counters": dict(mesh.counters)})
        # keep serving so that peers finishing later are not left without us
        wait_go(poller, lambda: mesh.poll_once(0.01))
    finally:
        mesh.close()


def role_raw(config_path: str, node_id: str, rounds: int) -> None:
    config = load_peers(config_path)
    ctx = zmq.Context()
    keys = None if config.insecure else load_secret(config.secret_key_path(node_id))
    auth = None
    if keys:
        from zmq.auth.thread import ThreadAuthenticator
        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
    me = config.peer(node_id)
    pull = ctx.socket(zmq.PULL)
    if keys:
        curve_server(pull, *keys, "*")
    pull.bind(f"tcp://{me.host}:{me.port}")
    pushes = []
    for p in config.peers:
        if p.id != node_id:
            s = ctx.socket(zmq.PUSH)
            if keys:
                curve_client(s, *keys, p.public_key.encode())
            s.connect(p.endpoint)
            pushes.append(s)
    payload = np.full(SLICE_BYTES // 4, 1, np.float32)
    poller = zmq.Poller()
    emit({"event": "ready", "pid": os.getpid()})
    # connection warm-up: one tagged message to each peer, wait for all of theirs
    for s in pushes:
        s.send_multipart([(2**62).to_bytes(8, "little"), b""])
    for _ in pushes:
        pull.recv_multipart()
    emit({"event": "all_joined"})
    wait_go(poller, lambda: None)
    pending = {}
    for r in range(WARMUP_ROUNDS + rounds):
        if r == WARMUP_ROUNDS:
            t0 = time.perf_counter()
        tag = r.to_bytes(8, "little")
        for s in pushes:
            s.send_multipart([tag, payload], copy=False)
        while pending.get(r, 0) < len(pushes):
            frames = pull.recv_multipart(copy=False)
            got = int.from_bytes(frames[0].bytes, "little")
            np.frombuffer(frames[1].buffer, np.float32)  # same zero-copy view the mesh makes
            pending[got] = pending.get(got, 0) + 1
        pending.pop(r)
    elapsed = time.perf_counter() - t0
    emit({"event": "done", "elapsed_s": elapsed, "bad": 0})
    wait_go(poller, lambda: None)
    for s in pushes + [pull]:
        s.close(linger=0)
    if auth:
        auth.stop()
    ctx.term()


# ------------------------------------------------------------------ the parent

class Proc:
    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.lines: "queue.Queue[dict]" = queue.Queue()
        self.seen: list = []  # lines already read, so that a later wait can match an earlier line
        threading.Thread(target=lambda: [self.lines.put(json.loads(l)) for l in self.proc.stdout], daemon=True).start()

    def wait(self, pred, timeout_s=60.0) -> dict:
        deadline = time.monotonic() + timeout_s
        for i, line in enumerate(self.seen):
            if pred(line):
                return self.seen.pop(i)
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise TimeoutError(f"pid {self.proc.pid}: no matching line")
                continue
            if pred(line):
                return line
            self.seen.append(line)

    def go(self) -> None:
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


def make_config(folder: Path, heartbeat_interval_ms: int, peer_timeout_ms: int, insecure: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    publics = {} if insecure else make_keypairs(folder / "keys", IDS)
    socks = [socket.socket() for _ in IDS]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    peers = tuple(PeerConfig(i, "127.0.0.1", p, publics.get(i), p + 1) for i, p in zip(IDS, ports))
    config = PeersConfig(peers, None, heartbeat_interval_ms=heartbeat_interval_ms, peer_timeout_ms=peer_timeout_ms,
                         insecure=insecure, secret_key_file=None if insecure else "keys/{id}.key_secret")
    return write_peers(folder / "peers.yaml", config)


def run_all_gather(config: Path, role: str, rounds: int) -> float:
    procs = [Proc("--role", role, "--config", str(config), "--id", i, "--rounds", str(rounds)) for i in IDS]
    try:
        for p in procs:
            p.wait(lambda l: l["event"] == "all_joined")
        for p in procs:
            p.go()
        done = [p.wait(lambda l: l["event"] == "done", 300) for p in procs]
        if any(d["bad"] for d in done):
            raise RuntimeError(f"{role}: incomplete gathers: {done}")
        return max(d["elapsed_s"] for d in done)
    finally:
        for p in procs:
            p.kill()


def run_detection(config: Path, kills: int, cpu_seconds: float):
    procs = {i: Proc("--role", "idle", "--config", str(config), "--id", i) for i in IDS}
    victim, survivors = IDS[-1], IDS[:-1]
    try:
        for i in IDS:
            for j in IDS:
                if i != j:
                    procs[i].wait(lambda l, j=j: l["event"] in ("joined", "rejoined") and l["peer"] == j)
        node = psutil.Process(procs["n0"].proc.pid)
        before = node.cpu_times()
        t0 = time.monotonic()
        time.sleep(cpu_seconds)  # the measurement window itself, not a synchronisation
        after = node.cpu_times()
        cpu_fraction = ((after.user + after.system) - (before.user + before.system)) / (time.monotonic() - t0)
        detections = []
        for _ in range(kills):
            t_kill = time.monotonic()
            os.kill(procs[victim].proc.pid, signal.SIGKILL)
            for s in survivors:
                died = procs[s].wait(lambda l: l["event"] == "died" and l["peer"] == victim, 30)
                detections.append((died["t"] - t_kill) * 1000.0)
            procs[victim].kill()
            procs[victim] = Proc("--role", "idle", "--config", str(config), "--id", victim)
            for s in survivors:
                procs[s].wait(lambda l: l["event"] == "rejoined" and l["peer"] == victim, 30)
        return detections, cpu_fraction
    finally:
        for p in procs.values():
            p.kill()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the JSON object as the last line")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "mesh_gather.json"))
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="alternating raw/mesh runs; medians are reported")
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--cpu-seconds", type=float, default=5.0)
    parser.add_argument("--insecure", action="store_true", help="plaintext for both the mesh and the raw run")
    parser.add_argument("--role", choices=["mesh", "raw", "idle"], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--id", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "raw":
        role_raw(args.config, args.id, args.rounds)
        return 0
    if args.role in ("mesh", "idle"):
        role_mesh(args.config, args.id, args.rounds, idle=args.role == "idle")
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        gather_cfg = make_config(Path(tmp) / "g", DEFAULT_HEARTBEAT_INTERVAL_MS, DEFAULT_PEER_TIMEOUT_MS, args.insecure)
        raw_cfg = make_config(Path(tmp) / "r", DEFAULT_HEARTBEAT_INTERVAL_MS, DEFAULT_PEER_TIMEOUT_MS, args.insecure)
        det_cfg = make_config(Path(tmp) / "d", DEFAULT_HEARTBEAT_INTERVAL_MS, DEFAULT_PEER_TIMEOUT_MS, args.insecure)
        # Alternate the two and keep the medians: on a shared machine one run can be slowed by
        # unrelated load, and alternating exposes both to the same conditions.
        raw_runs, mesh_runs = [], []
        for _ in range(args.repeats):
            raw_runs.append(run_all_gather(raw_cfg, "raw", args.rounds))
            mesh_runs.append(run_all_gather(gather_cfg, "mesh", args.rounds))
        raw_s, mesh_s = float(np.median(raw_runs)), float(np.median(mesh_runs))
        detections, cpu = run_detection(det_cfg, args.kills, args.cpu_seconds)
    per_node_bytes = args.rounds * SLICE_BYTES * (len(IDS) - 1)
    result = {
        "gather_vs_raw_throughput_ratio": round(raw_s / mesh_s, 3),
        "gather_MiB_per_s_per_node": round(per_node_bytes / mesh_s / 2**20, 1),
        "raw_MiB_per_s_per_node": round(per_node_bytes / raw_s / 2**20, 1),
        "raw_runs_s": [round(x, 3) for x in raw_runs], "gather_runs_s": [round(x, 3) for x in mesh_runs],
        "nodes": len(IDS), "slice_bytes": SLICE_BYTES, "rounds": args.rounds, "curve": not args.insecure,
        "detection_ms": {"median": round(float(np.median(detections)), 1), "max": round(float(np.max(detections)), 1),
                         "min": round(float(np.min(detections)), 1), "samples": len(detections), "kills": args.kills},
        "peer_timeout_ms": DEFAULT_PEER_TIMEOUT_MS,
        "heartbeat_interval_ms": DEFAULT_HEARTBEAT_INTERVAL_MS,
        "detection_bound_ms": 1.25 * (DEFAULT_PEER_TIMEOUT_MS + DEFAULT_HEARTBEAT_INTERVAL_MS),
        "heartbeat_cpu_fraction": round(cpu, 5),
        "cpu_window_s": args.cpu_seconds,
    }
    print(f"all-gather {result['gather_MiB_per_s_per_node']} MiB/s per node vs raw {result['raw_MiB_per_s_per_node']} "
          f"MiB/s: ratio {result['gather_vs_raw_throughput_ratio']} (target >= 0.7)")
    print(f"detection median {result['detection_ms']['median']} ms, max {result['detection_ms']['max']} ms "
          f"(bound {result['detection_bound_ms']} ms) over {args.kills} kills")
    print(f"idle heartbeat CPU {cpu * 100:.3f}% of one core (target < 1%)")
    write_result(result, args.out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
