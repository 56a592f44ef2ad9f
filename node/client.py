"""A client of a node's client port: submit inputs, ask for status.

The client port admits CURVE clients whose public key is in peers.yaml (`clients:` or a peer's);
the secret key comes from `--key`, $ROBUSTDICE_CLIENT_KEY, or `client.key_secret` beside the
nodes' secret keys. With `insecure: true` no key is used.
"""
from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import zmq

from robustdice.mesh import wire
from robustdice.mesh.config import PeersConfig
from robustdice.mesh.errors import WireError
from robustdice.mesh.keys import load_secret
from robustdice.mesh.transport import curve_client

from .errors import NodeError

CLIENT_NAME = "client"


def default_key_path(config: PeersConfig, key: Optional[str] = None) -> Optional[Path]:
    if config.insecure:
        return None
    if key:
        return Path(key)
    if os.environ.get("ROBUSTDICE_CLIENT_KEY"):
        return Path(os.environ["ROBUSTDICE_CLIENT_KEY"])
    if config.secret_key_file:
        candidate = config.secret_key_path("client").parent / "client.key_secret"
        if candidate.exists():
            return candidate
    raise NodeError("no client key: pass --key FILE.key_secret (its public key must be in peers.yaml clients:)")


class NodeClient:
    """A DEALER connected to one node's client port."""

    def __init__(self, config: PeersConfig, node_id: str, key_path: Optional[Path] = None,
                 context: Optional[zmq.Context] = None) -> None:
        self.config = config
        self.node = config.peer(node_id)
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.setsockopt(zmq.MAXMSGSIZE, config.max_message_bytes)
        self.name = CLIENT_NAME
        if not config.insecure:
            if key_path is None:
                raise NodeError("a client key is needed unless peers.yaml says insecure: true")
            public, secret = load_secret(key_path)
            curve_client(self.sock, public, secret, self.node.public_key.encode())
        self.sock.connect(self.node.client_endpoint)
        self._ids = itertools.count()

    def close(self) -> None:
        self.sock.close(0)
        if self._own_context:
            self.context.term()

    def __enter__(self) -> "NodeClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send_input(self, x: np.ndarray, meta: Optional[Dict] = None) -> int:
        request_id = next(self._ids)
        body = dict(meta or {}, id=request_id, sent_wall_s=time.time())
        msg = wire.Input(0, self.name, np.ascontiguousarray(x, dtype=np.float32), body, sender=self.name)
        self.sock.send_multipart(wire.encode(msg), copy=False)
        return request_id

    def receive(self, timeout_s: float):
        """The next message from the node, or None after `timeout_s`."""
        if not self.sock.poll(timeout_s * 1000.0):
            return None
        try:
            return wire.decode(self.sock.recv_multipart(copy=False), self.config.max_message_bytes)
        except WireError as exc:
            raise NodeError(f"node {self.node.id} sent an unreadable reply ({exc.reason}: {exc.detail})") from None

    def submit(self, x: np.ndarray, meta: Optional[Dict] = None, timeout_s: float = 30.0):
        request_id = self.send_input(x, meta)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            reply = self.receive(deadline - time.monotonic())
            if isinstance(reply, wire.Result) and reply.meta.get("request", {}).get("id") == request_id:
                return reply
        raise NodeError(f"node {self.node.id} did not answer within {timeout_s:.0f} s "
                        f"({self.node.client_endpoint})")

    def status(self, timeout_s: float = 3.0) -> Optional[Dict]:
        self.sock.send_multipart(wire.encode(wire.Control("status", {}, sender=self.name)))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            reply = self.receive(deadline - time.monotonic())
            if isinstance(reply, wire.Control) and reply.kind == "status":
                return dict(reply.body)
        return None


def closed_loop(client: NodeClient, inputs: np.ndarray, frames: int, in_flight: int, *, first: int = 0,
                timeout_s: float = 60.0, stop=None, records: Optional[List[Dict]] = None) -> List[Dict]:
    """Submit `frames` inputs (sample i is `inputs[(first + i) % len(inputs)]`, batch 1), keeping
    `in_flight` of them outstanding, as a camera with a pipeline does; returns one record per
    frame sent, in order: sample, submitted/answered wall time, and the answer's meta (None if
    none came within `timeout_s` of the last answer). `stop` (an Event): send no more, collect
    what is outstanding. `records`: a list to fill as answers come (another thread may watch it)."""
    records = [] if records is None else records
    by_id: Dict[int, Dict] = {}
    waiting = 0
    last_s = time.monotonic()
    while True:
        while len(records) < frames and waiting < in_flight and not (stop is not None and stop.is_set()):
            sample = (first + len(records)) % len(inputs)
            rid = client.send_input(inputs[sample: sample + 1])
            record = {"sample": sample, "submitted_wall_s": time.time(), "answered_wall_s": None, "meta": None}
            records.append(record)
            by_id[rid] = record
            waiting += 1
        if waiting == 0 or time.monotonic() - last_s > timeout_s:
            return records
        msg = client.receive(min(1.0, timeout_s))
        if isinstance(msg, wire.Result):
            record = by_id.pop(msg.meta.get("request", {}).get("id"), None)
            if record is not None:
                record["answered_wall_s"] = time.time()
                record["meta"] = dict(msg.meta)
                waiting -= 1
                last_s = time.monotonic()


