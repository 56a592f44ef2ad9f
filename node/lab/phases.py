"""What happened to each frame of a stream, told from the nodes' own events: phases, figures,
and whether any answer understated its zero-fill.

Phases of a frame (wall clock, same machine):
  before     answered before the first failure
  detecting  in flight while a failure was being detected: between the fault and the moment
             every survivor ran new frames without the device
  failed     submitted after detection, answered before the device came back
  rejoining  in flight while the device was coming back (restart or SIGCONT until every node
             counts it again for new frames)
  rejoined   submitted after the rejoin
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from robustdice.partitioner.core.serving_stages import serving_stages

PHASES = ("before", "detecting", "failed", "rejoining", "rejoined")


@dataclasses.dataclass
class FrameRecord:
    """One frame of a stream, as the client saw it."""
    index: int
    sample: int
    label: int
    submitted_wall_s: float
    answered_wall_s: Optional[float] = None
    prediction: Optional[int] = None
    latency_ms: Optional[float] = None
    zero_filled_fraction: Optional[float] = None
    zero_filled: Optional[Dict[str, float]] = None
    participants: Optional[List[str]] = None
    error: Optional[str] = None
    phase: Optional[str] = None

    REPORTED = ("index", "sample", "label", "prediction", "latency_ms", "zero_filled_fraction", "phase",
                "participants", "submitted_wall_s", "error")

    def answer(self, meta: Mapping[str, Any], wall_s: float) -> None:
        self.answered_wall_s = wall_s
        if "error" in meta:
            self.error = meta["error"]
            return
        self.prediction = int(meta["prediction"][0])
        self.latency_ms = meta["latency_ms"]
        self.zero_filled_fraction = meta["zero_filled_fraction"]
        self.zero_filled = meta["zero_filled"]
        self.participants = meta.get("participants")

    def report(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in self.REPORTED}


def event_times(views: List[Dict], kind: str, peer: str, after_wall_s: float) -> List[float]:
    return [e["wall_s"] for v in views if not v.get("unreachable") for e in v.get("events", [])
            if e.get("peer") == peer and e["kind"] in kind.split("|") and e["wall_s"] >= after_wall_s]


def counted_from(view: Dict, peer: str, after_wall_s: float, counted: bool) -> Optional[float]:
    """When `view`'s node first ran new frames with (counted) or without `peer` after the time."""
    for e in view.get("events", []):
        if e["kind"] == "participants" and e["wall_s"] >= after_wall_s and (peer in e["participants"]) == counted:
            return e["wall_s"]
    return None


def classify(frames: List[FrameRecord], windows: List[Tuple[str, float, float]]) -> None:
    """Set each frame's phase from its submit/answer wall times and the fault windows."""
    first_fault = min((w[1] for w in windows if w[0] == "detecting"), default=float("inf"))
    for f in frames:
        start, end = f.submitted_wall_s, f.answered_wall_s or float("inf")
        phase = "before" if end < first_fault else "failed"
        for name, lo, hi in windows:
            if name == "detecting" and start < hi and end > lo:
                phase = "detecting"
                break
            if name == "rejoining" and start < hi and end > lo:
                phase = "rejoining"
                break
            if name == "rejoined" and start >= lo:
                phase = "rejoined"
        f.phase = phase


def summarise(frames: List[FrameRecord]) -> Dict[str, Dict]:
    out = {}
    for phase in PHASES:
        sel = [f for f in frames if f.phase == phase and f.prediction is not None]
        if not sel:
            continue
        lat = np.array([f.latency_ms for f in sel])
        span = max(f.answered_wall_s for f in sel) - min(f.submitted_wall_s for f in sel)
        out[phase] = {"frames": len(sel),
                      "accuracy": float(np.mean([f.prediction == f.label for f in sel])),
                      "fps": len(sel) / span if span > 0 else None,
                      "latency_ms_p50": float(np.percentile(lat, 50)), "latency_ms_p99": float(np.percentile(lat, 99)),
                      "zero_filled_fraction": float(np.mean([f.zero_filled_fraction for f in sel]))}
    return out


def format_phases(phases: Dict[str, Dict]) -> str:
    header = f"{'phase':<10} {'frames':>6} {'accuracy':>9} {'FPS':>6} {'p50 ms':>8} {'p99 ms':>8} {'zero-filled':>11}"
    lines = [header, "-" * len(header)]
    for name, s in phases.items():
        fps = "-" if s["fps"] is None else f"{s['fps']:.1f}"
        lines.append(f"{name:<10} {s['frames']:>6} {100 * s['accuracy']:>8.1f}% {fps:>6} {s['latency_ms_p50']:>8.1f} "
                     f"{s['latency_ms_p99']:>8.1f} {100 * s['zero_filled_fraction']:>10.1f}%")
    return "\n".join(lines)


