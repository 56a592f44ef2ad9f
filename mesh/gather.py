"""The per-(frame, stage) all-gather bookkeeping: pure, no sockets, no clock (`now_s` is passed in).

A gather starts when this node has computed its own slice of a stage. It waits for the
*holders*: the frame's other participants whose neurons at that stage are not all ours. It
completes as soon as every neuron has a copy or no holder is left to wait for. It hands back
what it received (the pieces, zero-copy views of the received frames); assembling them with
the local slice ("first copy wins, zero-fill the rest") is the partitioner's `assemble`, the
one place that rule lives.

When to stop waiting for a holder (`holder_verdict`), from what the membership knows of it:
  * it is not alive (dead, refused), or unreachable (others hear it, we do not: its slices
    cannot reach us), or says its engine is stalled: released at once;
  * its latest heartbeat says it has sent this stage's slice: that heartbeat came after the
    slice on the same connection (ZeroMQ keeps order per connection), so the slice was lost
    on the way: released at once;
  * its latest heartbeat does not list the frame, although it has received an input of the
    frame's origin at least as new, or (judged by the origin) although it no longer hears the
    origin: it finished, dropped or never had the frame, or never will: released;
  * its latest heartbeat lists the frame at an earlier stage: it is alive and busy with this
    frame, so the wait goes on; the deadline moves to `sync_timeout` after that heartbeat;
  * otherwise (it has not received the input yet, or we cannot hear it): released when
    `sync_timeout` has passed since the gather began (or since its last progress report).
A busy live peer is therefore never zero-filled, and a peer that finished a frame long ago
(a node back from a stall or a partition) costs nothing. `sync_timeout` bounds only silence.

Late slices are counted by what they are: a replica that came after the gather had every
neuron (`late_replica`), a slice for a frame its origin had already finished (`finished`: the
origin completed it on other copies and this node dropped it), a slice from a holder already
released or for a frame this node gave up (`late`), or a replay of a slice already used
(`stale`). The first two are routine under load; `late` means some wait ran out.

Early slices (for a gather not begun yet: peers run ahead) are kept, bounded in count, bytes and
age, and per sender, so that one peer's flood evicts its own slices, never another's. Frame ids
are predictable, so a slice for a frame this node has not admitted yet (`admit`: its input came,
or it started it) proves nothing: it is kept for one sync timeout only (the skew between a
peer's slice and the origin's input on another connection), and dropped when the frame is
admitted without its sender among the participants (`not_participant`).

Claims against deliveries. A heartbeat costs nothing to send and may lie: a peer that says it
is ready and hears everyone but never computes would otherwise cost every frame a sync timeout
(it "never got the input") or the frame timeout (it says it is busy with the frame). So a busy
claim moves a holder's deadline only as far as a sync timeout past the last slice it delivered
here (or past the gather's start): a live busy peer keeps delivering the slices of older frames.
A holder released by that timeout is *suspected* (`suspects`): no gather waits for it, those in
progress and those of new frames stop waiting at once (`suspected`), for 5 sync timeouts,
doubling while it stays silent, until a slice of a real frame from it arrives (or it rejoins
after being dead: `rejoined`). It stays a participant: an honest peer whose input was lost (a
reset connection looks the same) clears itself with the next slice it sends, late or not.
"""
from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Mapping, Optional, Set, Tuple

import numpy as np

from .errors import MeshError
from .membership import PeerState, Report

Key = Tuple[int, int]  # (frame, stage)
Degraded = Tuple[Tuple[int, int, int], ...]

# Drop reasons, used as counter names by the mesh.
STALE = "stale"
LATE = "late"
LATE_REPLICA = "late_replica"
FINISHED = "finished"
BAD_SLICE = "bad_slice"
NOT_FINITE = "not_finite"
DUPLICATE = "duplicate"
EARLY_EVICTED = "early_evicted"
EARLY_EXPIRED = "early_expired"
BAD_STAGE = "bad_stage"
NOT_PARTICIPANT = "not_participant"
# An early slice of a participant this node stopped waiting for in the frame (released at an
# earlier stage) before the slice's own stage began here: routine, the release was the news.
NOT_WAITED = "not_waited"
UNADMITTED_EXPIRED = "unadmitted_expired"

