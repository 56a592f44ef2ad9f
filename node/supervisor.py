"""`robustdice-node`: the parent that supervises the event handler and the inference engine.

    robustdice-node --peers peers.yaml [--id ID] [--plan DIR] [--threads N] [--check]

Start-up: check peers.yaml, the plan and this device's shard (node/config.py), make a private run
folder for the ipc socket, start the engine, and once it is ready the handler; each writes
"ready" on a pipe the supervisor gives it. Once both are ready: sd_notify READY=1 (when
NOTIFY_SOCKET is set). The handler then writes status lines on its pipe (serving, refused by
every peer, ...), which go to systemd as STATUS=.

The order of start-up and shutdown is a small pure state machine (`transition`), as
supervisord's states.py keeps process states: the shell only turns its actions into processes
and signals.

Child death policy: if either child dies, the node exits non-zero (after stopping the other
child) and lets systemd restart it (Restart=on-failure). A restart is a new process with a new
incarnation, which the peers' membership sees as a rejoin: one recovery path, the same as for a
crashed board, rather than a second, in-process one.

Shutdown on SIGTERM/SIGINT: the handler first (no new frames, peers see us leave), then the
engine, each given a grace period, then SIGKILL; the run folder is removed in `finally`. The
whole takes under 5 s. Signal handlers only set a flag; the loop acts on it.
"""
from __future__ import annotations

import argparse
import enum
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable, List, Optional, Tuple

from .errors import NodeError
from .process import PROCESS_NAMES, set_process_name
from .sdnotify import Notifier

log = logging.getLogger("robustdice.node")

READY_TIMEOUT_S = 300.0       # a large shard on a slow SD card takes a while to load
CHILD_GRACE_S = 2.0           # per child; handler + engine stay within the 5 s stop budget
POLL_S = 0.2


class State(str, enum.Enum):
    STARTING_ENGINE = "starting engine"
    STARTING_HANDLER = "starting handler"
    RUNNING = "running"
    STOPPING = "stopping"


class Event(str, enum.Enum):
    ENGINE_READY = "engine ready"
    HANDLER_READY = "handler ready"
    CHILD_EXITED = "child exited"
    SIGNALLED = "signalled"
    READY_TIMEOUT = "ready timeout"


class Action(str, enum.Enum):
    START_HANDLER = "start handler"
    NOTIFY_READY = "notify ready"
    STOP = "stop"                 # stop the children, handler first, and exit


def transition(state: State, event: Event) -> Tuple[State, Optional[Action], int]:
    """(next state, action, exit status if the node stops). Pure."""
    if state == State.STOPPING:
        return state, None, 0
    if event == Event.SIGNALLED:
        return State.STOPPING, Action.STOP, 0
    if event in (Event.CHILD_EXITED, Event.READY_TIMEOUT):
        return State.STOPPING, Action.STOP, 1
    if state == State.STARTING_ENGINE and event == Event.ENGINE_READY:
        return State.STARTING_HANDLER, Action.START_HANDLER, 0
    if state == State.STARTING_HANDLER and event == Event.HANDLER_READY:
        return State.RUNNING, Action.NOTIFY_READY, 0
    return state, None, 0


def exec_child(argv: List[str], ready_fd: int) -> subprocess.Popen:
    """How a board starts a child: a new Python running `argv`, given the ready pipe."""
    return subprocess.Popen(argv + ["--ready-fd", str(ready_fd)], pass_fds=(ready_fd,))


class Child:
    """One child process and the pipe on which it says "ready", then status lines. `spawn` starts
    it: `exec_child`, or a fork from a warm local cluster (node/lab/warm.py)."""

    def __init__(self, name: str, argv: List[str], spawn: Callable = exec_child) -> None:
        self.name = name
        read_fd, write_fd = os.pipe()
        self.proc = spawn(argv, write_fd)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        self.fd: Optional[int] = read_fd
        self.ready = False
        self._partial = b""

    def read_lines(self) -> List[str]:
        """Lines the child wrote since the last call (sets `ready` on its "ready" line)."""
        if self.fd is None or not select.select([self.fd], [], [], 0)[0]:
            return []
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return []
        if not data:  # the child closed its end (it exited)
            os.close(self.fd)
            self.fd = None
            return []
        *lines, self._partial = (self._partial + data).split(b"\n")
        out = []
        for line in lines:
            text = line.decode("utf-8", "replace")
            if text == "ready":
                self.ready = True
            elif text.startswith("status "):
                out.append(text[len("status "):])
        return out

    def stop(self, grace_s: float) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.1f s: killing it", self.name, grace_s)
            self.proc.kill()
            self.proc.wait()


