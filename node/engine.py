"""The inference engine: one process holding this device's shard, computing its slices.

It loads only its own shard onto a model skeleton built on the meta device (so the full model
never exists in this process). It is a dataflow engine: one compute thread takes work items
from the handler in the order they come — start a frame, or continue a frame whose stage was
gathered — and never waits on the network. Between items a frame is a suspended `FrameRun`
(partitioner/runtime.py), so any number of frames are in flight while one thread computes;
the handler decides which item comes next (oldest first, the same order on every node).

Assembling a gathered stage is the partitioner's `assemble` (first copy wins, zero-fill the
rest) and `FrameRun.advance` finishes it (cdc recovery, followers): the same code the
simulation runs. A frame with no other participant (`alone`) runs every stage here in one go.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
import warnings
from typing import Dict, List, Optional

import zmq

from . import ipc
from .process import child_main, report_ready

log = logging.getLogger("robustdice.engine")
POLL_MS = 100


class Engine:
    def __init__(self, plan_dir: str, device: int) -> None:
        import torch

        from robustdice.partitioner.plan import load_plan
        from robustdice.partitioner.runtime import Assembler, DeviceRuntime, build_skeleton, load_shard

        self.torch = torch
        self.plan = load_plan(plan_dir)
        self.device = device
        self.assembler = Assembler(self.plan)
        shard = load_shard(self.plan, plan_dir, device)
        staged = build_skeleton(self.plan, shard["shared"])
        self.runtime = DeviceRuntime(self.plan, staged, shard, device)
        self.runs: Dict[int, object] = {}          # frame -> FrameRun suspended between stages
        self.own: Dict[int, object] = {}           # frame -> its current slice, contiguous
        self.compute_ms: Dict[int, float] = {}

    # ------------------------------------------------------------ work items
    def handle(self, header: dict, bufs) -> Optional[ipc.Item]:
        """One work item from the handler; returns its result (None for `drop`)."""
        kind, frame = header.get("kind"), header.get("frame")
        if kind == ipc.DROP:
            self._forget(frame)
            return None
        start = time.perf_counter()
        if kind == ipc.INPUT:
            x = self.torch.from_numpy(ipc.array(bufs[0], header["dtype"], header["shape"]))
            if header.get("alone"):
                return self._alone(frame, x, start)
            run = self.runtime.start(x)
            self.runs[frame] = run
            self.compute_ms[frame] = 0.0
            return self._slice_result(frame, run, None, start)
        if kind == ipc.GATHERED:
            return self._continue(frame, header, bufs, start)
        raise ValueError(f"unexpected work item {kind!r}")

    def _rows(self, header: dict, bufs) -> Dict[int, object]:
        """device -> its rows of the gathered stage, as views of the received frames."""
        from_numpy, counts, dtype = self.torch.from_numpy, self.assembler.counts[header["stage"]], header["dtype"]
        trailing = list(header["trailing"])
        return {d: from_numpy(ipc.array(buf, dtype, [counts[d]] + trailing)) for d, buf in zip(header["from"], bufs)}

    def _continue(self, frame: int, header: dict, bufs, start: float) -> ipc.Item:
        run = self.runs.get(frame)
        if run is None or run.stage != header["stage"]:
            raise ValueError(f"frame {frame}: gathered stage {header['stage']} for a frame not at that stage")
        rows = self._rows(header, bufs)
        rows[self.device] = self.own.pop(frame)
        full, missing = self.assembler.assemble(run.stage, rows)
        stage = run.stage
        if run.advance(full, missing):
            return self._done_result(frame, run, {stage: int(run.zero_masks[-1].sum())}, start)
        return self._slice_result(frame, run, int(run.zero_masks[-1].sum()), start)

    def _alone(self, frame: int, x, start: float) -> ipc.Item:
        """Every stage here: the peers' rows are absent, which the assembly zero-fills."""
        run = self.runtime.start(x)
        while True:
            full, missing = self.assembler.assemble(run.stage, {self.device: run.slice})
            if run.advance(full, missing):
                break
        self.compute_ms[frame] = 0.0
        zero = {i: int(m.sum()) for i, m in enumerate(run.zero_masks)}
        return self._done_result(frame, run, zero, start)

    def _slice_result(self, frame: int, run, zero_before: Optional[int], start: float) -> ipc.Item:
        own = run.slice.contiguous()
        self.own[frame] = own  # kept to assemble with the peers' rows; ZeroMQ also sends from it
        self.compute_ms[frame] += (time.perf_counter() - start) * 1000.0
        array = own.numpy()
        return {"kind": ipc.SLICE, "frame": frame, "stage": run.stage, "zero_before": zero_before,
                "ms": (time.perf_counter() - start) * 1000.0, **ipc.describe(array)}, [array]

    def _done_result(self, frame: int, run, zero: Dict[int, int], start: float) -> ipc.Item:
        compute_ms = self.compute_ms.pop(frame, 0.0) + (time.perf_counter() - start) * 1000.0
        self.runs.pop(frame, None)
        self.own.pop(frame, None)
        logits = run.logits.contiguous().numpy()
        return {"kind": ipc.DONE, "frame": frame, "zero": {str(k): v for k, v in zero.items()},
                "compute_ms": compute_ms, "ms": (time.perf_counter() - start) * 1000.0,
                **ipc.describe(logits)}, [logits]

    def _forget(self, frame) -> None:
        run = self.runs.pop(frame, None)
        if run is not None:
            run.close()
        self.own.pop(frame, None)
        self.compute_ms.pop(frame, None)


def serve(engine: Engine, sock: zmq.Socket, stop) -> None:
    """Answer work until `stop()` or a `stop` message."""
    sock.send(ipc.READY)
    with engine.torch.inference_mode():
        _serve(engine, sock, stop)


def _serve(engine: Engine, sock: zmq.Socket, stop) -> None:
    sock.rcvtimeo = POLL_MS
    while not stop():
        try:
            parts = sock.recv_multipart(copy=False)
        except zmq.Again:  # nothing within POLL_MS: look at the stop flag again
            continue
        kind, items = ipc.unpack(parts)
        if kind == ipc.STOP:
            return
        results = []
        for header, bufs in items:
            frame = header.get("frame")
            try:
                result = engine.handle(header, bufs)
            except Exception as exc:  # one bad frame must not end the engine: report it and go on
                log.exception("frame %s failed", frame)
                engine._forget(frame)
                result = ({"kind": ipc.ERROR, "frame": frame, "message": f"{type(exc).__name__}: {exc}"[:500]}, [])
            if result is not None:
                results.append(result)
        if results:
            sock.send_multipart(ipc.pack(ipc.RESULTS, results), copy=False)


def main(argv: Optional[List[str]] = None) -> int:
    def arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--plan", required=True)
        p.add_argument("--device", type=int, required=True)
        p.add_argument("--ipc", required=True)
        p.add_argument("--threads", type=int, default=1)

    args = child_main("engine", argv, arguments)
    stopping = {"flag": False}

    def on_signal(*_):
        stopping["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

    import torch
    torch.set_num_threads(max(1, args.threads))
    engine = Engine(args.plan, args.device)
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(args.ipc)
    log.info("device %d of plan %s (%s, %s): shard loaded, %d stages, %d torch threads", args.device,
             engine.plan.plan_hash[:12], engine.plan.model, engine.plan.method, len(engine.plan.stages),
             torch.get_num_threads())
    report_ready(args.ready_fd)
    try:
        serve(engine, sock, lambda: stopping["flag"])
    finally:
        sock.close(0)
        context.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