# Why a holder was not waited for any longer (GatherResult.released values).
RELEASED_DEAD = "dead"
RELEASED_STALLED = "stalled"
RELEASED_LOST = "lost"
RELEASED_ABSENT = "absent"
RELEASED_TIMEOUT = "timeout"
RELEASED_UNREACHABLE = "unreachable"
RELEASED_SUSPECTED = "suspected"
# Releases that hold for the rest of the frame: the holder will not take part in its later
# stages either (a lost slice is the one release that concerns one stage only).
FOR_THE_FRAME = frozenset({RELEASED_DEAD, RELEASED_STALLED, RELEASED_ABSENT, RELEASED_TIMEOUT,
                           RELEASED_UNREACHABLE, RELEASED_SUSPECTED})

DEFAULT_MAX_EARLY_SLICES = 1024
DEFAULT_MAX_EARLY_BYTES = 32 * 1024 * 1024
DEFAULT_EARLY_TTL_S = 10.0
DEFAULT_FINISHED_MEMORY = 4096
# How long a holder released at the sync timeout stays suspected, in sync timeouts; doubled at
# each release while it delivers nothing, up to SUSPECT_MAX_FACTOR times that.
SUSPECT_SYNC_TIMEOUTS = 5
SUSPECT_MAX_FACTOR = 16


@dataclass(frozen=True)
class SliceData:
    neuron_ids: np.ndarray
    array: np.ndarray


@dataclass(frozen=True)
class Piece:
    sender: str
    neuron_ids: np.ndarray = field(compare=False)
    array: np.ndarray = field(compare=False)
    degraded: Degraded = ()


@dataclass(frozen=True)
class GatherResult:
    frame: int
    stage: int
    pieces: Tuple[Piece, ...] = field(compare=False)    # what arrived, in arrival order
    released: Mapping[str, str] = field(default_factory=dict)   # holder -> why it was not waited for
    contributors: FrozenSet[str] = frozenset()     # node ids whose slices arrived (self included)
    uncovered: int = 0                             # neuron ids that no copy reached
    elapsed_ms: float = 0.0

    @property
    def timed_out(self) -> bool:
        return RELEASED_TIMEOUT in self.released.values()


def holder_verdict(frame: int, stage: int, origin: str, state: PeerState, report: Optional[Report],
                   deadline_s: float, sync_timeout_s: float, now_s: float,
                   holder: Optional[str] = None, self_id: Optional[str] = None,
                   started_s: Optional[float] = None,
                   delivered_s: Optional[float] = None) -> Tuple[Optional[str], float]:
    """(release reason or None to keep waiting, the holder's deadline) — see the module doc.

    "It cannot hear the origin" is judged only by the origin itself (`self_id == origin`), and
    only from a report sent after the gather began (`started_s`): an older one, or another
    node's copy of one, may merely predate the holder hearing the origin.

    `delivered_s`: when the holder last delivered a slice here (or the gather began, if later);
    a busy claim moves the deadline no further than a sync timeout past it. None: no bound.
    """
    if state == PeerState.UNREACHABLE:
        return RELEASED_UNREACHABLE, deadline_s   # we cannot hear it: its slices cannot reach us either
    if state != PeerState.ALIVE:
        return RELEASED_DEAD, deadline_s
    if report is not None:
        if not report.ready:
            return RELEASED_STALLED, deadline_s
        sent = report.progress.get(frame)
        if sent is not None:
            if sent > stage:
                return RELEASED_LOST, deadline_s
            claimed_s = report.received_s if delivered_s is None else min(report.received_s, delivered_s)
            deadline_s = max(deadline_s, claimed_s + sync_timeout_s)
        elif report.inputs.get(origin, -1) >= frame:
            return RELEASED_ABSENT, deadline_s
        elif (origin == self_id and holder != origin and started_s is not None
              and report.received_s > started_s and origin not in report.hears):
            return RELEASED_ABSENT, deadline_s    # it has not our input, and cannot hear us send it
    if now_s >= deadline_s:
        return RELEASED_TIMEOUT, deadline_s
    return None, deadline_s


