"""Chaos on a real network: 4 nodes in 4 network namespaces (node/lab/netlab.py), one fault at a
time, and what it costs the frames of a camera-like stream (issue 10).

    python benchmarks/chaos.py --json [--scenarios stop,stallorigin,linkdown,split,loss,cut,oneway,restart,refused]
                               [--rate 20] [--loss-seconds 60] [--cut-seconds 14]
                               [--out benchmarks/results/chaos.json]

Needs root, iproute2 and nftables. digits_cnn (robust) over 4 devices; the client streams to
n0 (to n3 for restart and refused) at --rate frames per second, open loop, from the root
namespace. Each scenario gets a fresh lab and cluster: 3 s before, the fault, 6 s after.
  stop      SIGSTOP n3 for 2 s              linkdown  n3's cable out for 3 s
  stallorigin  SIGSTOP n0, the camera's own node, for 2 s (a frozen board: its peers go on
            without it; it runs its frames in flight again and answers them all)
  split     n0,n1 | n2,n3 for 3 s           loss      5 % loss between n0 and n1, both ways
  cut       n3's cable out for --cut-seconds (TCP connections die; they must heal within 1 s)
  oneway    n0 -> n3 packets dropped (n3 hears nothing from n0, n0 hears n3) for 4 s
  restart   n3 killed, restarted 1 s later, while the client streams to n3
  refused   n3 restarted with another plan, while the client streams to n3
Per scenario: frames sent/answered/errors; p50/p99 latency before, during, after; the first
frame submitted after the heal and its latency over the p50 before; when frames run on every
node again (reintegrated_after_ms) and how many frames after that were still zero-filled;
deaths (false ones for loss and oneway); answers that claim less zero-fill than some node had
for that frame ("divergent", stricter: a participant's rows nobody used count too) and answers that claim to be
whole yet differ from the no-failure model ("silent", the check); for cut, when each side heard the other again; for restart, the
frames n3 answered alone; for refused, the errors naming the plan mismatch; for stallorigin, the
frames n0 ran again. Every scenario lists its error answers by message (error_messages).
The last stdout line is the JSON object (with --json).
"""
from __future__ import annotations

import argparse
import collections
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from robustdice.node.lab.phases import divergent_answers, silent_divergence
from robustdice.partitioner.core.runtime import Cluster

from _results import write_result

BEFORE_S, AFTER_S = 3.0, 6.0
SCENARIOS = ("stop", "stallorigin", "linkdown", "split", "loss", "cut", "oneway", "restart", "refused")


def pct(values, q):
    return None if not values else round(float(np.percentile(values, q)), 1)


def lat(records):
    return [r["meta"]["latency_ms"] for r in records if r["meta"] and "latency_ms" in r["meta"]]


def events_of(views, kinds, peer=None, after=0.0):
    return [(v["node"], e) for v in views if not v.get("unreachable") for e in v.get("events", [])
            if e["kind"] in kinds and (peer is None or e["peer"] == peer) and e["wall_s"] >= after]


