"""The inference engine: one process holding this device's shard, computing its slices.

It loads only its own shard onto a model skeleton built on the meta device (so the full model
never exists in this process); for a rocoin plan, its student and the teacher's head, served as
one stage (partitioner/core/rocoin_device.py). It is a dataflow engine: one compute thread takes work items
from the handler in the order they come — start a frame, or continue a frame whose stage was
gathered — and never waits on the network. Between items a frame is a suspended `FrameRun`
(partitioner/core/runtime.py), so any number of frames are in flight while one thread computes;
the handler decides which item comes next (oldest first, the same order on every node).

Assembling a gathered stage is the partitioner's `assemble` (first copy wins, zero-fill the
rest) and `FrameRun.advance` finishes it (cdc recovery, followers): the same code the
simulation runs. A frame with no other participant (`alone`) runs every stage here in one go.

A slice of this device with a NaN or an infinity (a peer's rows were finite but huge, and a
stage overflowed) ends the frame here with an error `not_finite`: it is never sent on, and the
frame is never answered as a prediction (node/frames.py checks the logits too).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
import warnings
from typing import Dict, List, Optional, Tuple

import zmq

from robustdice.mesh.config import COMPUTE_KINDS, DTYPES
from robustdice.mesh.gather import finite
from robustdice.mesh.ratelog import RateLimitedLog
from robustdice.mesh.transport import send_parts

from . import ipc
from .process import child_main, report_ready

log = logging.getLogger("robustdice.engine")
ratelog = RateLimitedLog(log)
POLL_MS = 100


TELEMETRY_EVERY_S = 1.0
# The engine runs below the event handler's CPU priority. When both want a core, the handler
# goes first: a slice forwarded now lets every peer's next stage start, and heartbeats stay on
# time under any compute load, while the engine loses only what the handler actually uses.
# Nice 10 (a weight of 110 against 1024) and SCHED_BATCH (a waking engine never preempts a
# running handler or ZeroMQ I/O thread): with nice 5 alone, 4 alexnet nodes on 2 cores under a
# closed-loop load (4 origins x 16 frames in flight) had a handler unscheduled for 250-630 ms
# in 6 of 7 runs, and in 2 of them a live peer declared dead and ~50 frames zero-filled; with
# both, 0 of 7 runs, at the same frames/s. Lowering one's own priority needs no privilege.
ENGINE_NICE = 10
ENGINE_POLICY = getattr(os, "SCHED_BATCH", None)   # Linux only


class NotFinite(ValueError):
    """This device's slice of a stage holds NaN or Inf: the frame cannot be answered."""


def resolve_device(name: str) -> str:
    """"auto" is cuda when torch sees a GPU, else cpu; "cuda" without one is an error."""
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--compute cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
    return name


class LoadedPlan:
    """One plan's shard on this device: the runtime, the assembler, the stages it serves."""

    def __init__(self, torch, plan_dir: str, device: int, compute, dtype, operator_public_key: Optional[str],
                 graph_lock=contextlib.nullcontext()) -> None:
        from robustdice.partitioner.core.plan import load_plan
        from robustdice.partitioner.core.runtime import (Assembler, DeviceRuntime, build_skeleton, load_shard, place,
                                                         place_model)

        # Checked again here, not only by the supervisor: this process reads plan.json itself.
        self.plan = load_plan(plan_dir, operator_public_key)
        self.others = frozenset(range(self.plan.devices)) - {device}   # all missing, for `alone` frames
        self.assembler = Assembler(self.plan, compute)
        self.stages = self.assembler.stages   # what this node serves: a rocoin plan's one stage too
        shard = load_shard(self.plan, plan_dir, device)  # float32 on the CPU, as the plan keeps it
        # torch.fx traces the model by patching nn.Module.__call__ for every thread: a roll-out's
        # plan loaded beside a computing engine traces its graph while the engine waits.
        if self.plan.rocoin is not None:   # a student and the head: one gather per frame
            from robustdice.partitioner.core.rocoin_device import RocoinDeviceRuntime
            with graph_lock:
                self.runtime = RocoinDeviceRuntime(self.plan, shard, device, compute, dtype)
        else:
            # The skeleton is built on the meta device; its shared parameters and this device's
            # rows go straight to the compute device, cast to the compute dtype.
            with graph_lock:
                skeleton = build_skeleton(self.plan, shard["shared"])
            staged = place_model(skeleton, compute, dtype)
            entries = {name: place(e, compute, dtype) for name, e in shard["stages"].items()}
            self.runtime = DeviceRuntime(self.plan, staged, {"stages": entries}, device)


