"""Prometheus metrics of one node: what `robustdice status` shows, for a fleet's scraper.

Off unless the node's peers.yaml entry has `metrics_port`. The handler's loop is one thread and
must never wait for, or be slowed by, a scrape. So:

  - `MetricsRecorder` keeps what status() has no running total of (the latency and zero-fill
    histograms of answers, answers by outcome, membership events by peer and kind). The loop
    updates it as answers and events happen: a few integer additions.
  - At most once per METRICS_REFRESH_S, from its housekeeping, the loop builds an immutable
    `MetricsSnapshot` from status() and the recorder and swaps it in with one assignment.
  - prometheus-client serves HTTP from its own thread; its collector (`SnapshotCollector`)
    reads whichever snapshot is current and never touches the loop's live dicts.

`families(snapshot, now_s)` is the pure mapping from a snapshot to metric families. Every name
starts with `robustdice_`; counters get prometheus' `_total` suffix.
"""
from __future__ import annotations

import bisect
import collections
import logging
import time
from dataclasses import dataclass
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Tuple

from robustdice.mesh.membership import EventKind, PeerState

from .errors import NodeError

log = logging.getLogger(__name__)

METRICS_REFRESH_S = 1.0   # the loop builds a new snapshot at most this often
# Answer latency on a board: milliseconds for a small CNN, seconds for a large one under failure
# (a sync timeout is paid per stage).
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Fraction of the model's neurons zero-filled for an answer; le=0 counts the exact answers.
ZERO_FILLED_BUCKETS = (0.0, 0.01, 0.05, 0.1, 0.2, 0.5, 1.0)
OUTCOMES = ("exact", "degraded", "error")
# status() counters that count something other than a dropped message or request; every other
# counter is a drop, exported under its name as the `reason` of robustdice_dropped_total.
NOT_DROPS = {
    "self_stalls": "times this node itself was not running for a peer timeout or more",
    "engine_stalls": "times the engine held work and answered nothing for the stall limit",
    "recv_again": "reads retried because a fresh CURVE connection's first message was not ready",
    "peers_suspected": "times a peer claimed work but delivered no slice for a sync timeout (left out of new frames)",
    "slice_bytes_sent": "bytes of slices this node sent to its peers",
}
FRAME_COUNTERS = {
    "frames_done": "frames this node's engine finished (its own clients' and its peers')",
    "frame_errors": "frames that failed in this node's engine",
    "frames_expired": "frames expired here (too old, or peers' frames received before this node's own stall)",
    "frames_pruned": "peers' frames dropped because their origin had finished them",
    "frames_rerun": "own frames run again under a new id because this node stalled while they were out",
    "frames_not_finite": "frames whose slice of some stage or logits held NaN or Inf here (answered as errors)",
}


@dataclass(frozen=True)
class HistogramData:
    bounds: Tuple[float, ...]      # upper bounds, without +Inf
    counts: Tuple[int, ...]        # observations per bucket (not cumulative), one more than bounds
    total: float                   # the sum of the observations

    @property
    def count(self) -> int:
        return sum(self.counts)