def run_scenario(name, plan, other_plan, images, expected, args):
    from robustdice.node.client import CameraStream
    from robustdice.node.lab.localcluster import LocalCluster
    from robustdice.node.lab.netlab import NetnsLab

    lab = NetnsLab(4)
    with lab, LocalCluster(plan, hosts=lab.hosts, prefix=lab.prefix, log_level="WARNING") as cluster:
        for d in range(4):
            cluster.start_node(d)
        cluster.wait_until(cluster.all_alive(), 120.0, "every node to count on every other")
        target = "n3" if name in ("restart", "refused") else "n0"
        stream = CameraStream(cluster.config, target, cluster.key_path, images, args.rate)
        stream.start()
        time.sleep(BEFORE_S)  # the stream's "before": a camera runs on its own clock
        fault_s = time.time()
        heal_s = None
        if name in ("stop", "stallorigin"):
            victim = 3 if name == "stop" else 0
            cluster.pause(victim)
            time.sleep(2.0)
            cluster.resume(victim)
        elif name in ("linkdown", "cut"):
            lab.link(3, up=False)
            time.sleep(3.0 if name == "linkdown" else args.cut_seconds)
            lab.link(3, up=True)
        elif name == "split":
            lab.split([[0, 1], [2, 3]])
            time.sleep(3.0)
            lab.heal()
        elif name == "loss":
            lab.loss(0, 1, 5.0)
            time.sleep(args.loss_seconds)
            lab.heal()
        elif name == "oneway":
            lab.one_way(0, 3)
            time.sleep(4.0)
            lab.heal()
        elif name == "restart":
            cluster.kill(3)
            time.sleep(1.0)
            cluster.start_node(3)
        elif name == "refused":
            cluster.kill(3)
            time.sleep(1.0)
            cluster.sign(other_plan)  # signed, so that the peers (not the node itself) refuse it
            cluster.start_node(3, extra=["--plan", str(other_plan)])
        heal_s = time.time()
        time.sleep(AFTER_S)
        stream.stop.set()
        stream.join(30)
        views = cluster.status(timeout_s=10.0, request={"zero_log": True})
    recs = stream.records
    out = {"frames": len(recs), "answered": sum(r["meta"] is not None for r in recs),
           "errors": sum(bool(r["meta"] and "error" in r["meta"]) for r in recs)}
    # What the errors said, digits folded so that one cause is one line.
    messages = collections.Counter(re.sub(r"\d+", "N", r["meta"]["error"])[:120]
                                   for r in recs if r["meta"] and "error" in r["meta"])
    out["error_messages"] = dict(messages.most_common(5))
    before = [r for r in recs if r["sent_s"] < fault_s]
    during = [r for r in recs if fault_s <= r["sent_s"] < heal_s]
    after = [r for r in recs if r["sent_s"] >= heal_s]
    p50_before = pct(lat(before), 50)
    out.update(p50_before_ms=p50_before, p99_before_ms=pct(lat(before), 99), p50_during_ms=pct(lat(during), 50),
               p99_during_ms=pct(lat(during), 99), p50_after_ms=pct(lat(after), 50), p99_after_ms=pct(lat(after), 99))
    answered_after = [r for r in after if r["meta"] and "latency_ms" in r["meta"]]
    if answered_after:
        first = answered_after[0]["meta"]["latency_ms"]
        out["first_after_heal_ms"] = round(first, 1)
        out["first_after_heal_over_before"] = round(first / p50_before, 2) if p50_before else None
    whole = [r for r in answered_after if len(r["meta"].get("participants", [])) == 4
             and not r["meta"].get("degraded")]
    if whole:
        back_s = whole[0]["sent_s"]
        out["reintegrated_after_ms"] = round(1000 * (back_s - heal_s), 1)
        out["zero_filled_after_reintegration"] = sum(
            1 for r in answered_after if r["sent_s"] >= back_s and r["meta"].get("zero_filled_fraction", 0) > 0)
    deaths = events_of(views, ("died",), after=fault_s)
    out["deaths"] = len(deaths)
    if name in ("loss",):
        out["false_deaths"] = len(deaths)
    # The check: an answer that says it is whole must equal the no-failure model. The stricter
    # figure beside it counts any participant's zero-fill of the frame, whether or not the answer
    # used those rows (see phases.divergent_answers).
    out["silent_divergence"] = len(silent_divergence(recs, expected))
    stage_names = [st.name for st in _plan_of(plan).stages]
    divergent = divergent_answers(recs, views, _plan_of(plan))
    out["divergent_answers"] = len(divergent)
    # Which nodes logged what the answer did not claim, and what the answer ran on: to read.
    participants = {r.get("frame"): (r["meta"] or {}).get("participants") for r in recs}
    out["divergent_detail"] = [
        {"frame": f, "stage": name, "claimed": c, "logged": n, "participants": participants.get(f),
         "logged_by": [v["node"] for v in views for lf, ls, z in v.get("zero_log", [])
                       if (lf, ls) == (f, stage_names.index(name)) and z]}
        for f, name, c, n in divergent[:10]]
    if name == "cut":
        up = heal_s
        peers_hear = [e["wall_s"] - up for node, e in events_of(views, ("rejoined", "reachable"), "n3", up)]
        n3 = next((v for v in views if v.get("node") == "n3"), {})
        n3_hears = [e["wall_s"] - up for e in n3.get("events", []) if e["kind"] in ("rejoined", "reachable")
                    and e["wall_s"] >= up]
        out["peers_hear_n3_after_ms"] = round(1000 * max(peers_hear), 1) if len(peers_hear) >= 3 else None
        out["n3_hears_peers_after_ms"] = round(1000 * max(n3_hears), 1) if len(n3_hears) >= 3 else None
    if name == "stallorigin":
        n0 = next((v for v in views if v.get("node") == "n0"), {})
        out["frames_rerun"] = n0.get("frames_rerun")
    if name == "restart":
        out["answered_alone_by_n3"] = sum(1 for r in after if r["meta"] and r["meta"].get("participants") == ["n3"])
    if name == "refused":
        refused = [r for r in after if r["meta"] and "plan mismatch" in r["meta"].get("error", "")]
        late = [r for r in after if r["sent_s"] > heal_s + 2.0]
        out["refused_errors"] = len(refused)
        out["answered_by_refused_node"] = sum(1 for r in late if r["meta"] and "prediction" in r["meta"])
    return out