class Engine:
    def __init__(self, plan_dir: str, device: int, compute_device: str = "cpu", dtype: str = "float32",
                 operator_public_key: Optional[str] = None) -> None:
        import torch

        self.torch = torch
        self.device = device
        self.compute = torch.device(compute_device)
        self.cuda = self.compute.type == "cuda"
        self.dtype = getattr(torch, dtype)
        self.operator_public_key = operator_public_key
        first = LoadedPlan(torch, plan_dir, device, self.compute, self.dtype, operator_public_key)
        # The current plan, and during a roll-out the next one beside it (node/plans.py).
        self.loaded: Dict[str, LoadedPlan] = {first.plan.plan_hash: first}
        self.current = first
        # frame -> (its FrameRun, suspended between stages; the plan it runs on)
        self.runs: Dict[int, Tuple[object, LoadedPlan]] = {}
        self.own: Dict[int, object] = {}           # frame -> its current slice, contiguous
        self.compute_ms: Dict[int, float] = {}
        self._telemetry_s = 0.0
        self._prepared: List[tuple] = []           # (plan hash, (LoadedPlan or None, row sizes or error))
        self._prepared_lock = threading.Lock()
        self.graph_lock = threading.Lock()         # held while computing, and while a new plan is traced

    # The current plan's parts, as one-plan callers (checks, tests) know them.
    plan = property(lambda self: self.current.plan)
    runtime = property(lambda self: self.current.runtime)
    assembler = property(lambda self: self.current.assembler)
    stages = property(lambda self: self.current.stages)

    def prepare(self, plan_dir: str, plan_hash: str) -> None:
        """Load a roll-out's plan beside the current one, in a thread of its own: the frames in
        flight keep this thread (a shard can take seconds to load, longer than the handler waits
        for an engine that holds work before it calls it stalled). `take_prepared` reports it."""
        def load() -> None:
            try:
                loaded = self.loaded.get(plan_hash) or LoadedPlan(
                    self.torch, plan_dir, self.device, self.compute, self.dtype, self.operator_public_key,
                    self.graph_lock)
                if loaded.plan.plan_hash != plan_hash:
                    raise ValueError(f"{plan_dir} holds plan {loaded.plan.plan_hash[:12]}, not {plan_hash[:12]}")
                # inference_mode is per thread, as serve() sets it for the engine's; a forward, like a
                # trace, must not overlap another thread's trace.
                with self.torch.inference_mode(), self.graph_lock:
                    outcome = (loaded, self.row_elements(loaded))
            except Exception as exc:   # a plan that cannot run here ends the roll-out, never the engine
                log.warning("cannot load plan %s from %s: %s", plan_hash[:12], plan_dir, exc)
                outcome = (None, f"{type(exc).__name__}: {exc}"[:500])
            with self._prepared_lock:
                self._prepared.append((plan_hash, outcome))

        threading.Thread(target=load, name="rd-engine-load", daemon=True).start()

    def take_prepared(self) -> List[ipc.Item]:
        """The `prepared` results of loads finished since the last call; the plans are installed."""
        with self._prepared_lock:
            done, self._prepared = self._prepared, []
        out: List[ipc.Item] = []
        for plan_hash, (loaded, rows_or_error) in done:
            if loaded is None:
                out.append(({"kind": ipc.PREPARED, "plan_hash": plan_hash, "error": rows_or_error}, []))
                continue
            self.loaded[plan_hash] = loaded
            log.info("plan %s (%s, %s) loaded beside plan %s", plan_hash[:12], loaded.plan.model,
                     loaded.plan.method, self.current.plan.plan_hash[:12])
            out.append(({"kind": ipc.PREPARED, "plan_hash": plan_hash, "row_elements": rows_or_error}, []))
        return out

    def retire(self, plan_hash: str) -> None:
        """Drop a plan no frame runs on; the other one becomes the current."""
        if plan_hash not in self.loaded or len(self.loaded) == 1:   # never the last plan
            return
        gone = self.loaded.pop(plan_hash)
        if gone is self.current:
            self.current = next(iter(self.loaded.values()))
        log.info("plan %s retired; plan %s is the current", plan_hash[:12], self.current.plan.plan_hash[:12])

    def check_forward(self) -> tuple:
        """One input of zeros through every stage, the peers' rows absent (as a node alone would
        run it): the shape of the logits. `robustdice-node --check` calls it, so that a plan the
        engine cannot run fails the check, not the running node."""
        # Two images, so that a graph that mixes the batch with the features fails here too.
        x = self.torch.zeros((2, *self.plan.input_shape), dtype=self.dtype, device=self.compute)
        _, (logits,) = self._alone(-1, self.current, x, time.perf_counter())
        if logits.ndim < 1 or logits.shape[0] != 2:
            raise RuntimeError(f"2 images give logits of shape {list(logits.shape)}: the batch is lost")
        return tuple(logits.shape)

    def row_elements(self, loaded: Optional[LoadedPlan] = None) -> List[int]:
        """Per stage, the values one neuron's row holds per image (1 for a linear stage, H x W for
        a convolution): what the handler bounds its messages by (node/config.py,
        plan_message_bytes). One input of zeros through every stage, as a node alone runs it."""
        loaded = loaded or self.current
        x = self.torch.zeros((1, *loaded.plan.input_shape), dtype=self.dtype, device=self.compute)
        run = loaded.runtime.start(x)
        out = []
        while True:
            out.append(int(math.prod(run.slice.shape[2:])))   # a slice is [rows, batch, ...]
            full, missing = loaded.assembler.assemble(run.stage, {self.device: run.slice})
            if run.advance(full, missing, loaded.others):
                return out

    def to_host(self, t):
        """A device tensor on the host, once: a pinned buffer, non_blocking, one synchronisation."""
        if not self.cuda:
            return t.contiguous()
        host = self.torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        self.torch.cuda.current_stream().synchronize()
        return host

    def to_device(self, host_rows: Dict[int, object]) -> Dict[int, object]:
        """The peers' rows on the device: one pinned buffer, one copy, then views of it."""
        if not self.cuda or not host_rows:
            return host_rows
        torch = self.torch
        order = list(host_rows)
        pinned = torch.cat([host_rows[d].reshape(-1) for d in order]).pin_memory()
        flat = pinned.to(self.compute, non_blocking=True)
        out, at = {}, 0
        for d in order:
            n = host_rows[d].numel()
            out[d] = flat[at:at + n].view(host_rows[d].shape)
            at += n
        return out

    def telemetry(self) -> Optional[dict]:
        """The device and its memory in use, at most once a second (it rides on a result)."""
        now = time.monotonic()
        if now - self._telemetry_s < TELEMETRY_EVERY_S:
            return None
        self._telemetry_s = now
        out = {"kind": ipc.TELEMETRY, "device": str(self.compute), "dtype": str(self.dtype).replace("torch.", "")}
        if self.cuda:
            out.update(gpu_name=self.torch.cuda.get_device_name(self.compute),
                       gpu_memory_bytes=int(self.torch.cuda.memory_allocated(self.compute)),
                       gpu_memory_reserved_bytes=int(self.torch.cuda.memory_reserved(self.compute)))
        return out

    # ------------------------------------------------------------ work items
    def handle(self, header: dict, bufs) -> Optional[ipc.Item]:
        """One work item from the handler; returns its result (None for `drop`)."""
        kind, frame = header.get("kind"), header.get("frame")
        if kind == ipc.DROP:
            self._forget(frame)
            return None
        if kind == ipc.PREPARE:
            self.prepare(str(header.get("plan_dir")), str(header.get("plan_hash")))
            return None
        if kind == ipc.RETIRE:
            self.retire(str(header.get("plan_hash")))
            return None
        start = time.perf_counter()
        if kind == ipc.INPUT:
            loaded = self.loaded.get(header["plan"]) if header.get("plan") else self.current
            if loaded is None:
                raise ValueError(f"frame {frame}: plan {str(header['plan'])[:12]} is not loaded here")
            x = self.torch.from_numpy(ipc.array(bufs[0], header["dtype"], header["shape"]))
            x = x.to(device=self.compute, dtype=self.dtype, non_blocking=True)
            if header.get("alone"):
                return self._alone(frame, loaded, x, start)
            run = loaded.runtime.start(x)
            self.runs[frame] = run, loaded
            self.compute_ms[frame] = 0.0
            return self._slice_result(frame, loaded, run, None, start)
        if kind == ipc.GATHERED:
            return self._continue(frame, header, bufs, start)
        raise ValueError(f"unexpected work item {kind!r}")

    def _rows(self, loaded: LoadedPlan, header: dict, bufs) -> Dict[int, object]:
        """device -> its rows of the gathered stage, as views of the received frames."""
        from_numpy, counts, dtype = self.torch.from_numpy, loaded.assembler.counts[header["stage"]], header["dtype"]
        trailing = list(header["trailing"])
        return {d: from_numpy(ipc.array(buf, dtype, [counts[d]] + trailing)) for d, buf in zip(header["from"], bufs)}

    def _continue(self, frame: int, header: dict, bufs, start: float) -> ipc.Item:
        run, loaded = self.runs.get(frame, (None, None))
        if run is None or run.stage != header["stage"]:
            raise ValueError(f"frame {frame}: gathered stage {header['stage']} for a frame not at that stage")
        rows = self.to_device(self._rows(loaded, header, bufs))
        rows[self.device] = self.own.pop(frame)
        full, missing = loaded.assembler.assemble(run.stage, rows)
        stage = run.stage
        # The devices whose slices did not come: a mean+bn plan picks its BatchNorm statistics
        # by them, here and for the next stage's slice, as Cluster.simulate does.
        if run.advance(full, missing, header.get("failed", ())):
            return self._done_result(frame, run, {stage: int(run.zero_masks[-1].sum())}, start)
        return self._slice_result(frame, loaded, run, int(run.zero_masks[-1].sum()), start)

    def _alone(self, frame: int, loaded: LoadedPlan, x, start: float) -> ipc.Item:
        """Every stage here: the peers' rows are absent, which the assembly zero-fills."""
        run = loaded.runtime.start(x)
        while True:
            full, missing = loaded.assembler.assemble(run.stage, {self.device: run.slice})
            if run.advance(full, missing, loaded.others):
                break
        self.compute_ms[frame] = 0.0
        zero = {i: int(m.sum()) for i, m in enumerate(run.zero_masks)}
        return self._done_result(frame, run, zero, start)

    def _slice_result(self, frame: int, loaded: LoadedPlan, run, zero_before: Optional[int], start: float) -> ipc.Item:
        own = run.slice.contiguous()
        array = self.to_host(own).numpy()  # on the CPU this is `own` itself: ZeroMQ sends from it
        if not finite(array):
            raise NotFinite(f"frame {frame}: stage {loaded.stages[run.stage].name} gave NaN or infinite values")
        self.own[frame] = own  # kept to assemble with the peers' rows (on the device)
        self.compute_ms[frame] += (time.perf_counter() - start) * 1000.0
        return {"kind": ipc.SLICE, "frame": frame, "stage": run.stage, "zero_before": zero_before,
                "ms": (time.perf_counter() - start) * 1000.0, **ipc.describe(array)}, [array]

    def _done_result(self, frame: int, run, zero: Dict[int, int], start: float) -> ipc.Item:
        compute_ms = self.compute_ms.pop(frame, 0.0) + (time.perf_counter() - start) * 1000.0
        self.runs.pop(frame, None)
        self.own.pop(frame, None)
        logits = run.logits.to(device="cpu", dtype=self.torch.float32).contiguous().numpy()
        return {"kind": ipc.DONE, "frame": frame, "zero": {str(k): v for k, v in zero.items()},
                "compute_ms": compute_ms, "ms": (time.perf_counter() - start) * 1000.0,
                **ipc.describe(logits)}, [logits]

    def _forget(self, frame) -> None:
        run, _ = self.runs.pop(frame, (None, None))
        if run is not None:
            run.close()
        self.own.pop(frame, None)
        self.compute_ms.pop(frame, None)


