"""One node's configuration: peers.yaml, which peer this node is, and its plan — loaded once.

`load_node_config` is the one loader: the supervisor calls it before starting anything (and for
`--check`), the handler and the engine call it again in their own processes, and every problem
is a NodeError, ConfigError or PlanError that names the file and the field.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

from robustdice.mesh.config import PeerConfig, PeersConfig, load_peers, resolve_self
from robustdice.partitioner.core.plan import Plan, load_plan
from robustdice.partitioner.core.serving_stages import serving_stages

from .errors import NodeError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeConfig:
    peers_path: Path
    peers: PeersConfig
    me: PeerConfig
    device: int            # this node's index in peers.yaml, which is its device in the plan
    plan_dir: Path
    plan: Plan
    compute: str = "auto"    # where the engine computes: auto (cuda if torch sees one), cpu, cuda
    dtype: str = "float32"    # what it computes in, and what its slices travel as
    # The plan peers.yaml (or --plan) names; `plan_dir` differs from it when a roll-out brought
    # another plan and the node restarted since (ROLLOUT_RECORD).
    configured_dir: Optional[Path] = None
    configured_hash: str = ""
    rollout_switch_ms: int = 0   # the roll-out's agreed switch time, when `plan` came from one

    @property
    def node_ids(self) -> Tuple[str, ...]:
        return self.peers.ids

    @property
    def shard_path(self) -> Path:
        return shard_path(self.plan_dir, self.device)

    # Timing derived from peers.yaml, in one place.
    @property
    def startup_grace_s(self) -> float:
        """How long a starting node waits to hear its peers before it serves clients anyway: a peer
        timeout (a live peer is heard within one heartbeat) plus two heartbeats for it to hear us."""
        return (self.peers.peer_timeout_ms + 2 * self.peers.heartbeat_interval_ms) / 1000.0

    @property
    def frame_timeout_s(self) -> float:
        return self.peers.frame_timeout_ms / 1000.0

    @property
    def engine_stall_s(self) -> float:
        """An engine that holds work and has answered nothing for this long is stalled: peers then
        stop counting on this node (a live handler in front of a hung engine is a zombie)."""
        return self.peers.sync_timeout_ms / 1000.0


# How far apart (relative) a plan's speed ratios and peers.yaml's may be before a node warns:
# two profiles of one board differ by a few per cent.
SPEED_TOLERANCE = 0.10


def capacity_mismatch(plan: Plan, peers: PeersConfig, peers_path) -> Optional[str]:
    """Why `plan`'s deal does not fit the boards peers.yaml describes (each peer's `capacity:`),
    or None: nothing given, or the same speed ratios (a plan dealt for 2:1:1:1 fits boards given
    as 4:2:2:2). Not an error: the plan still computes exactly; the fast boards wait for the slow."""
    given = [p.capacity for p in peers.peers]
    if not any(given):
        return None
    if not all(given):
        missing = [p.id for p in peers.peers if p.capacity is None]
        return f"peers.yaml gives a capacity for some peers but not {', '.join(missing)}: it describes no deal"
    speeds = [c.speed for c in given]
    planned = [1.0] * len(speeds) if plan.capacities is None else [float(c["speed"]) for c in plan.capacities]
    ratios = [[v / max(values) for v in values] for values in (speeds, planned)]
    if all(abs(a - b) <= SPEED_TOLERANCE * max(a, b) for a, b in zip(*ratios)):
        return None

    def shown(values):
        return ":".join(f"{v / min(values):.3g}" for v in values)
    made_for = "equal boards" if plan.capacities is None else f"speeds {shown(planned)}"
    return (f"plan {plan.plan_hash[:12]} was dealt for {made_for}, but peers.yaml gives speeds {shown(speeds)}: "
            f"the faster boards will wait for the slower; `robustdice partition --capacities {peers_path}` deals "
            f"by them")


# The least a node derives for max_message_bytes: a small plan's messages are far smaller, and
# headers, status replies and a future field must never be what a bound cuts off.
MIN_MESSAGE_BYTES = 1024 * 1024


def plan_message_bytes(plan: Plan, row_elements: Sequence[int], max_batch: int, wire_dtype: str) -> Tuple[int, str]:
    """(bytes, why): the largest message a node of `plan` sends or takes, for max_message_bytes
    when peers.yaml does not set it: the largest slice of any device at any stage (its rows x
    `row_elements` of the stage, the values per neuron and image, x `max_batch` images, in the
    wire dtype, with its neuron ids), or the largest input (float32), plus a header each, at
    least MIN_MESSAGE_BYTES."""
    import numpy as np
    from robustdice.mesh.wire import MAX_HEADER_BYTES

    itemsize = np.dtype(wire_dtype).itemsize
    sizes = {"floor": MIN_MESSAGE_BYTES,
             "input": MAX_HEADER_BYTES + max_batch * 4 * int(np.prod(plan.input_shape))}
    for stage, elements in zip(serving_stages(plan), row_elements):
        rows = max(len(stage.holders(d)) for d in range(plan.devices))
        sizes[f"a slice of {stage.name} ({rows} rows of {elements})"] = (
            MAX_HEADER_BYTES + rows * (4 + max_batch * int(elements) * itemsize))
    why = max(sizes, key=sizes.get)
    return sizes[why], why


# What the early slices of admitted frames may take at most, whatever the plan: a board also
# holds its shard, its engine's activations and the inputs in flight.
MAX_EARLY_BYTES = 256 * 1024 * 1024


def plan_early_bounds(plan: Plan, row_elements: Sequence[int], frames_in_flight: int, wire_dtype: str
                      ) -> Tuple[int, int]:
    """(slices, bytes) of early slices a node must be able to hold for its admitted frames: a
    peer ahead of it is at most one stage ahead on each frame (the next needs this node's slice,
    but for the neurons another copy gives), so each peer may send one slice per frame in
    flight before this node begins that gather: at most the plan's largest slice (one image).
    Capped at MAX_EARLY_BYTES (mesh/gather.py's defaults are the floor)."""
    import numpy as np

    itemsize = np.dtype(wire_dtype).itemsize
    largest = max((max(len(stage.holders(d)) for d in range(plan.devices)) * (4 + int(elements) * itemsize)
                   for stage, elements in zip(serving_stages(plan), row_elements)), default=0)
    senders = max(1, plan.devices - 1)
    return frames_in_flight * senders, min(MAX_EARLY_BYTES, frames_in_flight * senders * largest)


def plan_trust_key(peers: PeersConfig) -> Optional[str]:
    """The operator key a node checks plans against; None (unsigned plans run) only with
    `insecure: true`. A plan decides what every board computes, so CURVE without a signed plan
    would authenticate the peers while trusting whoever can write the plan folder."""
    if peers.operator_public_key is not None:
        return peers.operator_public_key
    if peers.insecure:
        log.warning("peers.yaml: no operator_public_key and insecure: true; plan signatures are not checked")
        return None
    raise NodeError("peers.yaml: operator_public_key: missing; a node runs only plans signed by the operator "
                    "(`robustdice sign --new-key DIR` makes the key) unless insecure: true")


# A node that took part in a roll-out remembers its plan here, in systemd's StateDirectory
# ($STATE_DIRECTORY), so that a restart runs the plan the cluster runs, not the one peers.yaml
# names: a whole cluster rebooted after a roll-out would otherwise go back to the old plan.
ROLLOUT_RECORD = "rollout-{id}.json"


def shard_path(plan_dir, device: int) -> Path:
    return Path(plan_dir) / "shards" / f"{device}.pt"


def plan_misfit(plan: Plan, plan_dir, peers: PeersConfig, device: int) -> Optional[str]:
    """Why `plan` (in `plan_dir`) cannot run as `device` of the cluster peers.yaml lists, or None:
    the one check of a starting node, a roll-out's plan and a state record's."""
    if plan.devices != len(peers.peers):
        return f"plan {plan_dir} is for {plan.devices} devices but peers.yaml lists {len(peers.peers)} peers"
    shard = shard_path(plan_dir, device)
    if not shard.exists():
        return f"shard for device {device} ({peers.ids[device]}) is missing: {shard}"
    return None


def _state_directory() -> Optional[Path]:
    value = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(value) if value else None


def record_rollout(config: NodeConfig, plan_dir, plan_hash: str, switch_ms: int) -> Optional[Path]:
    """Remember that this node switches to `plan_dir` (written when the switch is agreed); None
    where there is no state directory (a restart then runs the configured plan, and rejoins the
    roll-out from its peers' heartbeats: node/plans.py)."""
    import json
    directory = _state_directory()
    if directory is None:
        log.warning("no $STATE_DIRECTORY: a restart of %s will start from plan %s and learn the roll-out from "
                    "its peers", config.me.id, config.configured_hash[:12])
        return None
    path = directory / ROLLOUT_RECORD.format(id=config.me.id)
    record = {"configured_plan": config.configured_hash, "plan_dir": str(Path(plan_dir).resolve()),
              "plan_hash": plan_hash, "switch_ms": int(switch_ms)}
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)   # a crash mid-write leaves the old record, never half of one
    return path


