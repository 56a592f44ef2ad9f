"""ZeroMQ plumbing for the mesh: socket options, CURVE, and a ZAP handler serviced by the event loop.

Topology: every node binds ONE PULL socket on its own address (the CURVE server) and connects
one PUSH per peer to that peer's bound address (a CURVE client). Only binding sockets are CURVE
servers. Sends never block: a PUSH with IMMEDIATE=1 refuses to queue for a peer that is not
connected, and a full send queue (SNDHWM) makes the send fail; both are counted as drops.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import zmq
from zmq.utils import z85

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
MESH_DOMAIN = "mesh"
CLIENT_DOMAIN = "client"
# Messages queued per peer before sends are dropped. A node may send a burst of many frames'
# slices while its I/O thread is starved of CPU: with 64, a loaded 2-core machine dropped 3 to
# 18 slices per node in a 60-gather burst, each costing the receiver a sync timeout and a
# zero-fill. What a stopped peer can pin stays bounded: slices go only to live peers, so its
# queue holds at most what this node produced within one peer timeout (plus heartbeats).
SEND_HWM = 1000
# Messages queued per peer connection before ZeroMQ stops reading its TCP socket: the node
# drains up to 2000 a pass, so this only bounds what a flood can pin in memory.
RECV_HWM = 1000


class ZapPolicy:
    """Who may connect: a per-domain allowlist of Z85 public keys mapped to user ids (pure)."""

    def __init__(self, allow: Mapping[str, Mapping[str, str]]):
        self.allow = {domain: dict(keys) for domain, keys in allow.items()}

    def decide(self, domain: str, mechanism: str, public_key_z85: Optional[str]) -> Tuple[bool, str]:
        """(admitted, user id or reason)."""
        if mechanism != "CURVE":
            return False, f"mechanism {mechanism} not allowed"
        keys = self.allow.get(domain)
        if keys is None:
            return False, f"unknown domain {domain!r}"
        user = keys.get(public_key_z85 or "")
        if user is None:
            return False, "key not listed"
        return True, user


class ZapHandler:
    """The context's ZAP endpoint as a REP socket, answered from the mesh's own loop (no thread)."""

    def __init__(self, context: zmq.Context, policy: ZapPolicy):
        self.policy = policy
        self.socket = context.socket(zmq.REP)
        self.socket.linger = 0
        self.socket.bind(ZAP_ENDPOINT)
        self.refused: Dict[str, int] = {}

    def handle_pending(self) -> int:
        """Answer every pending request without blocking; returns how many were refused."""
        refused = 0
        while self.socket.getsockopt(_EVENTS) & _POLLIN:
            request = self.socket.recv_multipart(zmq.NOBLOCK)
            ok, user = self._decide(request)
            request_id = request[1] if len(request) > 1 else b""
            if ok:
                reply = [b"1.0", request_id, b"200", b"OK", user.encode(), b""]
            else:
                refused += 1
                reply = [b"1.0", request_id, b"400", user.encode()[:255], b"", b""]
            self.socket.send_multipart(reply)
        return refused

    def _decide(self, request) -> Tuple[bool, str]:
        if len(request) < 6 or request[0] != b"1.0":
            return False, "malformed ZAP request"
        domain, mechanism = request[2].decode("ascii", "replace"), request[5].decode("ascii", "replace")
        key = z85.encode(request[6]).decode("ascii") if mechanism == "CURVE" and len(request) > 6 \
            and len(request[6]) == 32 else None
        return self.policy.decide(domain, mechanism, key)

    def close(self) -> None:
        self.socket.close(linger=0)


def curve_server(sock: zmq.Socket, public: bytes, secret: bytes, domain: str) -> None:
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_server = True
    sock.zap_domain = domain.encode()


def curve_client(sock: zmq.Socket, public: bytes, secret: bytes, server_public: bytes) -> None:
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_serverkey = server_public


def link_options(sock: zmq.Socket, heartbeat_interval_ms: int, peer_timeout_ms: int) -> None:
    """Tear down dead TCP connections quickly, so that a healed link is used at once.

    Without these, a connection that lost its peer (a cut cable, a partition) sits in TCP's
    retransmission backoff for minutes: after a 14 s cut the RTO had reached 13 s, and the
    healed link carried nothing for that long. With them:
      * ZMTP heartbeats (PING/PONG every half peer timeout) close a connection that has heard
        nothing for `dead_ms`, and the reconnect loop starts over;
      * TCP_USER_TIMEOUT (ZMQ_TCP_MAXRT) closes one whose sent data stays unacknowledged as long;
      * a connect attempt gives up after half a peer timeout (a SYN in backoff is abandoned) and a
        fresh one follows `reconnect_ivl` later, so a returning link is tried about three times a
        second.
    `dead_ms` is 3 peer timeouts (at least 1.5 s): on a lossy link TCP can hold a stream back by
    200 + 400 + 800 ms of retransmissions, which must not cost the connection and what is queued
    on it. Membership does not wait for this: it judges liveness from heartbeats.
    """
    dead_ms = max(1500, 3 * peer_timeout_ms)
    # A PING every half peer timeout (ours travel every interval anyway; the PONGs are what a
    # PUSH connection hears): several per dead_ms, without doubling an idle node's wakeups.
    sock.setsockopt(zmq.HEARTBEAT_IVL, max(heartbeat_interval_ms, peer_timeout_ms // 2))
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, dead_ms)
    sock.setsockopt(zmq.HEARTBEAT_TTL, dead_ms)
    sock.setsockopt(zmq.TCP_MAXRT, dead_ms)
    sock.setsockopt(zmq.CONNECT_TIMEOUT, max(100, peer_timeout_ms // 2))


_SNDMORE = int(zmq.SNDMORE)


def send_parts(sock: zmq.Socket, parts: Sequence, flags: int = 0) -> None:
    """`sock.send_multipart(parts, flags, copy=False)` at a lower cost per part.

    pyzmq's send_multipart checks every part's buffer and combines its flags as enum.IntFlag
    values, a few microseconds per part in Python; a node sends some sixty parts per frame on
    each of its loops. Parts here are bytes, memoryviews, zmq.Frames or numpy arrays (which
    pyzmq copies below its copy threshold and sends zero-copy above). ZeroMQ takes a multipart
    message whole or not at all: only the first part can raise zmq.Again.
    """
    flags = int(flags)
    more = flags | _SNDMORE
    last = len(parts) - 1
    send = sock.send
    for i, part in enumerate(parts):
        send(part, more if i < last else flags, copy=False)


def make_pull(context: zmq.Context, max_message_bytes: int) -> zmq.Socket:
    sock = context.socket(zmq.PULL)
    sock.linger = 0
    sock.rcvhwm = RECV_HWM
    # libzmq drops the connection of a peer that sends more than this, before we see a byte.
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    return sock


def make_push(context: zmq.Context, reconnect_ivl_ms: int) -> zmq.Socket:
    sock = context.socket(zmq.PUSH)
    sock.linger = 0
    sock.immediate = 1
    sock.sndhwm = SEND_HWM
    # A constant, short reconnect interval: a restarted peer must be reachable again within a
    # heartbeat or so, and the backoff to a dead peer costs one SYN per interval.
    sock.reconnect_ivl = reconnect_ivl_ms
    sock.reconnect_ivl_max = 0
    return sock
