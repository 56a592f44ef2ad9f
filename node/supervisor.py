"""`robustdice-node`: the parent that supervises the event handler and the inference engine.

    robustdice-node --peers peers.yaml [--id ID] [--plan DIR] [--threads N] [--workers K]

Start-up: check peers.yaml, the plan and this device's shard, make a private run folder for the
ipc socket, start the engine, and once it is ready the handler; each writes "ready" on a pipe
the supervisor gives it. Once both are ready: sd_notify READY=1 (when NOTIFY_SOCKET is set).

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
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from .errors import NodeError
from .sdnotify import Notifier

log = logging.getLogger("robustdice.node")

READY_TIMEOUT_S = 300.0       # a large shard on a slow SD card takes a while to load
CHILD_GRACE_S = 2.0           # per child; handler + engine stay within the 5 s stop budget
POLL_S = 0.2


def _check(args) -> Dict[str, object]:
    """Validate configuration before starting anything; NodeError/ConfigError/PlanError name the cause."""
    from robustdice.mesh.config import load_peers, resolve_self
    from robustdice.mesh.keys import load_own_keys
    from robustdice.partitioner.plan import load_plan

    config = load_peers(args.peers)
    me = resolve_self(config, args.id)
    if not config.insecure:
        load_own_keys(config, me.id)  # a bad key file fails here, not later inside the handler
    plan_dir = Path(args.plan) if args.plan else config.plan
    if plan_dir is None:
        raise NodeError("no plan: give --plan DIR or set 'plan:' in peers.yaml")
    plan = load_plan(plan_dir)
    if plan.devices != len(config.peers):
        raise NodeError(f"plan {plan_dir} is for {plan.devices} devices but {args.peers} lists {len(config.peers)} peers")
    device = list(config.ids).index(me.id)
    shard = plan_dir / "shards" / f"{device}.pt"
    if not shard.exists():
        raise NodeError(f"shard for device {device} ({me.id}) is missing: {shard}")
    return {"config": config, "me": me, "plan": plan, "plan_dir": plan_dir, "device": device}


class Child:
    def __init__(self, name: str, argv: List[str]) -> None:
        self.name = name
        read_fd, write_fd = os.pipe()
        self.proc = subprocess.Popen(argv + ["--ready-fd", str(write_fd)], pass_fds=(write_fd,))
        os.close(write_fd)
        self.ready_fd: Optional[int] = read_fd
        self.ready = False

    def poll_ready(self) -> None:
        if self.ready_fd is None:
            return
        r, _, _ = select.select([self.ready_fd], [], [], 0)
        if r:
            data = os.read(self.ready_fd, 64)
            os.close(self.ready_fd)
            self.ready_fd = None
            self.ready = data.startswith(b"ready")

    def stop(self, grace_s: float) -> None:
        if self.ready_fd is not None:
            os.close(self.ready_fd)
            self.ready_fd = None
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
    from robustdice.partitioner.cli import positive_int
    p = argparse.ArgumentParser(prog="robustdice-node", description="Run one RobustDiCE node (handler + engine).")
    p.add_argument("--peers", required=True, help="peers.yaml, the same file on every board")
    p.add_argument("--id", help="this node's id (default: the peer whose host is one of this machine's addresses)")
    p.add_argument("--plan", help="plan folder (default: peers.yaml's plan:)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads for the engine (default: $ROBUSTDICE_THREADS, else torch's own choice)")
    p.add_argument("--workers", type=positive_int, default=2, help="frames in flight in the engine (default 2)")
    p.add_argument("--check", action="store_true",
                   help="check peers.yaml, this node's key, the plan and its shard, print a summary and exit")
    p.add_argument("--log-level", default=os.environ.get("ROBUSTDICE_LOG_LEVEL", "INFO").upper(),
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level (default: $ROBUSTDICE_LOG_LEVEL, else INFO)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    p = build_parser()
    env_threads = os.environ.get("ROBUSTDICE_THREADS", "").strip()
    if env_threads and not env_threads.isdigit():
        p.error(f"ROBUSTDICE_THREADS={env_threads!r} is not a whole number of threads")
    args = p.parse_args(argv)
    if args.threads is None and env_threads and int(env_threads) > 0:
        args.threads = int(env_threads)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s node[%(process)d]: %(message)s")
    from robustdice.mesh.errors import MeshError
    from robustdice.partitioner.errors import PartitionerError
    try:
        info = _check(args)
    except (NodeError, MeshError, PartitionerError) as exc:
        print(f"robustdice-node: error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        from robustdice.partitioner.runtime import load_shard
        try:
            load_shard(info["plan"], info["plan_dir"], info["device"])  # digest, plan hash, device
        except PartitionerError as exc:
            print(f"robustdice-node: error: {exc}", file=sys.stderr)
            return 2
        me, plan = info["me"], info["plan"]
        print(f"ok: node {me.id} is device {info['device']} of {plan.devices} in plan {plan.plan_hash[:12]} "
              f"({plan.model}, {plan.method}); mesh {me.endpoint}, clients {me.client_endpoint}, "
              f"{'INSECURE (no CURVE)' if info['config'].insecure else 'CURVE key checked'}")
        return 0

    stopping = {"flag": False}

    def on_signal(signum, _frame):
        stopping["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    notifier = Notifier()
    # ipc:// paths must stay under 107 characters: a short private folder under /tmp (or systemd's
    # RuntimeDirectory) rather than anything derived from the (possibly long) plan path.
    run_dir = tempfile.mkdtemp(prefix=f"rdn-{info['me'].id[:16]}-", dir=os.environ.get("RUNTIME_DIRECTORY"))
    endpoint = f"ipc://{run_dir}/engine.sock"
    children: List[Child] = []
    status = 0
    try:
        common = ["--log-level", args.log_level]
        engine_argv = [sys.executable, "-m", "robustdice.node.engine", "--plan", str(info["plan_dir"]),
                       "--device", str(info["device"]), "--ipc", endpoint, "--workers", str(args.workers)] + common
        if args.threads:
            engine_argv += ["--threads", str(args.threads)]
        handler_argv = [sys.executable, "-m", "robustdice.node.handler", "--peers", str(args.peers),
                        "--id", info["me"].id, "--plan", str(info["plan_dir"]), "--ipc", endpoint] + common
        # The engine first: the handler's first heartbeat tells the peers to count on this node,
        # so the shard must already be loaded by then (a rejoining node would otherwise make
        # them wait on slices it cannot compute yet).
        children.append(Child("engine", engine_argv))
        deadline = time.monotonic() + READY_TIMEOUT_S
        announced = False
        watchdog_s = notifier.watchdog_interval_s()
        next_watchdog = time.monotonic()
        while not stopping["flag"]:
            for c in children:
                c.poll_ready()
                code = c.proc.poll()
                if code is not None:
                    log.error("%s exited with %s: stopping the node so that systemd restarts it", c.name, code)
                    status = 1
                    stopping["flag"] = True
            if stopping["flag"]:
                break
            if not announced:
                if len(children) == 1 and children[0].ready:
                    children.append(Child("handler", handler_argv))
                elif len(children) == 2 and all(c.ready for c in children):
                    announced = True
                    log.info("node %s ready (device %d, plan %s)", info["me"].id, info["device"],
                             info["plan"].plan_hash[:12])
                    notifier.notify(f"READY=1\nSTATUS=serving device {info['device']} of plan "
                                    f"{info['plan'].plan_hash[:12]}\nMAINPID={os.getpid()}")
                elif time.monotonic() > deadline:
                    log.error("children not ready within %.0f s", READY_TIMEOUT_S)
                    status = 1
                    break
            if watchdog_s and announced and time.monotonic() >= next_watchdog:
                notifier.notify("WATCHDOG=1")
                next_watchdog = time.monotonic() + watchdog_s
            time.sleep(POLL_S)  # the supervisor only watches; nothing waits on it
    finally:
        notifier.notify("STOPPING=1")
        for c in reversed(children):  # handler first: it stops taking frames, then the engine
            c.stop(CHILD_GRACE_S)
        shutil.rmtree(run_dir, ignore_errors=True)
        notifier.close()
    log.info("node %s stopped", info["me"].id)
    return status


if __name__ == "__main__":
    sys.exit(main())
