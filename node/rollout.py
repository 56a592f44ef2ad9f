"""`robustdice rollout`: a new plan on every node while frames keep flowing (node/plans.py).

    prepare   every node checks the plan folder (the operator's signature, its shard) and its
              engine loads the shard beside the current plan; wait until every node that
              answers has it loaded
    switch    every node is told the same switch time: the latest wall clock any node reported,
              plus `switch_in_ms` (time for the request to reach every node before it passes)
    retire    each node drops the old plan once no frame needs it (a frame timeout after the
              switch); by default this waits for that too

A node that does not answer is not waited for: it learns the roll-out from its peers'
heartbeats when it comes back, and loads the plan from the same folder on its own disk. The
folder is given as the nodes see it; on boards the deploy copies it there first.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from robustdice.mesh.config import PeersConfig

from .client import ask_all
from .errors import NodeError
from .plans import ROLLOUT_PREPARE, ROLLOUT_SWITCH, clock_text

# How far ahead of the nodes' latest clock the switch is set: the switch request must reach every
# node before its clock passes the time, or frames it admits meanwhile still run on the old plan.
SWITCH_IN_MS = 2000
POLL_S = 0.2


def _reachable(views: List[Dict]) -> List[Dict]:
    return [v for v in views if not v.get("unreachable")]


def _has_loaded(view: Dict, plan_hash: str) -> bool:
    following = view.get("next_plan") or {}
    return view.get("plan_hash") == plan_hash or (following.get("plan_hash") == plan_hash and following.get("ready"))


def _retired_to(view: Dict, plan_hash: str) -> bool:
    return view.get("plan_hash") == plan_hash and not view.get("next_plan")


def rollout(config: PeersConfig, key_path: Optional[Path], plan_dir, *, switch_in_ms: int = SWITCH_IN_MS,
            timeout_s: float = 120.0, wait_retired: bool = True, say: Callable[[str], None] = print) -> Dict:
    """Roll the plan in `plan_dir` out to the cluster; returns what happened (plan hash, switch
    time, each node's final view). Raises NodeError naming the node and why when one refuses."""
    folder = Path(plan_dir)
    if folder.exists():
        folder = folder.resolve()
    elif not folder.is_absolute():
        raise NodeError(f"--plan {plan_dir}: not a folder here; give the folder as the nodes see it, an absolute path")
    deadline = time.monotonic() + timeout_s
    started = time.monotonic()

    replies = ask_all(config, key_path, ROLLOUT_PREPARE, {"plan_dir": str(folder)})
    for v in replies:
        if v.get("unreachable"):
            say(f"{v['node']}: unreachable; it joins the roll-out from its peers when it comes back")
    answered = _reachable(replies)
    if not answered:
        raise NodeError("no node answered: is the cluster running, and is this its peers.yaml?")
    refused = [v for v in answered if not v.get("ok")]
    if refused:
        raise NodeError("; ".join(f"{v['node']} refused the plan: {v.get('error')}" for v in refused))
    targets = {(v.get("next_plan") or {}).get("plan_hash") or v["plan_hash"] for v in answered}
    if len(targets) != 1:
        raise NodeError(f"the nodes name different plans for {folder}: {', '.join(sorted(t[:12] for t in targets))}")
    plan_hash = targets.pop()
    ids = [v["node"] for v in answered]
    if all(_retired_to(v, plan_hash) for v in answered):   # the plan they run (a cancel, or a repeat)
        say(f"{', '.join(ids)} run plan {plan_hash[:12]}; nothing to roll out")
        return {"plan_hash": plan_hash, "plan_dir": str(folder), "switch_ms": None, "nodes": ids,
                "prepared_s": 0.0, "views": answered}
    say(f"plan {plan_hash[:12]}: loading on {', '.join(ids)}")

    def wait(predicate, what: str) -> List[Dict]:
        while True:
            views = ask_all(config, key_path, "status", {}, nodes=ids)
            if all(not v.get("unreachable") and predicate(v) for v in views):
                return views
            failed = [v for v in views if v.get("rollout_error")]
            if failed:
                raise NodeError("; ".join(f"{v['node']}: {v['rollout_error']}" for v in failed))
            if time.monotonic() > deadline:
                behind = [v["node"] for v in views if v.get("unreachable") or not predicate(v)]
                raise NodeError(f"timed out after {timeout_s:.0f} s waiting for {what} on {', '.join(behind)}")
            time.sleep(POLL_S)   # polling the nodes' status with a deadline

    views = wait(lambda v: _has_loaded(v, plan_hash), "the plan to load")
    prepared_s = time.monotonic() - started
    switch_ms = max(int(v["wall_s"] * 1000) for v in views) + switch_in_ms
    replies = ask_all(config, key_path, ROLLOUT_SWITCH, {"plan_hash": plan_hash, "switch_ms": switch_ms}, nodes=ids)
    bad = [v for v in replies if v.get("unreachable") or not v.get("ok")]
    if bad:   # those that agreed switch; the others learn the time from their heartbeats
        say("; ".join(f"{v['node']}: {'unreachable' if v.get('unreachable') else v.get('error')}" for v in bad))
    agreed = {v.get("switch_ms") for v in replies if v.get("ok")}
    if len(agreed) > 1:
        say(f"nodes hold different switch times {sorted(agreed)}: each frame still runs on the plan its origin chose")
    say(f"plan {plan_hash[:12]} loaded on every node after {prepared_s:.1f} s; frames admitted from "
        f"{clock_text(switch_ms)} run on it")
    out = {"plan_hash": plan_hash, "plan_dir": str(folder), "switch_ms": switch_ms, "nodes": ids,
           "prepared_s": prepared_s}
    if wait_retired:
        views = wait(lambda v: _retired_to(v, plan_hash), "the old plan to retire")
        out["retired_s"] = time.monotonic() - started
        say(f"done: every node runs plan {plan_hash[:12]} only ({out['retired_s']:.1f} s)")
    out["views"] = views
    return out
