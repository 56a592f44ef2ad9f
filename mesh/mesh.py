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

Failure detection bound: a peer is declared dead `peer_timeout_ms` after the last message we
received from it, plus the loop's scheduling slack, because `next_due` wakes the loop exactly at
the earliest expiry. Since a live peer sends at least one heartbeat per `heartbeat_interval_ms`,
the time from a crash to detection lies in [peer_timeout_ms - heartbeat_interval_ms,
peer_timeout_ms] + slack, inside the contract of peer_timeout_ms + heartbeat_interval_ms after
the last message. `DETECTION_SLACK_MS` is the slack the tests allow (a loaded 2-core machine
running several nodes); the caller's loop must call `process` as soon as `next_due` says.

A node that was itself not running for a while (SIGSTOP, CPU starvation, a VM pause) would
otherwise wake up and judge its peers before ZeroMQ's I/O thread has delivered the heartbeats
they sent meanwhile, and declare every one of them dead. So when `process` finds that it was
not called for longer than `stall_threshold_s`, it holds all verdicts for 2 heartbeat
intervals (at most once per `peer_timeout_ms`, so that a loop that is always late still
detects): a peer that really died during our stall is then detected up to 2 intervals later.
"""
from __future__ import annotations

import collections
import logging
import math
import time
from typing import Callable, Deque, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from . import wire
from .config import PeersConfig, bind_endpoint
from .errors import MeshError, WireError
from .gather import GatherBook, GatherResult, SliceData
from .keys import load_own_keys
from .membership import Membership, MembershipEvent
from .transport import (CLIENT_DOMAIN, MESH_DOMAIN, ZapHandler, ZapPolicy, curve_client, curve_server,
                        make_pull, make_push)

log = logging.getLogger(__name__)

DETECTION_SLACK_MS = 50
DROP_LOG_INTERVAL_S = 10.0
# Messages handled per `process` call, so that a flood cannot starve heartbeats and timeouts.
MAX_DRAIN_PER_PROCESS = 2000
MAX_APP_MESSAGES = 10000
_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


class Mesh:
    def __init__(self, config: PeersConfig, self_id: str, plan_hash: str, *, incarnation: Optional[int] = None,
                 context: Optional[zmq.Context] = None, on_event: Optional[Callable[[MembershipEvent], None]] = None):
        self.config = config
        self.me = config.peer(self_id)
        self.self_id = self_id
        self.plan_hash = plan_hash
        # Microseconds since the epoch: a restarted process always gets a larger number.
        self.incarnation = int(time.time() * 1e6) if incarnation is None else int(incarnation)
        self.on_event = on_event
        self.peer_ids = tuple(p for p in config.ids if p != self_id)
        self.membership = Membership(self_id, self.peer_ids, plan_hash, config.peer_timeout_ms)
        self.book = GatherBook(self_id)
        self.counters: "collections.Counter[str]" = collections.Counter()
        self.newest_frame = -1
        self._given_context = context
        self.context: Optional[zmq.Context] = None
        self._pull = self._monitor = None
        self._zap: Optional[ZapHandler] = None
        self._push: Dict[str, zmq.Socket] = {}
        self._client_sockets: List[zmq.Socket] = []
        self._poller: Optional[zmq.Poller] = None
        self._completed: List[GatherResult] = []
        self._messages: Deque[wire.Message] = collections.deque()
        self._next_heartbeat_s = 0.0
        self._drop_logged: Dict[str, Tuple[float, int]] = {}
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
            if self._keys:
                curve_server(self._pull, *self._keys, MESH_DOMAIN)
            self._monitor = self._pull.get_monitor_socket(_HANDSHAKE_FAILED)
            self._pull.bind(bind_endpoint(self.me.host, self.me.port))
            reconnect_ms = max(10, min(100, cfg.heartbeat_interval_ms))
            for peer in cfg.peers:
                if peer.id == self.self_id:
                    continue
                push = make_push(self.context, reconnect_ms)
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
        if self._backlog:
            return 0.0
        due = [self._next_heartbeat_s, self.membership.next_expiry_s(), self.book.next_deadline_s()]
        return max(0.0, math.ceil((min(d for d in due if d is not None) - now_s) * 1000.0) / 1000.0)

    def process(self, now_s: Optional[float] = None) -> List[MembershipEvent]:
        """Do everything that is due without blocking; returns the membership events it caused."""
        if self._pull is None or self._closed:
            raise MeshError("mesh is not started")
        now_s = time.monotonic() if now_s is None else now_s
        events: List[MembershipEvent] = []
        if self._zap is not None:
            refused = self._zap.handle_pending()
            if refused:
                self._drop("unauthenticated", now_s, refused)
        self._drain_monitor(now_s)
        # Receive before applying timeouts: after a pause of our own, the peers' queued
        # heartbeats must count before we judge them silent.
        events += self._drain(now_s)
        self._check_own_stall(now_s)
        events += self.membership.tick(now_s)
        if now_s >= self._next_heartbeat_s:
            self._send_heartbeats()
            self._next_heartbeat_s = self._next_heartbeat_slot(now_s)
        self._completed += self.book.poll(now_s, self.membership.alive())
        if self.on_event is not None:
            for e in events:
                self.on_event(e)
        return events

    def _check_own_stall(self, now_s: float) -> None:
        last, self._last_process_s = self._last_process_s, now_s
        if last is None or now_s - last <= self.stall_threshold_s:
            return
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
        for _ in range(MAX_DRAIN_PER_PROCESS):
            # Asking EVENTS first is far cheaper than raising zmq.Again on every idle wakeup.
            if not self._pull.get(zmq.EVENTS) & zmq.POLLIN:
                return events
            events += self._handle(self._pull.recv_multipart(zmq.NOBLOCK, copy=False), now_s)
        self._backlog = True
        return events

    def _handle(self, frames, now_s: float) -> List[MembershipEvent]:
        try:
            msg = wire.decode(frames, self.config.max_message_bytes)
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
            reason, events = self.membership.on_heartbeat(sender, now_s, msg.incarnation, msg.plan_hash, msg.newest_frame)
        else:
            reason, events = self.membership.on_message(sender, now_s, msg.incarnation)
        if reason is not None:
            self._drop(reason, now_s, detail=f"{type(msg).__name__} from {sender}")
            return events
        if isinstance(msg, wire.Slice):
            reason = self.book.add_slice(sender, msg.frame, msg.stage, msg.neuron_ids, msg.array)
            if reason is not None:
                self._drop(reason, now_s, detail=f"slice frame {msg.frame} stage {msg.stage} from {sender}")
        elif not isinstance(msg, wire.Heartbeat):
            if len(self._messages) >= MAX_APP_MESSAGES:
                self._drop("app_overflow", now_s)
            else:
                self._messages.append(msg)
        return events

    def _drain_monitor(self, now_s: float) -> None:
        while self._monitor.get(zmq.EVENTS) & zmq.POLLIN:
            event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            if event["event"] & _HANDSHAKE_FAILED:
                self._drop("handshake_failed", now_s, detail=f"{event['endpoint']!r} event {event['event']}")

    def _drop(self, reason: str, now_s: float, n: int = 1, detail: str = "") -> None:
        self.counters[reason] += n
        last_s, last_count = self._drop_logged.get(reason, (None, 0))
        if last_s is None or now_s - last_s >= DROP_LOG_INTERVAL_S:
            since = self.counters[reason] - last_count
            log.warning("%s: dropped %d message(s) as %s in the last %.0f s (%s)", self.self_id, since, reason,
                        DROP_LOG_INTERVAL_S, detail)
            self._drop_logged[reason] = (now_s, self.counters[reason])

    # ------------------------------------------------------------ sending
    def _send_frames(self, peer_id: str, frames) -> bool:
        try:
            self._push[peer_id].send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:  # not connected (IMMEDIATE) or queue full: never block on a peer
            self.counters["send_dropped"] += 1
            return False

    def _send_heartbeats(self) -> None:
        frames = wire.encode(wire.Heartbeat(self.self_id, self.incarnation, self.plan_hash, self.newest_frame))
        for peer_id in self._push:
            self._send_frames(peer_id, frames)

    def send(self, peer_id: str, msg: wire.Message) -> bool:
        """Send `msg` (stamped with our id) to one peer; False if it was dropped."""
        if peer_id not in self._push:
            raise MeshError(f"unknown peer {peer_id!r}")
        frames = wire.encode(wire.with_sender(msg, self.self_id, self.incarnation))
        return self._fits(msg, frames, 1) and self._send_frames(peer_id, frames)

    def broadcast(self, msg: wire.Message, only_alive: bool = True) -> int:
        """Send `msg` to every (live) peer; returns how many sends were queued."""
        frames = wire.encode(wire.with_sender(msg, self.self_id, self.incarnation))
        alive = self.membership.alive()
        targets = [p for p in self._push if not only_alive or p in alive]
        if not self._fits(msg, frames, len(targets)):
            return 0
        return sum(self._send_frames(p, frames) for p in targets)

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
        """Input, Result and Control messages received since the last call."""
        out = list(self._messages)
        self._messages.clear()
        return out

    # ------------------------------------------------------------ gathers
    def begin_gather(self, frame: int, stage: int, local: SliceData, holders: Mapping[str, Iterable[int]],
                     n_neurons: int, timeout_ms: Optional[float] = None, now_s: Optional[float] = None) -> None:
        """Start gather (frame, stage) and send the local slice to every live peer (zero-copy).

        `local.array` must not be modified until the gather is done: ZeroMQ sends from it.
        """
        now_s = time.monotonic() if now_s is None else now_s
        timeout_ms = self.config.sync_timeout_ms if timeout_ms is None else timeout_ms
        for sender, reason in self.book.begin(frame, stage, local, holders, n_neurons, now_s, now_s + timeout_ms / 1000.0):
            self._drop(reason, now_s, detail=f"early slice frame {frame} stage {stage} from {sender}")
        self.broadcast(wire.Slice(frame, stage, self.self_id, np.asarray(local.neuron_ids), np.asarray(local.array)))
        self._completed += self.book.poll(now_s, self.membership.alive())

    def take_completed(self) -> List[GatherResult]:
        out, self._completed = self._completed, []
        return out

    def gather(self, frame: int, stage: int, local: SliceData, holders: Mapping[str, Iterable[int]],
               n_neurons: int, timeout_ms: Optional[float] = None) -> GatherResult:
        """Blocking gather for tests and benchmarks; other completed gathers stay in take_completed."""
        self.begin_gather(frame, stage, local, holders, n_neurons, timeout_ms)
        while True:
            for i, r in enumerate(self._completed):
                if (r.frame, r.stage) == (frame, stage):
                    return self._completed.pop(i)
            self._poller.poll(self.next_due(time.monotonic()) * 1000.0)
            self.process(time.monotonic())

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
                "newest_frame": self.newest_frame, "peers": self.membership.snapshot(now_s),
                "counters": dict(self.counters), "gathers_in_progress": len(self.book.active_keys()),
                "early_slices": self.book.early_count, "early_bytes": self.book.early_bytes}