def serve(engine: Engine, sock: zmq.Socket, stop) -> None:
    """Answer work until `stop()` or a `stop` message."""
    sock.send(ipc.READY)
    # The device it resolved, and how large its slices are per neuron and image.
    with engine.torch.inference_mode():
        telemetry = dict(engine.telemetry(), row_elements=engine.row_elements())
    sock.send_multipart(ipc.pack(ipc.RESULTS, [(telemetry, [])]))
    with engine.torch.inference_mode():
        _serve(engine, sock, stop)


def _serve(engine: Engine, sock: zmq.Socket, stop) -> None:
    sock.rcvtimeo = POLL_MS
    while not stop():
        prepared = engine.take_prepared()   # a roll-out's plan loaded meanwhile (within POLL_MS)
        if prepared:
            send_parts(sock, ipc.pack(ipc.RESULTS, prepared))
        try:
            parts = sock.recv_multipart(copy=False)
        except zmq.Again:  # nothing within POLL_MS: look at the stop flag again
            continue
        kind, items = ipc.unpack(parts)
        if kind == ipc.STOP:
            return
        results = []
        with engine.graph_lock:
            for header, bufs in items:
                result = _handle_one(engine, header, bufs)
                if result is not None:
                    results.append(result)
        if results:
            telemetry = engine.telemetry()
            if telemetry is not None:
                results.append((telemetry, []))
            send_parts(sock, ipc.pack(ipc.RESULTS, results))