class _Gather:
    def __init__(self, key: Key, origin: str, local_ids: np.ndarray, holders: Dict[str, np.ndarray],
                 n_ids: int, started_s: float, deadline_s: float, self_id: str,
                 holder_bytes: Optional[Dict[str, bytes]] = None):
        self.key = key
        self.origin = origin
        self.holders = holders
        # Each holder's ids as bytes: a slice's ids (int32 off the wire) are checked against them
        # by one bytes comparison instead of np.array_equal, which costs ten times as much.
        self.holder_bytes = holder_bytes if holder_bytes is not None else {
            h: a.astype(_IDS, copy=False).tobytes() for h, a in holders.items()}
        self.started_s = started_s
        self.deadlines = {h: deadline_s for h in holders}
        self.covered = np.zeros(n_ids, dtype=bool)
        self.covered[local_ids] = True
        # Kept up to date where `covered` changes (once per slice), not recomputed at each of
        # the many completion checks (a poll re-judges a gather at every deadline and report).
        self.all_covered = bool(self.covered.all())
        self.pieces: List[Piece] = []
        self.answered: Set[str] = set()
        self.released: Dict[str, str] = {}
        self.contributors = {self_id}
        self.trailing: Optional[Tuple[int, ...]] = None
        self.dtype: Optional[np.dtype] = None

    def check(self, sender: str, ids: np.ndarray, array: np.ndarray) -> Optional[str]:
        expected = self.holder_bytes.get(sender)
        if expected is None:
            return BAD_SLICE
        same = (ids.tobytes() == expected if ids.dtype == _IDS
                else np.array_equal(ids, self.holders[sender]))   # not off the wire (a test, a caller)
        if not same or ids.ndim != 1 or array.shape[0] != ids.shape[0]:
            # A holder sends exactly the ids the plan gives it: anything else (a repeated id
            # posing as a full answer, ids it does not hold) is not ours to use.
            return BAD_SLICE
        if self.trailing is not None and (tuple(array.shape[1:]) != self.trailing or array.dtype != self.dtype):
            return BAD_SLICE
        if sender in self.answered:
            return DUPLICATE
        return None

    def add(self, sender: str, ids: np.ndarray, array: np.ndarray, degraded: Degraded) -> Optional[str]:
        reason = self.check(sender, ids, array)
        if reason is not None:
            return reason
        # A holder given up on whose slice still comes before the gather ends is used after all.
        self.released.pop(sender, None)
        self.answered.add(sender)
        self.trailing, self.dtype = tuple(array.shape[1:]), array.dtype
        if ids.size:
            self.contributors.add(sender)
            self.covered[ids] = True
            self.all_covered = bool(self.covered.all())
        self.pieces.append(Piece(sender, ids, array, degraded))
        return None

    def waiting(self) -> List[str]:
        return [h for h in self.holders if h not in self.answered and h not in self.released]

    def complete(self) -> bool:
        return self.all_covered or not self.waiting()

    def result(self, now_s: float) -> GatherResult:
        return GatherResult(self.key[0], self.key[1], tuple(self.pieces), dict(self.released),
                            frozenset(self.contributors), int(self.covered.size - np.count_nonzero(self.covered)),
                            (now_s - self.started_s) * 1000.0)


_IDS = np.dtype(np.int32)   # neuron ids as the wire carries them (native little-endian int32)


# Below this many elements a boolean temporary is cheaper than entering np.errstate, which
# costs more than the check itself on the small slices of a small model (every slice is checked).
_FINITE_TEMPORARY_MAX = 1 << 16


