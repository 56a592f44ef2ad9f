"""Who is alive, who hears whom, who takes part: a pure state machine over heartbeats and time.

No clock is read here: every call takes `now_s` (seconds, any monotonic origin).

States per peer (`PeerState`):
    unknown      never heard a heartbeat from it (its plan hash is unverified)
    alive        heard directly within `peer_timeout_ms`
    unreachable  not heard directly for `peer_timeout_ms`, but another peer heard it within
                 that time (its heartbeat says so): the link between us is lossy or down, the
                 peer itself is not. Not a participant of new frames, and no `died` event.
    dead         nobody has heard it for `peer_timeout_ms`; any message of the same
                 incarnation revives it
    refused      its heartbeat carries a plan hash (or wire dtype) other than ours; stays
                 refused until a heartbeat with ours arrives

Failure detection. A crashed node falls silent to everyone at once: dead after
`peer_timeout_ms`. Packet loss on one link delays TCP (a lost segment holds the stream back by
200 ms, 400 ms, ... of retransmission), which a fixed timeout would call a death. Heartbeats
therefore say whom their sender hears and how long ago (`hears`); a peer we stopped hearing
but whom others still hear — clearly after we last did, by more than `vouch_margin_ms` — is
`unreachable`, not dead (indirect evidence, as SWIM's indirect probes give, but free: it rides
on the heartbeats every node sends anyway).

Taking part. A peer is *connected* when it is alive, its last heartbeat says it hears us (our
current incarnation, recently), it says its engine is ready, and our sends to it do not fail:
the link works both ways and the peer computes. New frames run on the largest set of nodes
that includes us in which every two nodes are connected (`participants`): a one-way link or a
half-healed split never puts two nodes in one frame that cannot exchange slices.

A new incarnation is only believed from a heartbeat (which also re-verifies the plan hash),
and only a larger one: a replayed or older incarnation is not accepted.
"""
from __future__ import annotations

import enum
import itertools
import logging
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

log = logging.getLogger(__name__)


class PeerState(str, enum.Enum):
    UNKNOWN = "unknown"
    ALIVE = "alive"
    UNREACHABLE = "unreachable"
    DEAD = "dead"
    REFUSED = "refused"


class EventKind(str, enum.Enum):
    JOINED = "joined"
    DIED = "died"
    REJOINED = "rejoined"
    REFUSED = "refused"
    UNREACHABLE = "unreachable"   # heard by others, not by us
    REACHABLE = "reachable"       # heard by us again


@dataclass(frozen=True)
class MembershipEvent:
    kind: EventKind
    peer_id: str
    now_s: float
    incarnation: Optional[int] = None
    restarted: bool = False  # rejoined with a new incarnation (the process restarted)
    detail: str = ""


@dataclass(frozen=True)
class Report:
    """What a peer's latest heartbeat claimed, and when it arrived."""

    received_s: float
    ready: bool = True
    hears: Mapping[str, Tuple[int, int]] = field(default_factory=dict)   # id -> (incarnation, age_ms)
    progress: Mapping[int, int] = field(default_factory=dict)            # frame -> stages sent
    inputs: Mapping[str, int] = field(default_factory=dict)              # origin id -> newest frame


@dataclass
class _Peer:
    state: PeerState = PeerState.UNKNOWN
    last_heard_s: Optional[float] = None
    vouched_s: float = float("-inf")       # the latest time another peer heard it
    incarnation: Optional[int] = None
    plan_hash: Optional[str] = None
    plans: FrozenSet[str] = frozenset()    # the plans it computes frames of (two during a roll-out)
    rollout: Tuple[str, int, str] = ("", 0, "")   # its heartbeat's (next plan, switch ms, plan folder)
    ever_alive: bool = False
    report: Optional[Report] = None
    send_failing: bool = False
    refusal: str = ""             # why it is refused (plan or wire dtype), from our side


# Why a message was not accepted; the mesh uses these as drop-counter names.
NOT_VERIFIED = "unverified"
REFUSED_PLAN = "refused_plan"
OLD_INCARNATION = "old_incarnation"

# Subsets tried exactly for the participant set; beyond this many candidates, a greedy pick.
EXACT_CLIQUE_MAX = 12