class CameraStream(threading.Thread):
    """An open-loop camera: one input every 1/`rate_fps` s to one node, whatever the answers do;
    every answer recorded (sample, sent/answered wall time, frame id, meta, logits). `stop`
    ends the sending; what is outstanding is collected for up to `drain_s`."""

    def __init__(self, config: PeersConfig, node_id: str, key_path: Optional[Path], inputs: np.ndarray,
                 rate_fps: float, drain_s: float = 12.0) -> None:
        super().__init__(daemon=True)
        self.config, self.node_id, self.key_path = config, node_id, key_path
        self.inputs, self.rate_fps, self.drain_s = inputs, rate_fps, drain_s
        self.records: List[Dict] = []
        self.stop = threading.Event()

    def run(self) -> None:
        by_id: Dict[int, Dict] = {}
        with NodeClient(self.config, self.node_id, self.key_path) as client:
            next_s = time.monotonic()
            drain_until = None
            while True:
                now = time.monotonic()
                if self.stop.is_set() and drain_until is None:
                    drain_until = now + self.drain_s
                if drain_until is not None and (now > drain_until or not by_id):
                    return
                if drain_until is None and now >= next_s:
                    sample = len(self.records) % len(self.inputs)
                    rid = client.send_input(self.inputs[sample: sample + 1])
                    record = {"sample": sample, "sent_s": time.time(), "answered_s": None, "frame": None,
                              "meta": None}
                    self.records.append(record)
                    by_id[rid] = record
                    next_s += 1.0 / self.rate_fps
                msg = client.receive(max(0.0, min(next_s - time.monotonic(), 0.05)))
                if isinstance(msg, wire.Result):
                    record = by_id.pop(msg.meta.get("request", {}).get("id"), None)
                    if record is not None:
                        record.update(meta=dict(msg.meta), answered_s=time.time(), frame=msg.frame,
                                      logits=msg.arrays[0] if msg.arrays else None)


def status_all(config: PeersConfig, key_path: Optional[Path], timeout_s: float = 2.0,
               request: Optional[Dict] = None) -> List[Dict]:
    """Every node's own view; a node that does not answer within `timeout_s` shows as unreachable.

    All nodes are asked at once and their replies read as they come, so one dead node costs
    the deadline once, not the nodes listed after it.
    """
    return ask_all(config, key_path, "status", request or {}, timeout_s)


def ask_all(config: PeersConfig, key_path: Optional[Path], kind: str, body: Dict, timeout_s: float = 2.0,
            nodes: Optional[List[str]] = None) -> List[Dict]:
    """Send the control request `kind` to every node (or `nodes`) at once; each one's reply body,
    or {"node": id, "unreachable": True} for a node silent within `timeout_s`."""
    replies: Dict[str, Dict] = {}
    asked = [p for p in config.peers if nodes is None or p.id in nodes]
    with zmq.Context() as ctx:
        clients = [NodeClient(config, p.id, key_path, ctx) for p in asked]
        try:
            poller = zmq.Poller()
            by_socket = {}
            for c in clients:
                c.sock.send_multipart(wire.encode(wire.Control(kind, body, sender=c.name)))
                poller.register(c.sock, zmq.POLLIN)
                by_socket[c.sock] = c
            deadline = time.monotonic() + timeout_s
            while len(replies) < len(clients):
                left_s = deadline - time.monotonic()
                if left_s <= 0:
                    break
                for sock, _ in poller.poll(left_s * 1000.0):
                    c = by_socket[sock]
                    msg = c.receive(0)
                    if isinstance(msg, wire.Control) and msg.kind == kind:
                        replies[c.node.id] = dict(msg.body)
        finally:
            for c in clients:
                c.sock.close(0)
    return [replies.get(p.id, {"node": p.id, "unreachable": True}) for p in asked]
