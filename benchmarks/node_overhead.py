"""Node benchmark: one peerless node vs a plain forward pass of the same model, and the ipc hop.

    python benchmarks/node_overhead.py --json [--threads 2] [--frames 20] [--compute cpu|cuda] [--dtype float32|float16]
                                      [--out benchmarks/results/node_overhead_vgg16_bn[_cuda].json]

vgg16_bn (--weights none), batch 1, 224x224, the same torch thread count, device and dtype on
both sides. The node is a plan with --devices 1 --method lop (the shard is the whole model),
started with LocalCluster(plan, threads=T): supervisor + handler + engine, no peers. A frame with
no other participant has nothing to gather, so the engine runs every stage without a trip to the
handler (node/engine.py, the "alone" path); input and answer still cross ipc:// and the client
port. With peers, each stage goes engine -> handler (slice) -> engine (gathered) over ipc://:
`ipc_ms_per_frame_upper_bound` bounds that cost for this model (2 hops per stage output).
Figures:
  overhead_ratio        median node latency (the node's own latency_ms: from the input arriving
                        at the handler to the answer) / median plain forward pass (target <= 1.1)
  round_trip_ratio      the same with the client round trip (CURVE client port, encode, decode)
  ipc_hop_ms            one way of a 12 MB float32 array (64x224x224, VGG's first activation)
                        over ZeroMQ ipc:// DEALER/ROUTER between two processes with copy=False
                        and node/ipc.py pack/unpack: median round trip / 2, and its GB/s
  transfer_ms_per_frame with --compute cuda: every stage output of one frame taken off the GPU
                        and put back (pinned buffer, non_blocking, one synchronisation each
                        way), what a node with peers pays per frame on top of the IPC
Node and plain frames are timed in alternating blocks of the same run (node, plain, plain, node,
...) so that load from other jobs on the shared machine hits both alike; medians are reported.
The last stdout line is the JSON object (with --json).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

from robustdice.node import ipc

from _results import write_result

MODEL = "vgg16_bn"
IPC_SHAPE = (64, 224, 224)  # VGG's first conv output at 224x224: 12.8 MB of float32


# ------------------------------------------------------------------ ipc echo (child process)

def role_echo(endpoint: str) -> None:
    """The engine's side: a DEALER that sends every work item straight back (zero-copy views)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(endpoint)
    sock.send(ipc.READY)
    while True:
        kind, items = ipc.unpack(sock.recv_multipart(copy=False))
        if kind == ipc.STOP:
            break
        out = [(dict(header, kind=ipc.SLICE), [ipc.array(bufs[0], header["dtype"], header["shape"])])
               for header, bufs in items]
        sock.send_multipart(ipc.pack(ipc.RESULTS, out), copy=False)
    sock.close(0)
    ctx.term()


def measure_ipc(rounds: int, warmup: int = 5) -> dict:
    with tempfile.TemporaryDirectory(prefix="rdc-ipc-") as tmp:
        endpoint = f"ipc://{tmp}/engine.sock"
        ctx = zmq.Context()
        router = ctx.socket(zmq.DEALER)
        router.linger = 0
        router.bind(endpoint)
        child = subprocess.Popen([sys.executable, __file__, "--role", "echo", "--endpoint", endpoint])
        try:
            if not router.poll(30_000):
                raise RuntimeError("ipc echo process did not connect")
            if router.recv_multipart()[0] != ipc.READY:
                raise RuntimeError("ipc echo process did not say ready")
            x = np.random.default_rng(0).standard_normal(IPC_SHAPE, dtype=np.float32)
            times = []
            for r in range(warmup + rounds):
                t0 = time.perf_counter()
                router.send_multipart(ipc.pack(ipc.WORK, [({"kind": ipc.INPUT, "frame": r, **ipc.describe(x)}, [x])]),
                                      copy=False)
                _, ((header, bufs),) = ipc.unpack(router.recv_multipart(copy=False))
                y = ipc.array(bufs[0], header["dtype"], header["shape"])
                t1 = time.perf_counter()
                if r == 0 and not np.array_equal(x, y):
                    raise RuntimeError("ipc echo returned different data")
                if r >= warmup:
                    times.append(t1 - t0)
            router.send_multipart(ipc.pack(ipc.STOP, []))
            child.wait(10)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            router.close(0)
            ctx.term()
    rtt_ms = float(np.median(times)) * 1000.0
    hop_ms = rtt_ms / 2
    return {"bytes": int(x.nbytes), "shape": list(IPC_SHAPE), "rounds": rounds,
            "round_trip_ms_median": round(rtt_ms, 3), "ipc_hop_ms": round(hop_ms, 3),
            "round_trip_ms_min": round(float(np.min(times)) * 1000.0, 3),
            "GB_per_s": round(x.nbytes / (hop_ms / 1000.0) / 1e9, 2)}


