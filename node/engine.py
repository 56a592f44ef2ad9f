"""The inference engine: one process holding this device's shard, computing its slices.

It loads only its own shard onto a model skeleton built on the meta device (so the full model
never exists in this process), then runs `--workers` threads. Each worker owns one frame at a
time: for every stage it computes the device's slice, hands it to the event handler, blocks
until the handler returns the peers' rows, and lets the partitioner's `assemble` and
`finish_stage` zero-fill what nobody sent and apply cdc recovery and followers (the same code
the simulation runs). A frame that no peer takes part in (a node alone, or the last survivor)
skips the handler: `assemble` of its own slice alone is what the gather would give.
Several workers mean several frames in flight, so one frame's communication overlaps another's
computation (the paper's asynchronous sync). torch releases the GIL inside its kernels.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
import warnings
from typing import List, Optional

import numpy as np
import zmq

from . import ipc
from .process import child_main, report_ready

log = logging.getLogger("robustdice.engine")
POLL_MS = 100


class Engine:
    def __init__(self, plan_dir: str, device: int) -> None:
        import torch

        from robustdice.partitioner.plan import load_plan
        from robustdice.partitioner.runtime import DeviceRuntime, assemble, build_skeleton, load_shard

        self.torch = torch
        self.assemble = assemble
        self.plan = load_plan(plan_dir)
        shard = load_shard(self.plan, plan_dir, device)
        staged = build_skeleton(self.plan, shard["shared"])
        self.runtime = DeviceRuntime(self.plan, staged, shard, device)
        # The slices' neuron ids, computed once: they go out with every slice.
        self.ids = [self.runtime.ids(i).numpy().astype(np.int32) for i in range(len(self.plan.stages))]
        self.neurons = [s.neurons for s in self.plan.stages]
        # Stages whose every row this device computes, in order: alone, its slice is the output.
        self.whole = [np.array_equal(ids, np.arange(s.total_ids)) for ids, s in zip(self.ids, self.plan.stages)]

    def run_frame(self, sock: zmq.Socket, frame: int, x: np.ndarray, stop: threading.Event, alone: bool = False):
        torch = self.torch
        zero_filled: List[float] = []

        def gather(i: int, ids, slice_nm):
            if alone:  # no peer takes part in this frame: what the handler's gather would give
                if self.whole[i]:  # nothing to place or zero-fill: no copy (nobody else holds it)
                    return slice_nm, torch.zeros(slice_nm.shape[0], dtype=torch.bool)
                return self.assemble(self.plan.stages[i].total_ids, [(ids, slice_nm)])
            local = slice_nm.detach().contiguous().numpy()
            sock.send_multipart(ipc.pack(ipc.SLICE, {"frame": frame, "stage": i, **ipc.describe(local)},
                                         self.ids[i], local), copy=False)
            while True:
                if sock.poll(POLL_MS) == 0:
                    if stop.is_set():
                        raise InterruptedError("engine stopping")
                    continue
                kind, header, bufs = ipc.unpack(sock.recv_multipart(copy=False))
                if kind == ipc.STOP:
                    raise InterruptedError("engine stopping")
                if kind != ipc.GATHERED or header.get("frame") != frame or header.get("stage") != i:
                    log.warning("unexpected %s for frame %s stage %s while waiting for %d/%d",
                                kind, header.get("frame"), header.get("stage"), frame, i)
                    continue
                # The peers' rows; ours we have. What neither holds is zero and missing, by the
                # partitioner's own rule (the one the simulation runs).
                received = torch.from_numpy(ipc.array(bufs[0], "int32", (header["shape"][0],)).astype(np.int64))
                rows = torch.from_numpy(ipc.array(bufs[1], header["dtype"], header["shape"]))
                return self.assemble(self.plan.stages[i].total_ids, [(ids, slice_nm), (received, rows)])

        def on_stage(i: int, zero_mask) -> None:
            zero_filled.append(float(zero_mask.float().mean()) if zero_mask.numel() else 0.0)

        start = time.perf_counter()
        with torch.inference_mode():
            logits = self.runtime.run(torch.from_numpy(np.array(x)), gather, on_stage)
        return logits.numpy(), zero_filled, (time.perf_counter() - start) * 1000.0


def worker(engine: Engine, context: zmq.Context, endpoint: str, index: int, stop: threading.Event) -> None:
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    sock.identity = f"w{index}".encode()
    sock.connect(endpoint)
    try:
        sock.send(ipc.READY)
        while not stop.is_set():
            if sock.poll(POLL_MS) == 0:
                continue
            kind, header, bufs = ipc.unpack(sock.recv_multipart(copy=False))
            if kind == ipc.STOP:
                break
            if kind != ipc.FRAME:
                continue
            frame = header["frame"]
            try:
                logits, zero_filled, compute_ms = engine.run_frame(
                    sock, frame, ipc.array(bufs[0], header["dtype"], header["shape"]), stop,
                    alone=bool(header.get("alone")))
            except InterruptedError:
                break
            except Exception as exc:  # a bad input must not kill the worker: report and carry on
                log.exception("frame %d failed", frame)
                sock.send_multipart(ipc.pack(ipc.ERROR, {"frame": frame, "message": f"{type(exc).__name__}: {exc}"}))
                continue
            sock.send_multipart(ipc.pack(ipc.DONE, {"frame": frame, "zero_filled": zero_filled,
                                                    "compute_ms": compute_ms, **ipc.describe(logits)}, logits),
                                copy=False)
    finally:
        sock.close(0)


def main(argv: Optional[List[str]] = None) -> int:
    def arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--plan", required=True)
        p.add_argument("--device", type=int, required=True)
        p.add_argument("--ipc", required=True)
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--workers", type=int, default=2)

    args = child_main("engine", argv, arguments)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

    import torch
    torch.set_num_threads(max(1, args.threads))
    engine = Engine(args.plan, args.device)
    context = zmq.Context()
    threads = [threading.Thread(target=worker, args=(engine, context, args.ipc, i, stop), daemon=True,
                                name=f"worker-{i}") for i in range(max(1, args.workers))]
    for t in threads:
        t.start()
    log.info("device %d of plan %s (%s, %s): shard loaded, %d stages, %d workers, %d torch threads",
             args.device, engine.plan.plan_hash[:12], engine.plan.model, engine.plan.method,
             len(engine.plan.stages), len(threads), torch.get_num_threads())
    report_ready(args.ready_fd)
    try:
        while not stop.is_set() and any(t.is_alive() for t in threads):
            stop.wait(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=2.0)
        if any(t.is_alive() for t in threads):
            # A worker inside a long torch kernel: its socket is still open, so term() would
            # wait for it. Nothing of ours needs flushing, and the supervisor's deadline is near.
            os._exit(0)
        context.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