def report(ids: Sequence[str], frames: List[FrameRecord], applied: List[Dict], views: List[Dict]) -> Dict:
    """The --json object of a stream: phases, detections, rejoins, every frame."""
    windows: List[Tuple[str, float, float]] = []
    detections, rejoins = [], []
    for a in applied:
        peer = ids[a["device"]]
        if a["kind"] in ("kill", "pause"):
            survivors = [v for v in views if v.get("node") != peer]
            times = [min(event_times([v], "died", peer, a["wall_s"]), default=None) for v in survivors]
            known = [t for t in times if t is not None]
            detected = max(known) if known else None
            # Frames run without the device once every survivor has stopped counting on it.
            dropped = [counted_from(v, peer, a["wall_s"], False) for v in survivors]
            stopped = max(dropped) if dropped and None not in dropped else None
            detections.append({"device": a["device"], "fault": a["kind"], "frame": a["frame"],
                               "survivors_reporting": len(known), "survivors": len(survivors),
                               "detected_after_ms": None if detected is None else 1000 * (detected - a["wall_s"]),
                               "per_node_ms": {v["node"]: None if t is None else 1000 * (t - a["wall_s"])
                                               for v, t in zip(survivors, times)}})
            end = max(t for t in (detected, stopped) if t is not None) if detected or stopped else float("inf")
            windows.append(("detecting", a["wall_s"], end))
        else:
            others = [v for v in views if v.get("node") != peer and not v.get("unreachable")]
            times = [min(event_times([v], "rejoined|joined", peer, a["wall_s"]), default=None) for v in others]
            known = [t for t in times if t is not None]
            back = max(known) if known else None
            # New frames run on the device once every node counts on it again (two-way, in the clique).
            counted = [counted_from(v, peer, a["wall_s"], True) for v in others]
            end = max(counted) if counted and None not in counted else float("inf")
            rejoins.append({"device": a["device"], "fault": a["kind"], "frame": a["frame"],
                            "rejoined_after_ms": None if back is None else 1000 * (back - a["wall_s"]),
                            "counted_after_ms": None if end == float("inf") else 1000 * (end - a["wall_s"])})
            windows += [("rejoining", a["wall_s"], end), ("rejoined", end, float("inf"))]
    classify(frames, windows)
    phases = summarise(frames)
    answered = sum(1 for f in frames if f.prediction is not None)
    return {"frames_submitted": len(frames), "frames_answered": answered,
            "frames_failed": sum(1 for f in frames if f.error is not None),
            "frames": [f.report() for f in frames],
            "phases": phases, "detections": detections, "rejoins": rejoins, "faults": applied}


def silent_divergence(records: Iterable[Mapping[str, Any]], expected_logits: Sequence[np.ndarray]) -> List[int]:
    """Frames whose answer claims to be whole (not degraded) yet whose logits differ from the
    no-failure model's (`expected_logits[sample]`): the silent divergence an answer must never
    hide. Returns their frame ids."""
    out = []
    for r in records:
        meta, logits = r.get("meta"), r.get("logits")
        if not meta or "error" in meta or meta.get("degraded") or logits is None:
            continue
        expected = expected_logits[r["sample"]]
        if not np.allclose(logits, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max())):
            out.append(r.get("frame"))
    return out


def divergent_answers(records: Iterable[Mapping[str, Any]], views: Sequence[Mapping[str, Any]], plan
                      ) -> List[Tuple[int, str, int, int]]:
    """Answers that claim fewer zero-filled neurons at a stage than one of the nodes that computed
    them (the answer's `participants`) logged for that frame, whether or not that node's rows of
    the stage reached the answer: (frame, stage name, claimed, logged). Stricter than what an
    answer rests on (a zero-fill whose rows nobody used, or one in a node's own last stage,
    changes no answer), so it is a figure to read beside `silent_divergence`, which is the check.
    A node outside the participants computed nothing the answer used: a node cut off mid-frame
    fills its peers' rows of the frames it holds, and nothing it computes after reaches the
    origin, which can neither know of it nor be changed by it. `records` carry the answer's frame
    id ("frame") and meta; `views` are the nodes' status with {"zero_log": true} (and "node")."""
    logged: Dict[Tuple[int, int], Dict[Optional[str], int]] = {}
    for v in views:
        for frame, stage, n in v.get("zero_log", []):
            by_node = logged.setdefault((frame, stage), {})
            by_node[v.get("node")] = max(by_node.get(v.get("node"), 0), n)
    stages = serving_stages(plan)
    out = []
    for r in records:
        meta = r.get("meta")
        if not meta or "zero_filled" not in meta:
            continue
        computed_by = meta.get("participants")
        for i, stage in enumerate(stages):
            claimed = round(meta["zero_filled"].get(stage.name, 0.0) * stage.neurons)
            worst = max((n for node, n in logged.get((r.get("frame"), i), {}).items()
                         if computed_by is None or node in computed_by), default=0)
            if claimed < worst:
                out.append((r.get("frame"), stage.name, claimed, worst))
    return out