def _handle_one(engine: Engine, header: dict, bufs) -> Optional[ipc.Item]:
    """One work item; a failure is the frame's error answer, never the engine's end."""
    frame = header.get("frame")
    try:
        return engine.handle(header, bufs)
    except NotFinite as exc:   # a peer's values, not a bug here: no traceback, few lines
        ratelog.log("not_finite", logging.WARNING, time.monotonic(), "%s; the frame is an error", exc)
        engine._forget(frame)
        return {"kind": ipc.ERROR, "frame": frame, "message": str(exc)[:500], "reason": ipc.NOT_FINITE}, []
    except Exception as exc:  # one bad frame must not end the engine: report it and go on
        log.exception("frame %s failed", frame)
        engine._forget(frame)
        return {"kind": ipc.ERROR, "frame": frame, "message": f"{type(exc).__name__}: {exc}"[:500]}, []


def main(argv: Optional[List[str]] = None) -> int:
    def arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--plan", required=True)
        p.add_argument("--device", type=int, required=True)
        p.add_argument("--ipc", required=True)
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--compute", choices=COMPUTE_KINDS, default="auto")
        p.add_argument("--dtype", choices=DTYPES, default="float32")
        p.add_argument("--operator-public-key", help="run the plan only if this operator key signed it")

    args = child_main("engine", argv, arguments)
    stopping = {"flag": False}

    def on_signal(*_):
        stopping["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

    try:
        os.nice(ENGINE_NICE)
        if ENGINE_POLICY is not None:
            os.sched_setscheduler(0, ENGINE_POLICY, os.sched_param(0))
    except OSError as exc:  # a sandbox that forbids it: the engine still runs, at the handler's priority
        log.warning("could not lower the engine's CPU priority (%s)", exc)
    import torch
    torch.set_num_threads(max(1, args.threads))
    try:
        compute = resolve_device(args.compute)
    except RuntimeError as exc:
        log.error("%s", exc)
        return 2
    engine = Engine(args.plan, args.device, compute, args.dtype, args.operator_public_key)
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(args.ipc)
    log.info("device %d of plan %s (%s, %s): shard loaded on %s in %s, %d stages, %d torch threads", args.device,
             engine.plan.plan_hash[:12], engine.plan.model, engine.plan.method, engine.compute, args.dtype,
             len(engine.stages), torch.get_num_threads())
    report_ready(args.ready_fd)
    try:
        serve(engine, sock, lambda: stopping["flag"])
    finally:
        sock.close(0)
        context.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
