"""The floor under the node's per-stage overhead on this machine: the same processes and hops,
with nothing but message forwarding in them.

    python benchmarks/hop_floor.py [--nodes 4] [--stages 5] [--frames 300] [--slice-bytes 1600]
                                   [--no-curve] [--json] [--out benchmarks/results/hop_floor.json]

Per node, two processes as in robustdice-node: an "engine" and a "handler", joined by a DEALER
pair over ipc://; the handlers joined N-to-N by PUSH/PULL over TCP on loopback, with CURVE as
the mesh uses it (unless --no-curve). One frame in flight: node 0's handler sends the input to
every handler; then, for each stage, every engine sends its slice (--slice-bytes, digits_cnn's
mean is about 1.6 kB) to its handler, which sends it to every other handler; a handler that has
its own slice and every peer's tells its engine to go on. Each process is a tight pyzmq loop:
no decoding, no checks, no torch.

per_stage_ms is the frame time at node 0 divided by the stages (median over frames). It is what
one stage costs this machine in process wake-ups, ZeroMQ and the kernel alone: the node's
per-stage overhead (benchmarks/throughput.py) minus this figure is what the node's own Python
adds. Run it beside throughput.py, alone on the machine.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _results import write_result

BASE_PORT = 17300


def _engine(ipc: str, slice_bytes: int) -> None:
    import zmq
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(ipc)
    payload = os.urandom(slice_bytes)
    sock.send(b"ready")
    while True:
        msg = sock.recv()
        if msg == b"stop":
            break
        sock.send_multipart([msg, payload])   # "computed" the slice of stage `msg`
    sock.close(0)
    ctx.term()


def _handler(me: int, n: int, stages: int, frames: int, ipc: str, keys, curve: bool, results) -> None:
    import zmq
    ctx = zmq.Context()
    engine = ctx.socket(zmq.DEALER)
    engine.bind(ipc)
    pull = ctx.socket(zmq.PULL)
    if curve:
        pull.curve_publickey, pull.curve_secretkey = keys[me]
        pull.curve_server = True
    pull.bind(f"tcp://127.0.0.1:{BASE_PORT + me}")
    push = {}
    for p in range(n):
        if p == me:
            continue
        s = ctx.socket(zmq.PUSH)
        if curve:
            s.curve_publickey, s.curve_secretkey = keys[me]
            s.curve_serverkey = keys[p][0]
        s.connect(f"tcp://127.0.0.1:{BASE_PORT + p}")
        push[p] = s
    assert engine.recv() == b"ready"
    poller = zmq.Poller()
    poller.register(engine, zmq.POLLIN)
    poller.register(pull, zmq.POLLIN)
    # Every handler first hears every other (connections up), then node 0 starts frames.
    for s in push.values():
        s.send_multipart([b"hello", str(me).encode()])
    heard = set()
    while len(heard) < n - 1:
        tag, who = pull.recv_multipart()
        if tag == b"hello":
            heard.add(who)
    got = {}            # stage -> peer slices received
    own = set()         # stages whose own slice was sent
    done_frames, times = 0, []
    t0 = None

    def start_frame():
        nonlocal t0
        t0 = time.perf_counter()
        for s in push.values():
            s.send_multipart([b"input", b"x" * 256])
        engine.send(b"0")

    def maybe_advance(stage: int):
        nonlocal done_frames
        if stage in own and got.get(stage, 0) == n - 1:
            own.discard(stage)
            got.pop(stage)
            if stage + 1 < stages:
                engine.send(str(stage + 1).encode())
                return
            done_frames += 1
            if me == 0:
                times.append(time.perf_counter() - t0)
                if done_frames < frames:
                    start_frame()

    if me == 0:
        time.sleep(0.2)   # let the hello round settle everywhere
        start_frame()
    while done_frames < frames:
        for sock, _ in poller.poll(5000):
            if sock is engine:
                stage_b, payload = engine.recv_multipart()
                stage = int(stage_b)
                own.add(stage)
                for s in push.values():
                    s.send_multipart([b"slice", stage_b, payload], copy=False)
                maybe_advance(stage)
            else:
                parts = pull.recv_multipart()
                if parts[0] == b"input":
                    engine.send(b"0")
                elif parts[0] == b"slice":
                    stage = int(parts[1])
                    got[stage] = got.get(stage, 0) + 1
                    maybe_advance(stage)
    engine.send(b"stop")
    if me == 0:
        results.put(times)
    time.sleep(0.5)   # the last slices reach the peers before the sockets go
    for s in list(push.values()) + [pull, engine]:
        s.close(0)
    ctx.term()


def measure(nodes: int, stages: int, frames: int, slice_bytes: int, curve: bool) -> dict:
    import zmq
    spawn = mp.get_context("spawn")
    keys = [zmq.curve_keypair() for _ in range(nodes)]
    results = spawn.Queue()
    with tempfile.TemporaryDirectory(prefix="rd-hop-") as tmp:
        procs = []
        for i in range(nodes):
            ipc = f"ipc://{tmp}/e{i}"
            procs.append(spawn.Process(target=_engine, args=(ipc, slice_bytes), daemon=True))
            procs.append(spawn.Process(target=_handler, args=(i, nodes, stages, frames, ipc, keys, curve, results),
                                       daemon=True))
        for p in procs:
            p.start()
        times = results.get(timeout=600)
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    warm = times[len(times) // 10:]   # the first frames pay connection set-up
    frame_ms = 1000.0 * float(np.median(warm))
    return {"nodes": nodes, "stages": stages, "frames": frames, "slice_bytes": slice_bytes, "curve": curve,
            "processes": 2 * nodes, "cores": os.cpu_count(), "frame_ms_p50": frame_ms,
            "per_stage_ms": frame_ms / stages}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--stages", type=int, default=5, help="stages per frame (digits_cnn has 5)")
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--slice-bytes", type=int, default=1600)
    parser.add_argument("--no-curve", action="store_true", help="plain TCP between the handlers")
    parser.add_argument("--json", action="store_true", help="print the JSON object as the last line")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "hop_floor.json"))
    args = parser.parse_args(argv)
    if args.nodes < 2 or args.stages < 2 or args.frames < 10:
        # stages >= 2: a frame's first stage and the last stage of the frame before never share a number
        parser.error("needs --nodes >= 2, --stages >= 2, --frames >= 10")
    result = measure(args.nodes, args.stages, args.frames, args.slice_bytes, not args.no_curve)
    print(f"{args.nodes} nodes ({2 * args.nodes} processes) on {result['cores']} cores: a frame of "
          f"{args.stages} stages takes {result['frame_ms_p50']:.2f} ms (p50), {result['per_stage_ms']:.3f} ms per "
          f"stage, in forwarding alone", file=sys.stderr)
    write_result(result, args.out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
