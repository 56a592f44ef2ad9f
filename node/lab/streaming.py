"""A camera-like stream at a cluster with a fault schedule: frames at a fixed rate to a node the
schedule leaves up, faults applied when the stream reaches their frame (kill = SIGKILL,
pause = SIGSTOP ... SIGCONT, restart = a fresh process), answers collected, phases reported.
"""
from __future__ import annotations

import logging
import time
from typing import Dict, List

import numpy as np

from .faults import Fault
from .localcluster import LocalCluster
from .phases import FrameRecord, report

log = logging.getLogger(__name__)

ANSWER_GRACE_S = 10.0


def stream(cluster: LocalCluster, images: np.ndarray, labels: np.ndarray, n_frames: int, rate_fps: float,
           faults: List[Fault], answer_timeout_s: float = ANSWER_GRACE_S) -> Dict:
    """Submit frames at `rate_fps`, apply `faults`, collect answers; returns the --json object."""
    from robustdice.mesh import wire

    from ..client import NodeClient
    schedule = list(faults)
    touched = {f.device for f in faults}
    candidates = [d for d in range(len(cluster.ids)) if d not in touched] or [0]
    target = candidates[0]
    frames: List[FrameRecord] = []
    by_request: Dict[int, FrameRecord] = {}
    applied: List[Dict] = []
    interval_s = 1.0 / rate_fps if rate_fps > 0 else 0.0
    t0 = time.monotonic()
    with NodeClient(cluster.config, cluster.ids[target], cluster.key_path) as client:
        def collect(until: float) -> None:
            while True:
                msg = client.receive(max(0.0, until - time.monotonic()))
                if msg is None:
                    return
                if isinstance(msg, wire.Result):
                    rec = by_request.pop(msg.meta.get("request", {}).get("id"), None)
                    if rec is not None:
                        rec.answer(msg.meta, time.time())
                if time.monotonic() >= until:
                    return

        for i in range(n_frames):
            while schedule and schedule[0].frame <= i:
                f = schedule.pop(0)
                wall = time.time()
                if f.kind == "restart":
                    # As a crashed board comes back: a new Python (torch imported again), so that
                    # the time until the node counts again is a board's, not a warm fork's.
                    cluster.start_node(f.device, warm=False)
                else:
                    getattr(cluster, {"kill": "kill", "pause": "pause", "resume": "resume"}[f.kind])(f.device)
                applied.append({"kind": f.kind, "device": f.device, "frame": i, "wall_s": wall})
                log.info("frame %d: %s device %d", i, f.kind, f.device)
            sample = i % len(labels)
            rec = FrameRecord(i, int(sample), int(labels[sample]), time.time())
            frames.append(rec)
            by_request[client.send_input(images[sample: sample + 1], {"index": i})] = rec
            collect(t0 + (i + 1) * interval_s)
        deadline = time.monotonic() + answer_timeout_s
        while by_request and time.monotonic() < deadline:
            collect(min(deadline, time.monotonic() + 0.5))
    # The final views carry the membership events the phases come from; a loaded machine can
    # be slow to answer, so this one query gets more time than a liveness probe.
    views = cluster.status(timeout_s=10.0)
    return report(cluster.ids, frames, applied, views)