def build_parser() -> argparse.ArgumentParser:
    """The `robustdice-node` command line (built without starting anything, for --help tests)."""
    from robustdice.mesh.config import COMPUTE_KINDS
    from robustdice.partitioner.argtypes import positive_int
    p = argparse.ArgumentParser(prog="robustdice-node", description="Run one RobustDiCE node (handler + engine).")
    p.add_argument("--peers", required=True, help="peers.yaml, the same file on every board")
    p.add_argument("--id", help="this node's id (default: the peer whose host is one of this machine's addresses)")
    p.add_argument("--plan", help="plan folder (default: peers.yaml's plan:)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads for the engine (default: $ROBUSTDICE_THREADS, else torch's own choice)")
    p.add_argument("--compute", choices=COMPUTE_KINDS,
                   help="where the engine computes (default: $ROBUSTDICE_COMPUTE, else peers.yaml's compute:, "
                        "else auto: cuda when torch sees a GPU)")
    p.add_argument("--dtype", choices=["float32", "float16"],
                   help="compute dtype, and the dtype of slices on the wire; every node must use the same "
                        "(default: $ROBUSTDICE_DTYPE, else peers.yaml's dtype:, else float32)")
    p.add_argument("--check", action="store_true",
                   help="check peers.yaml, this node's key, the plan and its shard, print a summary and exit "
                        "(default: off)")
    p.add_argument("--log-level", default=os.environ.get("ROBUSTDICE_LOG_LEVEL", "INFO").upper(),
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level (default: $ROBUSTDICE_LOG_LEVEL, else INFO)")
    return p


def main(argv: Optional[List[str]] = None, spawn: Callable = exec_child) -> int:
    """`spawn`: how the engine and the handler start (node/lab/warm.py forks them)."""
    p = build_parser()
    env_threads = os.environ.get("ROBUSTDICE_THREADS", "").strip()
    if env_threads and not env_threads.isdigit():
        p.error(f"ROBUSTDICE_THREADS={env_threads!r} is not a whole number of threads")
    args = p.parse_args(argv)
    if args.threads is None and env_threads and int(env_threads) > 0:
        args.threads = int(env_threads)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s node[%(process)d]: %(message)s")
    set_process_name(PROCESS_NAMES["supervisor"])
    from robustdice.mesh.errors import MeshError
    from robustdice.partitioner.errors import PartitionerError

    from .config import capacity_mismatch, load_node_config
    try:
        config = load_node_config(args.peers, args.id, args.plan, compute=args.compute, dtype=args.dtype)
        mismatch = capacity_mismatch(config.plan, config.peers, config.peers_path)
        if args.check:
            logits_shape = check_plan(config)
    except (NodeError, MeshError, PartitionerError) as exc:
        print(f"robustdice-node: error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        me, plan = config.me, config.plan
        print(f"ok: node {me.id} is device {config.device} of {plan.devices} in plan {plan.plan_hash[:12]} "
              f"({plan.model}, {plan.method}, {'signed by the operator' if config.peers.operator_public_key else 'UNSIGNED'}); "
              f"a forward of zeros gives logits {list(logits_shape)}; mesh {me.endpoint}, clients {me.client_endpoint}, "
              f"{'INSECURE (no CURVE)' if config.peers.insecure else 'CURVE key checked'}")
        if mismatch:
            print(f"warning: {mismatch}")
        return 0
    if mismatch:
        log.warning("%s", mismatch)
    return run(config, args, spawn)


def check_plan(config) -> tuple:
    """Load the plan exactly as the engine will (signature, graph, skeleton, this device's shard)
    and run one input of zeros through it on the CPU; the logits' shape. Raises NodeError."""
    from robustdice.partitioner.errors import PartitionerError

    from .engine import Engine
    try:
        engine = Engine(str(config.plan_dir), config.device, "cpu", "float32", config.peers.operator_public_key)
        return engine.check_forward()
    except PartitionerError:
        raise
    except Exception as exc:  # a graph that builds but cannot run: torch raises many kinds
        raise NodeError(f"plan {config.plan_dir}: a forward of zeros on device {config.device} fails: "
                        f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None


def run(config, args, spawn: Callable = exec_child) -> int:
    stopping = {"flag": False}

    def on_signal(signum, _frame):
        stopping["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    notifier = Notifier()
    # ipc:// paths must stay under 107 characters: a short private folder under /tmp (or systemd's
    # RuntimeDirectory) rather than anything derived from the (possibly long) plan path.
    run_dir = tempfile.mkdtemp(prefix=f"rdn-{config.me.id[:16]}-", dir=os.environ.get("RUNTIME_DIRECTORY"))
    endpoint = f"ipc://{run_dir}/engine.sock"
    common = ["--log-level", args.log_level]
    engine_argv = [sys.executable, "-m", "robustdice.node.engine", "--plan", str(config.plan_dir),
                   "--device", str(config.device), "--ipc", endpoint, "--compute", config.compute,
                   "--dtype", config.dtype] + common
    if args.threads:
        engine_argv += ["--threads", str(args.threads)]
    if config.peers.operator_public_key is not None:
        engine_argv += ["--operator-public-key", config.peers.operator_public_key]
    handler_argv = [sys.executable, "-m", "robustdice.node.handler", "--peers", str(config.peers_path),
                    "--id", config.me.id, "--plan", str(config.configured_dir), "--ipc", endpoint,
                    "--compute", config.compute, "--dtype", config.dtype] + common
    children: List[Child] = []
    state, status = State.STARTING_ENGINE, 0
    watchdog_s = notifier.watchdog_interval_s()
    next_watchdog = time.monotonic()
    deadline = time.monotonic() + READY_TIMEOUT_S
    try:
        # The engine first: the handler's first heartbeat tells the peers to count on this node,
        # so the shard must already be loaded by then.
        children.append(Child("engine", engine_argv, spawn))
        while state != State.STOPPING:
            events: List[Event] = []
            for c in children:
                for line in c.read_lines():
                    notifier.notify(f"STATUS={line}")
                code = c.proc.poll()
                if code is not None:
                    log.error("%s exited with %s: stopping the node so that systemd restarts it", c.name, code)
                    events.append(Event.CHILD_EXITED)
            if stopping["flag"]:
                events.append(Event.SIGNALLED)
            if state == State.STARTING_ENGINE and children[0].ready:
                events.append(Event.ENGINE_READY)
            if state == State.STARTING_HANDLER and children[-1].ready:
                events.append(Event.HANDLER_READY)
            if state != State.RUNNING and time.monotonic() > deadline:
                log.error("children not ready within %.0f s", READY_TIMEOUT_S)
                events.append(Event.READY_TIMEOUT)
            for event in events:
                state, action, code = transition(state, event)
                status = status or code
                if action == Action.START_HANDLER:
                    children.append(Child("handler", handler_argv, spawn))
                elif action == Action.NOTIFY_READY:
                    log.info("node %s ready (device %d, plan %s)", config.me.id, config.device,
                             config.plan.plan_hash[:12])
                    notifier.notify(f"READY=1\nSTATUS=started device {config.device} of plan "
                                    f"{config.plan.plan_hash[:12]}\nMAINPID={os.getpid()}")
            if watchdog_s and state == State.RUNNING and time.monotonic() >= next_watchdog:
                notifier.notify("WATCHDOG=1")
                next_watchdog = time.monotonic() + watchdog_s
            if state != State.STOPPING:
                time.sleep(POLL_S)  # the supervisor only watches; nothing waits on it
    finally:
        notifier.notify("STOPPING=1")
        for c in reversed(children):  # handler first: it stops taking frames, then the engine
            c.stop(CHILD_GRACE_S)
        shutil.rmtree(run_dir, ignore_errors=True)
        notifier.close()
    log.info("node %s stopped", config.me.id)
    return status


if __name__ == "__main__":
    sys.exit(main())