def _rolled_out(peers: PeersConfig, me: PeerConfig, configured_hash: str, trust_key: Optional[str]):
    """(folder, plan, switch ms) of the plan a roll-out left this node, or None: no record, or one
    made while peers.yaml named another plan (the operator changed it since: that one wins)."""
    import json
    directory = _state_directory()
    path = directory / ROLLOUT_RECORD.format(id=me.id) if directory is not None else None
    if path is None or not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        if record.get("configured_plan") != configured_hash:
            return None
        plan = load_plan(record["plan_dir"], trust_key)
        if plan.plan_hash != record.get("plan_hash"):
            raise NodeError(f"it names plan {str(record.get('plan_hash'))[:12]}, the folder holds {plan.plan_hash[:12]}")
        misfit = plan_misfit(plan, record["plan_dir"], peers, list(peers.ids).index(me.id))
        if misfit:
            raise NodeError(misfit)
        return Path(record["plan_dir"]), plan, int(record.get("switch_ms", 0))
    except Exception as exc:   # a bad record costs the roll-out, never the start
        log.error("%s: ignored (%s); running the configured plan", path, exc)
        return None


def load_node_config(peers_path, node_id: Optional[str] = None, plan_dir=None, *, check_key: bool = True,
                     compute: Optional[str] = None, dtype: Optional[str] = None) -> NodeConfig:
    """`compute`/`dtype` (the command line) win over $ROBUSTDICE_COMPUTE/$ROBUSTDICE_DTYPE (the
    unit's environment), which win over peers.yaml's `compute:`/`dtype:`."""
    from robustdice.mesh.config import COMPUTE_KINDS, DTYPES
    from robustdice.mesh.keys import load_own_keys

    peers_path = Path(peers_path)
    peers = load_peers(peers_path)
    me = resolve_self(peers, node_id)
    if check_key and not peers.insecure:
        load_own_keys(peers, me.id)  # a bad key file fails here, not later inside the handler
    directory = Path(plan_dir) if plan_dir else peers.plan
    if directory is None:
        raise NodeError("no plan: give --plan DIR or set 'plan:' in peers.yaml")
    trust_key = plan_trust_key(peers)
    plan = load_plan(directory, trust_key)
    configured = (Path(directory), plan.plan_hash)
    switch_ms = 0
    rolled_out = _rolled_out(peers, me, plan.plan_hash, trust_key)
    if rolled_out is not None:
        directory, plan, switch_ms = rolled_out
        log.info("running plan %s from %s, which a roll-out brought (peers.yaml names plan %s)",
                 plan.plan_hash[:12], directory, configured[1][:12])
    misfit = plan_misfit(plan, directory, peers, list(peers.ids).index(me.id))
    if misfit:
        raise NodeError(misfit.replace("peers.yaml", str(peers_path)))
    chosen = {}
    for name, given, choices in (("compute", compute, COMPUTE_KINDS), ("dtype", dtype, DTYPES)):
        env = os.environ.get(f"ROBUSTDICE_{name.upper()}", "").strip()
        value = given or env or getattr(peers, name)
        if value not in choices:
            source = "--" + name if given else f"ROBUSTDICE_{name.upper()}"
            raise NodeError(f"{source}: {value!r} is not one of {', '.join(choices)}")
        chosen[name] = value
    config = NodeConfig(peers_path, peers, me, list(peers.ids).index(me.id), Path(directory), plan, **chosen,
                        configured_dir=configured[0], configured_hash=configured[1], rollout_switch_ms=switch_ms)
    return config
