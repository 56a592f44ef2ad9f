"""The event handler: the mesh, the gathers, the clients. One process, one event loop.

It polls three things: the mesh (heartbeats, peers' slices and inputs), the engine's workers
(ipc ROUTER), and the clients (the node's client port). It never imports torch.

A frame's life:
  client → this node (`submit`): the frame gets id (device << 40 | sequence), and its
    *participants* are fixed: this node and every peer alive now. The input goes to them.
  every participant: the frame waits for an idle engine worker; for each stage the worker's
    slice starts a mesh gather whose holders are the other participants, and the gathered
    output goes back to that worker. A peer that dies is not waited for once detected; a peer
    that rejoins takes part from the next frame on, never in frames it never received.
  the origin answers its client in submission order: prediction, top-5, latency, and the
    zero-filled fraction of every stage.
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
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional

import numpy as np
import psutil
import zmq

from robustdice.mesh import wire
from robustdice.mesh.config import load_peers, resolve_self
from robustdice.mesh.errors import MeshError, WireError
from robustdice.mesh.gather import SliceData
from robustdice.mesh.mesh import Mesh
from robustdice.partitioner.plan import load_plan

from . import ipc
from .errors import NodeError
from .process import child_main, report_ready
from .telemetry import Power

log = logging.getLogger("robustdice.handler")

FRAME_ID_SHIFT = 40
FRAME_SEQ_MASK = (1 << FRAME_ID_SHIFT) - 1   # 2^40 ms ≈ 34 years before the sequence wraps
MAX_PENDING_FRAMES = 256       # inputs queued beyond this are refused (answered with an error)
RECENT_FRAMES = 200            # frames the status statistics are taken over
EVENT_HISTORY = 100
MAX_BATCH = 64


@dataclass
class Frame:
    frame: int
    origin: str
    participants: frozenset
    input: np.ndarray
    received_s: float
    client: Optional[bytes] = None
    request: dict = field(default_factory=dict)
    worker: Optional[bytes] = None
    answer: Optional[dict] = None
    logits: Optional[np.ndarray] = None


class Handler:
    def __init__(self, peers_path: str, node_id: Optional[str], plan_dir: Optional[str], ipc_endpoint: str):
        self.config = load_peers(peers_path)
        self.me = resolve_self(self.config, node_id)
        plan_dir = plan_dir or self.config.plan
        if plan_dir is None:
            raise NodeError("no plan: give --plan or set plan: in peers.yaml")
        self.plan = load_plan(plan_dir)  # plain JSON: the handler never imports torch
        self.node_ids = list(self.config.ids)
        if self.plan.devices != len(self.node_ids):
            raise NodeError(f"plan is for {self.plan.devices} devices but peers.yaml lists {len(self.node_ids)} peers")
        self.device = self.node_ids.index(self.me.id)
        self.holders = [{nid: np.asarray(s.holders(d), dtype=np.int32) for d, nid in enumerate(self.node_ids)}
                        for s in self.plan.stages]
        self.total_ids = [s.total_ids for s in self.plan.stages]
        self.stage_names = [s.name for s in self.plan.stages]
        self.ipc_endpoint = ipc_endpoint
        self.events: Deque[dict] = collections.deque(maxlen=EVENT_HISTORY)
        self.mesh = Mesh(self.config, self.me.id, self.plan.plan_hash, on_event=self._on_event)
        self.frames: Dict[int, Frame] = {}
        self.pending: Deque[int] = collections.deque()
        self.idle: Deque[bytes] = collections.deque()
        self.answer_order: Deque[int] = collections.deque()
        # Frame ids must not repeat across restarts: peers remember finished (frame, stage) keys
        # and would drop a restarted origin's slices as stale. Milliseconds since the epoch
        # start the sequence above anything an earlier incarnation can have used at 1 kHz.
        self.sequence = itertools.count(int(time.time() * 1000) & FRAME_SEQ_MASK)
        self.recent: Deque[dict] = collections.deque(maxlen=RECENT_FRAMES)
        self.frames_done = 0
        self.frame_errors = 0
        self.last_zero_filled: tuple = ()
        # A peer counts as a participant of new frames only once it has been alive this long:
        # time for it to have heard our heartbeat too, since it ignores inputs from a node it
        # has not verified yet (a just-restarted peer would otherwise stall every stage).
        self.participant_grace_s = 2 * self.config.heartbeat_interval_ms / 1000.0
        self.alive_since: Dict[str, float] = {}
        self.power = Power()
        self.stop = False

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.mesh.start()
        ctx = self.mesh.context
        self.engine = ctx.socket(zmq.ROUTER)
        self.engine.linger = 0
        self.engine.bind(self.ipc_endpoint)
        self.client = self.mesh.client_socket(zmq.ROUTER)
        self.poller = zmq.Poller()
        for s in self.mesh.sockets + [self.engine, self.client]:
            self.poller.register(s, zmq.POLLIN)
        log.info("node %s (device %d of %d) up: mesh %s, clients %s, plan %s (%s %s)%s", self.me.id, self.device,
                 self.plan.devices, self.me.endpoint, self.me.client_endpoint, self.plan.plan_hash[:12],
                 self.plan.model, self.plan.method, ", INSECURE (no CURVE)" if self.config.insecure else "")

    def close(self) -> None:
        for _ in range(len(self.idle)):
            try:
                self.engine.send_multipart([self.idle.popleft(), ipc.STOP, b""], zmq.NOBLOCK)
            except zmq.ZMQError:
                break
        self.engine.close(0)
        self.power.close()
        self.mesh.close()

    def run(self) -> None:
        while not self.stop:
            now = time.monotonic()
            timeout_s = min(self.mesh.next_due(now), 0.25)
            ready = dict(self.poller.poll(timeout_s * 1000.0))
            self.mesh.process(time.monotonic())
            if self.engine in ready:
                self._drain_engine()
            if self.client in ready:
                self._drain_clients()
            for msg in self.mesh.take_messages():
                self._on_peer_message(msg)
            for result in self.mesh.take_completed():
                self._on_gathered(result)
            self._dispatch()

    # ------------------------------------------------------------ membership
    def _on_event(self, event) -> None:
        record = {"kind": event.kind, "peer": event.peer_id, "wall_s": time.time(),
                  "incarnation": event.incarnation, "restarted": event.restarted}
        self.events.append(record)
        if event.kind in ("joined", "rejoined"):
            self.alive_since[event.peer_id] = time.monotonic()
        else:
            self.alive_since.pop(event.peer_id, None)
        if event.kind == "died":
            log.warning("peer %s died (silent for %d ms): its neurons are zero-filled unless replicated",
                        event.peer_id, self.config.peer_timeout_ms)
        elif event.kind == "refused":
            log.error("peer %s refused: %s", event.peer_id, event.detail or "plan hash differs from ours")
        else:
            log.info("peer %s %s%s", event.peer_id, event.kind, " (restarted)" if event.restarted else "")

    # ------------------------------------------------------------ frames
    def _admit(self, frame: Frame) -> bool:
        if len(self.pending) >= MAX_PENDING_FRAMES:
            return False
        self.frames[frame.frame] = frame
        self.pending.append(frame.frame)
        return True

    def _dispatch(self) -> None:
        while self.pending and self.idle:
            f = self.frames.get(self.pending.popleft())
            if f is None:
                continue
            f.worker = self.idle.popleft()
            # A frame with no other participant has nothing to gather: the engine then zero-fills
            # on its own instead of a round trip to this process per stage.
            alone = f.participants == frozenset({self.me.id})
            self.engine.send_multipart([f.worker] + ipc.pack(ipc.FRAME, {"frame": f.frame, "alone": alone,
                                                                         **ipc.describe(f.input)},
                                                             f.input), copy=False)

    def _on_peer_message(self, msg) -> None:
        if isinstance(msg, wire.Input):
            participants = msg.meta.get("participants") if isinstance(msg.meta, dict) else None
            if msg.origin != msg.sender or not isinstance(participants, list):
                self.mesh.counters["bad_input"] += 1
                return
            if self.me.id not in participants or msg.frame in self.frames:
                return  # the origin did not count on us for this frame (we were not alive to it)
            if msg.array.ndim != 4 or msg.array.dtype != np.float32:
                self.mesh.counters["bad_input"] += 1
                return
            frame = Frame(msg.frame, msg.origin, frozenset(participants), msg.array, time.monotonic())
            if not self._admit(frame):
                self.mesh.counters["input_overflow"] += 1
        elif isinstance(msg, wire.Control):
            self.mesh.counters["unexpected_control"] += 1

    def participants_now(self) -> List[str]:
        """Who a frame submitted now would run on: this node and every peer settled in."""
        now = time.monotonic()
        settled = {p for p in self.mesh.membership.alive()
                   if now - self.alive_since.get(p, now) >= self.participant_grace_s}
        return sorted({self.me.id} | settled)

    def _submit(self, identity: bytes, msg) -> None:
        x = np.asarray(msg.array)
        if x.dtype != np.float32 or x.ndim != 4 or not 1 <= x.shape[0] <= MAX_BATCH:
            self._reply_error(identity, msg, f"input must be float32 (batch<= {MAX_BATCH}, C, H, W), got "
                                             f"{x.dtype} {list(x.shape)}")
            return
        frame_id = (self.device << FRAME_ID_SHIFT) | (next(self.sequence) & FRAME_SEQ_MASK)
        participants = self.participants_now()
        frame = Frame(frame_id, self.me.id, frozenset(participants), x, time.monotonic(), client=identity,
                      request=dict(msg.meta) if isinstance(msg.meta, dict) else {})
        if not self._admit(frame):
            self._reply_error(identity, msg, "node busy: too many frames queued")
            return
        self.answer_order.append(frame_id)
        self.mesh.broadcast(wire.Input(frame_id, self.me.id, x, {"participants": participants}))

    def _drain_engine(self) -> None:
        while self.engine.get(zmq.EVENTS) & zmq.POLLIN:
            parts = self.engine.recv_multipart(zmq.NOBLOCK, copy=False)
            worker = bytes(parts[0])
            kind, header, bufs = ipc.unpack(parts[1:])
            if kind == ipc.READY:
                self.idle.append(worker)
            elif kind == ipc.SLICE:
                self._on_slice(header, bufs)
            elif kind in (ipc.DONE, ipc.ERROR):
                self.idle.append(worker)
                self._on_done(kind, header, bufs)

    def _on_slice(self, header: dict, bufs) -> None:
        f = self.frames.get(header["frame"])
        stage = header["stage"]
        if f is None:
            return
        ids = ipc.array(bufs[0], "int32", (header["shape"][0],))
        local = SliceData(ids, ipc.array(bufs[1], header["dtype"], header["shape"]))
        holders = {nid: self.holders[stage][nid] for nid in f.participants if nid != self.me.id}
        self.mesh.begin_gather(f.frame, stage, local, holders, self.total_ids[stage])

    def _on_gathered(self, result) -> None:
        f = self.frames.get(result.frame)
        if f is None or f.worker is None:
            return
        if result.timed_out:
            # Peers that sent nothing by the deadline do not have this frame (or are gone):
            # later stages of the frame do not wait for them again.
            silent = set(f.participants) - set(result.contributors) - {self.me.id}
            if silent:
                log.warning("frame %d stage %s: no slice from %s within %d ms; not waiting for them in later stages",
                            f.frame, self.stage_names[result.stage], ", ".join(sorted(silent)),
                            self.config.sync_timeout_ms)
                f.participants = frozenset(f.participants) - silent
        # The engine holds its own rows already: send back only the ones that came from peers.
        received = ~result.zero_mask
        received[self.holders[result.stage][self.me.id]] = False
        ids = np.flatnonzero(received).astype(np.int32)
        rows = result.array[ids] if ids.size < received.size else result.array
        self.engine.send_multipart(
            [f.worker] + ipc.pack(ipc.GATHERED, {"frame": f.frame, "stage": result.stage, **ipc.describe(rows)},
                                  ids, rows), copy=False)

    def _on_done(self, kind: bytes, header: dict, bufs) -> None:
        f = self.frames.get(header.get("frame"))
        if f is None:
            return
        now = time.monotonic()
        if kind == ipc.ERROR:
            self.frame_errors += 1
            f.answer = {"error": header.get("message", "engine error")}
        else:
            logits = ipc.array(bufs[0], header["dtype"], header["shape"]).copy()
            zero = header.get("zero_filled", [])
            weights = [s.neurons for s in self.plan.stages]
            overall = float(np.dot(zero, weights) / max(1, sum(weights))) if zero else 0.0
            f.logits = logits
            f.answer = self._answer(f, logits, zero, overall, now, header.get("compute_ms", 0.0))
            self._log_zero_fill(f, zero)
            self.frames_done += 1
            self.recent.append({"latency_ms": f.answer["latency_ms"], "zero_filled_fraction": overall})
        self.mesh.newest_frame = max(self.mesh.newest_frame, f.frame & FRAME_SEQ_MASK)
        if f.origin != self.me.id:
            del self.frames[f.frame]
        self._answer_in_order()

    def _log_zero_fill(self, f: Frame, zero: List[float]) -> None:
        """Log what was zero-filled whenever it changes from one frame to the next (not per frame)."""
        pattern = tuple(round(z, 3) for z in zero)
        if pattern == self.last_zero_filled or (not any(pattern) and not any(self.last_zero_filled)):
            self.last_zero_filled = pattern
            return
        self.last_zero_filled = pattern
        absent = sorted(set(self.node_ids) - set(f.participants))
        if any(pattern):
            lost = ", ".join(f"{n} {100 * z:.1f}%" for n, z in zip(self.stage_names, zero) if z > 0)
            log.warning("frame %d: zero-filled %s (participants %s%s)", f.frame, lost, ", ".join(sorted(f.participants)),
                        f"; not counted on: {', '.join(absent)}" if absent else "")
        else:
            log.info("frame %d: nothing zero-filled any more (participants %s)", f.frame, ", ".join(sorted(f.participants)))

    def _answer(self, f: Frame, logits: np.ndarray, zero: List[float], overall: float, now: float,
                compute_ms: float) -> dict:
        flat = logits.reshape(logits.shape[0], -1)
        shifted = np.exp(flat - flat.max(axis=1, keepdims=True))
        probs = shifted / shifted.sum(axis=1, keepdims=True)
        top5 = [[[int(c), float(p[c])] for c in np.argsort(-p)[:5]] for p in probs]
        return {"prediction": [int(i) for i in flat.argmax(axis=1)], "top5": top5,
                "latency_ms": (now - f.received_s) * 1000.0, "compute_ms": compute_ms,
                "zero_filled": {name: z for name, z in zip(self.stage_names, zero)},
                "zero_filled_fraction": overall, "participants": sorted(f.participants)}

    def _answer_in_order(self) -> None:
        while self.answer_order:
            f = self.frames.get(self.answer_order[0])
            if f is None:
                self.answer_order.popleft()
                continue
            if f.answer is None:
                return
            self.answer_order.popleft()
            del self.frames[f.frame]
            meta = dict(f.answer, request=f.request, node=self.me.id)
            arrays = (f.logits,) if f.logits is not None else ()
            self._reply(f.client, wire.Result(f.frame, self.me.id, meta, arrays))

    # ------------------------------------------------------------ clients
    def _drain_clients(self) -> None:
        while self.client.get(zmq.EVENTS) & zmq.POLLIN:
            parts = self.client.recv_multipart(zmq.NOBLOCK, copy=False)
            identity = bytes(parts[0])
            try:
                msg = wire.decode(parts[1:], self.config.max_message_bytes)
            except WireError as exc:
                self.mesh.counters[f"client_{exc.reason}"] += 1
                continue
            if isinstance(msg, wire.Input):
                self._submit(identity, msg)
            elif isinstance(msg, wire.Control) and msg.kind == "status":
                self._reply(identity, wire.Control("status", self.status()))
            else:
                self.mesh.counters["client_unexpected"] += 1

    def _reply(self, identity: Optional[bytes], msg) -> None:
        if identity is None:
            return
        frames = wire.encode(wire.with_sender(msg, self.me.id, self.mesh.incarnation))
        try:
            self.client.send_multipart([identity] + frames, zmq.NOBLOCK, copy=False)
        except zmq.ZMQError:
            self.mesh.counters["client_reply_dropped"] += 1

    def _reply_error(self, identity: bytes, msg, text: str) -> None:
        self.mesh.counters["client_bad_request"] += 1
        log.warning("refused a client request: %s", text)
        self._reply(identity, wire.Result(0, self.me.id, {"error": text, "request": dict(msg.meta or {})}))

    def status(self) -> dict:
        mesh = self.mesh.status()
        lat = sorted(r["latency_ms"] for r in self.recent)
        zero = [r["zero_filled_fraction"] for r in self.recent]
        rss = {}
        try:
            parent = psutil.Process(os.getppid())
            for proc in [parent] + parent.children():
                rss[f"{proc.pid}:{proc.name()}"] = proc.memory_info().rss
        except psutil.Error:
            pass
        power = self.power.total_mw()
        return {
            "node": self.me.id, "device": self.device, "incarnation": self.mesh.incarnation,
            "plan_hash": self.plan.plan_hash, "model": self.plan.model, "method": self.plan.method,
            "members": mesh["peers"], "counters": mesh["counters"],
            "participants": self.participants_now(),
            "frames_done": self.frames_done, "frame_errors": self.frame_errors,
            "frames_in_flight": len(self.frames), "frames_pending": len(self.pending),
            "latency_ms_p50": lat[len(lat) // 2] if lat else None,
            "zero_filled_fraction": float(np.mean(zero)) if zero else 0.0,
            "rss_bytes": rss, "rss_total_bytes": sum(rss.values()),
            "power_mw": power, "power": "n/a" if power is None else f"{power / 1000:.2f} W",
            "power_note": self.power.reason, "events": list(self.events), "wall_s": time.time(),
        }


def main(argv: Optional[List[str]] = None) -> int:
    def arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--peers", required=True)
        p.add_argument("--id")
        p.add_argument("--plan")
        p.add_argument("--ipc", required=True)

    args = child_main("handler", argv, arguments)
    handler = Handler(args.peers, args.id, args.plan, args.ipc)

    def on_signal(*_):
        handler.stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        handler.start()
    except MeshError as exc:  # the supervisor checks the config first; this is the last line of defence
        log.error("cannot start the mesh: %s", exc)
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