class Membership:
    def __init__(self, self_id: str, peer_ids: Iterable[str], plan_hash: str, peer_timeout_ms: int, *,
                 incarnation: int = 0, wire_dtype: str = "float32", vouch_margin_ms: float = 0.0):
        self.self_id = self_id
        self.incarnation = int(incarnation)
        self.plan_hash = plan_hash
        self.plans: FrozenSet[str] = frozenset({plan_hash})   # ours: a peer must share one of them
        self.wire_dtype = wire_dtype
        self.peer_timeout_s = peer_timeout_ms / 1000.0
        # Others' word keeps a peer we stopped hearing alive only if they heard it clearly after
        # we last did: when a node crashes, everyone's last news of it is within a heartbeat.
        self.vouch_margin_s = vouch_margin_ms / 1000.0
        self.order = [p for p in peer_ids if p != self_id]
        self._peers: Dict[str, _Peer] = {p: _Peer() for p in self.order}
        # No verdict before this time: set after this node itself was stalled (see hold_verdicts).
        self._verdicts_held_until_s = float("-inf")

    # ------------------------------------------------------------ inputs
    def on_heartbeat(self, peer_id: str, now_s: float, incarnation: int, plan_hash: str, *,
                     wire_dtype: str = "float32", ready: bool = True,
                     hears: Optional[Mapping[str, Tuple[int, int]]] = None,
                     progress: Optional[Mapping[int, int]] = None,
                     inputs: Optional[Mapping[str, int]] = None, next_plan: str = "", switch_ms: int = 0,
                     rollout_dir: str = "") -> Tuple[Optional[str], List[MembershipEvent]]:
        """Apply a heartbeat; returns (reason it was not accepted or None, events). A peer is
        refused unless it computes frames of one of our plans (`plans`: two during a roll-out)."""
        peer = self._peers.get(peer_id)
        if peer is None:
            return NOT_VERIFIED, []
        if peer.incarnation is not None and incarnation < peer.incarnation:
            return OLD_INCARNATION, []
        events: List[MembershipEvent] = []
        restarted = peer.incarnation is not None and incarnation != peer.incarnation
        peer.plan_hash = plan_hash
        peer.plans = frozenset((plan_hash, next_plan)) if next_plan else frozenset((plan_hash,))
        peer.rollout = (next_plan, int(switch_ms), rollout_dir)
        mismatch = self._mismatch(peer.plans, wire_dtype)
        if mismatch:
            if peer.state != PeerState.REFUSED or restarted:
                events.append(MembershipEvent(EventKind.REFUSED, peer_id, now_s, incarnation, restarted, mismatch))
            peer.state, peer.incarnation, peer.report, peer.refusal = PeerState.REFUSED, incarnation, None, mismatch
            peer.last_heard_s = now_s
            return REFUSED_PLAN, events
        peer.last_heard_s = now_s
        peer.report = Report(now_s, bool(ready), dict(hears or {}), dict(progress or {}), dict(inputs or {}))
        self._vouch(peer_id, now_s, peer.report.hears)
        if peer.state == PeerState.ALIVE and not restarted:
            return None, events
        if peer.state == PeerState.UNREACHABLE and not restarted:
            kind = EventKind.REACHABLE
        else:
            kind = EventKind.REJOINED if peer.ever_alive else EventKind.JOINED
        events.append(MembershipEvent(kind, peer_id, now_s, incarnation, restarted))
        peer.state, peer.incarnation, peer.ever_alive = PeerState.ALIVE, incarnation, True
        return None, events

    def set_plans(self, current: str, others: Iterable[str] = ()) -> None:
        """The plans this node computes frames of: `current`, and a roll-out's next one. Peers are
        judged against them from their next heartbeat on."""
        self.plan_hash = current
        self.plans = frozenset((current, *others))

    def _mismatch(self, plans: FrozenSet[str], wire_dtype: str) -> str:
        if not plans & self.plans:
            theirs = " and ".join(sorted(p[:64] for p in plans))
            ours = " and ".join(sorted(self.plans))
            return f"plan mismatch: it runs plan {theirs}, this node runs plan {ours}"
        if wire_dtype != self.wire_dtype:
            return f"wire dtype mismatch: it sends {wire_dtype[:16]} slices, this node sends {self.wire_dtype}"
        return ""

    def _vouch(self, reporter: str, now_s: float, hears: Mapping[str, Tuple[int, int]]) -> None:
        for peer_id, (incarnation, age_ms) in hears.items():
            peer = self._peers.get(peer_id)
            if peer is None or peer_id == reporter or incarnation != peer.incarnation:
                continue
            peer.vouched_s = max(peer.vouched_s, now_s - age_ms / 1000.0)

    def on_message(self, peer_id: str, now_s: float, incarnation: int) -> Tuple[Optional[str], List[MembershipEvent]]:
        """Apply any other message (a sign of life); returns (reason not accepted or None, events)."""
        peer = self._peers.get(peer_id)
        if peer is None or peer.state == PeerState.UNKNOWN or incarnation != peer.incarnation:
            return NOT_VERIFIED, []
        if peer.state == PeerState.REFUSED:
            return REFUSED_PLAN, []
        peer.last_heard_s = now_s
        if peer.state == PeerState.DEAD:
            peer.state = PeerState.ALIVE
            return None, [MembershipEvent(EventKind.REJOINED, peer_id, now_s, incarnation, False)]
        if peer.state == PeerState.UNREACHABLE:
            peer.state = PeerState.ALIVE
            return None, [MembershipEvent(EventKind.REACHABLE, peer_id, now_s, incarnation, False)]
        return None, []

    def on_send(self, peer_id: str, ok: bool) -> None:
        """Whether the latest send to `peer_id` was taken by its connection."""
        peer = self._peers.get(peer_id)
        if peer is not None:
            peer.send_failing = not ok

    def hold_verdicts(self, until_s: float) -> None:
        """Declare nobody dead before `until_s`.

        For a node that was itself not running (stopped, starved of CPU): the heartbeats its
        peers sent meanwhile may still sit in the kernel or in ZeroMQ's I/O thread, which
        wakes no sooner than we do, so their silence is ours and proves nothing yet.
        """
        self._verdicts_held_until_s = max(self._verdicts_held_until_s, until_s)

    def tick(self, now_s: float) -> List[MembershipEvent]:
        """Apply timeouts: alive → unreachable or dead, unreachable → dead."""
        events: List[MembershipEvent] = []
        if now_s < self._verdicts_held_until_s:
            return events
        timeout = self.peer_timeout_s
        for peer_id, peer in self._peers.items():
            if peer.state not in (PeerState.ALIVE, PeerState.UNREACHABLE):
                continue
            silent_s = now_s - peer.last_heard_s
            if silent_s < timeout:
                continue
            vouched = now_s - peer.vouched_s < timeout and peer.vouched_s > peer.last_heard_s + self.vouch_margin_s
            if peer.state == PeerState.ALIVE and vouched:
                peer.state = PeerState.UNREACHABLE
                events.append(MembershipEvent(EventKind.UNREACHABLE, peer_id, now_s, peer.incarnation,
                                              detail=f"silent to us for {silent_s * 1000:.0f} ms, heard by others"))
            elif not vouched:
                peer.state = PeerState.DEAD
                events.append(MembershipEvent(EventKind.DIED, peer_id, now_s, peer.incarnation,
                                              detail=f"silent for {silent_s * 1000:.0f} ms"))
        return events

    # ------------------------------------------------------------ queries
    def alive(self) -> FrozenSet[str]:
        """Peers heard directly within the timeout."""
        return frozenset(p for p, s in self._peers.items() if s.state == PeerState.ALIVE)

    def is_alive(self, peer_id: str) -> bool:
        peer = self._peers.get(peer_id)
        return peer is not None and peer.state == PeerState.ALIVE

    def state(self, peer_id: str) -> PeerState:
        return self._peers[peer_id].state

    def refusal(self, peer_id: str) -> str:
        """Why the peer is refused ("" unless it is): its plan or wire dtype against ours."""
        peer = self._peers[peer_id]
        return peer.refusal if peer.state == PeerState.REFUSED else ""

    def report(self, peer_id: str) -> Optional[Report]:
        peer = self._peers.get(peer_id)
        return None if peer is None else peer.report

    def _hears(self, peer: _Peer, now_s: float) -> Dict[str, int]:
        """Whom `peer` heard recently by its last report: id -> incarnation (ours for self)."""
        report = peer.report
        if report is None:
            return {}
        since_ms = (now_s - report.received_s) * 1000.0
        limit_ms = self.peer_timeout_s * 1000.0
        return {p: inc for p, (inc, age_ms) in report.hears.items() if age_ms + since_ms < limit_ms}

    def hears_us(self, peer_id: str, now_s: float) -> bool:
        """`_hears(peer)` holds us at our incarnation; without building the whole map (a node asks
        this of every peer on every housekeeping pass)."""
        peer = self._peers.get(peer_id)
        report = None if peer is None else peer.report
        if report is None:
            return False
        entry = report.hears.get(self.self_id)
        return (entry is not None and entry[0] == self.incarnation
                and entry[1] + (now_s - report.received_s) * 1000.0 < self.peer_timeout_s * 1000.0)

    def connected(self, now_s: float) -> FrozenSet[str]:
        """Peers we can compute frames with: alive, hearing us, ready, and taking our sends."""
        return frozenset(p for p, s in self._peers.items()
                         if s.state == PeerState.ALIVE and s.report is not None and s.report.ready
                         and not s.send_failing and self.hears_us(p, now_s))

    def plans_of(self, peer_id: str) -> FrozenSet[str]:
        peer = self._peers.get(peer_id)
        return peer.plans if peer is not None else frozenset()

    def rollout_of(self, peer_id: str) -> Tuple[str, str, int, str]:
        """What the peer's latest heartbeat said of plans, accepted or refused: (plan, next plan,
        switch ms, roll-out plan folder)."""
        peer = self._peers[peer_id]
        return (peer.plan_hash or "", *peer.rollout)

    def participants(self, now_s: float, plan: Optional[str] = None) -> FrozenSet[str]:
        """Who a frame submitted now runs on: us and the largest set of connected peers in which
        every two hear each other (ties go to the lower device indices, by peers.yaml order);
        with `plan`, only peers that compute frames of that plan (a subset of a clique is one)."""
        connected = self.connected(now_s)   # once: a node asks this every housekeeping pass
        candidates = [p for p in self.order if p in connected and (plan is None or plan in self._peers[p].plans)]
        heard = {p: self._hears(self._peers[p], now_s) for p in candidates}

        def mutual(a: str, b: str) -> bool:
            return (heard[a].get(b) == self._peers[b].incarnation and heard[b].get(a) == self._peers[a].incarnation)

        return frozenset({self.self_id} | set(largest_clique(candidates, mutual)))

    def heard_view(self, now_s: float) -> Dict[str, Tuple[int, int]]:
        """What our heartbeat says we hear: {peer: (incarnation, age_ms)} for peers heard directly."""
        return {p: (s.incarnation, int((now_s - s.last_heard_s) * 1000.0)) for p, s in self._peers.items()
                if s.state == PeerState.ALIVE}

    def next_expiry_s(self) -> Optional[float]:
        """When the next timeout can change a state if nothing arrives, or None."""
        times = []
        for p in self._peers.values():
            if p.state == PeerState.ALIVE:
                times.append(p.last_heard_s + self.peer_timeout_s)
            elif p.state == PeerState.UNREACHABLE:
                times.append(p.vouched_s + self.peer_timeout_s)
        return max(min(times), self._verdicts_held_until_s) if times else None

    def snapshot(self, now_s: float) -> Dict[str, dict]:
        out = {}
        connected = self.connected(now_s)
        for peer_id, p in self._peers.items():
            entry = {"state": p.state.value, "incarnation": p.incarnation,
                     "connected": peer_id in connected, "hears_us": self.hears_us(peer_id, now_s),
                     "ready": bool(p.report.ready) if p.report else None,
                     "hears": sorted(self._hears(p, now_s)) if p.report else []}
            if p.last_heard_s is not None:
                entry["silent_ms"] = round((now_s - p.last_heard_s) * 1000.0, 1)
            out[peer_id] = entry
        return out


def largest_clique(candidates: Sequence[str], mutual) -> List[str]:
    """The largest subset of `candidates` whose members are pairwise `mutual(a, b)`.

    Among the largest, the one first in `candidates` order (lexicographic on positions). Exact
    up to EXACT_CLIQUE_MAX candidates (at most 4096 subsets, on a handful of boards usually
    one); greedy in order beyond.
    """
    n = len(candidates)
    if n > EXACT_CLIQUE_MAX:
        chosen: List[str] = []
        for c in candidates:
            if all(mutual(c, o) for o in chosen):
                chosen.append(c)
        return chosen
    ok: Set[Tuple[int, int]] = {(i, j) for i, j in itertools.combinations(range(n), 2)
                                if mutual(candidates[i], candidates[j])}
    for size in range(n, 0, -1):
        for combo in itertools.combinations(range(n), size):
            if all(pair in ok for pair in itertools.combinations(combo, 2)):
                return [candidates[i] for i in combo]
    return []
