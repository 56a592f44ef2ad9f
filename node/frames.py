"""The frames of one node: admission, participants, the ready queue, answers, statistics.

A pure core, like the mesh's membership and gather books: no sockets, no clock reads (`now_s`
is an argument), no torch. The handler moves messages; every decision about frames is here.

The unit of work is (frame, stage), not the frame. A frame's life on a node:

    held       a local frame waiting for the node to be ready to serve (start-up: until it has
               heard its peers); its participants are not chosen yet
    queued     the input is here; the engine has not started the frame
    running    one work item of the frame is at the engine (start, or continue after a gather)
    gathering  the engine's slice of `stage` is out; the mesh gathers the others'
    gathered   the gather of `stage` is done; the engine continues when it takes the item
    done       the logits are here (a local frame then waits for its turn to be answered)

Ready work (queued and gathered frames) is taken oldest first by (t_ms, frame): the origin's
admission time and the frame id, which travel with the input, so every node orders the same
work the same way and no cycle of waits can form between nodes. Nothing here waits on the
network: a frame whose gather is pending simply is not ready.

Frames have an age. A frame is expired (a local one answered with an error, a peer's one
dropped) when it is older than `frame_timeout_s`, or when its origin's heartbeat no longer
lists it (the origin has finished it). Expired frames are never waited on. When this node was
itself stalled for a peer timeout, its peers went on without it: the peers' frames it held are
dropped, and its own frames are run again from their inputs under new ids (`after_stall`,
`rerun`), because the client still waits for them and the input is still here.

Logits with a NaN or an infinity (a peer's finite but huge values overflow a later stage) are
an error answer, never a prediction; so is a frame whose engine found its own slice of some stage
not finite (its error says `not_finite`). Both are counted (`frames_not_finite`).

What a frame rests on is tracked as `degraded`: for each stage at which some holder was
missing here or anywhere upstream (the slices say so), the missing devices and the most
neurons zero-filled. The answer reports it, so an answer never claims less zero-fill than
any node had for that frame.
"""
from __future__ import annotations

import collections
import enum
import heapq
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from robustdice.mesh.gather import finite


class Phase(str, enum.Enum):
    HELD = "held"
    QUEUED = "queued"
    RUNNING = "running"
    GATHERING = "gathering"
    GATHERED = "gathered"
    DONE = "done"


READY_PHASES = (Phase.QUEUED, Phase.GATHERED)

# Frames a node keeps in flight from one origin (its own included). A client asking for more
# is told the node is busy; a peer sending more is dropped and counted.
MAX_FRAMES_PER_ORIGIN = 32
# A peer may hold more of an origin's frames than the origin itself: those the origin finished
# since its last heartbeat, which the peer prunes at the next one. It admits this many times the
# origin's window, so that the origin's own limit is the one that binds, and a busy peer is
# never the one that drops a frame (the origin would zero-fill it).
PEER_WINDOW_FACTOR = 2
# Input bytes this node holds, over all origins: peers' inputs until the engine starts them, and
# its own clients' inputs until they are answered (kept to run again after a stall). A burst of
# large inputs is refused rather than pinned in memory.
MAX_QUEUED_INPUT_BYTES = 64 * 1024 * 1024
RECENT_FRAMES = 200          # frames the status statistics are taken over
# A client's new frame is refused as busy while this node's oldest unanswered one has waited
# this share of the frame timeout: past it the node is not keeping up, and a frame taken now
# would wait behind that backlog and likely expire. Under 4 origins x 16 frames of Lite0 on 2
# cores, taking everything expired 54-57 of 64 frames after 10 s each and zero-filled some of
# the rest; the sojourn of the oldest frame, as CoDel judges a queue, says so early and cheaply.
BUSY_AGE_SHARE = 0.5

# Drop reasons of peers' inputs (counter names).
DROP_REPLAY = "input_replay"
DROP_OVERFLOW = "input_overflow"
DROP_FINISHED = "input_finished"