def finite(array: np.ndarray) -> bool:
    """No NaN or Inf in a float payload. Large payloads: one pass with no temporary (a NaN or Inf
    makes the sum non-finite; a sum overflowing from finite float32 values needs values no
    network carries)."""
    if array.dtype.kind != "f" or array.size == 0:
        return True
    if array.size <= _FINITE_TEMPORARY_MAX:
        return bool(np.isfinite(array).all())
    with np.errstate(invalid="ignore", over="ignore"):  # +Inf + -Inf is NaN: an answer, not a warning
        return bool(np.isfinite(np.add.reduce(array.reshape(-1), dtype=np.float64)))


PeerLookup = Callable[[str], Tuple[PeerState, Optional[Report]]]
EarlyKey = Tuple[Key, str]                                        # (frame, stage), sender
EarlyEntry = Tuple[np.ndarray, np.ndarray, Degraded, float]       # ids, array, degraded, kept since


class _Window:
    """Slices kept for gathers not begun, oldest first, bounded in age and per sender (a share of
    the book's bounds), so that one sender's flood evicts only its own; the book bounds the total."""

    def __init__(self, max_slices: int, max_bytes: int, ttl_s: float, senders: int):
        self.ttl_s = ttl_s
        self.senders = senders
        self.resize(max_slices, max_bytes)
        self.entries: "OrderedDict[EarlyKey, EarlyEntry]" = OrderedDict()
        self.nbytes = 0
        self._of: Dict[str, "OrderedDict[EarlyKey, int]"] = {}   # sender -> its keys (and sizes), oldest first
        self._bytes_of: Dict[str, int] = {}

    def resize(self, max_slices: int, max_bytes: int) -> None:
        """Each sender's share of new bounds (slices beyond them go at the next `add`)."""
        self.sender_slices = max(1, -(-max_slices // self.senders))
        self.sender_bytes = -(-max_bytes // self.senders)

    def add(self, early_key: EarlyKey, entry: EarlyEntry) -> int:
        """Keep a slice; returns how many (it included) were evicted to stay within bounds."""
        sender, size = early_key[1], entry[0].nbytes + entry[1].nbytes
        self.entries[early_key] = entry
        self._of.setdefault(sender, OrderedDict())[early_key] = size
        self._bytes_of[sender] = self._bytes_of.get(sender, 0) + size
        self.nbytes += size
        evicted = 0
        while sender in self._of and (len(self._of[sender]) > self.sender_slices
                                      or self._bytes_of[sender] > self.sender_bytes):
            self.pop(next(iter(self._of[sender])))
            evicted += 1
        return evicted

    def pop(self, early_key: EarlyKey) -> EarlyEntry:
        entry = self.entries.pop(early_key)
        sender = early_key[1]
        size = self._of[sender].pop(early_key)
        self._bytes_of[sender] -= size
        self.nbytes -= size
        if not self._of[sender]:
            del self._of[sender], self._bytes_of[sender]
        return entry

    def of_frame(self, frame: int) -> List[EarlyKey]:
        return [k for k in self.entries if k[0][0] == frame]

    def expire(self, now_s: float) -> int:
        n = 0
        while self.entries:
            early_key, entry = next(iter(self.entries.items()))
            if now_s - entry[3] < self.ttl_s:
                break
            self.pop(early_key)
            n += 1
        return n


class GatherBook:
    """All gathers in progress, the early-slice window and the memory of finished keys."""

    def __init__(self, self_id: str, sync_timeout_ms: float, *, max_stage: Optional[int] = None,
                 max_early_slices: int = DEFAULT_MAX_EARLY_SLICES, max_early_bytes: int = DEFAULT_MAX_EARLY_BYTES,
                 early_ttl_s: float = DEFAULT_EARLY_TTL_S, finished_memory: int = DEFAULT_FINISHED_MEMORY,
                 senders: int = 1, unadmitted_ttl_s: Optional[float] = None):
        """`senders`: how many peers share the early windows (each gets its share of the bounds);
        `unadmitted_ttl_s`: how long a slice for a frame not admitted is kept (a sync timeout)."""
        self.self_id = self_id
        self.sync_timeout_s = sync_timeout_ms / 1000.0
        self.max_stage = max_stage
        self.max_early_slices = max_early_slices
        self.max_early_bytes = max_early_bytes
        self.early_ttl_s = early_ttl_s
        self.finished_memory = finished_memory
        self._active: Dict[Key, _Gather] = {}
        self._waiting_on: Dict[str, Set[Key]] = {}
        self._dirty: Set[Key] = set()
        self._deadlines: List[Tuple[float, Key]] = []   # a heap; stale entries are skipped
        # Early slices of admitted frames (kept since admission or arrival) and of frames not
        # admitted yet (kept since arrival, one sync timeout).
        self._early = _Window(max_early_slices, max_early_bytes, early_ttl_s, senders)
        self._unadmitted = _Window(max_early_slices, max_early_bytes,
                                   self.sync_timeout_s if unadmitted_ttl_s is None else unadmitted_ttl_s, senders)
        # Frames admitted here -> their participants (None: not told, any sender may hold rows).
        self._admitted: "OrderedDict[int, Optional[FrozenSet[str]]]" = OrderedDict()
        # Deliveries and suspicion: when each peer last delivered a slice of a real frame here;
        # suspected peers -> until when, and how often caught since their last delivery.
        self._delivered: Dict[str, float] = {}
        self._suspected: Dict[str, float] = {}
        self._strikes: Dict[str, int] = {}
        self._caught: List[str] = []
        # key -> the holders still unanswered when it finished, and whether it had every neuron
        self._finished: "OrderedDict[Key, Tuple[FrozenSet[str], FrozenSet[str]]]" = OrderedDict()
        # Frames given up here -> the drop reason of their later slices: FINISHED when their
        # origin had finished them, LATE when this node gave up waiting (expired).
        self._abandoned: "OrderedDict[int, str]" = OrderedDict()
        # Neuron-id arrays checked once (`known_ids`): id(array) -> (array, n_ids, its bytes).
        self._known: Dict[int, Tuple[np.ndarray, int, bytes]] = {}

    def known_ids(self, ids: Iterable[int], n_ids: int, what: str = "neuron ids") -> np.ndarray:
        """`ids` checked once against [0, n_ids), as a read-only int32 array: `begin` takes it from
        then on without checking it again. A plan's per-stage tables are known when the node
        starts; checking them at every gather (numpy min and max per holder) was a fixed cost of
        every stage."""
        array = np.array(ids, dtype=_IDS).reshape(-1)
        if array.size and (array.min() < 0 or array.max() >= n_ids):
            raise MeshError(f"{what}: neuron ids outside [0, {n_ids})")
        array.flags.writeable = False   # what was checked cannot change afterwards
        self._known[id(array)] = (array, int(n_ids), array.tobytes())   # the reference keeps the id unique
        return array

    def _known_bytes(self, ids: Any, n_ids: int) -> Optional[bytes]:
        known = self._known.get(id(ids))
        return known[2] if known is not None and known[0] is ids and known[1] == n_ids else None

    # ------------------------------------------------------------ begin
    def begin(self, frame: int, stage: int, origin: str, local_ids: np.ndarray, holders: Mapping[str, Iterable[int]],
              n_ids: int, now_s: float, *, trailing: Optional[Tuple[int, ...]] = None,
              dtype: Optional[np.dtype] = None) -> List[Tuple[str, str]]:
        """Start a gather; returns (sender, reason) for buffered early slices that were rejected.

        `trailing` and `dtype`: the local slice's row shape and dtype, which every piece must
        share (without them, the first piece to arrive sets them).
        """
        key = (int(frame), int(stage))
        if key in self._active or key in self._finished:
            raise MeshError(f"gather for frame {frame} stage {stage} was already begun")
        if not isinstance(n_ids, (int, np.integer)) or n_ids < 0:
            raise MeshError(f"n_ids: {n_ids!r} is not a count")
        if self._known_bytes(local_ids, n_ids) is not None:
            ids = local_ids
        else:
            ids = np.asarray(local_ids).reshape(-1).astype(np.intp)
            if ids.size and (ids.min() < 0 or ids.max() >= n_ids):
                raise MeshError(f"local slice: neuron ids outside [0, {n_ids})")
        holder_ids: Dict[str, np.ndarray] = {}
        holder_bytes: Dict[str, bytes] = {}
        for p, h in holders.items():
            if p == self.self_id:
                continue
            known = self._known_bytes(h, n_ids)
            if known is None:
                h = np.asarray(h).reshape(-1).astype(np.int32)
                if h.size and (h.min() < 0 or h.max() >= n_ids):
                    raise MeshError(f"holder {p}: neuron ids outside [0, {n_ids})")
                known = h.tobytes()
            holder_ids[p], holder_bytes[p] = h, known
        gather = _Gather(key, origin, ids, holder_ids, int(n_ids), now_s, now_s + self.sync_timeout_s, self.self_id,
                         holder_bytes)
        if trailing is not None:
            gather.trailing, gather.dtype = tuple(trailing), np.dtype(dtype)
        self._active[key] = gather
        for h in holder_ids:
            self._waiting_on.setdefault(h, set()).add(key)
        self._dirty.add(key)
        heapq.heappush(self._deadlines, (now_s + self.sync_timeout_s, key))
        if key[0] not in self._admitted:   # a mesh used without `admit`: beginning admits
            self._remember_admitted(key[0], None)
        rejected = []
        members = self._admitted.get(key[0])
        for window in (self._early, self._unadmitted):
            for early_key in [k for k in window.of_frame(key[0]) if k[0] == key]:
                e_ids, e_array, e_degraded, kept_s = window.pop(early_key)
                sender = early_key[1]
                if sender not in holder_bytes and members is not None and sender in members:
                    rejected.append((sender, NOT_WAITED))
                    continue
                reason = gather.add(sender, e_ids, e_array, e_degraded)
                if reason is not None:
                    rejected.append((sender, reason))
                else:
                    self._delivery(sender, kept_s)
        return rejected

    def admit(self, frame: int, participants: Iterable[str], now_s: float) -> List[Tuple[str, str]]:
        """This node took `frame` (its input came, or it started it) with these participants;
        returns (sender, reason) for the early slices dropped: those of non-participants."""
        frame = int(frame)
        members = frozenset(participants)
        self._remember_admitted(frame, members)
        dropped = []
        for early_key in self._unadmitted.of_frame(frame):
            entry = self._unadmitted.pop(early_key)
            if early_key[1] not in members:
                dropped.append((early_key[1], NOT_PARTICIPANT))
            elif self._early.add(early_key, entry[:3] + (now_s,)):
                dropped.append((early_key[1], EARLY_EVICTED))
        return dropped

    def _remember_admitted(self, frame: int, members: Optional[FrozenSet[str]]) -> None:
        self._admitted[frame] = members
        self._admitted.move_to_end(frame)
        while len(self._admitted) > self.finished_memory:
            self._admitted.popitem(last=False)

    # ------------------------------------------------------------ slices
    def add_slice(self, sender: str, frame: int, stage: int, neuron_ids: np.ndarray, array: np.ndarray,
                  now_s: float, degraded: Degraded = ()) -> Optional[str]:
        """File one received slice; returns the drop reason, or None if it was used or buffered.

        May report `EARLY_EVICTED` when buffering this slice pushed the oldest early one out.
        """
        if self.max_stage is not None and stage >= self.max_stage:
            return BAD_STAGE
        if not finite(array):
            return NOT_FINITE
        key = (frame, stage)
        gather = self._active.get(key)
        if gather is not None:
            reason = gather.add(sender, neuron_ids, array, degraded)
            if reason is None:
                self._dirty.add(key)
                self._delivery(sender, now_s)
            return reason
        abandoned = self._abandoned.get(frame)
        if abandoned is not None:
            return abandoned  # this node dropped the frame: none of its gathers will begin
        finished = self._finished.get(key)
        if finished is not None:
            unanswered, released = finished
            if sender not in released and sender not in unanswered:
                return STALE
            # A first copy that came late: the sender computes (and a replay of it is stale).
            self._finished[key] = (unanswered - {sender}, released - {sender})
            self._delivery(sender, now_s)
            return LATE if sender in released else LATE_REPLICA
        early_key = (key, sender)
        if early_key in self._early.entries or early_key in self._unadmitted.entries:
            return DUPLICATE
        if frame in self._admitted:
            members = self._admitted[frame]
            if members is not None and sender not in members:
                return NOT_PARTICIPANT
            window = self._early
        else:
            window = self._unadmitted
        evicted = window.add(early_key, (neuron_ids, array, tuple(degraded), now_s)) + self._trim()
        return EARLY_EVICTED if evicted else None

    def _trim(self) -> int:
        """Evict the oldest early slices beyond the book's bounds, those of frames not admitted
        first; returns how many."""
        n = 0
        for window in (self._unadmitted, self._early):
            while window.entries and (self.early_count > self.max_early_slices
                                      or self.early_bytes > self.max_early_bytes):
                window.pop(next(iter(window.entries)))
                n += 1
        return n

    def set_early_bounds(self, max_slices: int, max_bytes: int) -> None:
        """Raise the bounds on early slices of admitted frames, never below those the book was
        made with (which still bound frames not admitted: a flood of slices nobody asked for).

        A node behind its peers holds, for every frame in flight, the slices of the stage it has
        not computed yet: on a deep network with large early activations (efficientnet_lite0's
        slices reach a megabyte) the default 32 MiB held a few dozen, and under overload the
        evicted ones were slices of live peers, zero-filled with nothing failed. The mesh's owner
        derives the bounds from its plan and frame window (node/handler.py)."""
        self.max_early_slices = max(self.max_early_slices, int(max_slices))
        self.max_early_bytes = max(self.max_early_bytes, int(max_bytes))
        self._early.resize(self.max_early_slices, self.max_early_bytes)

    def expire_early(self, now_s: float) -> int:
        """Drop early slices of admitted frames older than the TTL (their gather never began here);
        returns how many."""
        return self._early.expire(now_s)

    def expire_unadmitted(self, now_s: float) -> int:
        """Drop slices of frames never admitted here within the unadmitted TTL; returns how many."""
        return self._unadmitted.expire(now_s)

    # ------------------------------------------------------------ deliveries and suspicion
    def _delivery(self, sender: str, now_s: float) -> None:
        self._delivered[sender] = max(self._delivered.get(sender, now_s), now_s)
        self._strikes.pop(sender, None)
        if self._suspected.pop(sender, None) is not None:
            self._dirty.update(self._waiting_on.get(sender, ()))

    def _suspect(self, peer: str, now_s: float) -> None:
        strikes = self._strikes.get(peer, 0) + 1
        self._strikes[peer] = strikes
        factor = min(SUSPECT_MAX_FACTOR, 2 ** (strikes - 1))
        self._suspected[peer] = now_s + SUSPECT_SYNC_TIMEOUTS * self.sync_timeout_s * factor
        self._caught.append(peer)
        self._dirty.update(self._waiting_on.get(peer, ()))   # its other gathers stop waiting too

    def rejoined(self, peer: str) -> None:
        """`peer` was dead and is back (a restart, a partition healed): no longer suspected; a
        peer that is caught again is suspected for longer (its strikes stay until it delivers)."""
        self._suspected.pop(peer, None)

    def suspects(self, now_s: float) -> FrozenSet[str]:
        """Peers that claimed work and delivered nothing for a sync timeout: not waited for."""
        return frozenset(p for p, until_s in self._suspected.items() if now_s < until_s)

    def take_caught(self) -> List[str]:
        """Peers suspected since the last call (a peer may appear more than once)."""
        out, self._caught = self._caught, []
        return out

    # ------------------------------------------------------------ completion
    def peer_changed(self, peer_id: str) -> None:
        """The membership state or report of `peer_id` changed: re-judge the gathers waiting on it."""
        self._dirty.update(self._waiting_on.get(peer_id, ()))

    def poll(self, now_s: float, lookup: PeerLookup) -> List[GatherResult]:
        """Finish and return every gather whose completion rule holds at `now_s`."""
        while self._deadlines and self._deadlines[0][0] <= now_s:
            self._dirty.add(heapq.heappop(self._deadlines)[1])
        finished = []
        dirty, self._dirty = self._dirty, set()
        for key in dirty:
            gather = self._active.get(key)
            if gather is None:
                continue
            if not gather.all_covered:
                for h in gather.waiting():
                    if now_s < self._suspected.get(h, now_s):
                        gather.released[h] = RELEASED_SUSPECTED
                        continue
                    reason, deadline = holder_verdict(key[0], key[1], gather.origin, *lookup(h),
                                                      gather.deadlines[h], self.sync_timeout_s, now_s, holder=h,
                                                      self_id=self.self_id, started_s=gather.started_s,
                                                      delivered_s=max(gather.started_s,
                                                                      self._delivered.get(h, gather.started_s)))
                    if reason == RELEASED_TIMEOUT:
                        self._suspect(h, now_s)
                    if reason is not None:
                        gather.released[h] = reason
                    elif deadline != gather.deadlines[h]:
                        gather.deadlines[h] = deadline
                        heapq.heappush(self._deadlines, (deadline, key))
            if gather.complete():
                finished.append(self._finish(key, gather, now_s))
        return finished

    def _finish(self, key: Key, gather: _Gather, now_s: float) -> GatherResult:
        del self._active[key]
        for h in gather.holders:
            keys = self._waiting_on.get(h)
            if keys is not None:
                keys.discard(key)
        self._finished[key] = (frozenset(gather.waiting()), frozenset(gather.released))
        while len(self._finished) > self.finished_memory:
            self._finished.popitem(last=False)
        return gather.result(now_s)

    def abandon(self, frame: int, finished: bool = False) -> int:
        """Forget every gather and early slice of `frame`; returns gathers dropped. `finished`:
        its origin had finished it (its later slices drop as FINISHED), not expired here (LATE)."""
        keys = [k for k in self._active if k[0] == frame]
        for key in keys:
            gather = self._active.pop(key)
            for h in gather.holders:
                self._waiting_on.get(h, set()).discard(key)
            self._finished[key] = (frozenset(gather.waiting()), frozenset(gather.holders))
        for window in (self._early, self._unadmitted):
            for early_key in window.of_frame(frame):
                window.pop(early_key)
        self._abandoned[frame] = FINISHED if finished else LATE
        while len(self._abandoned) > self.finished_memory:
            self._abandoned.popitem(last=False)
        while len(self._finished) > self.finished_memory:
            self._finished.popitem(last=False)
        return len(keys)

    def next_deadline_s(self) -> Optional[float]:
        while self._deadlines and self._deadlines[0][1] not in self._active:
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None

    @property
    def has_dirty(self) -> bool:
        return bool(self._dirty)

    def active_keys(self) -> List[Key]:
        return list(self._active)

    @property
    def early_count(self) -> int:
        return len(self._early.entries) + len(self._unadmitted.entries)

    @property
    def early_bytes(self) -> int:
        return self._early.nbytes + self._unadmitted.nbytes
