"""A cluster of real robustdice-node processes on one machine: keys, peers.yaml, start, kill,
pause, resume, status — for tests, benchmarks, `robustdice cluster` and `make demo`.

Each node runs in its own process group, so a kill takes the whole node (supervisor, handler,
engine). On 127.0.0.1 every node gets free ports; with `hosts` (netlab.py's namespaces) every
node binds 5550/5551 (and 5552 for metrics, with `metrics=True`) on its own address.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from robustdice.mesh.config import (DEFAULT_FRAME_TIMEOUT_MS, DEFAULT_HEARTBEAT_INTERVAL_MS,
                                    DEFAULT_PEER_TIMEOUT_MS, DEFAULT_SYNC_TIMEOUT_MS)

from ..errors import NodeError

log = logging.getLogger(__name__)


# How often wait_until asks every node for its status. One round costs ~19 ms of CPU (a CURVE
# handshake and a status body per node, 4 nodes; 7.5 ms of it the asker's): at the 50 ms it was,
# ~16 rounds a second, a wait took ~0.3 of a core between the asker and the nodes.
STATUS_POLL_S = 0.2


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
    """N robustdice-node processes with generated keys and peers.yaml: on 127.0.0.1 (free
    ports), or on the given `hosts` (one per device, ports 5550/5551), each started behind
    `prefix(device)` (e.g. `ip netns exec NS`, see netlab.py)."""

    NODE_PORT = 5550

    def __init__(self, plan_dir, workdir=None, *, threads: int = 1,
                 heartbeat_interval_ms: int = DEFAULT_HEARTBEAT_INTERVAL_MS, peer_timeout_ms: int = DEFAULT_PEER_TIMEOUT_MS,
                 sync_timeout_ms: int = DEFAULT_SYNC_TIMEOUT_MS, frame_timeout_ms: int = DEFAULT_FRAME_TIMEOUT_MS,
                 log_level: str = "INFO", insecure: bool = False,
                 hosts: Optional[Sequence[str]] = None, prefix=None, dtype: str = "float32",
                 metrics: bool = False, warm: Optional[bool] = None) -> None:
        from robustdice.partitioner.core.plan import load_plan, plan_dir as to_plan_dir
        self.plan_dir = to_plan_dir(Path(plan_dir)).resolve()
        self.plan = load_plan(self.plan_dir)
        self._tmp = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="rdc-")
            workdir = self._tmp.name
        # Absolute: peers.yaml's relative paths are resolved against its own folder.
        self.workdir = Path(workdir).resolve()
        self.threads, self.log_level = threads, log_level
        self.ids = [f"n{d}" for d in range(self.plan.devices)]
        self.procs: Dict[int, "subprocess.Popen | WarmProcess"] = {}   # Popen's interface either way
        self.logs: Dict[int, Path] = {}
        self.hosts, self.prefix, self.dtype = hosts, prefix, dtype
        self.metrics = metrics   # every node serves Prometheus metrics (metrics_port in peers.yaml)
        # Nodes forked from one process that imported torch (warm.py), unless each must start
        # behind a prefix (a network namespace): 4 x 3 s of torch imports saved per cluster start.
        if warm and prefix is not None:
            raise NodeError("a warm cluster cannot start its nodes behind a prefix (warm=False)")
        self.warm = prefix is None if warm is None else warm
        self._zygote = None
        self.frame_timeout_ms = frame_timeout_ms
        self.peers_path = self._write_config(heartbeat_interval_ms, peer_timeout_ms, sync_timeout_ms, insecure)

    def _write_config(self, heartbeat_ms: int, timeout_ms: int, sync_ms: int, insecure: bool) -> Path:
        from robustdice.mesh.config import ClientKey, PeerConfig, PeersConfig, write_peers
        from robustdice.mesh.keys import make_keypairs
        keys_dir = self.workdir / "keys"
        publics = {} if insecure else make_keypairs(keys_dir, self.ids + ["client"])
        operator_public_key = None
        self.operator_key = None
        if not insecure:
            # The lab is its own operator: a key of its own signs the plan(s) its nodes run.
            from robustdice.partitioner.core.signing import make_operator_key
            _, self.operator_key, operator_public_key = make_operator_key(keys_dir / "operator")
            self.sign(self.plan_dir)
        per_node = 3 if self.metrics else 2
        if self.hosts is None:
            ports = free_ports(per_node * len(self.ids))
            peers = tuple(PeerConfig(nid, "127.0.0.1", ports[per_node * d], publics.get(nid), ports[per_node * d + 1],
                                     ports[per_node * d + 2] if self.metrics else None)
                          for d, nid in enumerate(self.ids))
        else:
            peers = tuple(PeerConfig(nid, self.hosts[d], self.NODE_PORT, publics.get(nid), self.NODE_PORT + 1,
                                     self.NODE_PORT + 2 if self.metrics else None)
                          for d, nid in enumerate(self.ids))
        config = PeersConfig(
            peers=peers, plan=self.plan_dir, heartbeat_interval_ms=heartbeat_ms, peer_timeout_ms=timeout_ms,
            sync_timeout_ms=sync_ms, frame_timeout_ms=self.frame_timeout_ms, dtype=self.dtype, insecure=insecure,
            secret_key_file=None if insecure else str(keys_dir / "{id}.key_secret"),
            clients=() if insecure else (ClientKey("client", publics["client"]),), base_dir=self.workdir,
            operator_public_key=operator_public_key)
        self.config = config
        self.key_path = None if insecure else keys_dir / "client.key_secret"
        return write_peers(self.workdir / "peers.yaml", config)

    def sign(self, plan_dir) -> None:
        """Sign `plan_dir` with this cluster's operator key, so that its nodes run it (a node given
        another plan by --plan checks it too); nothing to do for an insecure cluster."""
        if self.operator_key is not None:
            from robustdice.partitioner.core.plan import sign_plan
            sign_plan(plan_dir, self.operator_key)

    # ------------------------------------------------------------ processes
    def start_node(self, device: int, extra: Sequence[str] = (), env: Optional[Dict[str, str]] = None,
                   warm: Optional[bool] = None):
        """Start device's robustdice-node (`extra`: more arguments, e.g. --plan for another plan;
        `env`: more environment, e.g. NOTIFY_SOCKET; `warm`: this node forked from the cluster's
        warm process, or a new Python as a board starts it; default: the cluster's). A
        subprocess.Popen, or a warm.WarmProcess with the same interface."""
        log_path = self.workdir / f"{self.ids[device]}.log"
        # A board's StateDirectory: where a node remembers a roll-out's plan across restarts.
        env = dict(env or {}, STATE_DIRECTORY=str(self.workdir / "state"))
        args = ["--peers", str(self.peers_path), "--id", self.ids[device], "--threads", str(self.threads),
                "--log-level", self.log_level, *extra]
        warm = self.warm if warm is None else warm
        if warm and self.prefix is not None:
            raise NodeError("a node behind a prefix cannot start warm (warm=False)")
        if warm:
            if self._zygote is None:
                from .warm import Zygote
                self._zygote = Zygote(str(self.workdir))
            proc = self._zygote.start(args, dict(os.environ, **(env or {})), str(log_path))
        else:
            argv = [sys.executable, "-m", "robustdice.node.supervisor", *args]
            if self.prefix is not None:
                argv = list(self.prefix(device)) + argv
            with open(log_path, "ab") as out:
                proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                        env=dict(os.environ, **env))
        self.procs[device] = proc
        self.logs[device] = log_path
        return proc

    def node_processes(self, device: int) -> Dict[str, "psutil.Process"]:
        """{'engine': Process, 'handler': Process} of device's node, by the names the node gives
        its processes (node/process.py): on a warm cluster's forks as on exec'd children."""
        import psutil
        from ..process import process_role
        out = {}
        for child in psutil.Process(self.procs[device].pid).children():
            try:
                role = process_role(child.name())
            except psutil.NoSuchProcess:
                continue
            if role in ("engine", "handler"):
                out[role] = child
        return out

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
        if self._zygote is not None:
            self._zygote.close()
            self._zygote = None
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ views
    def status(self, timeout_s: float = 2.0, request: Optional[Dict] = None) -> List[Dict]:
        from ..client import status_all
        return status_all(self.config, self.key_path, timeout_s, request)

    def metrics_url(self, device: int) -> str:
        peer = self.config.peers[device]
        if peer.metrics_port is None:
            raise NodeError(f"node {peer.id} serves no metrics: make the cluster with metrics=True")
        return f"http://{peer.host}:{peer.metrics_port}/metrics"

    def wait_until(self, predicate, timeout_s: float, what: str, interval_s: float = STATUS_POLL_S) -> List[Dict]:
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
        submitted now on all of them (a peer counts for new frames only once the link works both
        ways, so "alive" alone would let the first frames be zero-filled)."""
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