@dataclass
class Frame:
    frame: int
    origin: str
    t_ms: int                          # the origin's admission time: the order key, with the id
    input: Any                         # until the engine takes it (a local frame's until answered: it may rerun)
    input_bytes: int
    received_s: float
    participants: FrozenSet[str] = frozenset()
    client: Optional[bytes] = None     # a local frame's client identity
    request: Dict[str, Any] = field(default_factory=dict)
    phase: Phase = Phase.QUEUED
    stage: int = 0                     # the stage being computed or gathered
    stages_sent: int = 0               # slices of this frame sent to peers (progress reports)
    gathered: Any = None               # the gather result waiting for the engine
    engine_state: bool = False         # the engine holds this frame's state (until done or dropped)
    degraded: Dict[int, Tuple[int, int]] = field(default_factory=dict)   # stage -> (missing mask, zero)
    excluded: FrozenSet[str] = frozenset()   # participants not waited for in later stages (gone for it)
    answer: Optional[Dict[str, Any]] = None
    logits: Any = None
    compute_ms: float = 0.0
    plan: Any = None                   # the plan it runs on (a roll-out's: node/plans.py); None: the book's

    @property
    def key(self) -> Tuple[int, int]:
        return self.t_ms, self.frame

    @property
    def local(self) -> bool:
        return self.client is not None


def merge_degraded(into: Dict[int, Tuple[int, int]], entries: Iterable[Tuple[int, int, int]]) -> None:
    """Fold (stage, missing mask, zero-filled) entries into a frame's record: masks are united,
    zero-fill is the most any node had."""
    for stage, mask, zero in entries:
        old_mask, old_zero = into.get(stage, (0, 0))
        if mask or zero or stage in into:
            into[stage] = (old_mask | mask, max(old_zero, zero))


def answer_body(logits: np.ndarray, latency_ms: float, compute_ms: float) -> Dict[str, Any]:
    """A client's answer from a frame's logits: the top-1 per image, the top 5 with their
    probabilities (a softmax over the flattened logits), and the times."""
    flat = logits.reshape(logits.shape[0], -1)
    shifted = np.exp(flat - flat.max(axis=1, keepdims=True))
    probs = shifted / shifted.sum(axis=1, keepdims=True)
    top5 = [[[int(c), float(p[c])] for c in np.argsort(-p)[:5]] for p in probs]
    return {"prediction": [int(i) for i in flat.argmax(axis=1)], "top5": top5, "latency_ms": latency_ms,
            "compute_ms": compute_ms}


