"""The Mesh: one node's end of the N-to-N mesh, driven by the caller's event loop.

Use from a bigger loop::

    mesh = Mesh(config, "n0", plan_hash); mesh.start()
    poller = zmq.Poller()
    for s in mesh.sockets: poller.register(s, zmq.POLLIN)
    while running:
        poller.poll(mesh.next_due(time.monotonic()) * 1000)
        events = mesh.process(time.monotonic())
        for result in mesh.take_completed(): ...
        for msg in mesh.take_messages(): ...

The caller tells the mesh what its heartbeats report besides liveness: `progress_source()`
returns (frames held → stages sent, origin → newest input frame), and `ready` says whether its
engine computes. Peers use these to decide when to stop waiting for our slices (gather.py).

Failure detection bound: a peer is declared dead `peer_timeout_ms` after the last message we
received from it, plus the loop's scheduling slack, because `next_due` wakes the loop exactly at
the earliest expiry. Since a live peer sends at least one heartbeat per `heartbeat_interval_ms`,
the time from a crash to detection lies in [peer_timeout_ms - heartbeat_interval_ms,
peer_timeout_ms] + slack, inside the contract of peer_timeout_ms + heartbeat_interval_ms after
the last message; the caller's loop must call `process` as soon as `next_due` says. A peer that
others still hear is `unreachable` rather than dead (membership.py).

A node that was itself not running for a while (SIGSTOP, CPU starvation, a VM pause) would
otherwise wake up and judge its peers before ZeroMQ's I/O thread has delivered the heartbeats
they sent meanwhile, and declare every one of them dead. So when `process` finds that it was
not called for longer than `stall_threshold_s`, it holds all verdicts for 2 heartbeat
intervals (at most once per `peer_timeout_ms`, so that a loop that is always late still
detects): a peer that really died during our stall is then detected up to 2 intervals later.
A stall of at least one peer timeout is reported to `on_stall(start_s, end_s)`: the peers have
declared this node dead meanwhile and gone on without it, so its frames from before are stale.

A pass reads at most MAX_DRAIN_PER_PROCESS messages and for at most MAX_DRAIN_S: a flood of
messages that are costly to decode (an authenticated peer's, say) is read over many passes, and
heartbeats, timeouts and gathers get their turn between them. What a peer's messages may hold is
bounded by this cluster (`wire.Limits`: the peer count, `max_progress` frames, `max_stage`).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
import time
from typing import Callable, Container, Deque, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from . import wire
from .config import PeersConfig, bind_endpoint
from .errors import MeshError, WireError
from .gather import FINISHED, LATE, LATE_REPLICA, NOT_WAITED, GatherBook, GatherResult, SliceData
from .keys import load_own_keys
from .membership import EventKind, Membership, MembershipEvent, PeerState, Report
from .ratelog import RateLimitedLog
from .transport import (CLIENT_DOMAIN, MESH_DOMAIN, ZapHandler, ZapPolicy, curve_client, curve_server,
                        link_options, make_pull, make_push, send_parts)

log = logging.getLogger(__name__)

# Messages handled per `process` call, and time spent reading them, so that a flood cannot
# starve heartbeats and timeouts: 3,000 heartbeats at 5 ms each once held one call for 10 s, and
# the peers declared the node dead. A tenth of the default heartbeat interval.
MAX_DRAIN_PER_PROCESS = 2000
MAX_DRAIN_S = 0.01
MAX_APP_MESSAGES = 10000
# Drops that a healthy cluster makes all the time, counted but logged at DEBUG: with replicated
# neurons a gather completes on the first copy of each, so every later copy is a late replica,
# and an origin finishes a frame on the first copies while a node behind still has it (which
# then drops it, and whatever else still comes for it is `finished`).
ROUTINE_DROPS = frozenset({LATE_REPLICA, FINISHED, NOT_WAITED})
_EVENTS, _POLLIN, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)   # plain ints: pyzmq's enum arithmetic costs
_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH)

ProgressSource = Callable[[], Tuple[Mapping[int, int], Mapping[str, int]]]


class Mesh:
    def __init__(self, config: PeersConfig, self_id: str, plan_hash: str, *, incarnation: Optional[int] = None,
                 context: Optional[zmq.Context] = None, on_event: Optional[Callable[[MembershipEvent], None]] = None,
                 wire_dtype: str = "float32", max_stage: Optional[int] = None,
                 on_stall: Optional[Callable[[float, float], None]] = None, max_progress: Optional[int] = None):
        """`max_stage`: the plan's stage count; `max_progress`: the most frames a peer's heartbeat
        may list (what a node can hold); both bound what a peer's message may hold."""
        self.config = config
        self.me = config.peer(self_id)
        self.self_id = self_id
        self.plan_hash = plan_hash
        self.wire_dtype = wire_dtype
        # Microseconds since the epoch: a restarted process always gets a larger number.
        self.incarnation = int(time.time() * 1e6) if incarnation is None else int(incarnation)
        self.on_event = on_event
        self.on_stall = on_stall
        self._ids = tuple(config.ids)   # PeersConfig.ids builds a new tuple at every call
        self.peer_ids = tuple(p for p in config.ids if p != self_id)
        self.membership = Membership(self_id, config.ids, plan_hash, config.peer_timeout_ms,
                                     incarnation=self.incarnation, wire_dtype=wire_dtype,
                                     vouch_margin_ms=1.5 * config.heartbeat_interval_ms)
        self.book = GatherBook(self_id, config.sync_timeout_ms, max_stage=max_stage,
                               senders=max(1, len(self.peer_ids)))
        self.limits = wire.Limits(max_peers=len(config.ids), max_progress=max_progress or wire.MAX_PROGRESS,
                                  max_stages=max_stage or wire.MAX_PROGRESS)
        self.counters: "collections.Counter[str]" = collections.Counter()
        self.progress_source: Optional[ProgressSource] = None
        self.rollout: Tuple[str, int, str] = ("", 0, "")   # what heartbeats say of a roll-out (set_plans)
        self._ready = True
        self._given_context = context
        self.context: Optional[zmq.Context] = None
        self._pull = self._monitor = None
        self._zap: Optional[ZapHandler] = None
        self._push: Dict[str, zmq.Socket] = {}
        self._client_sockets: List[zmq.Socket] = []
        self._poller: Optional[zmq.Poller] = None
        self._completed: List[GatherResult] = []
        self._outbox: Dict[str, List[wire.Slice]] = {}   # peer -> slices to send at `flush`
        self._late_records: List[Tuple[int, Tuple[Tuple[int, int, int], ...]]] = []
        self._messages: Deque[wire.Message] = collections.deque()
        self._next_heartbeat_s = 0.0
        self._ratelog = RateLimitedLog(log)
        self._backlog = False
        self._closed = False
        self._last_process_s: Optional[float] = None
        self._last_stall_s = float("-inf")
        interval_s = config.heartbeat_interval_ms / 1000.0
        # A loop that follows `next_due` calls `process` at least once per heartbeat interval.
        self.stall_threshold_s = max(2 * interval_s, config.peer_timeout_ms / 2000.0)
        self.stall_grace_s = 2 * interval_s
        self._keys: Optional[Tuple[bytes, bytes]] = None

    # ------------------------------------------------------------ lifecycle
    def start(self) -> "Mesh":
        if self.context is not None:
            raise MeshError("mesh already started")
        cfg = self.config
        if not cfg.insecure:
            self._keys = load_own_keys(cfg, self.self_id)
        self.context = self._given_context or zmq.Context()
        try:
            if self._keys:
                peers = {p.public_key: p.id for p in cfg.peers}
                clients = dict(peers, **{c.public_key: c.name for c in cfg.clients})
                self._zap = ZapHandler(self.context, ZapPolicy({MESH_DOMAIN: peers, CLIENT_DOMAIN: clients}))
            self._pull = make_pull(self.context, cfg.max_message_bytes)
            link_options(self._pull, cfg.heartbeat_interval_ms, cfg.peer_timeout_ms)
            if self._keys:
                curve_server(self._pull, *self._keys, MESH_DOMAIN)
            self._monitor = self._pull.get_monitor_socket(_HANDSHAKE_FAILED)
            self._pull.bind(bind_endpoint(self.me.host, self.me.port))
            reconnect_ms = max(10, min(100, cfg.heartbeat_interval_ms))
            for peer in cfg.peers:
                if peer.id == self.self_id:
                    continue
                push = make_push(self.context, reconnect_ms)
                link_options(push, cfg.heartbeat_interval_ms, cfg.peer_timeout_ms)
                if self._keys:
                    curve_client(push, *self._keys, peer.public_key.encode())
                push.connect(peer.endpoint)
                self._push[peer.id] = push
            self._poller = zmq.Poller()
            for s in self.sockets:
                self._poller.register(s, zmq.POLLIN)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Close every socket (and the context if the mesh made it); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        sockets = list(self._push.values()) + self._client_sockets
        if self._pull is not None:
            try:
                self._pull.disable_monitor()
            except zmq.ZMQError:
                pass
            sockets.append(self._pull)
        if self._monitor is not None:
            sockets.append(self._monitor)
        for s in sockets:
            s.close(linger=0)
        if self._zap is not None:
            self._zap.close()
        if self.context is not None and self._given_context is None:
            self.context.term()
        self._push.clear()
        self._client_sockets.clear()

    def __enter__(self) -> "Mesh":
        return self.start() if self.context is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_max_message_bytes(self, nbytes: int) -> None:
        """Take and send no message over `nbytes` from now on: decoding and sending check it at
        once; the sockets' own limit (libzmq drops such a connection unread) holds for the
        connections made from now on."""
        self.config = dataclasses.replace(self.config, max_message_bytes=int(nbytes))
        for sock in [self._pull] + self._client_sockets:
            if sock is not None:
                sock.setsockopt(zmq.MAXMSGSIZE, int(nbytes))

    def set_plans(self, current: str, next_plan: str = "", switch_ms: int = 0, rollout_dir: str = "",
                  max_stage: Optional[int] = None) -> None:
        """A roll-out (node/plans.py): the plans this node computes frames of, and what its
        heartbeats tell the peers; `max_stage` bounds the stages of both plans' slices."""
        self.plan_hash = current
        self.membership.set_plans(current, (next_plan,) if next_plan else ())
        self.rollout = (next_plan, int(switch_ms), rollout_dir)
        if max_stage is not None:
            self.book.max_stage = max_stage
            self.limits = dataclasses.replace(self.limits, max_stages=max_stage)

    def set_early_bounds(self, max_slices: int, max_bytes: int) -> None:
        """Hold up to these many early slices (and bytes) of admitted frames (GatherBook.set_early_bounds)."""
        self.book.set_early_bounds(max_slices, max_bytes)

    @property
    def ready(self) -> bool:
        """What our heartbeats say: whether our engine computes, so that peers may count on us."""
        return self._ready

    @ready.setter
    def ready(self, ready: bool) -> None:
        """A change is announced at once, not at the next heartbeat slot: a node that sends an input
        right after its engine became ready must not reach a peer whose latest report from it
        still says "not ready" (the peer would release it as stalled from its own frame). ZeroMQ
        keeps order per connection, so this heartbeat arrives before anything sent after it."""
        changed, self._ready = ready != self._ready, ready
        if changed and self._push and not self._closed:
            self._send_heartbeats(time.monotonic())

    @property
    def pull_socket(self) -> zmq.Socket:
        """The socket peers' messages arrive on (the busy one of `sockets`)."""
        return self._pull

    @property
    def sockets(self) -> List[zmq.Socket]:
        """Register these for POLLIN in the caller's poller; call `process` when any is readable."""
        out = [self._pull, self._monitor]
        if self._zap is not None:
            out.append(self._zap.socket)
        return [s for s in out if s is not None]

    def client_socket(self, socket_type: int = zmq.ROUTER) -> zmq.Socket:
        """A socket bound on this node's client port, admitting peer keys and `clients` keys.

        Owned by the mesh (closed by `close`); the caller polls and serves it.
        """
        sock = self.context.socket(socket_type)
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes)
        if self._keys:
            curve_server(sock, *self._keys, CLIENT_DOMAIN)
        sock.bind(bind_endpoint(self.me.host, self.me.client_port))
        self._client_sockets.append(sock)
        return sock

    # ------------------------------------------------------------ the loop
    def next_due(self, now_s: float) -> float:
        """Seconds until `process` has timed work (heartbeat, timeout, gather deadline); >= 0.

        Rounded up to whole milliseconds: zmq polls in integer milliseconds, and a fraction
        rounded down to 0 would spin the loop until the due time.
        """
        if self._backlog or self.book.has_dirty:
            return 0.0
        due = [self._next_heartbeat_s, self.membership.next_expiry_s(), self.book.next_deadline_s()]
        return max(0.0, math.ceil((min(d for d in due if d is not None) - now_s) * 1000.0) / 1000.0)

    def process(self, now_s: Optional[float] = None, readable: Optional[Container] = None) -> List[MembershipEvent]:
        """Do everything that is due without blocking; returns the membership events it caused.

        `readable`: the sockets the caller's poll found readable (None: look at every socket).
        """
        if self._pull is None or self._closed:
            raise MeshError("mesh is not started")
        now_s = time.monotonic() if now_s is None else now_s
        self.flush()  # before any heartbeat: a heartbeat must never overtake the slices it reports sent
        events: List[MembershipEvent] = []
        if self._zap is not None and (readable is None or self._zap.socket in readable):
            refused = self._zap.handle_pending()
            if refused:
                self._drop("unauthenticated", now_s, refused)
        if readable is None or self._monitor in readable:
            self._drain_monitor(now_s)
        # Receive before applying timeouts: after a pause of our own, the peers' queued
        # heartbeats must count before we judge them silent.
        if readable is None or self._backlog or self._pull in readable:
            events += self._drain(now_s)
        self._check_own_stall(now_s)
        events += self.membership.tick(now_s)
        if now_s >= self._next_heartbeat_s:
            self._send_heartbeats(now_s)
            self._next_heartbeat_s = self._next_heartbeat_slot(now_s)
        for e in events:
            if e.kind in (EventKind.JOINED, EventKind.REJOINED):
                self.book.rejoined(e.peer_id)
            self.book.peer_changed(e.peer_id)
        expired = self.book.expire_early(now_s)
        if expired:
            self._drop("early_expired", now_s, expired)
        expired = self.book.expire_unadmitted(now_s)
        if expired:
            self._drop("unadmitted_expired", now_s, expired, detail="slices of frames that never came")
        self._poll_book(now_s)
        if self.on_event is not None:
            for e in events:
                self.on_event(e)
        return events

    def _poll_book(self, now_s: float) -> None:
        self._completed += self.book.poll(now_s, self._lookup)
        for peer in self.book.take_caught():
            self.counters["peers_suspected"] += 1
            self._ratelog.log(f"suspected:{peer}", logging.WARNING, now_s,
                              "%s: peer %s claimed work but delivered no slice for a sync timeout (%d ms): "
                              "not waited for until it does", self.self_id, peer, self.config.sync_timeout_ms)

    def admit(self, frame: int, participants: Iterable[str], now_s: float) -> None:
        """This node took `frame` (its input came, or it started it): slices for it that came
        before from a non-participant are dropped, the others kept until its gathers begin."""
        for sender, reason in self.book.admit(frame, participants, now_s):
            self._drop(reason, now_s, detail=f"early slice of frame {frame} from {sender}")

    def _lookup(self, peer_id: str) -> Tuple[PeerState, Optional[Report]]:
        return self.membership.state(peer_id), self.membership.report(peer_id)

    def _check_own_stall(self, now_s: float) -> None:
        last, self._last_process_s = self._last_process_s, now_s
        if last is None or now_s - last <= self.stall_threshold_s:
            return
        if self.on_stall is not None and now_s - last >= self.config.peer_timeout_ms / 1000.0:
            self.on_stall(last, now_s)
        if now_s - self._last_stall_s < self.config.peer_timeout_ms / 1000.0:
            return
        self._last_stall_s = now_s
        self.membership.hold_verdicts(now_s + self.stall_grace_s)
        self.counters["self_stalls"] += 1
        log.warning("%s was not running for %.0f ms: judging no peer for %.0f ms, until their queued heartbeats "
                    "are read", self.self_id, (now_s - last) * 1000.0, self.stall_grace_s * 1000.0)

    def _next_heartbeat_slot(self, now_s: float) -> float:
        """The next multiple of the interval on the wall clock, as a monotonic time.

        Nodes with synchronised clocks then send in the same instants, so that each node wakes
        about once per interval for all its peers' heartbeats instead of once per peer: this
        is what keeps an idle node's CPU low. Computed from now, never from a missed slot, so
        there is no burst after a pause.
        """
        interval_s = self.config.heartbeat_interval_ms / 1000.0
        wall_s = time.time() + (now_s - time.monotonic())
        return now_s + (math.floor(wall_s / interval_s) + 1) * interval_s - wall_s

    def _drain(self, now_s: float) -> List[MembershipEvent]:
        events: List[MembershipEvent] = []
        self._backlog = False
        stop_s = time.monotonic() + MAX_DRAIN_S
        for _ in range(MAX_DRAIN_PER_PROCESS):
            if time.monotonic() > stop_s:
                break
            # Asking EVENTS first is far cheaper than raising zmq.Again on every idle wakeup.
            if not self._pull.getsockopt(_EVENTS) & _POLLIN:
                return events
            try:
                frames = self._pull.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                # EVENTS can say POLLIN while the first message of a fresh CURVE connection is
                # still being decrypted; it will be readable on a later pass.
                self.counters["recv_again"] += 1
                return events
            try:
                events += self._handle(frames, now_s)
            except Exception as exc:  # a message that breaks a check we lack must not end the loop
                self.counters["handler_error"] += 1
                self._ratelog.log(f"error:{type(exc).__name__}", logging.ERROR, now_s,
                                  "%s: a message could not be handled (%s: %s); dropped and counted", self.self_id,
                                  type(exc).__name__, str(exc)[:200], exc_info=True)
        self._backlog = True
        return events

    def _handle(self, frames, now_s: float) -> List[MembershipEvent]:
        try:
            msg = wire.decode(frames, self.config.max_message_bytes, self.limits)
        except WireError as exc:
            self._drop(exc.reason, now_s, detail=exc.detail)
            return []
        sender = msg.sender
        if self._keys is not None:
            try:
                user = frames[0].get("User-Id")
            except zmq.ZMQError:
                user = None
            if user != sender:
                self._drop("spoofed", now_s, detail=f"sender {sender!r} on a connection authenticated as {user!r}")
                return []
        if sender == self.self_id or sender not in self._push:
            self._drop("unknown_sender", now_s, detail=repr(sender))
            return []
        if isinstance(msg, wire.Heartbeat):
            reason, events = self.membership.on_heartbeat(
                sender, now_s, msg.incarnation, msg.plan_hash, wire_dtype=msg.wire_dtype, ready=msg.ready,
                hears=msg.hears, progress=msg.progress, inputs=msg.inputs, next_plan=msg.next_plan,
                switch_ms=msg.switch_ms, rollout_dir=msg.rollout_dir)
            self.book.peer_changed(sender)
        else:
            reason, events = self.membership.on_message(sender, now_s, msg.incarnation)
        if reason is not None:
            self._drop(reason, now_s, detail=f"{type(msg).__name__} from {sender}")
            return events
        if isinstance(msg, wire.Slices):
            for sl in msg.slices:
                if wire.frame_device(sl.frame) >= len(self._ids):
                    self._drop("bad_frame", now_s, detail=f"slice frame {sl.frame} of no device, from {sender}")
                    continue
                reason = self.book.add_slice(sender, sl.frame, sl.stage, sl.neuron_ids, sl.array, now_s, sl.degraded)
                if reason in (LATE, LATE_REPLICA, FINISHED) and sl.degraded:
                    # Not used, but what it rests on is news about the frame: the answer should
                    # rather claim too much zero-fill than too little.
                    self._late_records.append((sl.frame, sl.degraded))
                if reason is not None:
                    self._drop(reason, now_s, detail=f"slice frame {sl.frame} stage {sl.stage} from {sender}")
        elif isinstance(msg, wire.Result):
            self._drop("unexpected_result", now_s, detail=f"from {sender}")  # peers never send results
        elif not isinstance(msg, wire.Heartbeat):
            if len(self._messages) >= MAX_APP_MESSAGES:
                self._drop("app_overflow", now_s)
            else:
                self._messages.append(msg)
        return events

    def _drain_monitor(self, now_s: float) -> None:
        while self._monitor.getsockopt(_EVENTS) & _POLLIN:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] & _HANDSHAKE_FAILED:
                self._drop("handshake_failed", now_s, detail=f"{event['endpoint']!r} event {event['event']}")

    def _drop(self, reason: str, now_s: float, n: int = 1, detail: str = "") -> None:
        self.counters[reason] += n
        level = logging.DEBUG if reason in ROUTINE_DROPS else logging.WARNING
        self._ratelog.log(f"drop:{reason}", level, now_s, "%s: dropped %d message(s) as %s (%s)",
                          self.self_id, n, reason, detail[:200])

    # ------------------------------------------------------------ sending
    def _send_frames(self, peer_id: str, frames, kind: str = "message") -> bool:
        try:
            send_parts(self._push[peer_id], frames, _NOBLOCK)
            ok = True
        except zmq.Again:  # not connected (IMMEDIATE) or queue full: never block on a peer
            self.counters["send_dropped"] += 1
            self.counters[f"send_dropped_{kind}"] += 1
            ok = False
        self.membership.on_send(peer_id, ok)
        return ok

    def _send_heartbeats(self, now_s: float) -> None:
        progress, inputs = self.progress_source() if self.progress_source is not None else ({}, {})
        frames = wire.encode(wire.Heartbeat(self.self_id, self.incarnation, self.plan_hash, self.wire_dtype,
                                            self.ready, self.membership.heard_view(now_s), progress, inputs,
                                            *self.rollout))
        for peer_id in self._push:
            self._send_frames(peer_id, frames, "heartbeat")

    def send(self, peer_id: str, msg: wire.Message) -> bool:
        """Send `msg` (stamped with our id) to one peer; False if it was dropped."""
        if peer_id not in self._push:
            raise MeshError(f"unknown peer {peer_id!r}")
        frames = wire.encode(wire.with_sender(msg, self.self_id, self.incarnation))
        return self._fits(msg, frames, 1) and self._send_frames(peer_id, frames, type(msg).__name__.lower())

    def broadcast(self, msg: wire.Message, to: Optional[Iterable[str]] = None) -> int:
        """Send `msg` to the peers in `to` (default: every alive peer); returns how many sends were queued."""
        frames = wire.encode(wire.with_sender(msg, self.self_id, self.incarnation))
        targets = [p for p in (self.membership.alive() if to is None else to) if p in self._push]
        if not self._fits(msg, frames, len(targets)):
            return 0
        kind = type(msg).__name__.lower()
        return sum(self._send_frames(p, frames, kind) for p in targets)

    def _fits(self, msg: wire.Message, frames, recipients: int) -> bool:
        """Whether the peers will take this message. One over `max_message_bytes` is counted and
        not sent: the receiver's libzmq would drop the whole connection for it, and with it the
        heartbeats and slices queued behind it."""
        size = sum(memoryview(f).nbytes for f in frames)
        if size <= self.config.max_message_bytes:
            return True
        self._drop("oversized_send", time.monotonic(), n=max(1, recipients),
                   detail=f"{type(msg).__name__} of {size} bytes > max_message_bytes {self.config.max_message_bytes}")
        return False

    def take_messages(self) -> List[wire.Message]:
        """Input and Control messages received since the last call."""
        out = list(self._messages)
        self._messages.clear()
        return out

    # ------------------------------------------------------------ gathers
    def begin_gather(self, frame: int, stage: int, local: SliceData, holders: Mapping[str, Iterable[int]],
                     n_ids: int, *, send_to: Optional[Iterable[str]] = None,
                     degraded: Tuple[Tuple[int, int, int], ...] = (), now_s: Optional[float] = None) -> int:
        """Start gather (frame, stage) and queue the local slice for `send_to` (default: the
        holders); `flush` (or the next `process`) sends it, zero-copy. Waits for `holders` as
        gather.py says. Returns how many peers the slice is queued for.

        `local.array` must not be modified until the gather is done: ZeroMQ sends from it.
        """
        now_s = time.monotonic() if now_s is None else now_s
        device = wire.frame_device(frame)
        origin = self._ids[device] if device < len(self._ids) else self.self_id
        array, ids = np.asarray(local.array), np.asarray(local.neuron_ids)
        for sender, reason in self.book.begin(frame, stage, origin, ids, holders, n_ids, now_s,
                                              trailing=array.shape[1:], dtype=array.dtype):
            self._drop(reason, now_s, detail=f"early slice frame {frame} stage {stage} from {sender}")
        targets = holders if send_to is None else send_to
        piece = wire.Slice(frame, stage, self.self_id, ids, array, self.incarnation, tuple(degraded))
        n = 0
        for peer in targets:
            n += 1
            queued = self._outbox.get(peer)
            if queued is not None:
                queued.append(piece)
            elif peer in self._push:
                self._outbox[peer] = [piece]
        self._poll_book(now_s)
        return n

    def known_ids(self, ids: Iterable[int], n_ids: int, what: str = "neuron ids") -> np.ndarray:
        """`ids` checked once (the plan's table of a stage): pass the array returned to
        `begin_gather` as a holder's or the local ids, and it is not checked again (gather.py)."""
        return self.book.known_ids(ids, n_ids, what)

    def flush(self) -> int:
        """Send the slices queued by `begin_gather`, one message per peer (split only by size);
        returns how many messages were queued."""
        if not self._outbox:   # most passes: nothing computed since the last
            return 0
        sent = 0
        outbox, self._outbox = self._outbox, {}
        # Usually every peer is sent the same slices: each distinct batch is encoded once.
        encoded: Dict[Tuple[int, ...], Tuple[wire.Slices, list, int]] = {}
        for peer, pieces in outbox.items():
            for batch in self._batches(pieces):
                key = tuple(map(id, batch))   # the pieces stay alive in `outbox` meanwhile
                if key not in encoded:
                    msg = wire.Slices(tuple(batch), self.self_id, self.incarnation)
                    frames = wire.encode(msg)
                    encoded[key] = (msg, frames, sum(memoryview(f).nbytes for f in frames))
                msg, frames, nbytes = encoded[key]
                if self._fits(msg, frames, 1) and self._send_frames(peer, frames, "slices"):
                    sent += 1
                    self.counters["slice_bytes_sent"] += nbytes
        return sent

    def _batches(self, pieces: List[wire.Slice]) -> Iterable[List[wire.Slice]]:
        """Split by payload bytes, count and header bytes (each slice's header entry grows with
        its degradation record: a deep network degraded at every stage has long ones)."""
        batch: List[wire.Slice] = []
        size = head = 0
        limit = self.config.max_message_bytes - wire.MAX_HEADER_BYTES
        head_limit = wire.MAX_HEADER_BYTES // 2   # the estimate below is generous, not exact
        for piece in pieces:
            nbytes = piece.array.nbytes + 4 * piece.neuron_ids.size
            entry = 96 + 24 * len(piece.degraded)
            if batch and (size + nbytes > limit or head + entry > head_limit or len(batch) >= wire.MAX_BATCH_SLICES):
                yield batch
                batch, size, head = [], 0, 0
            batch.append(piece)
            size += nbytes
            head += entry
        if batch:
            yield batch

    def abandon(self, frame: int, finished: bool = False) -> None:
        """Forget the gathers of a frame this node dropped: its later slices count as `finished`
        when its origin had finished it (routine), else as `late` (this node gave up on it)."""
        self.book.abandon(frame, finished)

    def take_late_records(self) -> List[Tuple[int, Tuple[Tuple[int, int, int], ...]]]:
        """(frame, degradation record) of slices that came too late to be used."""
        out, self._late_records = self._late_records, []
        return out

    def take_completed(self) -> List[GatherResult]:
        out, self._completed = self._completed, []
        return out

    def poll_once(self, timeout_s: Optional[float] = None) -> List[MembershipEvent]:
        """Wait for input or the next due time (at most `timeout_s`), then `process`."""
        wait_s = self.next_due(time.monotonic())
        if timeout_s is not None:
            wait_s = min(wait_s, timeout_s)
        self._poller.poll(wait_s * 1000.0)
        return self.process(time.monotonic())

    # ------------------------------------------------------------ status
    def status(self, now_s: Optional[float] = None) -> dict:
        now_s = time.monotonic() if now_s is None else now_s
        return {"id": self.self_id, "incarnation": self.incarnation, "plan_hash": self.plan_hash,
                "wire_dtype": self.wire_dtype, "ready": self.ready,
                "peers": self.membership.snapshot(now_s),
                "counters": dict(self.counters), "gathers_in_progress": len(self.book.active_keys()),
                "early_slices": self.book.early_count, "early_bytes": self.book.early_bytes,
                "suspected": sorted(self.book.suspects(now_s))}
