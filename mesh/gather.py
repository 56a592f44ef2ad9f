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
(`stale`). The first two are routine under load; `late` means some wait ran out. Early
slices (for a gather not begun yet: peers run ahead) are kept, bounded in count, bytes and age.
"""
from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, Iterable, List, Mapping, Optional, Set, Tuple

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

# Why a holder was not waited for any longer (GatherResult.released values).
RELEASED_DEAD = "dead"
RELEASED_STALLED = "stalled"
RELEASED_LOST = "lost"
RELEASED_ABSENT = "absent"
RELEASED_TIMEOUT = "timeout"
RELEASED_UNREACHABLE = "unreachable"
# Releases that hold for the rest of the frame: the holder will not take part in its later
# stages either (a lost slice is the one release that concerns one stage only).
FOR_THE_FRAME = frozenset({RELEASED_DEAD, RELEASED_STALLED, RELEASED_ABSENT, RELEASED_TIMEOUT,
                           RELEASED_UNREACHABLE})

DEFAULT_MAX_EARLY_SLICES = 1024
DEFAULT_MAX_EARLY_BYTES = 32 * 1024 * 1024
DEFAULT_EARLY_TTL_S = 10.0
DEFAULT_FINISHED_MEMORY = 4096


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
                   started_s: Optional[float] = None) -> Tuple[Optional[str], float]:
    """(release reason or None to keep waiting, the holder's deadline) — see the module doc.

    "It cannot hear the origin" is judged only by the origin itself (`self_id == origin`), and
    only from a report sent after the gather began (`started_s`): an older one, or another
    node's copy of one, may merely predate the holder hearing the origin.
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
            deadline_s = max(deadline_s, report.received_s + sync_timeout_s)
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
                 n_ids: int, started_s: float, deadline_s: float, self_id: str):
        self.key = key
        self.origin = origin
        self.holders = holders
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
        expected = self.holders.get(sender)
        if expected is None or not np.array_equal(ids, expected) or array.shape[0] != ids.shape[0]:
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


# Below this many elements a boolean temporary is cheaper than entering np.errstate, which
# costs more than the check itself on the small slices of a small model (every slice is checked).
_FINITE_TEMPORARY_MAX = 1 << 16


def _finite(array: np.ndarray) -> bool:
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


class GatherBook:
    """All gathers in progress, the early-slice window and the memory of finished keys."""

    def __init__(self, self_id: str, sync_timeout_ms: float, *, max_stage: Optional[int] = None,
                 max_early_slices: int = DEFAULT_MAX_EARLY_SLICES, max_early_bytes: int = DEFAULT_MAX_EARLY_BYTES,
                 early_ttl_s: float = DEFAULT_EARLY_TTL_S, finished_memory: int = DEFAULT_FINISHED_MEMORY):
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
        # (key, sender) -> (ids, array, degraded, arrived_s), oldest first so that overflow and
        # expiry take the oldest.
        self._early: "OrderedDict[Tuple[Key, str], Tuple[np.ndarray, np.ndarray, Degraded, float]]" = OrderedDict()
        self._early_bytes = 0
        # key -> the holders still unanswered when it finished, and whether it had every neuron
        self._finished: "OrderedDict[Key, Tuple[FrozenSet[str], FrozenSet[str]]]" = OrderedDict()
        # Frames given up here -> the drop reason of their later slices: FINISHED when their
        # origin had finished them, LATE when this node gave up waiting (expired).
        self._abandoned: "OrderedDict[int, str]" = OrderedDict()

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
        ids = np.asarray(local_ids).reshape(-1).astype(np.intp)
        if ids.size and (ids.min() < 0 or ids.max() >= n_ids):
            raise MeshError(f"local slice: neuron ids outside [0, {n_ids})")
        holder_ids = {p: np.asarray(h).reshape(-1).astype(np.int32) for p, h in holders.items() if p != self.self_id}
        for p, h in holder_ids.items():
            if h.size and (h.min() < 0 or h.max() >= n_ids):
                raise MeshError(f"holder {p}: neuron ids outside [0, {n_ids})")
        gather = _Gather(key, origin, ids, holder_ids, int(n_ids), now_s, now_s + self.sync_timeout_s, self.self_id)
        if trailing is not None:
            gather.trailing, gather.dtype = tuple(trailing), np.dtype(dtype)
        self._active[key] = gather
        for h in holder_ids:
            self._waiting_on.setdefault(h, set()).add(key)
        self._dirty.add(key)
        heapq.heappush(self._deadlines, (now_s + self.sync_timeout_s, key))
        rejected = []
        for early_key in [k for k in self._early if k[0] == key]:
            e_ids, e_array, e_degraded, _ = self._pop_early(early_key)
            reason = gather.add(early_key[1], e_ids, e_array, e_degraded)
            if reason is not None:
                rejected.append((early_key[1], reason))
        return rejected

    # ------------------------------------------------------------ slices
    def add_slice(self, sender: str, frame: int, stage: int, neuron_ids: np.ndarray, array: np.ndarray,
                  now_s: float, degraded: Degraded = ()) -> Optional[str]:
        """File one received slice; returns the drop reason, or None if it was used or buffered.

        May report `EARLY_EVICTED` when buffering this slice pushed the oldest early one out.
        """
        if self.max_stage is not None and stage >= self.max_stage:
            return BAD_STAGE
        if not _finite(array):
            return NOT_FINITE
        key = (frame, stage)
        gather = self._active.get(key)
        if gather is not None:
            reason = gather.add(sender, neuron_ids, array, degraded)
            if reason is None:
                self._dirty.add(key)
            return reason
        abandoned = self._abandoned.get(frame)
        if abandoned is not None:
            return abandoned  # this node dropped the frame: none of its gathers will begin
        finished = self._finished.get(key)
        if finished is not None:
            unanswered, released = finished
            if sender in released:
                return LATE
            return LATE_REPLICA if sender in unanswered else STALE
        if (key, sender) in self._early:
            return DUPLICATE
        self._early[(key, sender)] = (neuron_ids, array, tuple(degraded), now_s)
        self._early_bytes += array.nbytes + neuron_ids.nbytes
        evicted = None
        while len(self._early) > self.max_early_slices or self._early_bytes > self.max_early_bytes:
            self._pop_early(next(iter(self._early)))
            evicted = EARLY_EVICTED
        return evicted

    def _pop_early(self, early_key):
        entry = self._early.pop(early_key)
        self._early_bytes -= entry[1].nbytes + entry[0].nbytes
        return entry

    def expire_early(self, now_s: float) -> int:
        """Drop early slices older than the TTL (their gather never began here); returns how many."""
        n = 0
        while self._early:
            early_key, entry = next(iter(self._early.items()))
            if now_s - entry[3] < self.early_ttl_s:
                break
            self._pop_early(early_key)
            n += 1
        return n

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
                    reason, deadline = holder_verdict(key[0], key[1], gather.origin, *lookup(h),
                                                      gather.deadlines[h], self.sync_timeout_s, now_s, holder=h,
                                                      self_id=self.self_id, started_s=gather.started_s)
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
        for early_key in [k for k in self._early if k[0][0] == frame]:
            self._pop_early(early_key)
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
        return len(self._early)

    @property
    def early_bytes(self) -> int:
        return self._early_bytes
