"""Client subcommands: `submit`, `status`, `rollout` (and `cluster`, in lab/cluster.py)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Tuple

from robustdice.partitioner.argtypes import positive_int

from .errors import NodeError


def register(sub) -> None:
    s = sub.add_parser("submit", help="send images to a node and print its answers")
    s.add_argument("--peers", required=True, type=Path, help="the cluster's peers.yaml")
    s.add_argument("--node", help="node id to submit to (default: the first that answers status)")
    s.add_argument("--key", help="client secret key file (default: client.key_secret beside the nodes' keys)")
    s.add_argument("--digits", help="evaluation-split samples of digits_cnn: an index, a list 0,5,9 or a range 0-9")
    s.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each answer (default %(default)s)")
    s.add_argument("--json", action="store_true", help="one JSON object per answer")
    s.add_argument("images", nargs="*", type=Path, help="image files, preprocessed as the plan's input says")
    s.set_defaults(func=cmd_submit)

    t = sub.add_parser("status", help="every node's view: members, frames, zero-fill, drops, memory, power")
    t.add_argument("--peers", required=True, type=Path, help="the cluster's peers.yaml")
    t.add_argument("--key", help="client secret key file (default: client.key_secret beside the nodes' keys)")
    t.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for each node (default %(default)s)")
    t.add_argument("--json", action="store_true", help="print one JSON list of every node's view")
    t.set_defaults(func=cmd_status)

    r = sub.add_parser("rollout", help="bring a new plan to every node while frames keep flowing")
    r.add_argument("--peers", required=True, type=Path, help="the cluster's peers.yaml")
    r.add_argument("--plan", required=True, help="the new plan's folder, as the nodes see it (signed by the operator)")
    r.add_argument("--key", help="client secret key file (default: client.key_secret beside the nodes' keys)")
    r.add_argument("--switch-in-ms", type=positive_int, default=None,
                   help="how far ahead of the nodes' clocks the switch is set (default 2000)")
    r.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for every step (default %(default)s)")
    r.add_argument("--no-wait", action="store_true", help="return once the switch is agreed, before the old plan "
                                                          "is retired (a frame timeout later)")
    r.add_argument("--json", action="store_true", help="print what happened as one JSON object")
    r.set_defaults(func=cmd_rollout)

    from .lab import cluster
    cluster.register(sub)


def parse_indices(text: str, upper: int) -> List[int]:
    out: List[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = (int(v) for v in part.split("-", 1))
                out += list(range(a, b + 1))
            elif part:
                out.append(int(part))
        except ValueError:
            raise NodeError(f"--digits: {text!r} is not an index, list or range") from None
    bad = [i for i in out if not 0 <= i < upper]
    if not out or bad:
        raise NodeError(f"--digits: {bad[0] if bad else text} is outside the evaluation split (0..{upper - 1})")
    return out


def _inputs(args, config):
    """(name, array (1, C, H, W), label or None) for every requested input."""
    import numpy as np

    from robustdice.partitioner.core.plan import load_plan
    if bool(args.digits) == bool(args.images):
        raise NodeError("give either --digits K or image files")
    if args.digits:
        from robustdice.partitioner.zoo.data import evaluation_split
        images, labels, indices = evaluation_split("digits_cnn")
        return [(f"digits[{i}] (row {int(indices[i])})", images[i: i + 1].numpy(), int(labels[i]))
                for i in parse_indices(args.digits, len(labels))]
    if config.plan is None:
        raise NodeError("peers.yaml has no plan: the model's input size is unknown")
    from PIL import Image, UnidentifiedImageError

    from robustdice.partitioner.zoo.data import preprocess
    spec = load_plan(config.plan).input
    out = []
    for path in args.images:
        try:
            with Image.open(path) as im:
                x = preprocess(im, spec)
        except (OSError, UnidentifiedImageError) as exc:
            raise NodeError(f"{path}: cannot read image ({exc})") from None
        out.append((str(path), x[None].numpy().astype(np.float32), None))
    return out


def cmd_submit(args) -> int:
    from robustdice.mesh.config import load_peers

    from .client import NodeClient, default_key_path, status_all
    config = load_peers(args.peers)
    key = default_key_path(config, args.key)
    node = args.node
    if node is None:
        views = status_all(config, key)
        node = next((v["node"] for v in views if not v.get("unreachable")), None)
        if node is None:
            raise NodeError("no node answers: is the cluster running?")
    inputs = _inputs(args, config)
    with NodeClient(config, node, key) as client:
        for name, x, label in inputs:
            reply = client.submit(x, {"name": name}, timeout_s=args.timeout)
            meta = dict(reply.meta)
            if "error" in meta:
                raise NodeError(f"node {node} refused {name}: {meta['error']}")
            if args.json:
                print(json.dumps({"input": name, "label": label, **{k: v for k, v in meta.items() if k != "request"}}))
                continue
            top5 = ", ".join(f"{c}:{p:.2f}" for c, p in meta["top5"][0])
            zero = ", ".join(f"{k} {100 * v:.0f}%" for k, v in meta["zero_filled"].items() if v > 0) or "none"
            truth = "" if label is None else f" (label {label}{', correct' if label == meta['prediction'][0] else ', WRONG'})"
            print(f"{name}: class {meta['prediction'][0]}{truth}  top-5 [{top5}]  "
                  f"{meta['latency_ms']:.1f} ms via {meta['node']}  zero-filled: {zero}")
    return 0


def _age(view, member) -> str:
    silent = member.get("silent_ms")
    return "-" if silent is None else f"{float(silent):.0f}ms ago"


def partition_of(views) -> List[List[str]]:
    """The groups of nodes that run frames together, from each reachable node's own view of
    who new frames run on: more than one group is a split (each half zero-fills the other)."""
    groups = []
    for v in views:
        if v.get("unreachable") or "participants" not in v:
            continue
        group = sorted(v["participants"])
        if group not in groups:
            groups.append(group)
    return sorted(groups)


def energy_per_frame(views) -> Tuple[Optional[float], str]:
    """Cluster-wide joules per answered frame: every board's energy over the frames answered to
    clients (each answered once, by its origin). None, and why, unless every reachable node
    reads its board's power (a sum over some boards would be too low)."""
    live = [v for v in views if not v.get("unreachable")]
    missing = [v["node"] for v in live if v.get("energy_j") is None]
    if not live or missing:
        return None, f"not available: no power reading on {', '.join(missing) or 'any node'}"
    answered = sum(int(v.get("answered", 0)) for v in live)
    if not answered:
        return None, "no frame answered yet"
    return sum(float(v["energy_j"]) for v in live) / answered, f"over {answered} answered frames"


