"""The plans a node serves, and rolling a new one out while frames keep flowing.

A pure core, like frames.py and serving.py: no sockets, no clock reads, no torch. The handler
carries values between it, the engine and the mesh.

`PlanLayout` is one plan as the handler serves it: per stage, the neuron ids each node holds
(checked once), whom this node waits for and whom it sends to, and the routes of the
participant sets it has met.

`Rollout` holds the current plan and, during a roll-out, the next one:

    prepare   `robustdice rollout` (or a peer's heartbeat, below) names a signed plan folder;
              the handler checks it and the engine loads its shard beside the current one.
              Once the engine says it is loaded, heartbeats carry its hash ("next"): peers
              may count on this node for frames of either plan.
    commit    every node is told the same switch time T (wall-clock ms of admission, the
              order key every node already shares): a frame admitted at T or later runs on
              the next plan, an earlier one on the current. The origin decides, and the frame's
              input names its plan, so a peer that has not heard of T yet still computes each
              frame on the plan it was admitted under. Heartbeats carry T.
    retire    once no frame of the old plan is held and T is a frame timeout past (no input
              admitted before T can still arrive), the old plan is dropped and the next one is
              the current.

A node that missed the roll-out (it was down, or restarted from the old plan) learns it from
any peer's heartbeat: a plan agreed with a later switch time than its own, and the folder where
the peer found it. It prepares that plan from the same folder on its own disk (the plan must be
signed by the operator like any other) and commits to the same T: it rejoins on the plan the
cluster runs. Two plans that no roll-out relates (two peers.yaml with different plans) still
refuse each other, as membership.py says.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

import numpy as np

from robustdice.partitioner.core.serving_stages import serving_stages

# The client requests of `robustdice rollout` (wire.Control kinds), answered with the roll-out's status.
ROLLOUT_PREPARE = "rollout_prepare"   # {"plan_dir": str}
ROLLOUT_SWITCH = "rollout_switch"     # {"plan_hash": str, "switch_ms": int}

# A switch time further ahead of a node's clock than this is refused (a value in the wrong unit
# would otherwise hold a roll-out, and every later one, for good).
MAX_SWITCH_AHEAD_MS = 3600 * 1000
MAX_REFUSED = 16   # plans remembered as refused, and as retired

# Routes kept per stage before the cache is cleared (membership churn makes new participant sets).
ROUTES_PER_STAGE = 64


class PlanLayout:
    """One plan's per-stage tables, as this node serves it. `known_ids(ids, n, what)` checks a
    table once (the mesh's gather then takes it unchecked)."""

    def __init__(self, plan, plan_dir: str, node_ids: Sequence[str], me: str,
                 known_ids: Callable[[np.ndarray, int, str], np.ndarray]) -> None:
        stages = serving_stages(plan)   # a rocoin plan is served as one stage
        self.plan = plan
        self.hash: str = plan.plan_hash
        self.dir = str(plan_dir)
        self.stage_names = [s.name for s in stages]
        self.total_ids = [s.total_ids for s in stages]
        self.neurons = [s.neurons for s in stages]
        # Per stage, per node: the neuron ids it computes; whom we wait for (their ids are not all
        # ours) and whom we send to (ours are not all theirs). A node holding all of a stage
        # waits for nobody; replicas that add nothing are never sent.
        raw = [{n: np.asarray(s.holders(d), dtype=np.int32) for d, n in enumerate(node_ids)} for s in stages]
        mine = [set(t[me].tolist()) for t in raw]
        self.wait_for = [{n for n, a in t.items() if n != me and not set(a.tolist()) <= mine[i]}
                         for i, t in enumerate(raw)]
        self.send_to = [{n for n, a in t.items() if n != me and not mine[i] <= set(a.tolist())}
                        for i, t in enumerate(raw)]
        self.ids = [{n: known_ids(a, self.total_ids[i], f"stage {self.stage_names[i]}, node {n}")
                     for n, a in t.items()} for i, t in enumerate(raw)]
        # (stage, participants taking part) -> (holders to wait for, peers to send to): the same
        # few sets at every stage of every frame.
        self._routes: Dict[Tuple[int, FrozenSet[str]], Tuple[Dict[str, np.ndarray], List[str]]] = {}

    @property
    def stages(self) -> int:
        return len(self.stage_names)

    def route(self, stage: int, taking_part: FrozenSet[str]) -> Tuple[Dict[str, np.ndarray], List[str]]:
        route = self._routes.get((stage, taking_part))
        if route is None:
            if len(self._routes) >= ROUTES_PER_STAGE * len(self.stage_names):
                self._routes.clear()
            route = self._routes[(stage, taking_part)] = (
                {p: self.ids[stage][p] for p in taking_part if p in self.wait_for[stage]},
                [p for p in taking_part if p in self.send_to[stage]])
        return route


def clock_text(wall_ms: int) -> str:
    """A wall-clock time in ms as the logs and the command show a switch time: HH:MM:SS.mmm."""
    return time.strftime("%H:%M:%S", time.localtime(wall_ms / 1000)) + f".{wall_ms % 1000:03d}"


@dataclass(frozen=True)
class Adopt:
    """What a peer's heartbeat asks of this node: prepare `plan_dir` (unless `plan_hash` is already
    loaded) and switch to it at `switch_ms`."""
    plan_hash: str
    plan_dir: str
    switch_ms: int


class Rollout:
    """The current plan and a roll-out's next one (see the module's docstring)."""

    def __init__(self, current: PlanLayout, switch_ms: int = 0) -> None:
        self.current = current
        # The agreed switch time of the roll-out that brought the current plan, and its folder
        # (0 and "": the configured plan): what heartbeats tell nodes that missed it.
        self.current_switch_ms = int(switch_ms)
        self.rollout_dir = current.dir if switch_ms else ""
        self.next: Optional[PlanLayout] = None
        self.next_ready = False            # the engine has loaded the next plan's shard
        self.switch_ms = 0                 # the agreed admission time of the next plan's first frame (0: none)
        self.pending_switch_ms = 0         # a switch adopted from a peer before the plan was ready here
        self.last_error = ""
        self.retired: List[str] = []       # hashes of plans dropped, oldest first
        # Plans a peer's heartbeat asked for that could not be prepared here: hash -> its switch
        # time. Not asked again until a later switch (a failure must not repeat every pass).
        self.refused: Dict[str, int] = {}

    # ------------------------------------------------------------ what frames run on
    def layouts(self) -> Dict[str, PlanLayout]:
        out = {self.current.hash: self.current}
        if self.next is not None and self.next_ready:
            out[self.next.hash] = self.next
        return out

    def layout(self, plan_hash: str) -> Optional[PlanLayout]:
        """The plan of a peer's frame ("" : the current), or None if this node does not serve it."""
        if not plan_hash or plan_hash == self.current.hash:
            return self.current
        if self.next is not None and self.next_ready and plan_hash == self.next.hash:
            return self.next
        return None

    def plan_for(self, t_ms: int) -> PlanLayout:
        """The plan a frame admitted at `t_ms` (this node's wall clock) runs on."""
        if self.switch_ms and self.next is not None and self.next_ready and t_ms >= self.switch_ms:
            return self.next
        return self.current

    # ------------------------------------------------------------ the roll-out's steps
    @property
    def agreed(self) -> bool:
        """The next plan's switch time is agreed (or adopted, waiting for the plan to load)."""
        return bool(self.switch_ms or self.pending_switch_ms)

    def begin(self, layout: PlanLayout) -> Optional[str]:
        """Prepare `layout` as the next plan; returns why not, or None (the engine loads it next).
        A next plan never switched to makes way for a newer request (the current plan's: a cancel)."""
        if self.next is not None and self.next.hash != layout.hash:
            if self.agreed:
                return f"a roll-out to plan {self.next.hash[:12]} is in progress (its switch is agreed)"
            if not self.next_ready:
                return f"plan {self.next.hash[:12]} is still loading here; ask again once it is loaded"
        if layout.hash == self.current.hash:
            self.next, self.next_ready, self.pending_switch_ms = None, False, 0
            return None
        if self.next is not None and self.next.hash == layout.hash:
            return None
        if layout.plan.devices != self.current.plan.devices:
            return (f"plan {layout.hash[:12]} is for {layout.plan.devices} devices; this cluster has "
                    f"{self.current.plan.devices}")
        self.next, self.next_ready, self.switch_ms, self.pending_switch_ms = layout, False, 0, 0
        self.last_error = ""
        return None

    @property
    def loading(self) -> bool:
        """The next plan's shard is being loaded by the engine."""
        return self.next is not None and not self.next_ready

    def prepared(self, plan_hash: str) -> bool:
        """The engine loaded the next plan; True if a switch adopted meanwhile is now committed."""
        if self.next is None or plan_hash != self.next.hash:
            return False
        self.next_ready = True
        if self.pending_switch_ms:
            self.switch_ms, self.pending_switch_ms = self.pending_switch_ms, 0
            return True
        return False

    def failed(self, plan_hash: str, why: str) -> None:
        """The next plan could not be loaded: the roll-out ends here, the current plan stays."""
        if self.next is not None and plan_hash == self.next.hash:
            self.refuse(plan_hash, self.pending_switch_ms or self.switch_ms)
            self.next, self.next_ready, self.switch_ms, self.pending_switch_ms = None, False, 0, 0
            self.last_error = f"plan {plan_hash[:12]}: {why}"

    def refuse(self, plan_hash: str, switch_ms: int) -> None:
        self.refused[plan_hash] = max(self.refused.get(plan_hash, 0), int(switch_ms))
        while len(self.refused) > MAX_REFUSED:
            self.refused.pop(next(iter(self.refused)))

    def commit(self, plan_hash: str, switch_ms: int, wall_ms: int) -> Optional[str]:
        """Agree on the switch time; returns why not, or None. The first time agreed stays."""
        if plan_hash == self.current.hash and self.next is None and self.current_switch_ms:
            return None   # already switched and retired: a late or repeated commit
        if self.next is None or plan_hash != self.next.hash:
            return f"plan {plan_hash[:12]} is not prepared on this node"
        if not self.next_ready:
            return f"plan {plan_hash[:12]} is still loading on this node"
        if not 0 < switch_ms <= wall_ms + MAX_SWITCH_AHEAD_MS:
            return (f"switch time {switch_ms} is not a wall-clock time in ms within "
                    f"{MAX_SWITCH_AHEAD_MS // 60000} minutes of this node's clock ({wall_ms})")
        if not self.switch_ms:
            self.switch_ms = int(switch_ms)
        return None

    def retire_due(self, wall_ms: int, frame_timeout_ms: int, frames_on_current: Callable[[], int]) -> bool:
        """The old plan can go: the switch is agreed, the next plan is served, nothing admitted
        before the switch can still arrive (a frame timeout past it), and no frame needs it
        (`frames_on_current` counts them, asked last: it walks every frame held)."""
        return (self.switch_ms > 0 and self.next is not None and self.next_ready
                and wall_ms >= self.switch_ms + frame_timeout_ms and frames_on_current() == 0)

    def retire(self) -> PlanLayout:
        """Drop the old plan; the next is the current from now on. Returns the old one."""
        old, self.current, self.next, self.next_ready = self.current, self.next, None, False
        self.current_switch_ms, self.rollout_dir, self.switch_ms = self.switch_ms, self.current.dir, 0
        self.retired = self.retired[-(MAX_REFUSED - 1):] + [old.hash]   # status shows the latest few
        return old

    # ------------------------------------------------------------ gossip
    def heard(self, plan: str, next_plan: str, switch_ms: int, plan_dir: str, wall_ms: int) -> Optional[Adopt]:
        """A peer's heartbeat: adopt its agreed switch time for our next plan, or ask to prepare a
        plan it switched to at a later time than ours (it was rolled out while this node was away,
        or a roll-out went back to an older plan)."""
        if not switch_ms or not plan_dir or switch_ms > wall_ms + MAX_SWITCH_AHEAD_MS:
            return None
        target = next_plan or plan   # its roll-out's plan: still the next one, or already its current
        if self.next is not None:
            if target == self.next.hash:
                if not self.agreed:
                    if self.next_ready:
                        self.switch_ms = int(switch_ms)
                    else:
                        self.pending_switch_ms = int(switch_ms)
                return None
            if self.agreed:
                return None
            # Ours is a plan prepared and never switched to: the cluster agreed on another.
        if target == self.current.hash or switch_ms <= self.current_switch_ms:
            return None
        if self.refused.get(target, -1) >= switch_ms:
            return None
        return Adopt(target, plan_dir, int(switch_ms))

    def heartbeat(self) -> Tuple[str, int, str]:
        """What heartbeats say: (next plan if served, its switch ms and folder once agreed); with
        no next plan, the roll-out that brought the current one (0 and "": none)."""
        if self.next is None or not self.next_ready:
            return "", self.current_switch_ms, self.rollout_dir
        return (self.next.hash, self.switch_ms, self.next.dir) if self.switch_ms else (self.next.hash, 0, "")

    def status(self) -> Dict[str, object]:
        return {"plan_hash": self.current.hash,
                "next_plan": None if self.next is None else {"plan_hash": self.next.hash, "ready": self.next_ready,
                                                             "plan_dir": self.next.dir},
                "switch_ms": (self.switch_ms if self.next is not None else self.current_switch_ms) or None,
                "rollout_error": self.last_error or None, "retired_plans": list(self.retired)}
