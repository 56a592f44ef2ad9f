"""The node before the dataflow engine (commit 07b0362), measured as issue 8 measured it: digits_cnn,
robust, 4 loopback nodes, 1 client keeping 8 frames in flight. Run beside throughput.py in the same
session to quote a same-machine ratio (the issue's 54 frames/s came from another session).

    git worktree add /tmp/wt-pre 07b0362
    mkdir -p /tmp/abpre/robustdice && for d in partitioner mesh node; do
        ln -sfn /tmp/wt-pre/$d /tmp/abpre/robustdice/$d; done
    PYTHONPATH=/tmp/abpre python benchmarks/baseline_pre_dataflow.py [--frames 300] [--json]
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=300, help="frames to answer (default 300)")
    parser.add_argument("--window", type=int, default=8, help="frames in flight (default 8)")
    parser.add_argument("--json", action="store_true", help="print the JSON object as the last line")
    args = parser.parse_args()
    from robustdice.node.client import NodeClient
    from robustdice.node.lab.cluster import LocalCluster
    from robustdice.partitioner.core.partition import PartitionRequest, partition
    from robustdice.partitioner.zoo.data import evaluation_split
    import robustdice.node.lab.cluster as code

    images = evaluation_split("digits_cnn")[0].numpy().astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="rd-pre-") as tmp:
        plan = Path(tmp) / "plan"
        partition(PartitionRequest("digits_cnn", 4, "robust", plan, show_progress=False))
        with LocalCluster(plan, threads=1, log_level="WARNING") as cluster:
            for d in range(4):
                cluster.start_node(d)
            cluster.wait_until(cluster.all_alive(), 120.0, "every node alive")
            with NodeClient(cluster.config, "n0", cluster.key_path) as client:
                sent = got = zero = 0
                latencies = []
                t0 = time.monotonic()
                while got < args.frames:
                    while sent < args.frames and sent - got < args.window:
                        client.send_input(images[sent % len(images)][None])
                        sent += 1
                    msg = client.receive(30.0)
                    if msg is None:
                        raise SystemExit("no answer within 30 s")
                    if "latency_ms" in msg.meta:
                        got += 1
                        latencies.append(msg.meta["latency_ms"])
                        zero += msg.meta.get("zero_filled_fraction", 0) > 0
                seconds = time.monotonic() - t0
    result = {"code": str(Path(code.__file__).resolve().parent.parent), "frames": args.frames, "window": args.window,
              "fps": args.frames / seconds, "latency_ms_p50": float(np.median(latencies)), "zero_filled_frames": zero}
    print(f"pre-dataflow node: {result['fps']:.1f} frames/s at {args.window} in flight, "
          f"p50 {result['latency_ms_p50']:.1f} ms, zero-filled {zero}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