class Histogram:
    """Observations counted into fixed buckets (upper bounds inclusive, as Prometheus' `le`)."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def frozen(self) -> HistogramData:
        return HistogramData(self.bounds, tuple(self.counts), self.total)


@dataclass(frozen=True)
class PeerView:
    peer: str
    state: str                     # a PeerState value
    connected: bool                # hears us, ready, and our sends succeed: counted on for new frames
    silent_s: Optional[float]      # since its last message; None if never heard


@dataclass(frozen=True)
class MetricsSnapshot:
    taken_s: float                 # time.monotonic() when the loop built it
    node: str
    device: int
    model: str
    method: str
    plan_hash: str
    started_wall_s: float          # when this handler process started (a restart resets it)
    serving: bool
    refused: bool
    engine_ready: bool
    engine_busy_s: float
    frames: Tuple[Tuple[str, int], ...]             # FRAME_COUNTERS' names → count
    frames_in_flight: int
    frames_queued: int
    gathers_in_progress: int
    early_slices: int
    participants: int
    zero_filled_recent: float                       # mean over status()'s recent answers
    answers: Tuple[Tuple[str, int], ...]            # outcome → count
    latency_s: HistogramData
    zero_filled: HistogramData
    peers: Tuple[PeerView, ...]
    membership_events: Tuple[Tuple[str, str, int], ...]   # (peer, kind, count), every kind listed
    counters: Tuple[Tuple[str, int], ...]           # status()'s merged counters
    rss_bytes: Tuple[Tuple[str, int], ...]          # process role → resident bytes
    power_w: Optional[float]                        # None where jtop is not available
    energy_j: Optional[float] = None                # the board's energy while the node ran (jtop)


class MetricsRecorder:
    """Running totals the loop keeps for the metrics (status() has no histogram of answers)."""

    def __init__(self) -> None:
        self.latency_s = Histogram(LATENCY_BUCKETS_S)
        self.zero_filled = Histogram(ZERO_FILLED_BUCKETS)
        self.answers: "collections.Counter[str]" = collections.Counter()
        self.events: "collections.Counter[Tuple[str, str]]" = collections.Counter()
        self.started_wall_s = time.time()

    def on_answer(self, answer: Mapping[str, Any]) -> None:
        """A local frame's answer as its client gets it (an error, or the prediction's account)."""
        if "error" in answer:
            self.answers["error"] += 1
            return
        self.answers["degraded" if answer.get("degraded") else "exact"] += 1
        self.latency_s.observe(float(answer.get("latency_ms", 0.0)) / 1000.0)
        self.zero_filled.observe(float(answer.get("zero_filled_fraction", 0.0)))

    def on_event(self, kind: str, peer: str) -> None:
        self.events[(peer, kind)] += 1

    def snapshot(self, status: Mapping[str, Any], taken_s: float, handler_pid: int,
                 supervisor_pid: int) -> MetricsSnapshot:
        """An immutable copy of what the metrics show, from the handler's `status()`."""
        members = status.get("members", {})
        peers = tuple(PeerView(p, str(m.get("state")), bool(m.get("connected")),
                               None if m.get("silent_ms") is None else float(m["silent_ms"]) / 1000.0)
                      for p, m in sorted(members.items()))
        events = tuple((p, k.value, self.events[(p, k.value)]) for p in sorted(members) for k in EventKind)
        roles = {str(handler_pid): "handler", str(supervisor_pid): "supervisor"}
        rss = tuple(sorted((roles.get(pid, "engine"), int(b)) for pid, b in status.get("rss_bytes", {}).items()))
        power_mw = status.get("power_mw")
        return MetricsSnapshot(
            taken_s=taken_s, node=str(status["node"]), device=int(status["device"]), model=str(status["model"]),
            method=str(status["method"]), plan_hash=str(status["plan_hash"]), started_wall_s=self.started_wall_s,
            serving=bool(status.get("serving")), refused=bool(status.get("refused")),
            engine_ready=bool(status.get("engine_ready")), engine_busy_s=float(status.get("engine_busy_ms", 0)) / 1000,
            frames=tuple((k, int(status.get(k, 0))) for k in FRAME_COUNTERS),
            frames_in_flight=int(status.get("frames_in_flight", 0)), frames_queued=int(status.get("frames_queued", 0)),
            gathers_in_progress=int(status.get("gathers_in_progress", 0)),
            early_slices=int(status.get("early_slices", 0)), participants=len(status.get("participants", ())),
            zero_filled_recent=float(status.get("zero_filled_fraction", 0.0)),
            answers=tuple((o, self.answers[o]) for o in OUTCOMES),
            latency_s=self.latency_s.frozen(), zero_filled=self.zero_filled.frozen(),
            peers=peers, membership_events=events,
            counters=tuple(sorted((str(k), int(v)) for k, v in status.get("counters", {}).items())),
            rss_bytes=rss, power_w=None if power_mw is None else float(power_mw) / 1000.0,
            energy_j=None if status.get("energy_j") is None else float(status["energy_j"]))