# ------------------------------------------------------------------ the parent

def activation_bytes(model, x) -> int:
    """Bytes of every Conv2d/Linear output of one forward pass (lop's stages): what the node ships
    engine -> handler as slices and again handler -> engine as gathered outputs."""
    import torch
    total = [0]
    hooks = [m.register_forward_hook(lambda _m, _i, out: total.__setitem__(0, total[0] + out.numel() * out.element_size()))
             for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.inference_mode():
        model(x)
    for h in hooks:
        h.remove()
    return total[0]


def transfer_ms(model, x, device, rounds: int = 10) -> float:
    """Median time to take every stage output of one frame off the device and put it back, as a
    node with peers does per stage (the engine's to_host / to_device)."""
    import torch
    outs = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: outs.append(out))
             for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.inference_mode():
        model(x)
    for h in hooks:
        h.remove()
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for out in outs:
            host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            host.copy_(out, non_blocking=True)
            torch.cuda.current_stream().synchronize()
            back = host.to(device, non_blocking=True)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000.0)
        del back
    return float(np.median(times))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the JSON object as the last line")
    parser.add_argument("--out", help="results file (default benchmarks/results/node_overhead_<model>[_cuda].json)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, node engine and plain model alike")
    parser.add_argument("--frames", type=int, default=20, help="timed frames on each side")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--block", type=int, default=2, help="frames per alternating block")
    parser.add_argument("--ipc-rounds", type=int, default=50)
    parser.add_argument("--compute", choices=["cpu", "cuda"], default="cpu", help="node and plain model alike")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--role", choices=["echo"], help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "echo":
        role_echo(args.endpoint)
        return 0
    if args.out is None:
        suffix = "_cuda" if args.compute == "cuda" else ""
        args.out = str(Path(__file__).resolve().parent / "results" / f"node_overhead_{MODEL}{suffix}.json")

    import torch

    from robustdice.node.client import NodeClient
    from robustdice.node.lab.localcluster import LocalCluster
    from robustdice.partitioner.core.partition import PartitionRequest, partition
    from robustdice.partitioner.zoo.data import calibration_batch
    from robustdice.partitioner.zoo.models import build_model

    torch.set_num_threads(args.threads)
    ipc_result = measure_ipc(args.ipc_rounds)  # before the node exists: nothing else running of ours
    print(f"ipc hop (one way, {ipc_result['bytes'] / 1e6:.1f} MB): {ipc_result['ipc_hop_ms']:.2f} ms, "
          f"{ipc_result['GB_per_s']:.2f} GB/s", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="rdc-overhead-") as tmp:
        t0 = time.monotonic()
        summary = partition(PartitionRequest(model=MODEL, devices=1, method="lop", out=Path(tmp) / "plan",
                                             weights="none", scores=("s1",), show_progress=False))
        partition_s = time.monotonic() - t0
        print(f"partitioned {MODEL} (1 device, lop) in {partition_s:.1f} s: shard "
              f"{summary['per_device_param_bytes'][0] / 1e6:.0f} MB", file=sys.stderr)
        dtype = getattr(torch, args.dtype)
        model = build_model(MODEL, weights="none", seed=0).to(device=args.compute, dtype=dtype)
        x_np = calibration_batch(MODEL, n=1).numpy().astype(np.float32)
        x = torch.from_numpy(x_np).to(device=args.compute, dtype=dtype)
        act_bytes = activation_bytes(model, x)
        gpu = {}
        if args.compute == "cuda":
            gpu = {"gpu_name": torch.cuda.get_device_name(0), "transfer_ms_per_frame": transfer_ms(model, x, args.compute)}

        node_lat, node_compute, node_rtt, plain = [], [], [], []
        with LocalCluster(summary["plan"], threads=args.threads, dtype=args.dtype) as cluster:
            t0 = time.monotonic()
            cluster.start_node(0, extra=["--compute", args.compute])
            cluster.wait_until(cluster.all_alive(), 300.0, "the node to come up")
            print(f"node up in {time.monotonic() - t0:.1f} s", file=sys.stderr)
            with NodeClient(cluster.config, cluster.ids[0], cluster.key_path) as client, torch.inference_mode():
                def node_frame(keep: bool):
                    t = time.perf_counter()
                    reply = client.submit(x_np, timeout_s=120.0)
                    rtt = (time.perf_counter() - t) * 1000.0
                    if "error" in reply.meta:
                        raise RuntimeError(f"node answered an error: {reply.meta['error']}")
                    if keep:
                        node_lat.append(reply.meta["latency_ms"])
                        node_compute.append(reply.meta["compute_ms"])
                        node_rtt.append(rtt)
                    return reply

                def plain_frame(keep: bool):
                    t = time.perf_counter()
                    out = model(x).float().cpu()  # to the host, as the node's answer is
                    if keep:
                        plain.append((time.perf_counter() - t) * 1000.0)
                    return out

                for _ in range(args.warmup):
                    reply = node_frame(False)
                    ref = plain_frame(False)
                node_logits = np.asarray(reply.arrays[0]).reshape(ref.shape)
                max_abs_diff = float(np.max(np.abs(node_logits - ref.numpy())))
                same_prediction = bool(node_logits.argmax() == int(ref.argmax()))
                done = 0
                b = 0
                while done < args.frames:
                    n = min(args.block, args.frames - done)
                    order = (node_frame, plain_frame) if b % 2 == 0 else (plain_frame, node_frame)
                    for fn in order:
                        for _ in range(n):
                            fn(True)
                    done += n
                    b += 1
                status = client.status()

    node_med = float(np.median(node_lat))
    plain_med = float(np.median(plain))
    rtt_med = float(np.median(node_rtt))
    result = {
        "model": MODEL, "input_shape": list(x.shape), "threads": args.threads, "device": args.compute,
        "dtype": args.dtype, **gpu,
        "frames": args.frames, "warmup": args.warmup, "block": args.block,
        "node_latency_ms_median": round(node_med, 2),
        "node_compute_ms_median": round(float(np.median(node_compute)), 2),
        "node_round_trip_ms_median": round(rtt_med, 2),
        "plain_ms_median": round(plain_med, 2),
        "overhead_ratio": round(node_med / plain_med, 4),
        "round_trip_ratio": round(rtt_med / plain_med, 4),
        "compute_ratio": round(float(np.median(node_compute)) / plain_med, 4),
        "overhead_target": 1.1,
        "node_latency_ms": [round(v, 2) for v in node_lat],
        "node_round_trip_ms": [round(v, 2) for v in node_rtt],
        "plain_ms": [round(v, 2) for v in plain],
        "logits_max_abs_diff": max_abs_diff, "same_prediction": same_prediction,
        "ipc": ipc_result,
        "ipc_hop_ms": ipc_result["ipc_hop_ms"],
        "ipc_GB_per_s": ipc_result["GB_per_s"],
        "stage_output_bytes_per_frame": act_bytes,
        # every stage output crosses the ipc socket twice (slice out, gathered back); conv outputs
        # before pooling, so an upper bound (the five pooled stages ship a quarter of that)
        "ipc_ms_per_frame_upper_bound": round(2 * act_bytes / (ipc_result["GB_per_s"] * 1e9) * 1000.0, 2),
        "shard_bytes": summary["per_device_param_bytes"][0],
        "partition_s": round(partition_s, 1),
        "node_rss_total_bytes": None if status is None else status.get("rss_total_bytes"),
    }
    print(f"node latency median {node_med:.1f} ms (compute {result['node_compute_ms_median']:.1f} ms, client round "
          f"trip {rtt_med:.1f} ms) vs plain {plain_med:.1f} ms: overhead ratio {result['overhead_ratio']:.3f} "
          f"(target <= 1.1), round-trip ratio {result['round_trip_ratio']:.3f}")
    print(f"ipc hop {result['ipc_hop_ms']:.2f} ms for {ipc_result['bytes'] / 1e6:.1f} MB ({result['ipc_GB_per_s']:.2f} GB/s);"
          f" {act_bytes / 1e6:.0f} MB of stage outputs per frame, x2 over ipc: <= {result['ipc_ms_per_frame_upper_bound']:.0f} ms")
    print(f"node vs plain logits: max |diff| {max_abs_diff:.2e}, same prediction: {same_prediction}")
    write_result(result, args.out, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
