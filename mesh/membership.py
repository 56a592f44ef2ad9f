"""Who is alive: a pure state machine over peer messages and the passage of time.

No clock is read here: every call takes `now_s` (seconds, any monotonic origin).

States per peer:
    unknown  never heard a heartbeat from it (its plan hash is unverified): not alive
    alive    heard within `peer_timeout_ms`
    dead     silent for `peer_timeout_ms`; any message of the same incarnation revives it
    refused  its heartbeat carries a plan hash other than ours; stays refused until a
             heartbeat with our hash arrives

A new incarnation is only believed from a heartbeat (which also re-verifies the plan hash);
other messages from an incarnation we have not verified are not accepted.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, FrozenSet, Iterable, List, Optional, Tuple

log = logging.getLogger(__name__)

UNKNOWN, ALIVE, DEAD, REFUSED = "unknown", "alive", "dead", "refused"
JOINED, DIED, REJOINED, REFUSED_EVENT = "joined", "died", "rejoined", "refused"


@dataclass(frozen=True)
class MembershipEvent:
    kind: str            # joined, died, rejoined or refused
    peer_id: str
    now_s: float
    incarnation: Optional[int] = None
    restarted: bool = False  # rejoined with a new incarnation (the process restarted)
    detail: str = ""


@dataclass
class _Peer:
    state: str = UNKNOWN
    last_heard_s: Optional[float] = None
    incarnation: Optional[int] = None
    newest_frame: int = -1
    plan_hash: Optional[str] = None
    ever_alive: bool = False


# Why a message was not accepted; the mesh uses these as drop-counter names.
NOT_VERIFIED = "unverified"
REFUSED_PLAN = "refused_plan"


class Membership:
    def __init__(self, self_id: str, peer_ids: Iterable[str], plan_hash: str, peer_timeout_ms: int):
        self.self_id = self_id
        self.plan_hash = plan_hash
        self.peer_timeout_s = peer_timeout_ms / 1000.0
        self._peers: Dict[str, _Peer] = {p: _Peer() for p in peer_ids if p != self_id}
        # No verdict before this time: set after this node itself was stalled (see hold_verdicts).
        self._verdicts_held_until_s = float("-inf")

    # ------------------------------------------------------------ inputs
    def on_heartbeat(self, peer_id: str, now_s: float, incarnation: int, plan_hash: str,
                     newest_frame: int = -1) -> Tuple[Optional[str], List[MembershipEvent]]:
        """Apply a heartbeat; returns (reason it was not accepted or None, events)."""
        peer = self._peers.get(peer_id)
        if peer is None:
            return NOT_VERIFIED, []
        events: List[MembershipEvent] = []
        restarted = peer.incarnation is not None and incarnation != peer.incarnation
        peer.last_heard_s = now_s
        peer.newest_frame = max(newest_frame, peer.newest_frame) if not restarted else newest_frame
        peer.plan_hash = plan_hash
        if plan_hash != self.plan_hash:
            if peer.state != REFUSED or restarted:
                log.error("peer %s (incarnation %s) runs plan %s, this node runs %s: refused until it matches",
                          peer_id, incarnation, plan_hash, self.plan_hash)
                events.append(MembershipEvent(REFUSED_EVENT, peer_id, now_s, incarnation, restarted,
                                              f"plan {plan_hash} != {self.plan_hash}"))
            peer.state, peer.incarnation = REFUSED, incarnation
            return REFUSED_PLAN, events
        if peer.state == ALIVE and not restarted:
            return None, events
        if peer.ever_alive:
            events.append(MembershipEvent(REJOINED, peer_id, now_s, incarnation, restarted))
        else:
            events.append(MembershipEvent(JOINED, peer_id, now_s, incarnation))
        peer.state, peer.incarnation, peer.ever_alive = ALIVE, incarnation, True
        return None, events

    def on_message(self, peer_id: str, now_s: float, incarnation: int) -> Tuple[Optional[str], List[MembershipEvent]]:
        """Apply any other message (a sign of life); returns (reason not accepted or None, events)."""
        peer = self._peers.get(peer_id)
        if peer is None or peer.state == UNKNOWN or incarnation != peer.incarnation:
            return NOT_VERIFIED, []
        if peer.state == REFUSED:
            return REFUSED_PLAN, []
        peer.last_heard_s = now_s
        if peer.state == DEAD:
            peer.state = ALIVE
            return None, [MembershipEvent(REJOINED, peer_id, now_s, incarnation, False)]
        return None, []

    def hold_verdicts(self, until_s: float) -> None:
        """Declare nobody dead before `until_s`.

        For a node that was itself not running (stopped, starved of CPU): the heartbeats its
        peers sent meanwhile may still sit in the kernel or in ZeroMQ's I/O thread, which
        wakes no sooner than we do, so their silence is ours and proves nothing yet.
        """
        self._verdicts_held_until_s = max(self._verdicts_held_until_s, until_s)

    def tick(self, now_s: float) -> List[MembershipEvent]:
        """Declare dead every alive peer silent for at least `peer_timeout_ms`."""
        events = []
        if now_s < self._verdicts_held_until_s:
            return events
        for peer_id, peer in self._peers.items():
            if peer.state == ALIVE and now_s - peer.last_heard_s >= self.peer_timeout_s:
                peer.state = DEAD
                events.append(MembershipEvent(DIED, peer_id, now_s, peer.incarnation,
                                              detail=f"silent for {(now_s - peer.last_heard_s) * 1000:.0f} ms"))
        return events

    # ------------------------------------------------------------ queries
    def alive(self) -> FrozenSet[str]:
        return frozenset(p for p, s in self._peers.items() if s.state == ALIVE)

    def is_alive(self, peer_id: str) -> bool:
        peer = self._peers.get(peer_id)
        return peer is not None and peer.state == ALIVE

    def state(self, peer_id: str) -> str:
        return self._peers[peer_id].state

    def next_expiry_s(self) -> Optional[float]:
        """When the next alive peer times out if it stays silent, or None."""
        times = [p.last_heard_s + self.peer_timeout_s for p in self._peers.values() if p.state == ALIVE]
        return max(min(times), self._verdicts_held_until_s) if times else None

    def snapshot(self, now_s: Optional[float] = None) -> Dict[str, dict]:
        out = {}
        for peer_id, p in self._peers.items():
            entry = {"state": p.state, "last_heard_s": p.last_heard_s, "incarnation": p.incarnation,
                     "newest_frame": p.newest_frame}
            if now_s is not None and p.last_heard_s is not None:
                entry["silent_ms"] = round((now_s - p.last_heard_s) * 1000.0, 1)
            out[peer_id] = entry
        return out