def families(snap: MetricsSnapshot, now_s: float) -> List[Any]:
    """The metric families of a snapshot (`now_s` on the snapshot's clock, for its age)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
    from prometheus_client.utils import floatToGoString

    def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
        return GaugeMetricFamily(f"robustdice_{name}", doc, value=value)

    def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
        return CounterMetricFamily(f"robustdice_{name}", doc, value=value)

    def histogram(name: str, doc: str, data: HistogramData) -> HistogramMetricFamily:
        cumulative, buckets = 0, []
        for bound, n in zip(list(data.bounds) + [float("inf")], data.counts):
            cumulative += n
            buckets.append((floatToGoString(bound), cumulative))
        return HistogramMetricFamily(f"robustdice_{name}", doc, buckets=buckets, sum_value=data.total)

    out: List[Any] = []
    info = GaugeMetricFamily("robustdice_node_info", "this node and its plan (always 1)",
                             labels=["node", "device", "model", "method", "plan_hash"])
    info.add_metric([snap.node, str(snap.device), snap.model, snap.method, snap.plan_hash[:12]], 1)
    out.append(info)
    out.append(gauge("start_time_seconds", "when the node's handler started (unix time): moves on a restart",
                     snap.started_wall_s))
    out.append(gauge("metrics_age_seconds", "how old these figures are: the loop refreshes them every "
                     f"{METRICS_REFRESH_S:g} s, so a growing age means a stuck loop", max(0.0, now_s - snap.taken_s)))
    out.append(gauge("serving", "1 once the node answers clients (it has heard its peers, or waited for them)",
                     int(snap.serving)))
    out.append(gauge("refused", "1 while every peer that answers refuses this node (plan mismatch)",
                     int(snap.refused)))
    out.append(gauge("engine_ready", "1 while the engine answers (0: not started, or stalled)", int(snap.engine_ready)))
    out.append(counter("engine_busy_seconds", "the engine's compute time, all work items together",
                       snap.engine_busy_s))
    for name, value in snap.frames:
        out.append(counter(name, FRAME_COUNTERS[name], value))
    out.append(gauge("frames_in_flight", "frames on this node not yet done (local and peers')", snap.frames_in_flight))
    out.append(gauge("frames_queued", "frames whose input waits for the engine", snap.frames_queued))
    out.append(gauge("gathers_in_progress", "all-gathers of a stage's slices not yet complete",
                     snap.gathers_in_progress))
    out.append(gauge("early_slices", "peers' slices buffered before this node reached their stage",
                     snap.early_slices))
    out.append(gauge("participants", "nodes a frame submitted now would run on, this one included",
                     snap.participants))

    answers = CounterMetricFamily("robustdice_answers", "answers to this node's clients by outcome: exact, "
                                  "degraded (some neurons zero-filled or a device missing), error",
                                  labels=["outcome"])
    for outcome, n in snap.answers:
        answers.add_metric([outcome], n)
    out.append(answers)
    out.append(histogram("answer_latency_seconds", "from a client's request to its answer (answers without error)",
                         snap.latency_s))
    out.append(histogram("answer_zero_filled_fraction", "fraction of the model's neurons zero-filled for an answer "
                         "(le=0: exact answers)", snap.zero_filled))
    out.append(gauge("zero_filled_fraction_recent", "mean zero-filled fraction of the recent answers",
                     snap.zero_filled_recent))

    states = GaugeMetricFamily("robustdice_peer_state", "1 for each peer's current membership state, 0 for the "
                               "others", labels=["peer", "state"])
    connected = GaugeMetricFamily("robustdice_peer_connected", "1 when the peer is counted on for new frames "
                                  "(alive, hears us, ready, sends succeed)", labels=["peer"])
    silent = GaugeMetricFamily("robustdice_peer_silent_seconds", "since the peer's last message (absent if never "
                               "heard)", labels=["peer"])
    for p in snap.peers:
        for s in PeerState:
            states.add_metric([p.peer, s.value], int(p.state == s.value))
        connected.add_metric([p.peer], int(p.connected))
        if p.silent_s is not None:
            silent.add_metric([p.peer], p.silent_s)
    events = CounterMetricFamily("robustdice_membership_events", "membership events by peer and kind: died is a "
                                 "detected failure, rejoined a peer back", labels=["peer", "kind"])
    for peer, kind, n in snap.membership_events:
        events.add_metric([peer, kind], n)
    out += [states, connected, silent, events]

    dropped = CounterMetricFamily("robustdice_dropped", "messages and requests dropped or refused, by reason "
                                  "(the mesh's and the handler's counters)", labels=["reason"])
    for name, n in snap.counters:
        if name in NOT_DROPS:
            out.append(counter(name, NOT_DROPS[name], n))
        else:
            dropped.add_metric([name], n)
    out.append(dropped)

    rss = GaugeMetricFamily("robustdice_resident_memory_bytes", "resident memory of the node's processes",
                            labels=["process"])
    for role, n in snap.rss_bytes:
        rss.add_metric([role], n)
    out.append(rss)
    if snap.power_w is not None:  # only where jtop reads the board's rails: never an invented number
        out.append(gauge("power_watts", "the board's total power (jtop, INA3221 rails)", snap.power_w))
    if snap.energy_j is not None:  # joules per image: rate(energy) / rate(answers), or per frame done
        out.append(counter("energy_joules", "the board's energy while this node ran: its power (jtop) "
                           "integrated over time", snap.energy_j))
    out.append(gauge("power_available", "1 where the board's power is read (jtop), else 0",
                     int(snap.power_w is not None)))
    return out


class SnapshotCollector:
    """A prometheus-client collector over the snapshot the loop swapped in last."""

    def __init__(self) -> None:
        self.snapshot: Optional[MetricsSnapshot] = None   # replaced whole by the loop, never mutated

    def collect(self) -> Iterable[Any]:
        snap = self.snapshot   # one read: the loop may swap in the next one meanwhile
        return [] if snap is None else families(snap, time.monotonic())

    def describe(self) -> Iterable[Any]:
        return []   # no collect() at registration: the families appear with the first snapshot


class MetricsServer:
    """prometheus-client's HTTP server (its own thread) over a SnapshotCollector."""

    def __init__(self, address: str, port: int, field: str) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        self.collector = SnapshotCollector()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self.collector)
        try:
            self._server, self._thread = start_http_server(port, addr=address, registry=registry)
        except OSError as exc:
            raise NodeError(f"{field}: cannot serve metrics on {address}:{port}: {exc.strerror or exc}") from None
        log.info("metrics on http://%s:%d/metrics", address, port)

    def publish(self, snapshot: MetricsSnapshot) -> None:
        self.collector.snapshot = snapshot

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=2.0)