_PLANS = {}


def _plan_of(path):
    from robustdice.partitioner.core.plan import load_plan
    if path not in _PLANS:
        _PLANS[path] = load_plan(path)
    return _PLANS[path]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the JSON object as the last line")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "chaos.json"))
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated, default all")
    parser.add_argument("--rate", type=float, default=20.0, help="frames per second offered (default 20)")
    parser.add_argument("--loss-seconds", type=float, default=60.0, help="length of the loss scenario (default 60)")
    parser.add_argument("--cut-seconds", type=float, default=14.0, help="length of the cut (default 14)")
    args = parser.parse_args(argv)
    from robustdice.node.lab.netlab import NetnsLab
    from robustdice.partitioner.core.partition import PartitionRequest, partition
    from robustdice.partitioner.zoo.data import evaluation_split

    why = NetnsLab.unavailable()
    if why:
        print(f"chaos: cannot run here: {why}", file=sys.stderr)
        return 2
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = sorted(set(scenarios) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)} (known: {', '.join(SCENARIOS)})")
    images, _, _ = evaluation_split("digits_cnn")
    images = images.numpy().astype(np.float32)
    result = {"rate_fps": args.rate, "model": "digits_cnn", "method": "robust", "devices": 4, "scenarios": {}}
    with tempfile.TemporaryDirectory(prefix="rd-chaos-") as tmp:
        plan = str(Path(tmp) / "plan")
        other = str(Path(tmp) / "other")
        partition(PartitionRequest("digits_cnn", 4, "robust", Path(plan), show_progress=False))
        partition(PartitionRequest("digits_cnn", 4, "lop", Path(other), show_progress=False))
        expected = Cluster(plan).simulate(torch.from_numpy(images)).numpy()
        for name in scenarios:
            print(f"chaos: {name} ...", file=sys.stderr)
            r = run_scenario(name, plan, other, images, expected, args)
            result["scenarios"][name] = r
            print(f"chaos: {name}: {r}", file=sys.stderr)
    print(format_table(result["scenarios"]))
    write_result(result, args.out, args.json)
    return 0


def format_table(rows) -> str:
    cols = [("frames", "frames"), ("answered", "answered"), ("errors", "errors"), ("p50_before_ms", "p50 before"),
            ("p50_during_ms", "p50 during"), ("p99_during_ms", "p99 during"), ("p50_after_ms", "p50 after"),
            ("first_after_heal_over_before", "first after/before"), ("reintegrated_after_ms", "whole after ms"),
            ("zero_filled_after_reintegration", "zero-filled after"), ("deaths", "deaths"),
            ("silent_divergence", "silent"), ("divergent_answers", "divergent")]
    head = f"{'scenario':<9}" + "".join(f"{label:>18}" for _, label in cols)
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        lines.append(f"{name:<9}" + "".join(f"{'-' if r.get(k) is None else r.get(k)!s:>18}" for k, _ in cols))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
