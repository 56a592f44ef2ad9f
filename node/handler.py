"""The event handler: the mesh, the gathers, the clients. One process, one event loop, no torch.

A thin shell: it moves messages between the mesh, the engine and the clients; what to do with
frames is decided by node/frames.py (the only writer of its frames), when to stop waiting for a
peer by mesh/gather.py, who is alive and who takes part by mesh/membership.py, how much work the
engine holds and when this node serves by node/serving.py.

A frame's life:
  client → this node (`submit`): the input is checked against the plan (dtype, shape, batch)
    and admitted (or refused: busy, refused by every peer). Once the node serves (it has
    heard its peers, or waited `startup_grace` for them), the frame gets its participants —
    this node and the largest set of peers that all hear each other — and its input goes to
    them, with the origin's admission time, the order key every node uses.
  every participant: the engine computes the frame's slice of a stage when the frame is the
    oldest ready work; the mesh gathers the other participants' slices; the engine continues.
  the origin answers its client, in submission order: prediction, top-5, latency, and what
    the answer rests on (who computed it, which devices were missing at which stage anywhere,
    how much was zero-filled).

The loop never blocks on a peer and gives the mesh its turn every pass: client requests are
taken at most MAX_CLIENT_PER_PASS per pass, and a status request costs a cached snapshot, so
no flood of requests can delay heartbeats. An exception while handling one message is counted
and logged (rate-limited) and the loop goes on: no message can end the handler. Prometheus
scrapes (metrics.py, with `metrics_port`) are served from another thread, from a snapshot that
housekeeping swaps in once a second: they never touch the loop's state (rendering one holds the
GIL for about half a millisecond).
"""
from __future__ import annotations

import argparse
import collections
import itertools
import logging
import os
import signal
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import psutil
import zmq

from robustdice.mesh import wire
from robustdice.mesh.errors import MeshError, WireError
from robustdice.mesh.gather import FOR_THE_FRAME, GatherResult, SliceData
from robustdice.mesh.membership import EventKind, PeerState
from robustdice.mesh.mesh import Mesh
from robustdice.mesh.poller import ReadyPoller
from robustdice.mesh.ratelog import RateLimitedLog
from robustdice.mesh.transport import send_parts
from robustdice.partitioner.core.plan import load_plan
from robustdice.partitioner.core.serving_stages import serving_stages

from . import ipc
from .config import (NodeConfig, load_node_config, plan_early_bounds, plan_message_bytes, plan_misfit,
                     plan_trust_key, record_rollout)
from .errors import NodeError
from .frames import Frame, FrameBook
from .metrics import METRICS_REFRESH_S, MetricsRecorder
from .plans import ROLLOUT_PREPARE, ROLLOUT_SWITCH, PlanLayout, Rollout, clock_text
from .serving import EngineWindow, ServingState
from .process import child_main, report_ready, report_status
from .telemetry import EnergyMeter, Gpu, Power, rss_bytes

log = logging.getLogger("robustdice.handler")

MAX_BATCH = 64                   # images per client request
MAX_CLIENT_PER_PASS = 64         # client messages taken per loop pass (the mesh goes between)
MAX_ENGINE_PER_PASS = 256
EVENT_HISTORY = 100
ZERO_LOG = 4000
TELEMETRY_REFRESH_S = 1.0        # process-tree RSS and power are read at most this often
TREE_REFRESH_S = 30.0            # which processes make up the node (a restarted child sooner: _telemetry_now)
# Start-up, engine health, expiry, pruning and the status line: this often. Nothing there needs
# the millisecond (frame and stall timeouts are tenths of seconds and more), and under load the
# loop wakes for every message: at 10 ms housekeeping took a fifth of the handler's CPU (Lite0).
HOUSEKEEPING_S = 0.025
_EVENTS, _POLLIN, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)