class FrameBook:
    def __init__(self, self_id: str, node_ids: Sequence[str], stage_names: Sequence[str],
                 stage_neurons: Sequence[int], *, frame_timeout_s: float,
                 max_per_origin: int = MAX_FRAMES_PER_ORIGIN,
                 max_queued_input_bytes: int = MAX_QUEUED_INPUT_BYTES) -> None:
        self.self_id = self_id
        self.node_ids = list(node_ids)
        self.device_of = {n: d for d, n in enumerate(self.node_ids)}
        self.stage_names = list(stage_names)
        self.stage_neurons = list(stage_neurons)
        self.frame_timeout_s = frame_timeout_s
        self.max_per_origin = max_per_origin
        self.max_queued_input_bytes = max_queued_input_bytes
        self.frames: Dict[int, Frame] = {}
        self._ready: List[Tuple[int, int]] = []        # heap of frame keys; stale entries skipped
        self._answer_order: Deque[int] = collections.deque()
        self._per_origin: "collections.Counter[str]" = collections.Counter()
        self._queued_bytes = 0
        self._inputs: Dict[str, int] = {}              # origin -> newest frame id received
        self.counters: "collections.Counter[str]" = collections.Counter()
        self.recent: Deque[Tuple[float, float]] = collections.deque(maxlen=RECENT_FRAMES)

    @property
    def max_frames_held(self) -> int:
        """The most frames a node holds at once (and its heartbeats list): its own window and
        every peer's, each PEER_WINDOW_FACTOR times as wide."""
        return self.max_per_origin * (1 + PEER_WINDOW_FACTOR * (len(self.node_ids) - 1))

    # ------------------------------------------------------------ admission
    def _room(self, origin: str, nbytes: int, max_frames: int) -> Optional[str]:
        if self._per_origin[origin] >= max_frames:
            return f"{self._per_origin[origin]} frames of {origin} in flight (at most {max_frames})"
        if self._queued_bytes + nbytes > self.max_queued_input_bytes:
            return (f"{(self._queued_bytes + nbytes) / 2**20:.0f} MiB of inputs would be held "
                    f"(at most {self.max_queued_input_bytes / 2**20:.0f} MiB)")
        return None

    def _add(self, f: Frame) -> None:
        self.frames[f.frame] = f
        self._per_origin[f.origin] += 1
        self._queued_bytes += f.input_bytes
        if f.phase in READY_PHASES:
            heapq.heappush(self._ready, f.key)

    def admit_local(self, frame: int, t_ms: int, array: Any, nbytes: int, client: bytes,
                    request: Mapping[str, Any], now_s: float, plan: Any = None) -> Optional[str]:
        """A client's frame, held until `start`; returns why it cannot be taken, or None."""
        full = self._room(self.self_id, nbytes, self.max_per_origin) or self._backlog(now_s)
        if full:
            return f"node busy: {full}"
        self._add(Frame(frame, self.self_id, t_ms, array, nbytes, now_s, client=client, request=dict(request),
                        phase=Phase.HELD, plan=plan))
        self._answer_order.append(frame)
        return None

    def _backlog(self, now_s: float) -> Optional[str]:
        """Why the node is too far behind to take a client's frame (BUSY_AGE_SHARE), or None."""
        for frame in self._answer_order:   # submission order: the first present is the oldest unanswered
            f = self.frames.get(frame)
            if f is None:
                continue
            waited_s = now_s - f.received_s
            if waited_s < BUSY_AGE_SHARE * self.frame_timeout_s:
                return None
            return (f"its oldest frame in flight has waited {waited_s * 1000:.0f} ms of the "
                    f"{self.frame_timeout_s * 1000:.0f} ms frame timeout; a frame taken now would likely expire")
        return None

    def held(self) -> List[Frame]:
        return [f for f in self.frames.values() if f.phase == Phase.HELD]

    def start(self, frame: int, participants: Iterable[str]) -> Frame:
        """A held local frame gets its participants and becomes ready (the handler broadcasts it)."""
        f = self.frames[frame]
        f.participants = frozenset(participants) | {self.self_id}
        f.phase = Phase.QUEUED
        self._inputs[self.self_id] = max(self._inputs.get(self.self_id, -1), frame)
        heapq.heappush(self._ready, f.key)
        return f

    def admit_peer(self, frame: int, origin: str, t_ms: int, participants: Iterable[str], array: Any,
                   nbytes: int, now_s: float, origin_report: Optional[Tuple[Mapping[int, int], Mapping[str, int]]],
                   plan: Any = None) -> Optional[str]:
        """A peer's input (already validated); returns the drop reason (a counter name) or None.

        `origin_report` is the origin's latest (progress, inputs): if it has moved past this frame
        and no longer lists it, the origin has finished it and the input is stale.
        """
        if frame <= self._inputs.get(origin, -1) or frame in self.frames:
            return DROP_REPLAY
        self._inputs[origin] = frame
        if origin_report is not None:
            progress, inputs = origin_report
            if inputs.get(origin, -1) >= frame and frame not in progress:
                return DROP_FINISHED
        if self._room(origin, nbytes, PEER_WINDOW_FACTOR * self.max_per_origin):
            return DROP_OVERFLOW
        self._add(Frame(frame, origin, t_ms, array, nbytes, now_s, participants=frozenset(participants), plan=plan))
        return None

    def origin_restarted(self, origin: str) -> None:
        """A new incarnation numbers its frames afresh: forget its watermark."""
        self._inputs.pop(origin, None)

    # ------------------------------------------------------------ the ready queue
    def next_work(self) -> Optional[Frame]:
        """The oldest ready frame, now running; None when nothing is ready."""
        while self._ready:
            key = heapq.heappop(self._ready)
            f = self.frames.get(key[1])
            if f is None or f.key != key or f.phase not in READY_PHASES:
                continue
            if f.phase == Phase.QUEUED and not f.local:   # a local input is kept until answered
                self._queued_bytes -= f.input_bytes
            f.phase = Phase.RUNNING
            f.engine_state = True
            return f
        return None

    def take_work(self) -> Optional[Tuple[Frame, Any, Any]]:
        """The oldest ready work, now at the engine: (frame, its input or None, its gather result
        or None). The book lets go of what the engine now holds: a peer's input (a local frame's
        is kept until answered, to run again after a stall) and the gather result."""
        f = self.next_work()
        if f is None:
            return None
        if f.gathered is not None:
            gathered, f.gathered = f.gathered, None
            return f, None, gathered
        x = f.input
        if not f.local:
            f.input = None
        return f, x, None

    def on_slice(self, frame: int, stage: int, zero_before: Optional[int]) -> Optional[Frame]:
        """The engine computed its slice of `stage`; `zero_before` is what it zero-filled at stage - 1."""
        f = self.frames.get(frame)
        if f is None or f.phase != Phase.RUNNING:
            return None
        if zero_before is not None and stage > 0:
            self._note_zero(f, stage - 1, zero_before)
        f.phase, f.stage = Phase.GATHERING, stage
        f.stages_sent = stage + 1
        return f

    def _note_zero(self, f: Frame, stage: int, zero: int) -> None:
        if zero:
            mask, old = f.degraded.get(stage, (0, 0))
            f.degraded[stage] = (mask, max(old, zero))

    def on_gathered(self, frame: int, stage: int, missing: Iterable[str],
                    upstream: Iterable[Tuple[int, int, int]], result: Any,
                    gone: Iterable[str] = ()) -> Optional[Frame]:
        """The gather of (frame, stage) is done: `missing` are the frame's devices whose rows did
        not come (not participants, or released holders), `upstream` the pieces' own records,
        `gone` the holders released for good (not waited for in the frame's later stages)."""
        f = self.frames.get(frame)
        if f is None or f.phase != Phase.GATHERING or f.stage != stage:
            return None
        f.excluded = f.excluded | frozenset(gone)
        mask = 0
        for node in missing:
            mask |= 1 << self.device_of[node]
        merge_degraded(f.degraded, self._plausible(f, upstream) + [(stage, mask, 0)])
        f.gathered = result
        f.phase = Phase.GATHERED
        heapq.heappush(self._ready, f.key)
        return f

    def _plausible(self, f: Frame, upstream: Iterable[Tuple[int, int, int]]) -> List[Tuple[int, int, int]]:
        """Peers' records, kept to what can be true: stages of the frame's plan, devices of the
        plan, no more zero-filled neurons than the stage has (a record is only what a peer says)."""
        all_devices = (1 << len(self.node_ids)) - 1
        neurons = self._stages(f)[1]
        return [(stage, mask & all_devices, min(zero, neurons[stage]))
                for stage, mask, zero in upstream if 0 <= stage < len(neurons)]

    def note_upstream(self, frame: int, upstream: Iterable[Tuple[int, int, int]]) -> None:
        """A peer's record for a frame still here, from a slice not used (it came late)."""
        f = self.frames.get(frame)
        if f is not None and f.phase != Phase.DONE:
            merge_degraded(f.degraded, self._plausible(f, upstream))

    def missing_devices(self, f: Frame, released: Iterable[str]) -> List[str]:
        """The devices whose rows a gather of `f` lacks: not counted on, or given up on."""
        return sorted((set(self.node_ids) - f.participants) | f.excluded | set(released), key=self.device_of.get)

    def on_done(self, frame: int, logits: Any, zero: Mapping[int, int], compute_ms: float,
                now_s: float) -> Optional[Frame]:
        """The engine finished the frame. A local frame gets its answer (`answer_body` and the
        degradation record); a peer's frame is forgotten."""
        f = self.frames.get(frame)
        if f is None or f.phase != Phase.RUNNING:
            return None
        for stage, count in zero.items():
            self._note_zero(f, stage, count)
        if f.participants == frozenset({self.self_id}):
            # It ran alone: every other device was missing at every stage.
            mask = sum(1 << self.device_of[n] for n in self.missing_devices(f, ()))
            for i in range(len(self._stages(f)[0])):
                f.degraded[i] = (mask, f.degraded.get(i, (0, 0))[1])
        if f.local:
            self._queued_bytes -= f.input_bytes
        f.logits, f.compute_ms, f.engine_state, f.input = logits, compute_ms, False, None
        f.phase = Phase.DONE
        self.counters["frames_done"] += 1
        if not finite(np.asarray(logits)):
            self.counters["frames_not_finite"] += 1
            self.counters["frame_errors"] += 1
            f.logits = None
            return self._fail(f, "the logits hold NaN or infinite values (a slice of some stage was out of range)")
        if not f.local:
            self._forget(f)
            return f
        f.answer = answer_body(f.logits, (now_s - f.received_s) * 1000.0, f.compute_ms)
        f.answer.update(self.degradation(f))
        self.recent.append((f.answer["latency_ms"], f.answer["zero_filled_fraction"]))
        return f

    def on_error(self, frame: int, message: str, not_finite: bool = False) -> Optional[Frame]:
        """The engine failed the frame (`not_finite`: a slice of this node held NaN or Inf)."""
        f = self.frames.get(frame)
        if f is None:
            return None
        self.counters["frame_errors"] += 1
        if not_finite:
            self.counters["frames_not_finite"] += 1
        f.engine_state = False
        return self._fail(f, message)

    def _fail(self, f: Frame, message: str) -> Frame:
        if f.phase in (Phase.QUEUED, Phase.HELD) or (f.local and f.phase != Phase.DONE):
            self._queued_bytes -= f.input_bytes
        f.phase, f.input, f.gathered = Phase.DONE, None, None
        if f.local:
            f.answer = {"error": message}
        else:
            self._forget(f)
        return f

    def _forget(self, f: Frame) -> None:
        if self.frames.pop(f.frame, None) is not None:
            self._per_origin[f.origin] -= 1

    # ------------------------------------------------------------ expiry
    def expire(self, now_s: float) -> List[Frame]:
        """Expire frames older than the frame timeout. Returns them; the handler drops their engine
        state and gathers."""
        out = []
        for f in list(self.frames.values()):
            age_s = now_s - f.received_s
            if f.phase == Phase.DONE or age_s <= self.frame_timeout_s:
                continue
            self.counters["frames_expired"] += 1
            out.append(self._expire(f, f"expired after {age_s * 1000:.0f} ms "
                                       f"(frame timeout {self.frame_timeout_s * 1000:.0f} ms)"))
        return out

    def after_stall(self, stalled_from_s: float, now_s: float) -> Tuple[List[Frame], List[Frame]]:
        """This node was not running from `stalled_from_s` for a peer timeout or more: its peers
        released it from every frame in flight then. Returns (expired, to_rerun):
        - the peers' frames received before the stall are expired: their origins went on without
          this node, and a node back from a stall must not wait on inputs finished long ago;
        - its own frames already sent out are to be run again (`rerun`): no peer sends it those
          slices any more, but the client still waits and the input is here. Held frames went
          nowhere yet and simply wait."""
        expired, to_rerun = [], []
        for f in list(self.frames.values()):
            if f.phase in (Phase.DONE, Phase.HELD) or f.received_s > stalled_from_s:
                continue
            if f.local and f.input is not None:
                to_rerun.append(f)
                continue
            self.counters["frames_expired"] += 1
            expired.append(self._expire(f, f"expired: this node was not running for "
                                           f"{(now_s - stalled_from_s) * 1000:.0f} ms, its peers went on without it"))
        return expired, to_rerun

    def rerun(self, f: Frame, new_frame: int) -> None:
        """A local frame starts over from its input as `new_frame`, held until the handler starts
        it with fresh participants. It keeps its admission time (`t_ms`, so its place in every
        node's order), its age (the frame timeout still bounds it) and its place in the answer
        order. Peers forget the old id when the heartbeats stop listing it. The handler has
        abandoned the old id's gathers and told the engine to drop its state."""
        if f.input is None or not f.local:
            raise ValueError(f"frame {f.frame}: only a local frame that still has its input can run again")
        del self.frames[f.frame]
        self._answer_order[self._answer_order.index(f.frame)] = new_frame
        f.frame, f.phase, f.participants, f.excluded = new_frame, Phase.HELD, frozenset(), frozenset()
        f.stage, f.stages_sent, f.gathered, f.engine_state, f.degraded = 0, 0, None, False, {}
        self.frames[new_frame] = f
        self.counters["frames_rerun"] += 1

    def _expire(self, f: Frame, why: str) -> Frame:
        state = f.engine_state
        self._fail(f, why)
        f.engine_state = state  # tells the handler whether the engine must drop its state
        return f

    def prune_origin(self, origin: str, progress: Mapping[int, int], inputs: Mapping[str, int]) -> List[Frame]:
        """Frames of `origin` that its latest heartbeat says it has finished: expire them."""
        newest = inputs.get(origin, -1)
        out = []
        for f in list(self.frames.values()):
            if f.origin == origin and f.frame <= newest and f.frame not in progress and f.phase != Phase.DONE:
                self.counters["frames_pruned"] += 1
                out.append(self._expire(f, "finished by its origin"))
        return out

    # ------------------------------------------------------------ answers and reports
    def take_answers(self) -> List[Frame]:
        """Local frames whose answer is ready, in the order their clients submitted them."""
        out = []
        while self._answer_order:
            f = self.frames.get(self._answer_order[0])
            if f is None:
                self._answer_order.popleft()
                continue
            if f.answer is None:
                break
            self._answer_order.popleft()
            self._forget(f)
            out.append(f)
        return out

    def progress(self) -> Dict[int, int]:
        """Frames held and how many of their stages' slices were sent (what heartbeats report)."""
        return {f.frame: f.stages_sent for f in self.frames.values() if f.phase not in (Phase.HELD, Phase.DONE)}

    def inputs(self) -> Dict[str, int]:
        return dict(self._inputs)

    def in_flight(self) -> int:
        return sum(1 for f in self.frames.values() if f.phase != Phase.DONE)

    def queued(self) -> int:
        return sum(1 for f in self.frames.values() if f.phase in (Phase.HELD, Phase.QUEUED))

    def stats(self) -> Dict[str, Any]:
        lat = sorted(r[0] for r in self.recent)
        return {"frames_done": self.counters["frames_done"], "frame_errors": self.counters["frame_errors"],
                "frames_not_finite": self.counters["frames_not_finite"],
                "frames_expired": self.counters["frames_expired"], "frames_pruned": self.counters["frames_pruned"],
                "frames_rerun": self.counters["frames_rerun"],
                "frames_in_flight": self.in_flight(), "frames_queued": self.queued(),
                "latency_ms_p50": lat[len(lat) // 2] if lat else None,
                "latency_ms_p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None,
                "zero_filled_fraction": float(np.mean([r[1] for r in self.recent])) if self.recent else 0.0}

    def _stages(self, f: Frame) -> Tuple[Sequence[str], Sequence[int]]:
        """The stage names and neuron counts of the plan `f` runs on."""
        if f.plan is None:
            return self.stage_names, self.stage_neurons
        return f.plan.stage_names, f.plan.neurons

    def frames_on(self, plan: Any) -> int:
        """How many frames held here run on `plan` (a roll-out retires a plan once none does)."""
        return sum(1 for f in self.frames.values() if f.plan is plan)

    def degradation(self, f: Frame) -> Dict[str, Any]:
        """The answer's account of what computed it: per stage, the devices missing anywhere and the
        most neurons zero-filled anywhere; who took part in every stage."""
        failed_by_stage: Dict[str, List[str]] = {}
        zero_filled: Dict[str, float] = {}
        union = 0
        names, neurons = self._stages(f)
        for i, name in enumerate(names):
            mask, zero = f.degraded.get(i, (0, 0))
            union |= mask
            if mask:
                failed_by_stage[name] = [n for d, n in enumerate(self.node_ids) if mask >> d & 1]
            zero_filled[name] = zero / neurons[i] if neurons[i] else 0.0
        overall = sum(f.degraded.get(i, (0, 0))[1] for i in range(len(names))) / max(1, sum(neurons))
        computed_by = [n for d, n in enumerate(self.node_ids) if n in f.participants and not union >> d & 1]
        return {"participants": computed_by, "counted_on": sorted(f.participants, key=self.device_of.get),
                "failed_by_stage": failed_by_stage, "zero_filled": zero_filled,
                "zero_filled_fraction": overall, "degraded": bool(union) or overall > 0}