def cmd_rollout(args) -> int:
    from robustdice.mesh.config import load_peers

    from .client import default_key_path
    from .rollout import SWITCH_IN_MS, rollout
    config = load_peers(args.peers)
    out = rollout(config, default_key_path(config, args.key), args.plan,
                  switch_in_ms=args.switch_in_ms or SWITCH_IN_MS, timeout_s=args.timeout,
                  wait_retired=not args.no_wait, say=(lambda _: None) if args.json else print)
    if args.json:
        print(json.dumps({k: v for k, v in out.items() if k != "views"}))
    return 0


def cmd_status(args) -> int:
    from robustdice.mesh.config import load_peers

    from .client import default_key_path, status_all
    from .plans import clock_text
    config = load_peers(args.peers)
    views = status_all(config, default_key_path(config, args.key), args.timeout)
    if args.json:
        print(json.dumps(views))
        return 0
    groups = partition_of(views)
    if len(groups) > 1:
        print("SPLIT: nodes run frames in separate groups, each zero-filling the others: "
              + " | ".join(",".join(g) for g in groups))
    for v in views:
        if v.get("unreachable"):
            print(f"{v['node']}: unreachable")
            continue
        p50 = "n/a" if v["latency_ms_p50"] is None else f"{v['latency_ms_p50']:.1f} ms"
        print(f"{v['node']} (device {v['device']}, incarnation {v['incarnation']}, plan {v['plan_hash'][:12]} "
              f"{v['model']}/{v['method']}): {v['frames_done']} frames, "
              f"zero-filled {100 * v['zero_filled_fraction']:.1f}%, p50 {p50}, "
              f"RSS {v['rss_total_bytes'] / 2**20:.0f} MiB, power {v['power']}")
        engine = v.get("engine") or {}
        gpu = v.get("gpu") or {}
        line = f"    engine on {engine.get('device', '?')} in {engine.get('dtype', '?')}"
        if engine.get("gpu_memory_bytes") is not None:
            line += f", {engine['gpu_memory_bytes'] / 2**20:.0f} MiB of GPU memory"
        if gpu.get("source"):
            line += f"; GPU {gpu.get('utilisation_pct', '?')}% busy"
            if gpu.get("power_mw") is not None:
                line += f", {gpu['power_mw'] / 1000:.1f} W"
        print(line)
        if v.get("refused"):
            print(f"    REFUSED: {v['refused']}")
        following = v.get("next_plan")
        if following:
            switch = v.get("switch_ms")
            when = clock_text(switch) if switch else "not agreed yet"
            print(f"    roll-out: plan {following['plan_hash'][:12]} {'loaded' if following['ready'] else 'loading'} "
                  f"beside it; frames admitted from {when} run on it")
        if v.get("rollout_error"):
            print(f"    roll-out failed here: {v['rollout_error']}")
        if "participants" in v:
            print(f"    new frames run on: {', '.join(v['participants'])}")
        for peer, m in sorted(v["members"].items()):
            link = "connected" if m.get("connected") else ("hears us" if m.get("hears_us") else "-")
            print(f"    {peer:<10} {m.get('state', '?'):<11} {link:<9} last heard {_age(v, m):>8}  "
                  f"incarnation {m.get('incarnation')}")
        if v.get("energy_j") is not None:
            per_frame = v["energy_j"] / v["frames_done"] if v["frames_done"] else None
            print(f"    energy {v['energy_j']:.1f} J over {v.get('energy_covered_s', 0):.0f} s"
                  + ("" if per_frame is None else f", {per_frame:.3f} J per frame computed here"))
        drops = {k: n for k, n in v["counters"].items() if n}
        if drops:
            print("    dropped: " + ", ".join(f"{k}={n}" for k, n in sorted(drops.items())))
    joules, why = energy_per_frame(views)
    print(f"energy per answered frame, cluster-wide: {'n/a' if joules is None else f'{joules:.3f} J'} ({why})")
    return 0 if all(not v.get("unreachable") for v in views) else 1


