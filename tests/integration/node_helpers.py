"""Helpers for the node integration tests: plans made once per session, settled clusters, processes."""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import psutil

from robustdice.node.lab.localcluster import LocalCluster

# The machine is shared and has 2 cores: generous deadlines, never sleeps used as synchronisation.
START_TIMEOUT_S = 120.0
STOP_BUDGET_S = 5.0       # the supervisor's documented stop budget on SIGTERM
DETECTION_SLACK_MS = 250  # detection bound = peer_timeout + heartbeat + this (loaded machine)

_PLANS: Dict[tuple, Path] = {}


def make_plan(tmp_path_factory, model: str, devices: int, method: str, **kwargs) -> Path:
    """Partition in-process once per test session (several modules share a plan)."""
    from robustdice.partitioner.core.partition import PartitionRequest, partition

    key = (model, devices, method, tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v)
                                                 for k, v in kwargs.items())))
    if key not in _PLANS:
        out = tmp_path_factory.mktemp(f"plan-{model}-{method}") / "plan"
        partition(PartitionRequest(model, devices, method, out, show_progress=False, **kwargs))
        _PLANS[key] = out
    return _PLANS[key]


def start_pyzmq_gc() -> None:
    """Start pyzmq's zero-copy garbage collector now, outside any test's leak check.

    The first `send(copy=False)` of a large buffer in a process (e.g. an AlexNet input) starts
    pyzmq's gc thread with its own context: 7 fds that live until the process exits. That is
    pyzmq's, not a leak of the node, so it is started once before the leak checks run.
    """
    import numpy as np
    import zmq

    with zmq.Context() as ctx:
        a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
        a.bind("inproc://warm-pyzmq-gc")
        b.connect("inproc://warm-pyzmq-gc")
        a.send(np.zeros(1 << 18, np.uint8), copy=False)
        b.recv()
        a.close(0)
        b.close(0)


def robustdice_cli() -> List[str]:
    script = Path(sys.executable).with_name("robustdice")
    return [str(script)] if script.exists() else [sys.executable, "-m", "robustdice.node.cli"]


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.1):
    """Poll `predicate` until it returns something truthy; fail with `what` after the deadline.
    Many predicates ask live nodes for their status (~5 ms of CPU per node per ask): tests that
    need a finer grain say so with `interval_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)  # polling a condition with a deadline, not synchronising on sleep


def start_cluster(cluster: LocalCluster, devices: Optional[Sequence[int]] = None) -> None:
    devices = list(range(len(cluster.ids))) if devices is None else list(devices)
    for d in devices:
        cluster.start_node(d)
    # all_alive also waits for each handler to count every other node in new frames (its grace).
    cluster.wait_until(cluster.all_alive(devices), START_TIMEOUT_S, "every node to count on every other")


def start_node_with_plan(cluster: LocalCluster, device: int, plan_dir: Path, env=None) -> subprocess.Popen:
    """Like LocalCluster.start_node, but with `--plan` overriding peers.yaml's plan (signed by
    the cluster's operator key, as a real deploy's would be)."""
    cluster.sign(plan_dir)
    return cluster.start_node(device, extra=["--plan", str(plan_dir)], env=env)


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET: what a node tells systemd."""

    def __init__(self, folder: Path):
        import socket
        self.path = str(folder / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: List[str] = []

    def receive(self) -> List[str]:
        """Every datagram received so far (those already read included)."""
        import socket
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except socket.timeout:
                return self.messages

    def close(self) -> None:
        self.sock.close()


def node_children(cluster: LocalCluster, device: int) -> Dict[str, psutil.Process]:
    """{'engine': Process, 'handler': Process} of one node's supervisor."""
    return cluster.node_processes(device)


def run_dir_of(engine: psutil.Process) -> Path:
    """The supervisor's private ipc folder, from the engine's `--ipc ipc://DIR/engine.sock`
    (a cold cluster's: a warm one's forks show the zygote's command line)."""
    cmdline = engine.cmdline()
    endpoint = cmdline[cmdline.index("--ipc") + 1]
    m = re.fullmatch(r"ipc://(.+)/engine\.sock", endpoint)
    assert m, endpoint
    return Path(m.group(1))


def processes_mentioning(text: str) -> List[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(text in arg for arg in (p.info["cmdline"] or [])):
                out.append(p)
        except psutil.Error:
            continue
    return out


def log_lines(path: Path) -> List[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []
