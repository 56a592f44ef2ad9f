"""The per-(frame, stage) all-gather bookkeeping: pure, no sockets, no clock (`now_s` is passed in).

A gather completes as soon as any of these holds:
  1. every neuron has at least one copy (local slice plus received slices);
  2. every live holder has answered (a peer known dead is never waited for);
  3. `now_s` reached its deadline.
Rows of neurons that no copy reached are zero and flagged in `zero_mask`. When several replicas
send the same neuron the first copy to arrive wins. The neuron axis is axis 0 of every slice.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterable, List, Mapping, Optional, Tuple

import numpy as np

from .errors import MeshError

Key = Tuple[int, int]  # (frame, stage)

# Drop reasons, used as counter names by the mesh.
STALE = "stale"
BAD_SLICE = "bad_slice"
DUPLICATE = "duplicate"
EARLY_EVICTED = "early_evicted"

DEFAULT_MAX_EARLY_SLICES = 1024
DEFAULT_MAX_EARLY_BYTES = 512 * 1024 * 1024
DEFAULT_FINISHED_MEMORY = 4096


@dataclass(frozen=True)
class SliceData:
    neuron_ids: np.ndarray
    array: np.ndarray


@dataclass(frozen=True)
class GatherResult:
    frame: int
    stage: int
    array: np.ndarray = field(compare=False)       # (n_neurons, *trailing), neuron order
    zero_mask: np.ndarray = field(compare=False)   # bool[n_neurons]: True where no copy arrived
    contributors: FrozenSet[str] = frozenset()     # node ids whose slices were used (self included)
    timed_out: bool = False                        # completed by the deadline with copies missing
    elapsed_ms: float = 0.0


class _Gather:
    def __init__(self, key: Key, self_id: str, local: SliceData, holders: Dict[str, np.ndarray],
                 n_neurons: int, started_s: float, deadline_s: float):
        self.key = key
        self.holders = holders
        self.started_s = started_s
        self.deadline_s = deadline_s
        self.trailing = tuple(local.array.shape[1:])
        self.dtype = local.array.dtype
        # Not zeros: every row is either written by a copy or zeroed when the gather ends, so
        # zeroing the whole array first would write each covered row twice.
        self.out = np.empty((n_neurons,) + self.trailing, dtype=self.dtype)
        self.covered = np.zeros(n_neurons, dtype=bool)
        self.answered: set = set()
        self.contributors = {self_id}
        self._write(local.neuron_ids, local.array)

    def _write(self, ids: np.ndarray, array: np.ndarray) -> None:
        fresh = ~self.covered[ids]
        if fresh.all():
            self.out[ids] = array
        else:  # first copy wins: keep rows already filled by an earlier replica
            self.out[ids[fresh]] = array[fresh]
        self.covered[ids] = True

    def check(self, sender: str, ids: np.ndarray, array: np.ndarray) -> Optional[str]:
        if array.dtype != self.dtype or tuple(array.shape[1:]) != self.trailing or ids.ndim != 1 \
                or ids.shape[0] != array.shape[0]:
            return BAD_SLICE
        n = self.covered.shape[0]
        if ids.size and (ids.min() < 0 or ids.max() >= n):
            return BAD_SLICE
        held = self.holders.get(sender)
        if held is None or not np.isin(ids, held).all():
            return BAD_SLICE
        if sender in self.answered:
            return DUPLICATE
        return None

    def add(self, sender: str, ids: np.ndarray, array: np.ndarray) -> Optional[str]:
        reason = self.check(sender, ids, array)
        if reason is None:
            self.answered.add(sender)
            if ids.size:
                self.contributors.add(sender)
            self._write(ids.astype(np.intp, copy=False), array)
        return reason

    def done(self, now_s: float, alive: FrozenSet[str]) -> Optional[bool]:
        """None while it must go on; else whether it ended by the deadline."""
        if self.covered.all():
            return False
        if all(p in self.answered for p in self.holders if p in alive):
            return False
        if now_s >= self.deadline_s:
            return True
        return None

    def result(self, now_s: float, timed_out: bool) -> GatherResult:
        missing = ~self.covered
        if missing.any():
            self.out[missing] = 0
        return GatherResult(self.key[0], self.key[1], self.out, ~self.covered, frozenset(self.contributors),
                            timed_out, (now_s - self.started_s) * 1000.0)


class GatherBook:
    """All gathers in progress, the early-slice window and the memory of finished keys."""

    def __init__(self, self_id: str, *, max_early_slices: int = DEFAULT_MAX_EARLY_SLICES,
                 max_early_bytes: int = DEFAULT_MAX_EARLY_BYTES, finished_memory: int = DEFAULT_FINISHED_MEMORY):
        self.self_id = self_id
        self.max_early_slices = max_early_slices
        self.max_early_bytes = max_early_bytes
        self.finished_memory = finished_memory
        self._active: Dict[Key, _Gather] = {}
        # (key, sender) -> (ids, array), oldest first so that overflow evicts the oldest.
        self._early: "OrderedDict[Tuple[Key, str], Tuple[np.ndarray, np.ndarray]]" = OrderedDict()
        self._early_bytes = 0
        self._finished: "OrderedDict[Key, None]" = OrderedDict()

    # ------------------------------------------------------------ begin
    def begin(self, frame: int, stage: int, local: SliceData, holders: Mapping[str, Iterable[int]],
              n_neurons: int, now_s: float, deadline_s: float) -> List[Tuple[str, str]]:
        """Start a gather; returns (sender, reason) for buffered early slices that were rejected."""
        key = (int(frame), int(stage))
        if key in self._active or key in self._finished:
            raise MeshError(f"gather for frame {frame} stage {stage} was already begun")
        if not isinstance(n_neurons, (int, np.integer)) or n_neurons < 0:
            raise MeshError(f"n_neurons: {n_neurons!r} is not a count")
        ids = np.asarray(local.neuron_ids).reshape(-1).astype(np.intp)
        array = np.asarray(local.array)
        if array.ndim < 1 or array.shape[0] != ids.shape[0]:
            raise MeshError(f"local slice: {ids.shape[0]} neuron ids for an array of shape {array.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= n_neurons):
            raise MeshError(f"local slice: neuron ids outside [0, {n_neurons})")
        holder_ids = {p: np.asarray(h, dtype=np.int64).reshape(-1) for p, h in holders.items() if p != self.self_id}
        gather = _Gather(key, self.self_id, SliceData(ids, array), holder_ids, int(n_neurons), now_s, deadline_s)
        self._active[key] = gather
        rejected = []
        for early_key in [k for k in self._early if k[0] == key]:
            e_ids, e_array = self._pop_early(early_key)
            reason = gather.add(early_key[1], e_ids, e_array)
            if reason is not None:
                rejected.append((early_key[1], reason))
        return rejected

    # ------------------------------------------------------------ slices
    def add_slice(self, sender: str, frame: int, stage: int, neuron_ids: np.ndarray, array: np.ndarray) -> Optional[str]:
        """File one received slice; returns the drop reason, or None if it was used or buffered.

        May report `EARLY_EVICTED` when buffering this slice pushed the oldest early one out.
        """
        key = (frame, stage)
        gather = self._active.get(key)
        if gather is not None:
            return gather.add(sender, neuron_ids, array)
        if key in self._finished:
            return STALE
        if (key, sender) in self._early:
            return DUPLICATE
        self._early[(key, sender)] = (neuron_ids, array)
        self._early_bytes += array.nbytes + neuron_ids.nbytes
        evicted = None
        while len(self._early) > self.max_early_slices or self._early_bytes > self.max_early_bytes:
            self._pop_early(next(iter(self._early)))
            evicted = EARLY_EVICTED
        return evicted

    def _pop_early(self, early_key) -> Tuple[np.ndarray, np.ndarray]:
        ids, array = self._early.pop(early_key)
        self._early_bytes -= array.nbytes + ids.nbytes
        return ids, array

    # ------------------------------------------------------------ completion
    def poll(self, now_s: float, alive: FrozenSet[str]) -> List[GatherResult]:
        """Finish and return every gather whose completion rule holds at `now_s`."""
        finished = []
        for key, gather in list(self._active.items()):
            timed_out = gather.done(now_s, alive)
            if timed_out is not None:
                finished.append(gather.result(now_s, timed_out))
                del self._active[key]
                self._finished[key] = None
                while len(self._finished) > self.finished_memory:
                    self._finished.popitem(last=False)
        return finished

    def next_deadline_s(self) -> Optional[float]:
        return min((g.deadline_s for g in self._active.values()), default=None)

    def active_keys(self) -> List[Key]:
        return list(self._active)

    @property
    def early_count(self) -> int:
        return len(self._early)

    @property
    def early_bytes(self) -> int:
        return self._early_bytes
