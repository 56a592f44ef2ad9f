"""Waiting on a few ZeroMQ sockets at a low fixed cost per wakeup.

`zmq.Poller.poll` asks every socket for its file descriptor and builds a poll set on each call.
`ReadyPoller` registers the sockets' ZMQ_FD with epoll once and asks ZMQ_EVENTS to learn which
are readable. Asking is not free either (libzmq processes the socket's pending commands), and a
node's loop wakes some fifteen times per frame, so the sockets that carry frames ("hot": the
mesh, the engine, the clients) are asked on every wakeup, and the rarely busy ones ("cold": the
ZAP handler, the handshake monitor) when no hot socket explains a wakeup, or when the caller
asks for all.

ZMQ_FD signals edges, not levels: a socket that still holds messages after a drain stopped
short raises no new edge. Callers drain a socket until ZMQ_EVENTS says it is empty, or come back
with a zero timeout (which asks without blocking), as the node's drains do.
"""
from __future__ import annotations

import select
from typing import List, Sequence, Set

import zmq

_EVENTS, _POLLIN, _FD = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.FD)


class ReadyPoller:
    def __init__(self, hot: Sequence[zmq.Socket], cold: Sequence[zmq.Socket] = ()) -> None:
        self.hot: List[zmq.Socket] = list(hot)
        self.cold: List[zmq.Socket] = list(cold)
        self._epoll = select.epoll()
        for s in self.hot + self.cold:
            self._epoll.register(s.getsockopt(_FD), select.EPOLLIN)

    def poll(self, timeout_s: float, everything: bool = False) -> Set[zmq.Socket]:
        """The sockets with a message waiting, after waiting up to `timeout_s` for a signal."""
        if timeout_s > 0:
            self._epoll.poll(timeout_s)
        ready = {s for s in self.hot if s.getsockopt(_EVENTS) & _POLLIN}
        if everything or not ready:
            ready.update(s for s in self.cold if s.getsockopt(_EVENTS) & _POLLIN)
        return ready

    def close(self) -> None:
        self._epoll.close()