class Handler:
    def __init__(self, config: NodeConfig, ipc_endpoint: str):
        self.config = config
        peers = config.peers
        self.me = config.me
        self.node_ids = list(config.node_ids)
        self.device_of = {n: d for d, n in enumerate(self.node_ids)}
        self.device = config.device
        stages = serving_stages(config.plan)   # a rocoin plan is served as one stage
        self.ipc_endpoint = ipc_endpoint
        self.book = FrameBook(self.me.id, self.node_ids, [s.name for s in stages], [s.neurons for s in stages],
                              frame_timeout_s=config.frame_timeout_s)
        # Twice what a peer can hold: a board one release behind, with other windows, is not dropped.
        self.mesh = Mesh(peers, self.me.id, config.plan.plan_hash, on_event=self._on_event,
                         max_stage=len(stages), on_stall=self._on_stall, wire_dtype=config.dtype,
                         max_progress=2 * self.book.max_frames_held)
        self.mesh.progress_source = lambda: (self.book.progress(), self.book.inputs())
        # The plan's tables, checked once by the mesh: a gather takes them unchecked from here on.
        # A roll-out (node/plans.py) brings a second plan beside this one; a node restarted on a
        # plan a roll-out brought says so in its heartbeats, for peers that missed the roll-out.
        self.rollout = Rollout(self._layout(config.plan, config.plan_dir), config.rollout_switch_ms)
        self.input_shape = tuple(config.plan.input_shape)
        self.mesh.set_plans(config.plan.plan_hash, *self.rollout.heartbeat())
        self.row_elements: Dict[str, List[int]] = {}   # plan hash -> the engine's row sizes per stage
        self.events: collections.deque = collections.deque(maxlen=EVENT_HISTORY)
        # (frame, stage, neurons zero-filled) of this node's own stages, for checks that no answer
        # claims less zero-fill than some node had (status with {"zero_log": true}).
        self.zero_log: collections.deque = collections.deque(maxlen=ZERO_LOG)
        self.counters: "collections.Counter[str]" = collections.Counter()
        self.ratelog = RateLimitedLog(log)
        # Frame ids must not repeat across restarts while peers still remember the old ones:
        # the sequence starts at the wall clock in ms, above what an earlier incarnation used
        # unless it averaged over 1000 frames a second. (It wraps every 2^40 ms, 34.8 years.)
        self.sequence = itertools.count(int(time.time() * 1000))
        # Decisions live in pure books (serving.py); this class carries values to and from sockets.
        self.serving_state = ServingState(config.startup_grace_s)
        self.engine_window = EngineWindow(config.engine_stall_s, time.monotonic())
        self.engine_telemetry: Dict[str, object] = {"device": config.compute, "dtype": config.dtype}
        self.stalled_from_s: Optional[float] = None
        self._pruned_by: Dict[str, object] = {}   # origin -> the heartbeat report last pruned by
        self.power = Power()
        self.energy = EnergyMeter()
        if not self.power.available:
            log.info("energy per image: not available (%s)", self.power.reason)
        self._telemetry: Tuple[float, Dict[str, int], Optional[float], Dict[str, object]] = (float("-inf"), {}, None, {})
        self._tree: Tuple[float, List[int]] = (float("-inf"), [])
        self.gpu = Gpu(self.power)
        self.status_line = ""
        self.engine_pending = self.client_pending = False   # a drain stopped at its per-pass cap
        self._next_housekeeping_s = float("-inf")
        self._participants: Tuple[str, ...] = ()
        self.metrics = MetricsRecorder()
        self.metrics_server = None           # a MetricsServer when peers.yaml gives this node a metrics_port
        self._next_metrics_s = float("-inf")
        self.passes = 0                      # loop passes (wakeups): each costs a fixed share of the CPU
        self.stop = False

    @property
    def plan(self):
        """The current plan (a roll-out's next one runs beside it: `rollout`)."""
        return self.rollout.current.plan

    def _layout(self, plan, plan_dir) -> PlanLayout:
        return PlanLayout(plan, plan_dir, self.node_ids, self.me.id, self.mesh.known_ids)

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self.me.metrics_address is not None:   # first: a port in use fails before anything else binds
            from .metrics import MetricsServer     # prometheus-client is imported only where metrics are on
            self.metrics_server = MetricsServer(*self.me.metrics_address, field=f"peers[{self.device}].metrics_port")
        self.mesh.start()
        ctx = self.mesh.context
        self.engine = ctx.socket(zmq.DEALER)
        self.engine.linger = 0
        self.engine.bind(self.ipc_endpoint)
        self.client = self.mesh.client_socket(zmq.ROUTER)
        hot = [self.mesh.pull_socket, self.engine, self.client]
        self.poller = ReadyPoller(hot, [s for s in self.mesh.sockets if s not in hot])
        self.mesh.ready = False   # until the engine says it is ready
        log.info("node %s (device %d of %d) up: mesh %s, clients %s, plan %s (%s %s)%s", self.me.id, self.device,
                 self.plan.devices, self.me.endpoint, self.me.client_endpoint, self.plan.plan_hash[:12],
                 self.plan.model, self.plan.method, ", INSECURE (no CURVE)" if self.config.peers.insecure else "")

    def close(self) -> None:
        try:
            self.engine.send_multipart(ipc.pack(ipc.STOP, []), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        self.engine.close(0)
        self.poller.close()
        self.power.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        self.mesh.close()

    def run(self) -> None:
        while not self.stop:
            now = time.monotonic()
            # Housekeeping needs no timer of its own: heartbeats wake the loop every interval.
            due_s = 0.0 if self.engine_pending or self.client_pending else self.mesh.next_due(now)
            readable = self.poller.poll(due_s, everything=now >= self._next_housekeeping_s)
            self.passes += 1
            self.step(time.monotonic(), readable)

    def step(self, now: float, readable=None) -> None:
        """One pass: the mesh first, then the engine, the peers' inputs, the clients, the frames."""
        self.mesh.process(now, readable)
        if readable is None or self.engine in readable or self.engine_pending:
            self._guard("engine", self._drain_engine, now)
        for msg in self.mesh.take_messages():
            self._guard("peer_message", self._on_peer_message, msg, now)
        if readable is None or self.client in readable or self.client_pending:
            self._guard("client", self._drain_clients, now)
        for result in self.mesh.take_completed():
            self._guard("gathered", self._on_gathered, result)
        for frame, record in self.mesh.take_late_records():
            self.book.note_upstream(frame, record)
        self._guard("frames", self._tend, now)
        self.mesh.flush()

    def _guard(self, what: str, fn, *args) -> None:
        """The exception barrier: one message's failure is counted and logged, never fatal."""
        try:
            fn(*args)
        except Exception as exc:
            self.counters[f"handler_error_{what}"] += 1
            self.ratelog.log(f"error:{what}:{type(exc).__name__}", logging.ERROR, time.monotonic(),
                             "handling %s failed (%s: %s); dropped and counted", what, type(exc).__name__,
                             str(exc)[:200], exc_info=True)

    # ------------------------------------------------------------ membership
    def _on_event(self, event) -> None:
        self.metrics.on_event(event.kind.value, event.peer_id)
        self.events.append({"kind": event.kind.value, "peer": event.peer_id, "wall_s": time.time(),
                            "incarnation": event.incarnation, "restarted": event.restarted, "detail": event.detail})
        if event.restarted:
            self.book.origin_restarted(event.peer_id)
        if event.kind == EventKind.DIED:
            log.warning("peer %s died (%s): its neurons are zero-filled unless replicated", event.peer_id, event.detail)
        elif event.kind == EventKind.REFUSED:
            self.ratelog.log(f"refused:{event.peer_id}", logging.ERROR, event.now_s, "peer %s refused: %s",
                             event.peer_id, event.detail)
        else:
            log.info("peer %s %s%s", event.peer_id, event.kind.value, " (restarted)" if event.restarted else "")

    def _on_stall(self, start_s: float, end_s: float) -> None:
        """This node was not running for a peer timeout or more: its peers went on without it.
        Called from within the mesh's pass, before this pass reads the clients: no frame starts
        on the peers' stale reports from here on (see `_after_stall`)."""
        self.stalled_from_s = start_s
        self.serving_state.stalled(end_s)

    def _after_stall(self, stalled_from: float, now: float) -> None:
        """Back from a stall (a frozen board, a long pause): the peers released this node from every
        frame in flight and may still count it dead. Their frames are dropped; this node's own are
        run again under new ids, and nothing starts until the peers hear it again (or a start-up
        grace), as at start-up: frames started now would run alone on the peers' stale reports."""
        expired, to_rerun = self.book.after_stall(stalled_from, now)
        self._expired(expired)
        for f in to_rerun:
            self._drop_work(f)
            self.book.rerun(f, wire.frame_id(self.device, next(self.sequence)))
        log.warning("back from a stall of %.0f ms: %d own frames run again, %d peers' frames dropped; serving "
                    "again once the peers hear this node", (now - stalled_from) * 1000, len(to_rerun), len(expired))

    def participants_now(self, now: float, plan: Optional[str] = None) -> List[str]:
        """Who a frame submitted now would run on (membership.py: pairwise connected), of the
        peers that compute `plan` (default: any of this node's plans)."""
        chosen = self.mesh.membership.participants(now, plan)
        return [n for n in self.node_ids if n in chosen]

    @property
    def serving(self) -> bool:
        return self.serving_state.serving

    @property
    def refusal(self) -> str:
        return self.serving_state.refusal

    def _check_serving(self, now: float, connected) -> None:
        m = self.mesh.membership
        states = {p: m.state(p).value for p in self.mesh.peer_ids}
        refusals = {p: m.refusal(p) for p, s in states.items() if s == PeerState.REFUSED.value}
        change = self.serving_state.update(now, states, connected, refusals)
        if change.refusal_changed:
            if self.refusal:
                log.error("%s; answering clients with this error", self.refusal)
            else:
                log.info("no longer refused by every peer")
        if change.serving_started:
            log.info("serving clients: %s", "every peer heard" if change.settled else
                     f"after {self.config.startup_grace_s * 1000:.0f} ms of start-up grace, without "
                     f"{', '.join(change.unheard)}")

    # ------------------------------------------------------------ frames
    def _tend(self, now: float) -> None:
        if now >= self._next_housekeeping_s:
            self._next_housekeeping_s = now + HOUSEKEEPING_S
            self._housekeeping(now)
        if self.engine_window.ready:
            self._dispatch(now)
        for f in self.book.take_answers():
            self._answer(f)

    def _housekeeping(self, now: float) -> None:
        """What needs no answer within the millisecond: start-up, refusal, engine health, frame
        expiry, held frames, the status line."""
        connected = self.mesh.membership.connected(now)   # once per pass: it reads every peer's report
        self._check_serving(now, connected)
        self._check_engine(now)
        participants = tuple(self.participants_now(now))
        if participants != self._participants:
            # When new frames start to (or stop) count on a peer: what a stream's phases hinge on.
            self._participants = participants
            self.events.append({"kind": "participants", "peer": None, "participants": list(participants),
                                "wall_s": time.time()})
        if self.stalled_from_s is not None:
            stalled_from, self.stalled_from_s = self.stalled_from_s, None
            self._after_stall(stalled_from, now)
        self._expired(self.book.expire(now))
        self._prune_finished()
        self._guard("rollout", self._tend_rollout, now)
        if self.serving:
            for f in self.book.held():
                if self.refusal:
                    self.book.on_error(f.frame, self.refusal)
                    continue
                self._start_local(f, now)
        self._report_status(len(connected))
        self._telemetry_now(now)
        if self.metrics_server is not None and now >= self._next_metrics_s:
            # A new immutable snapshot for the metrics thread; scrapes never read the live state.
            self._next_metrics_s = now + METRICS_REFRESH_S
            self.metrics_server.publish(self.metrics.snapshot(self.status(now), now, os.getpid(), os.getppid()))

    def _prune_finished(self) -> None:
        """Drop the peers' frames that their origin has finished (its latest heartbeat no longer
        lists them): with replicas an origin completes a stage on the first copy of each neuron,
        so a node behind the others is left with frames nobody waits for. Computing them wastes
        its core; holding them fills its window for that origin, so that it would drop the
        origin's next inputs, and the origin would zero-fill a live peer. Once per heartbeat."""
        membership = self.mesh.membership
        for origin in self.mesh.peer_ids:
            report = membership.report(origin)
            if report is None or self._pruned_by.get(origin) is report:
                continue
            self._pruned_by[origin] = report
            self._expired(self.book.prune_origin(origin, report.progress, report.inputs), finished=True)

    def _start_local(self, f: Frame, now: float) -> None:
        participants = self.participants_now(now, f.plan.hash)
        self.book.start(f.frame, participants)
        self.mesh.admit(f.frame, participants, now)
        others = [p for p in participants if p != self.me.id]
        if others:
            self.mesh.broadcast(wire.Input(f.frame, self.me.id, f.input, {}, participants=tuple(participants),
                                           t_ms=f.t_ms, plan=f.plan.hash), to=others)

    def _dispatch(self, now: float) -> None:
        """Send the engine the oldest ready work, as many items as its window allows, in one message."""
        items = []
        room = self.engine_window.room()
        while len(items) < room:
            work = self.book.take_work()
            if work is None:
                break
            f, x, gathered = work
            if gathered is None:
                alone = f.participants == frozenset({self.me.id})
                items.append(({"kind": ipc.INPUT, "frame": f.frame, "alone": alone, "plan": f.plan.hash,
                               **ipc.describe(x)}, [x]))
            else:
                items.append(self._gathered_item(f, gathered))
        if not items:
            return
        self.engine_window.sent(len(items), now)
        send_parts(self.engine, ipc.pack(ipc.WORK, items))

    def _gathered_item(self, f: Frame, result: GatherResult) -> ipc.Item:
        pieces = [p for p in result.pieces if p.neuron_ids.size]
        failed = [self.device_of[n] for n in self.book.missing_devices(f, result.released)]
        trailing = list(pieces[0].array.shape[1:]) if pieces else []
        dtype = wire.dtype_name(pieces[0].array.dtype) if pieces else "float32"
        # Views of the received frames: forwarded without a copy. The mesh checked each piece's
        # ids against the plan, so the engine knows them from the device.
        return ({"kind": ipc.GATHERED, "frame": f.frame, "stage": result.stage, "failed": failed,
                 "from": [self.device_of[p.sender] for p in pieces], "dtype": dtype, "trailing": trailing},
                [p.array for p in pieces])

    def _drop_work(self, f: Frame, finished: bool = False) -> None:
        """Forget a frame id's gathers here and its state at the engine (it expired, runs again,
        or its origin finished it: `finished`)."""
        self.mesh.abandon(f.frame, finished)
        if f.engine_state:
            self.engine.send_multipart(ipc.pack(ipc.WORK, [({"kind": ipc.DROP, "frame": f.frame}, [])]))

    def _expired(self, frames: List[Frame], finished: bool = False) -> None:
        for f in frames:
            self._drop_work(f, finished)
            if f.local:
                self.ratelog.log("expired", logging.WARNING, time.monotonic(), "frame %d: %s", f.frame,
                                 (f.answer or {}).get("error", "expired"))

    def _check_engine(self, now: float) -> None:
        """A live handler in front of a hung engine must not be counted on by the peers."""
        stalled = self.engine_window.stalled(now)
        ready = self.engine_window.ready and not stalled
        if ready != self.mesh.ready:
            self.mesh.ready = ready
            if stalled:
                log.warning("engine stalled: no answer for %.0f ms with work pending; peers will not count on "
                            "this node", (now - self.engine_window.quiet_since_s) * 1000)
                self.counters["engine_stalls"] += 1
            elif self.counters["engine_stalls"]:
                log.warning("engine answers again")
            else:   # its first READY: not news worth a warning
                self.serving_state.engine_ready(now)
                log.info("engine ready: peers count on this node")

    # ------------------------------------------------------------ peers
    def _on_peer_message(self, msg, now: float) -> None:
        if isinstance(msg, wire.Input):
            self._on_peer_input(msg, now)
        else:
            self.counters["unexpected_control"] += 1

    def _on_peer_input(self, msg: wire.Input, now: float) -> None:
        origin = msg.origin
        problem = None
        if origin != msg.sender:
            problem = f"input of {origin!r} relayed by {msg.sender}"
        elif wire.frame_device(msg.frame) != self.node_ids.index(origin):
            problem = f"frame {msg.frame} is outside {origin}'s frame ids"
        elif not set(msg.participants) <= set(self.node_ids) or origin not in msg.participants:
            problem = f"participants {list(msg.participants)[:8]} are not peers of this plan with the origin"
        else:
            problem = self._bad_input(msg.array)
        if problem:
            self._count_drop("bad_input", now, f"from {msg.sender}: {problem}")
            return
        if self.me.id not in msg.participants:
            self.counters["input_not_participant"] += 1  # the origin did not count on us for it
            return
        layout = self.rollout.layout(msg.plan)
        if layout is None:   # the origin counted on us for a plan we do not serve (any more)
            self._count_drop("input_unknown_plan", now, f"frame {msg.frame} of plan {msg.plan[:12]} from {origin}")
            return
        report = self.mesh.membership.report(origin)
        reason = self.book.admit_peer(msg.frame, origin, msg.t_ms, msg.participants, msg.array, msg.array.nbytes,
                                      now, (report.progress, report.inputs) if report else None, layout)
        if reason:
            self._count_drop(reason, now, f"frame {msg.frame} from {origin}")
        else:
            self.mesh.admit(msg.frame, msg.participants, now)

    def _bad_input(self, x) -> Optional[str]:
        x = np.asarray(x)
        if x.dtype != np.float32 or x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape \
                or not 1 <= x.shape[0] <= MAX_BATCH:
            return (f"input must be float32 (batch 1..{MAX_BATCH}, {', '.join(map(str, self.input_shape))}) for "
                    f"plan {self.plan.plan_hash[:12]} ({self.plan.model}), got {x.dtype} {list(x.shape)}")
        if not np.isfinite(np.add.reduce(x.reshape(-1), dtype=np.float64)):
            return "input holds NaN or infinite values"
        return None

    def _count_drop(self, reason: str, now: float, detail: str) -> None:
        self.counters[reason] += 1
        self.ratelog.log(f"drop:{reason}", logging.WARNING, now, "dropped a peer input as %s: %s", reason, detail)

    def _on_gathered(self, result: GatherResult) -> None:
        f = self.book.frames.get(result.frame)
        if f is None:
            return
        missing = self.book.missing_devices(f, result.released)
        upstream = [entry for p in result.pieces for entry in p.degraded]
        if result.released:
            self.ratelog.log("released", logging.INFO, time.monotonic(), "frame %d stage %s: went on without %s",
                             result.frame, f.plan.stage_names[result.stage],
                             ", ".join(f"{n} ({why})" for n, why in sorted(result.released.items())))
        gone = [n for n, why in result.released.items() if why in FOR_THE_FRAME]
        self.book.on_gathered(result.frame, result.stage, missing, upstream, result, gone)

    # ------------------------------------------------------------ engine
    def _drain_engine(self, now: float) -> None:
        self.engine_pending = True   # unless the socket runs dry below
        for _ in range(MAX_ENGINE_PER_PASS):
            if not self.engine.getsockopt(_EVENTS) & _POLLIN:
                self.engine_pending = False
                return
            try:
                parts = self.engine.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                self.engine_pending = False
                return
            kind, items = ipc.unpack(parts)
            if kind == ipc.READY:
                self.engine_window.ready = True
                continue
            work = [h for h, _ in items if h.get("kind") not in (ipc.TELEMETRY, ipc.PREPARED)]
            self.engine_window.answered([h.get("ms", 0.0) / 1000.0 for h in work], now)
            for header, bufs in items:
                if header.get("kind") == ipc.TELEMETRY:   # rides along; not a work item
                    if "row_elements" in header:      # the first, right after READY
                        self._bound_messages(self.plan.plan_hash, header["row_elements"])
                    self.engine_telemetry = {k: v for k, v in header.items()
                                             if k not in ("kind", "n", "row_elements")}
                    continue
                kind = header.get("kind")
                if kind == ipc.PREPARED:
                    self._on_prepared(header)
                elif kind == ipc.SLICE:
                    self._on_slice(header, bufs, now)
                elif kind == ipc.DONE:
                    self._on_done(header, bufs, now)
                elif kind == ipc.ERROR:
                    self.book.on_error(header.get("frame"), f"engine: {header.get('message', 'error')}",
                                       not_finite=header.get("reason") == ipc.NOT_FINITE)

    def _bound_messages(self, plan_hash: str, row_elements) -> None:
        """The engine says how large a plan's slices are: the mesh holds as many early slices as
        the frames in flight need (node/config.py), and unless peers.yaml sets max_message_bytes,
        takes and sends no message larger than the largest of the plans it serves."""
        peers = self.config.peers
        layouts = dict(self.rollout.layouts())
        if self.rollout.next is not None:   # being prepared: its sizes come before it is served
            layouts[self.rollout.next.hash] = self.rollout.next
        layout = layouts.get(plan_hash)
        if (layout is None or not isinstance(row_elements, list) or len(row_elements) != layout.stages
                or not all(isinstance(n, int) and n >= 1 for n in row_elements)):
            log.error("the engine's row sizes %r do not fit plan %s: max_message_bytes stays %d",
                      row_elements, plan_hash[:12], peers.max_message_bytes)
            return
        self.row_elements = {h: rows for h, rows in self.row_elements.items() if h in layouts}
        self.row_elements[plan_hash] = row_elements
        served = [(layouts[h].plan, rows) for h, rows in self.row_elements.items()]
        in_flight = self.book.max_per_origin * len(self.node_ids)
        bounds = [plan_early_bounds(plan, rows, in_flight, self.config.dtype) for plan, rows in served]
        self.mesh.set_early_bounds(max(b[0] for b in bounds), max(b[1] for b in bounds))
        log.info("early slices: up to %d, %.1f MiB (%d frames in flight, one stage ahead per peer)",
                 self.mesh.book.max_early_slices, self.mesh.book.max_early_bytes / 2 ** 20, in_flight)
        if peers.max_message_bytes_given:
            log.info("max_message_bytes %d, as peers.yaml sets it", peers.max_message_bytes)
            return
        nbytes, why = max(plan_message_bytes(plan, rows, MAX_BATCH, self.config.dtype) for plan, rows in served)
        self.mesh.set_max_message_bytes(nbytes)
        log.info("max_message_bytes %d (%.1f MiB), from the plan: the largest message is %s, for %d images",
                 nbytes, nbytes / 2 ** 20, why, MAX_BATCH)

    def _on_slice(self, header: dict, bufs, now: float) -> None:
        stage = header["stage"]
        if header.get("zero_before"):
            self.zero_log.append((header["frame"], stage - 1, header["zero_before"]))
        f = self.book.on_slice(header["frame"], stage, header.get("zero_before"))
        if f is None:
            return  # expired meanwhile; the engine was told to drop it
        layout = f.plan
        local = SliceData(layout.ids[stage][self.me.id], ipc.array(bufs[0], header["dtype"], header["shape"]))
        taking_part = f.participants - f.excluded if f.excluded else f.participants
        holders, send_to = layout.route(stage, taking_part)
        degraded = tuple((s, m, z) for s, (m, z) in sorted(f.degraded.items())) if f.degraded else ()
        self.mesh.begin_gather(f.frame, stage, local, holders, layout.total_ids[stage], send_to=send_to,
                               degraded=degraded, now_s=now)

    def _on_done(self, header: dict, bufs, now: float) -> None:
        frame = header["frame"]
        logits = ipc.array(bufs[0], header["dtype"], header["shape"]).copy()
        zero = {int(k): int(v) for k, v in header.get("zero", {}).items()}
        self.zero_log.extend((frame, stage, n) for stage, n in zero.items() if n)
        f = self.book.on_done(frame, logits, zero, float(header.get("compute_ms", 0.0)), now)
        if f is not None and f.logits is None:
            self.ratelog.log("not_finite", logging.WARNING, now, "frame %d: %s", frame,
                             (f.answer or {}).get("error", "logits not finite"))

    def _answer(self, f: Frame) -> None:
        self.metrics.on_answer(f.answer)
        meta = dict(f.answer, request=f.request, node=self.me.id)
        if f.plan is not None and "error" not in f.answer:
            meta["plan_hash"] = f.plan.hash   # the plan it was admitted under (a roll-out may run two)
        arrays = (f.logits,) if f.logits is not None and "error" not in f.answer else ()
        self._reply(f.client, wire.Result(f.frame, self.me.id, meta, arrays))

    # ------------------------------------------------------------ roll-out (node/plans.py)
    def _on_rollout_request(self, kind: str, body) -> dict:
        """`robustdice rollout`'s two steps: prepare a plan folder, then switch at an agreed time."""
        if kind == ROLLOUT_PREPARE:
            plan_dir = body.get("plan_dir")
            if not isinstance(plan_dir, str) or not 0 < len(plan_dir) <= wire.MAX_PATH_CHARS:
                problem = "plan_dir: expected a folder path of 1 to %d characters" % wire.MAX_PATH_CHARS
            else:
                problem = self._prepare(plan_dir)
        else:
            plan_hash, switch_ms = body.get("plan_hash"), body.get("switch_ms")
            if not isinstance(plan_hash, str) or type(switch_ms) is not int:
                problem = "switch: expected plan_hash (str) and switch_ms (int)"
            else:
                problem = self.rollout.commit(plan_hash, switch_ms, int(time.time() * 1000))
                if not problem:
                    self._committed()
        if problem:
            log.warning("roll-out %s refused: %s", kind, problem)
        return dict(self.rollout.status(), ok=not problem, error=problem or None, node=self.me.id,
                    wall_ms=int(time.time() * 1000))

    def _prepare(self, plan_dir: str, switch_ms: int = 0, expect: str = "") -> Optional[str]:
        """Check a plan folder as a starting node would (signature, devices, this device's shard,
        the clients' input shape; `expect`: the hash a peer said it holds) and have the engine load
        it beside the current plan. Returns why not, or None."""
        try:
            plan = load_plan(plan_dir, plan_trust_key(self.config.peers))
        except Exception as exc:   # PlanError, NodeError, OSError: the plan is refused, never the node
            return f"{plan_dir}: {exc}"
        if expect and plan.plan_hash != expect:
            return f"{plan_dir} holds plan {plan.plan_hash[:12]} here, not plan {expect[:12]}"
        misfit = plan_misfit(plan, plan_dir, self.config.peers, self.device)
        if misfit:
            return misfit
        if tuple(plan.input_shape) != self.input_shape:
            return (f"plan {plan.plan_hash[:12]} takes inputs of shape {list(plan.input_shape)}; clients of this "
                    f"cluster send {list(self.input_shape)}")
        was = self.rollout.next
        if was is not None and was.hash != plan.plan_hash and self.book.frames_on(was):
            return f"frames of plan {was.hash[:12]} are still in flight here"
        try:
            layout = self._layout(plan, plan_dir)
        except Exception as exc:   # a table the mesh refuses (ids out of range): refused, never fatal
            return f"plan {plan.plan_hash[:12]}: {exc}"
        problem = self.rollout.begin(layout)
        if problem:
            return problem
        if switch_ms:
            self.rollout.pending_switch_ms = int(switch_ms)
        if was is not None and self.rollout.next is not was:
            # An earlier roll-out's plan, prepared and never switched to: replaced (or cancelled).
            log.info("roll-out: plan %s, never switched to, is dropped", was.hash[:12])
            self._engine_retire(was.hash)
            self._publish_plans()
        if self.rollout.next is not None and self.rollout.next is not was:
            log.info("roll-out: loading plan %s (%s, %s) from %s beside plan %s", plan.plan_hash[:12], plan.model,
                     plan.method, plan_dir, self.plan.plan_hash[:12])
            self.engine.send_multipart(ipc.pack(ipc.WORK, [({"kind": ipc.PREPARE, "plan_dir": str(plan_dir),
                                                             "plan_hash": plan.plan_hash}, [])]))
        return None

    def _engine_retire(self, plan_hash: str) -> None:
        self.engine.send_multipart(ipc.pack(ipc.WORK, [({"kind": ipc.RETIRE, "plan_hash": plan_hash}, [])]))
        self.row_elements.pop(plan_hash, None)

    def _on_prepared(self, header: dict) -> None:
        plan_hash = str(header.get("plan_hash"))
        if self.rollout.next is None or self.rollout.next.hash != plan_hash:
            if not header.get("error"):   # loaded after it was cancelled: the engine drops it again
                self._engine_retire(plan_hash)
            return
        if header.get("error"):
            log.error("roll-out: the engine cannot load plan %s: %s", plan_hash[:12], header["error"])
            self.rollout.failed(plan_hash, str(header["error"]))
            return
        self._bound_messages(plan_hash, header.get("row_elements"))
        committed = self.rollout.prepared(plan_hash)
        log.info("roll-out: plan %s loaded; peers may count on this node for its frames", plan_hash[:12])
        if committed:
            self._committed()
        self._publish_plans()

    def _committed(self) -> None:
        if self.rollout.next is None:   # a repeated switch after the old plan was retired
            return
        log.info("roll-out: frames admitted from %s (wall clock) run on plan %s", clock_text(self.rollout.switch_ms),
                 self.rollout.next.hash[:12])
        try:
            record_rollout(self.config, self.rollout.next.dir, self.rollout.next.hash, self.rollout.switch_ms)
        except OSError as exc:   # the roll-out goes on; a restart then learns it from the peers
            log.error("roll-out: cannot record plan %s for restarts (%s)", self.rollout.next.hash[:12], exc)
        self._publish_plans()

    def _publish_plans(self) -> None:
        """Tell the mesh which plans this node computes (peers judge us by them) and what its
        heartbeats say of the roll-out."""
        layouts = self.rollout.layouts()
        next_plan, switch_ms, rollout_dir = self.rollout.heartbeat()
        self.mesh.set_plans(self.rollout.current.hash, next_plan, switch_ms, rollout_dir,
                            max_stage=max(lay.stages for lay in layouts.values()))

    def _tend_rollout(self, now: float) -> None:
        """Housekeeping: adopt what the peers agreed (a switch time, or a plan rolled out while this
        node was away), and retire the old plan once no frame needs it."""
        membership = self.mesh.membership
        wall_ms = int(time.time() * 1000)
        for peer in self.mesh.peer_ids:
            had_switch = self.rollout.switch_ms
            adopt = self.rollout.heard(*membership.rollout_of(peer), wall_ms)
            if adopt is not None:
                problem = self._prepare(adopt.plan_dir, adopt.switch_ms, expect=adopt.plan_hash)
                if problem:   # not again until a later switch: a failure must not repeat every pass
                    self.rollout.refuse(adopt.plan_hash, adopt.switch_ms)
                    self.ratelog.log("adopt", logging.ERROR, now, "cannot join the roll-out to plan %s that %s "
                                     "runs: %s", adopt.plan_hash[:12], peer, problem)
                break
            if self.rollout.switch_ms and not had_switch:
                self._committed()
        if self.rollout.retire_due(wall_ms, self.config.peers.frame_timeout_ms,
                                   lambda: self.book.frames_on(self.rollout.current)):
            old = self.rollout.retire()
            self._engine_retire(old.hash)
            log.info("roll-out done: plan %s retired, plan %s (%s, %s) is the current", old.hash[:12],
                     self.plan.plan_hash[:12], self.plan.model, self.plan.method)
            self._publish_plans()

    # ------------------------------------------------------------ clients
    def _drain_clients(self, now: float) -> None:
        self.client_pending = True   # unless the socket runs dry below: the rest waits for the next pass
        for _ in range(MAX_CLIENT_PER_PASS):
            if not self.client.getsockopt(_EVENTS) & _POLLIN:
                self.client_pending = False
                return
            try:
                parts = self.client.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                self.client_pending = False
                return
            self._guard("client_message", self._on_client, parts, now)

    def _on_client(self, parts, now: float) -> None:
        identity = bytes(parts[0])
        try:
            msg = wire.decode(parts[1:], self.mesh.config.max_message_bytes)
        except WireError as exc:
            self.counters[f"client_{exc.reason}"] += 1
            self.ratelog.log(f"client:{exc.reason}", logging.WARNING, now, "dropped a client message as %s (%s)",
                             exc.reason, exc.detail[:200])
            return
        if isinstance(msg, wire.Input):
            self._submit(identity, msg, now)
        elif isinstance(msg, wire.Control) and msg.kind == "status":
            body = self.status(now)
            if msg.body.get("zero_log") is True:
                body["zero_log"] = [list(entry) for entry in self.zero_log]
            self._reply(identity, wire.Control("status", body))
        elif isinstance(msg, wire.Control) and msg.kind in (ROLLOUT_PREPARE, ROLLOUT_SWITCH):
            self._reply(identity, wire.Control(msg.kind, self._on_rollout_request(msg.kind, msg.body)))
        else:
            self.counters["client_unexpected"] += 1

    def _submit(self, identity: bytes, msg: wire.Input, now: float) -> None:
        request = dict(msg.meta) if isinstance(msg.meta, dict) else {}
        problem = self._bad_input(msg.array) or self.refusal
        if not problem:
            frame = wire.frame_id(self.device, next(self.sequence))
            t_ms = int(time.time() * 1000)
            problem = self.book.admit_local(frame, t_ms, msg.array, msg.array.nbytes, identity, request, now,
                                            self.rollout.plan_for(t_ms))
        if not problem:
            if self.serving:  # else housekeeping starts it once the node has heard its peers
                self._start_local(self.book.frames[frame], now)
            return
        if problem:
            self.counters["client_refused"] += 1
            self.ratelog.log("client_refused", logging.WARNING, now, "refused a client request: %s", problem)
            self._reply(identity, wire.Result(0, self.me.id, {"error": problem, "request": request, "node": self.me.id}))

    def _reply(self, identity: Optional[bytes], msg) -> None:
        if identity is None:
            return
        frames = wire.encode(wire.with_sender(msg, self.me.id, self.mesh.incarnation))
        try:
            send_parts(self.client, [identity] + frames, _NOBLOCK)
        except zmq.ZMQError:
            self.counters["client_reply_dropped"] += 1

    # ------------------------------------------------------------ status
    def _report_status(self, connected: int) -> None:
        """One line for systemd (sd_notify STATUS via the supervisor) whenever it changes."""
        if self.refusal:
            line = f"REFUSED: {self.refusal}"
        elif not self.serving:
            line = ("back from a stall: waiting to hear the peers again"
                    if self.serving_state.awaiting_since_s > float("-inf")
                    else "starting: waiting to hear the peers")
        else:
            line = (f"serving device {self.device} of plan {self.plan.plan_hash[:12]}; "
                    f"{connected} of {len(self.mesh.peer_ids)} peers connected")
        if line != self.status_line:
            self.status_line = line
            report_status(line)

    def _telemetry_now(self, now: float) -> Tuple[Dict[str, int], Optional[float], Dict[str, object]]:
        """RSS, power and GPU, read at most every TELEMETRY_REFRESH_S; housekeeping calls it, so
        that the energy integral has a reading every second whether or not anyone asks."""
        read_s, rss, power, gpu = self._telemetry
        if now - read_s >= TELEMETRY_REFRESH_S:
            pids = self._tree_pids(now)
            rss = rss_bytes(pids)
            if len(rss) < len(pids):   # a child was restarted meanwhile: look again next time
                self._tree = (float("-inf"), pids)
            power = self.power.total_mw()
            self.energy.sample(now, power)
            gpu = self.gpu.read(pids)
            self._telemetry = (now, rss, power, gpu)
        return rss, power, gpu

    def _tree_pids(self, now: float) -> List[int]:
        """The supervisor and its children (this handler, the engine), looked up at most every
        TREE_REFRESH_S: psutil finds children by reading every process's /proc stat, which took
        11 of the 28 ms a second an idle handler took, on a machine running a few hundred processes."""
        read_s, pids = self._tree
        if now - read_s < TREE_REFRESH_S:
            return pids
        try:
            parent = psutil.Process(os.getppid())
            pids = [parent.pid] + [c.pid for c in parent.children()]
        except psutil.Error:
            pids = [os.getpid()]
        self._tree = (now, pids)
        return pids

    def status(self, now: Optional[float] = None) -> dict:
        now = time.monotonic() if now is None else now
        mesh = self.mesh.status(now)
        rss, power, gpu = self._telemetry_now(now)
        counters = dict(mesh["counters"])
        counters.update(self.counters)
        counters.update({k: v for k, v in self.book.counters.items() if k.startswith("input_")})
        return {
            "node": self.me.id, "device": self.device, "incarnation": self.mesh.incarnation,
            "model": self.plan.model, "method": self.plan.method, **self.rollout.status(),
            "serving": self.serving, "refused": self.refusal or None, "engine_ready": self.mesh.ready,
            "engine_busy_ms": self.engine_window.busy_s * 1000.0, "engine": dict(self.engine_telemetry), "gpu": gpu,
            "members": mesh["peers"], "counters": counters,
            "participants": self.participants_now(now),
            **self.book.stats(),
            "gathers_in_progress": mesh["gathers_in_progress"], "early_slices": mesh["early_slices"],
            "rss_bytes": rss, "rss_total_bytes": sum(rss.values()),
            "power_mw": power, "power": "n/a" if power is None else f"{power / 1000:.2f} W",
            "power_note": self.power.reason, "events": list(self.events), "wall_s": time.time(),
            # Joules of this board while it ran, None where its power is not read (never a guess).
            "energy_j": self.energy.joules if self.power.available else None,
            "answered": self.metrics.answers["exact"] + self.metrics.answers["degraded"],
            "energy_covered_s": self.energy.covered_s, "loop_passes": self.passes,
        }


def main(argv: Optional[List[str]] = None) -> int:
    def arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--peers", required=True)
        p.add_argument("--id")
        p.add_argument("--plan")
        p.add_argument("--ipc", required=True)
        p.add_argument("--compute")
        p.add_argument("--dtype")

    args = child_main("handler", argv, arguments)
    handler = Handler(load_node_config(args.peers, args.id, args.plan, check_key=False, compute=args.compute,
                                       dtype=args.dtype), args.ipc)

    def on_signal(*_):
        handler.stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        handler.start()
    except (MeshError, NodeError) as exc:  # the supervisor checks the config first; this is the last line of defence
        log.error("cannot start: %s", exc)
        if handler.metrics_server is not None:
            handler.metrics_server.close()
        handler.mesh.close()
        return 2
    report_ready(args.ready_fd)
    try:
        handler.run()
    finally:
        handler.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
