"""Helpers for mesh integration tests and the benchmark: configs on free ports, node processes.

Run as a script, this file is one mesh node driven by JSON lines on stdin; it prints JSON lines
(events, results, status) on stdout. Each node is its own OS process (subprocess: fork+exec),
so every ZeroMQ context is created in the process that uses it.
"""
from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from robustdice.mesh.config import PeerConfig, PeersConfig, write_peers

HERE = Path(__file__).resolve()


def free_ports(n: int) -> List[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def make_config(folder: Path, ids: Sequence[str], *, insecure: bool = False, heartbeat_interval_ms: int = 30,
                peer_timeout_ms: int = 200, sync_timeout_ms: int = 2000, clients: Sequence[str] = ()) -> Path:
    """Write keys and peers.yaml for `ids` on 127.0.0.1 free ports; returns the yaml path.

    `clients` names extra key pairs listed under `clients:` (their keys are in folder/keys too).
    """
    from robustdice.mesh.config import ClientKey
    from robustdice.mesh.keys import make_keypairs
    folder = Path(folder)
    publics = {} if insecure else make_keypairs(folder / "keys", list(ids) + list(clients))
    ports = free_ports(2 * len(ids))
    peers = tuple(PeerConfig(i, "127.0.0.1", ports[2 * k], publics.get(i), ports[2 * k + 1]) for k, i in enumerate(ids))
    config = PeersConfig(peers, None, heartbeat_interval_ms=heartbeat_interval_ms, peer_timeout_ms=peer_timeout_ms,
                         sync_timeout_ms=sync_timeout_ms, frame_timeout_ms=max(10000, 2 * sync_timeout_ms),
                         insecure=insecure, secret_key_file=None if insecure else "keys/{id}.key_secret",
                         clients=tuple(ClientKey(c, publics[c]) for c in clients))
    return write_peers(folder / "peers.yaml", config)


def slice_values(frame: int, stage: int, neuron_ids: np.ndarray, trailing: Sequence[int]) -> np.ndarray:
    """The deterministic 'activation' of neurons: every holder of a neuron computes the same rows."""
    ids = np.asarray(neuron_ids, dtype=np.int64).reshape((-1,) + (1,) * len(trailing))
    inner = np.arange(int(np.prod(trailing)) if trailing else 1, dtype=np.int64).reshape(tuple(trailing))
    return ((frame * 7919 + stage * 104729 + ids * 31 + inner) % 65521).astype(np.float32)


def assignment(rng: np.random.Generator, ids: Sequence[str], n_neurons: int, replicas: float = 0.3) -> Dict[str, List[int]]:
    """Each neuron on one random node, a fraction of them also on a second node; some nodes may get none."""
    holders: Dict[str, List[int]] = {i: [] for i in ids}
    for neuron in range(n_neurons):
        owners = rng.choice(len(ids), size=2 if rng.random() < replicas else 1, replace=False)
        for o in owners:
            holders[ids[o]].append(neuron)
    return holders


def blocking_gather(mesh, frame: int, stage: int, local, holders: Dict[str, np.ndarray], n_ids: int):
    """Begin (frame, stage), send our slice, and serve the mesh until that gather completes.

    The way a test or a benchmark uses the mesh alone: the node's handler never blocks.
    """
    others = {p: np.asarray(h) for p, h in holders.items() if p != mesh.self_id and len(h)}
    # Everyone else needs our rows (we send nothing when we hold none); we wait for those who hold some.
    send_to = [p for p in holders if p != mesh.self_id] if len(local.neuron_ids) else []
    mesh.begin_gather(frame, stage, local, others, n_ids, send_to=send_to)
    mesh.flush()
    while True:
        done = [r for r in mesh.take_completed() if (r.frame, r.stage) == (frame, stage)]
        if done:
            return done[0]
        mesh.poll_once()


def assembled(local, result, n_ids: int):
    """Our slice and the received pieces as one array, first copy winning; and the missing mask."""
    trailing = local.array.shape[1:]
    out = np.zeros((n_ids,) + tuple(trailing), dtype=local.array.dtype)
    covered = np.zeros(n_ids, dtype=bool)
    for ids, rows in [(local.neuron_ids, local.array)] + [(p.neuron_ids, p.array) for p in result.pieces]:
        ids = np.asarray(ids, dtype=np.int64)
        fresh = ~covered[ids]
        out[ids[fresh]] = rows[fresh]
        covered[ids] = True
    return out, ~covered


# ---------------------------------------------------------------- the node process

def _emit(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def node_main(argv: Sequence[str]) -> int:
    import argparse
    import zmq
    from robustdice.mesh import Mesh, SliceData, load_peers

    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--plan-hash", default="plan-A")
    args = parser.parse_args(argv)
    # Every membership event, also those inside a blocking gather, goes to the test side.
    mesh = Mesh(load_peers(args.config), args.id, args.plan_hash,
                on_event=lambda e: _emit({"event": e.kind.value, "peer": e.peer_id, "t": e.now_s,
                                          "restarted": e.restarted}))
    mesh.start()
    poller = zmq.Poller()
    for s in mesh.sockets:
        poller.register(s, zmq.POLLIN)
    stdin_fd = sys.stdin.fileno()
    poller.register(stdin_fd, zmq.POLLIN)
    _emit({"event": "ready", "id": args.id, "pid": os.getpid(), "incarnation": mesh.incarnation})
    pending = b""

    def run_gather(cmd, frame, stage):
        holders = {p: np.asarray(v, dtype=np.int64) for p, v in cmd["holders"].items()}
        mine = holders.get(args.id, np.zeros(0, np.int64))
        trailing = tuple(cmd.get("trailing", [3]))
        local = SliceData(mine, slice_values(frame, stage, mine, trailing))
        t0 = time.monotonic()
        result = blocking_gather(mesh, frame, stage, local, holders, cmd["n"])
        full, missing = assembled(local, result, cmd["n"])
        expected = slice_values(frame, stage, np.arange(cmd["n"]), trailing)
        expected[missing] = 0
        return {"frame": frame, "stage": stage, "exact": bool(np.array_equal(full, expected)),
                "zero": np.flatnonzero(missing).tolist(), "contributors": sorted(result.contributors),
                "released": dict(result.released), "timed_out": result.timed_out, "elapsed_ms": result.elapsed_ms,
                "wall_ms": (time.monotonic() - t0) * 1e3}

    try:
        while True:
            ready = dict(poller.poll(mesh.next_due(time.monotonic()) * 1000.0))
            mesh.process(time.monotonic())
            if stdin_fd not in ready:
                continue
            chunk = os.read(stdin_fd, 65536)
            if not chunk:
                return 0
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                cmd = json.loads(line)
                op = cmd["op"]
                if op == "quit":
                    return 0
                if op == "status":
                    _emit({"event": "status", **mesh.status()})
                elif op == "gathers":
                    # Several frames x stages, one after the other, as the engine would run them.
                    out = []
                    for frame in cmd["frames"]:
                        for stage in range(cmd["stages"]):
                            out.append(run_gather(cmd, frame, stage))
                    _emit({"event": "gathers", "results": out})
    finally:
        mesh.close()


# ---------------------------------------------------------------- the test side

class Node:
    def __init__(self, config: Path, node_id: str, plan_hash: str = "plan-A"):
        self.id = node_id
        self.proc = subprocess.Popen([sys.executable, str(HERE), "--config", str(config), "--id", node_id,
                                      "--plan-hash", plan_hash],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=str(HERE.parent))
        self.lines: "queue.Queue[dict]" = queue.Queue()
        self.events: List[dict] = []  # membership events seen so far
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            self.lines.put(json.loads(raw))

    def command(self, **cmd) -> None:
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()

    def wait_for(self, predicate: Callable[[dict], bool], timeout_s: float) -> dict:
        """The first line satisfying predicate; membership events are also kept in `events`."""
        deadline = time.monotonic() + timeout_s
        for e in self.events:
            if predicate(e):
                return e
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"node {self.id}: condition not met in {timeout_s} s (events: {self.events})")
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    raise RuntimeError(f"node {self.id} exited with {self.proc.returncode}") from None
                continue
            if line.get("event") in ("joined", "died", "rejoined", "refused"):
                self.events.append(line)
            if predicate(line):
                return line

    def request(self, event: str, timeout_s: float = 30.0, **cmd) -> dict:
        self.command(**cmd)
        return self.wait_for(lambda l: l.get("event") == event, timeout_s)

    def status(self) -> dict:
        return self.request("status", op="status")

    def signal(self, sig: int) -> float:
        t = time.monotonic()
        os.kill(self.proc.pid, sig)
        return t

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except (BrokenPipeError, OSError):
                pass
        self._reader.join(timeout=5)


class Cluster:
    """Node processes for the ids in `config`; `with Cluster(...) as c:` kills them all at the end."""

    def __init__(self, config: Path, ids: Sequence[str], plan_hashes: Optional[Dict[str, str]] = None):
        self.config = config
        self.ids = list(ids)
        self.plan_hashes = plan_hashes or {}
        self.nodes: Dict[str, Node] = {}
        self.retired: List[Node] = []

    def __enter__(self) -> "Cluster":
        try:
            for i in self.ids:
                self.start(i)
            for i in self.ids:
                self.nodes[i].wait_for(lambda l: l.get("event") == "ready", 30)
        except BaseException:
            self.close()
            raise
        return self

    def start(self, node_id: str) -> Node:
        if node_id in self.nodes:
            self.retired.append(self.nodes.pop(node_id))
        node = self.nodes[node_id] = Node(self.config, node_id, self.plan_hashes.get(node_id, "plan-A"))
        return node

    def wait_all_joined(self, ids: Optional[Sequence[str]] = None, timeout_s: float = 20) -> None:
        ids = list(ids or self.ids)
        for i in ids:
            for j in ids:
                if i != j:
                    self.nodes[i].wait_for(lambda l, j=j: l.get("event") in ("joined", "rejoined") and l["peer"] == j,
                                           timeout_s)
        # Joined is "we hear it"; a node counts a peer in a frame only once a heartbeat of the
        # peer says it hears us too. Before that, a heartbeat still on its way may say the peer
        # cannot hear a frame's origin, and the origin's gather rightly releases it.
        deadline = time.monotonic() + timeout_s
        for i in ids:
            while not all(self.nodes[i].status()["peers"][j]["hears_us"] for j in ids if j != i):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{i} is not heard back by all of {ids}: {self.nodes[i].status()['peers']}")

    def gathers(self, ids: Sequence[str], timeout_s: float = 60, **cmd) -> Dict[str, List[dict]]:
        for i in ids:
            self.nodes[i].command(op="gathers", **cmd)
        return {i: self.nodes[i].wait_for(lambda l: l.get("event") == "gathers", timeout_s)["results"] for i in ids}

    def close(self) -> None:
        for node in list(self.nodes.values()) + self.retired:
            node.stop()

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    # Run from tests/integration; make the repository importable the same way pytest does.
    sys.exit(node_main(sys.argv[1:]))
