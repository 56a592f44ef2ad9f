"""Boards of different speed: the capacity file, and deals that give each device work in
proportion to its speed, within its memory.

A capacity file (YAML or JSON; `robustdice profile` writes one per board, `--merge` joins them)
lists the plan's devices in order (or give `--capacities` the cluster's peers.yaml, whose peers
each carry `capacity: {speed: ..., memory_bytes: ...}`):

    format: robustdice-capacities
    version: 1
    devices:
      - id: n0                 # optional: a name for the reader (peers.yaml's node id)
        speed: 31.6            # relative speed: any unit common to every device; profile writes
                               # frames per second of the whole model's forward (1000 / forward_ms)
        memory_bytes: 3.9e9    # optional: what the device's shard may take (profile: free memory)
        compute: cpu           # optional, informative: where it was measured
        forward_ms: 31.6       # optional, informative: the measured forward, and per stage
        stage_ms: {features.0: 4.1, ...}

Pure cores (values in, values out): `deal_weights` turns speeds and memory into integer weights
(water-filling: a device whose memory cannot hold its speed's share gets what fits, the others
share the rest by speed), `deal_by_speed` deals a layer's groups (robust, robust+cdc, random,
uniform), `split_by_speed` and `cdc_by_speed` split contiguously (lop, cdc), and
`cluster.rotated_parity` with the weights places robust+cdc's parity rows. With equal weights
each is today's function exactly, so equal capacities give today's plans byte for byte:
`deal_weights` returns None for them and the plan records no capacities.

The shell: `load_capacities`, `write_capacities`, `merge_capacities`, and `capacity_stages`,
which sizes the deal from the plan's rows and re-plans (partition.sized_stages calls it).

A budget (--memory, --budget-mb, --replication) sizes the plan as for equal devices, as today:
it fixes each layer's copies (N times the per-device budget in all); the capacity deal then
moves those copies towards the fast devices, and the capacity file's memory_bytes, not the
budget, bounds each device. robust+cdc's parity rows can grow under an unequal deal: a row takes
one single copy of every device but one, and the fast devices now hold more of them.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from robustdice.partitioner.core.cluster import Assignment, CdcLayout, cdc_layout, lop_assignment
from robustdice.partitioner.errors import PartitionerError

CAPACITY_FORMAT = "robustdice-capacities"
CAPACITY_VERSION = 1
# Integer weights keep the deal exact: equal speeds give equal integers, hence today's j mod N
# with no floating-point tie to break. A millionth of the fastest device is finer than any
# measurement of a board's speed.
WEIGHT_SCALE = 1_000_000


class CapacityError(PartitionerError):
    """A capacity file that is missing, malformed or does not fit the plan (names the field)."""


@dataclass(frozen=True)
class DeviceCapacity:
    speed: float                              # relative: only ratios between devices count
    memory_bytes: Optional[int] = None        # what its shard may take; None: unbounded
    id: Optional[str] = None
    compute: Optional[str] = None
    forward_ms: Optional[float] = None
    stage_ms: Tuple[Tuple[str, float], ...] = ()

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {k: v for k, v in (("id", self.id), ("speed", self.speed), ("memory_bytes", self.memory_bytes),
                                                 ("compute", self.compute), ("forward_ms", self.forward_ms))
                               if v is not None}
        if self.stage_ms:
            out["stage_ms"] = dict(self.stage_ms)
        return out


@dataclass(frozen=True)
class Capacities:
    devices: Tuple[DeviceCapacity, ...] = field(default_factory=tuple)

    @property
    def uniform(self) -> bool:
        """Every device as fast as every other, with the same memory: today's plans."""
        first = self.devices[0]
        return all(d.speed == first.speed and d.memory_bytes == first.memory_bytes for d in self.devices)

    def plan_record(self) -> List[Dict[str, Any]]:
        """What a plan records (inside its hash): what the deal was made for."""
        return [{"speed": d.speed, **({} if d.memory_bytes is None else {"memory_bytes": d.memory_bytes})}
                for d in self.devices]

    def to_json(self) -> Dict[str, Any]:
        return {"format": CAPACITY_FORMAT, "version": CAPACITY_VERSION,
                "devices": [d.to_json() for d in self.devices]}


# --- the file ---------------------------------------------------------------------------------

def _number(where: str, value: Any, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise CapacityError(f"{where}: {value!r} is not a positive number")
    if integer:
        return int(value)
    return float(value)


DEVICE_FIELDS = frozenset({"id", "speed", "memory_bytes", "compute", "forward_ms", "stage_ms"})


def _device(at: str, entry: Mapping[str, Any], known) -> DeviceCapacity:
    """One device's entry (a mapping of `known` fields) as a DeviceCapacity; names the bad field."""
    unknown = sorted(set(entry) - known)
    if unknown:
        raise CapacityError(f"{at}.{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")
    if "speed" not in entry:
        raise CapacityError(f"{at}.speed is missing")
    speed = _number(f"{at}.speed", entry["speed"])
    memory = entry.get("memory_bytes")
    memory = None if memory is None else _number(f"{at}.memory_bytes", memory, integer=True)
    ident = entry.get("id")
    if ident is not None and not isinstance(ident, str):
        raise CapacityError(f"{at}.id: {ident!r} is not a string")
    compute = entry.get("compute")
    if compute is not None and not isinstance(compute, str):
        raise CapacityError(f"{at}.compute: {compute!r} is not a string")
    forward = entry.get("forward_ms")
    forward = None if forward is None else _number(f"{at}.forward_ms", forward)
    stage_ms = entry.get("stage_ms") or {}
    if not isinstance(stage_ms, dict):
        raise CapacityError(f"{at}.stage_ms: expected a mapping of layer names to milliseconds")
    stages = tuple((str(k), _number(f"{at}.stage_ms.{k}", v)) for k, v in stage_ms.items())
    return DeviceCapacity(speed, memory, ident, compute, forward, stages)


def parse_capacities(data: Any, where: str = "capacities") -> Capacities:
    """A capacity file's content (parsed YAML/JSON) as Capacities; CapacityError names the field."""
    if not isinstance(data, dict):
        raise CapacityError(f"{where}: expected a mapping with format, version and devices")
    unknown = sorted(set(data) - {"format", "version", "devices"})
    if unknown:
        raise CapacityError(f"{where}.{unknown[0]}: unknown field (known: format, version, devices)")
    if data.get("format", CAPACITY_FORMAT) != CAPACITY_FORMAT:
        raise CapacityError(f"{where}.format: {data['format']!r} is not {CAPACITY_FORMAT!r}")
    if data.get("version", CAPACITY_VERSION) != CAPACITY_VERSION:
        raise CapacityError(f"{where}.version: {data['version']!r} is not {CAPACITY_VERSION}")
    devices = data.get("devices")
    if not isinstance(devices, list) or not devices:
        raise CapacityError(f"{where}.devices: expected a non-empty list, one entry per device")
    out = []
    for i, entry in enumerate(devices):
        at = f"{where}.devices[{i}]"
        if not isinstance(entry, dict):
            raise CapacityError(f"{at}: expected a mapping with speed (and memory_bytes)")
        out.append(_device(at, entry, DEVICE_FIELDS))
    return Capacities(tuple(out))


def load_capacities(path, devices: Optional[int] = None) -> Capacities:
    """Read a capacity file (YAML or JSON); with `devices`, it must list exactly that many."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CapacityError(f"--capacities: no file {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CapacityError(f"--capacities: {path} cannot be read: {exc}") from None
    try:
        data = yaml.safe_load(text)   # JSON is YAML
    except yaml.YAMLError as exc:
        raise CapacityError(f"--capacities: {path} is not valid YAML or JSON: {exc}") from None
    if isinstance(data, dict) and "peers" in data:
        caps = peers_capacities(data, str(path))
    else:
        caps = parse_capacities(data, str(path))
    if devices is not None and len(caps.devices) != devices:
        raise CapacityError(f"{path}: devices lists {len(caps.devices)} devices, the plan has {devices} "
                            f"(one entry per device, in the plan's order)")
    return caps


PEER_CAPACITY_FIELDS = frozenset({"speed", "memory_bytes"})   # peers.yaml's `capacity:` (mesh/config.py)


def peers_capacities(data: Mapping[str, Any], where: str) -> Capacities:
    """A peers.yaml's boards in its order (the plan's device order), each from its `capacity:`
    (speed, optionally memory_bytes; mesh/config.py checks the same fields when a node loads it)."""
    peers = data.get("peers")
    if not isinstance(peers, list) or not peers:
        raise CapacityError(f"{where}: peers: expected a non-empty list of boards")
    out = []
    for i, peer in enumerate(peers):
        at = f"{where}: peers[{i}].capacity"
        capacity = peer.get("capacity") if isinstance(peer, dict) else None
        if not isinstance(capacity, dict):
            raise CapacityError(f"{at}: missing: to deal by peers.yaml every peer needs one (speed, optionally "
                                f"memory_bytes; `robustdice profile` measures a board)")
        ident = peer.get("id")
        out.append(replace(_device(at, capacity, PEER_CAPACITY_FIELDS),
                                       id=ident if isinstance(ident, str) else None))
    return Capacities(tuple(out))


def write_capacities(caps: Capacities, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(caps.to_json(), indent=1) + "\n" if path.suffix == ".json" else \
        yaml.safe_dump(caps.to_json(), sort_keys=False)
    path.write_text(text)
    return path


def merge_capacities(parts: Sequence[Capacities]) -> Capacities:
    """The devices of several files, in order: one file per board gives the plan's device order."""
    return Capacities(tuple(d for caps in parts for d in caps.devices))


# --- the pure cores ---------------------------------------------------------------------------

def memory_shares(speeds: Sequence[float], row_room: Sequence[float], total_rows: float
                  ) -> Tuple[List[float], List[str]]:
    """Each device's share of the plan's rows, and what bounds it ("speed" or "memory").

    Shares follow speed; a device whose `row_room` (bytes its rows may take) holds less than its
    share of `total_rows` (bytes of every row of the plan) gets exactly what fits, and the others
    share the rest by speed (water-filling). Raises CapacityError when no deal fits.
    """
    n = len(speeds)
    if total_rows <= 0:
        return [1.0 / n] * n, ["speed"] * n
    cap = [max(0.0, r) / total_rows for r in row_room]
    if sum(min(c, 1.0) for c in cap) < 1.0 - 1e-12:
        raise CapacityError(f"no deal fits the devices' memory: the plan's rows take {total_rows / 1e6:.4g} MB "
                            f"and the devices have room for {sum(max(0.0, r) for r in row_room) / 1e6:.4g} MB "
                            f"after what each holds anyway (per device: "
                            + ", ".join(f"{max(0.0, r) / 1e6:.4g}" for r in row_room) + " MB)")
    share = [0.0] * n
    bound = ["speed"] * n
    free = list(range(n))
    left = 1.0
    while free:
        total = sum(speeds[d] for d in free)
        over = [d for d in free if left * speeds[d] / total > cap[d]]
        if not over:
            for d in free:
                share[d] = left * speeds[d] / total
            break
        for d in over:
            share[d], bound[d] = cap[d], "memory"
            left -= cap[d]
            free.remove(d)
    return share, bound


def deal_weights(shares: Sequence[float]) -> List[int]:
    """Integer weights of the deal: shares scaled to WEIGHT_SCALE for the largest (at least 1)."""
    top = max(shares)
    return [max(1, int(round(WEIGHT_SCALE * s / top))) for s in shares]


def deal_by_speed(groups: Sequence[Sequence[int]], weights: Sequence[int]) -> Assignment:
    """replicate_and_deal with each device's share of the layer's rows proportional to its weight.

    Groups are padded to a multiple of N as today (the same copies: the plan's replication and
    total memory do not move), the j-th copy being the group's (j mod |G|)-th neuron. Copies are
    dealt by smooth weighted round-robin: every device's credit grows by its weight, the copy goes
    to the device with the most credit (the lowest index on a tie) among those that do not hold
    that neuron yet, whose credit then falls by the total. Credits carry across the layer's groups,
    so the layer's share tracks the weights. Some device never holds the neuron: a neuron has at
    most N copies. Equal weights give 0, 1, ..., N-1, 0, ... from zero credits at each group's
    start: replicate_and_deal's j mod N exactly.
    """
    n = len(weights)
    if n < 1:
        raise ValueError("weights: expected one per device")
    total = sum(weights)
    credit = [0] * n
    devices: Assignment = [[] for _ in range(n)]
    for group in groups:
        size = len(group)
        if size == 0:
            continue
        holders: List[set] = [set() for _ in range(n)]
        for j in range(size + (-size) % n):
            neuron = int(group[j % size])
            for d in range(n):
                credit[d] += weights[d]
            d = max((d for d in range(n) if neuron not in holders[d]), key=lambda d: (credit[d], -d))
            credit[d] -= total
            holders[d].add(neuron)
            devices[d].append(neuron)
    return devices


def split_bounds(n_neurons: int, weights: Sequence[int]) -> List[int]:
    """Contiguous bounds 0 = b_0 <= ... <= b_N = C with b_d = floor(C * (w_0 + ... + w_{d-1}) / W):
    lop_assignment's (d * C) // N for equal weights."""
    total = sum(weights)
    bounds, acc = [0], 0
    for w in weights:
        acc += w
        bounds.append(n_neurons * acc // total)
    return bounds


def split_by_speed(n_neurons: int, weights: Sequence[int]) -> Assignment:
    """lop in proportion to speed: contiguous slices, no copies."""
    if len(set(weights)) == 1:
        return lop_assignment(n_neurons, len(weights))
    b = split_bounds(n_neurons, weights)
    return [list(range(b[d], b[d + 1])) for d in range(len(weights))]


def cdc_by_speed(n_neurons: int, weights: Sequence[int]) -> CdcLayout:
    """cdc in proportion to speed: the data split contiguously over N-1 devices by their weights,
    and the parity rows (as many as the longest data slice) on the device that makes the slowest
    device's time (rows / weight) least; the last device on a tie, as today. Equal weights:
    cdc_layout exactly."""
    n = len(weights)
    if n < 2:
        raise ValueError(f"cdc needs at least 2 devices (N-1 data + 1 parity), got {n}")
    if len(set(weights)) == 1:
        return cdc_layout(n_neurons, n)
    best = None
    for parity in reversed(range(n)):
        data = [d for d in range(n) if d != parity]
        b = split_bounds(n_neurons, [weights[d] for d in data])
        sizes = [b[i + 1] - b[i] for i in range(len(data))]
        k = max(sizes)
        slowest = max([s / weights[d] for s, d in zip(sizes, data)] + [k / weights[parity]])
        if best is None or slowest < best[0]:
            best = (slowest, parity, data, b, k)
    _, parity, data, b, k = best
    assignment: Assignment = [[] for _ in range(n)]
    for i, d in enumerate(data):
        assignment[d] = list(range(b[i], b[i + 1]))
    members = tuple(tuple(b[i] + j for i in range(len(data)) if b[i] + j < b[i + 1]) for j in range(k))
    return CdcLayout(data=assignment, parity_device=parity, members=members)


# --- the shell --------------------------------------------------------------------------------

def capacity_stages(staged, request, stages, replan: Callable[[Sequence[int]], list]) -> Tuple[list, Dict[str, Any]]:
    """The stages of `request` dealt by its capacities, and what bound each device's share.

    `stages`: the plan made for equal devices (it fixes the copies of every layer, which a deal
    only moves); `replan(weights)`: the same plan dealt by those weights. Memory: every device
    holds the model's skeleton and fill values whatever the deal (budget.budget_costs' `fixed`)
    and a row of a stage costs that stage's row bytes; one row more per stage is kept free for
    the deal's rounding. write_plan checks the shards' real bytes against memory_bytes.
    """
    import dataclasses

    from robustdice.partitioner.core.budget import budget_costs

    caps = request.capacities
    n = request.devices
    costs = budget_costs(staged, dataclasses.replace(request, replication=None, budget_mb=1.0, memory=None))
    total_rows = 0.0
    for sp, row, prow in zip(stages, costs.rows, costs.parity_rows):
        parity_rows = len(sp.parity.members) if sp.parity is not None else 0
        total_rows += sum(len(a) for a in sp.assignment) * row + parity_rows * prow
    slack = sum(max(r, p) for r, p in zip(costs.rows, costs.parity_rows))
    room = [math.inf if c.memory_bytes is None else c.memory_bytes - costs.fixed - slack for c in caps.devices]
    for d, r in enumerate(room):
        if r <= 0:
            raise CapacityError(f"device {d}: memory_bytes {caps.devices[d].memory_bytes} does not hold what every "
                                f"device of this plan holds anyway ({(costs.fixed + slack) / 1e6:.4g} MB: the "
                                f"model's skeleton and fill values, and one row of each stage)")
    if request.method == "nmr":
        shares, bound = [1.0 / n] * n, ["speed"] * n   # everything everywhere: nothing to deal
        for d, r in enumerate(room):
            if total_rows / n > r:
                raise CapacityError(f"device {d}: nmr puts every neuron on every device "
                                    f"({(total_rows / n + costs.fixed) / 1e6:.4g} MB), more than its memory_bytes "
                                    f"{caps.devices[d].memory_bytes}")
        weights = [1] * n
    else:
        shares, bound = memory_shares([c.speed for c in caps.devices], room, total_rows)
        weights = deal_weights(shares)
    out = stages if len(set(weights)) == 1 else replan(weights)
    report = {"speeds": [c.speed for c in caps.devices], "shares": [round(s, 6) for s in shares],
              "bound_by": bound, "weights": weights}
    return out, report


def plan_fields(caps: Optional[Capacities]) -> Dict[str, Any]:
    """The Plan fields of a capacity-aware plan: its capacities, and the version that has them.
    None or equal capacities: none (the plan made without a capacity file, byte for byte)."""
    from robustdice.partitioner.core.plan import CAPACITY_PLAN_VERSION
    if caps is None or caps.uniform:
        return {}
    return {"capacities": tuple(caps.plan_record()), "version": CAPACITY_PLAN_VERSION}


def plan_capacities(plan) -> Optional[Capacities]:
    """The capacities a plan records, as Capacities (a fine-tuned plan keeps its parent's)."""
    if plan.capacities is None:
        return None
    return Capacities(tuple(DeviceCapacity(float(c["speed"]), c.get("memory_bytes")) for c in plan.capacities))


def check_memory(caps: Optional[Capacities], per_device_bytes: Sequence[int]) -> None:
    """Refuse a plan whose shard exceeds a device's memory_bytes (the deal's estimate was short)."""
    if caps is None:
        return
    for d, (c, have) in enumerate(zip(caps.devices, per_device_bytes)):
        if c.memory_bytes is not None and have > c.memory_bytes:
            raise CapacityError(f"device {d}: its shard takes {have / 1e6:.4g} MB, more than its memory_bytes "
                                f"{c.memory_bytes / 1e6:.4g} MB: no deal of this plan fits (a smaller --memory or "
                                f"--budget-mb copies less)")


def deal_summary(stages, devices: int, report: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """What the summary of a capacity-aware plan says: the planned shares, what bound them, and
    each device's share of the plan's rows (data and parity) as dealt."""
    rows = [0] * devices
    for sp in stages:
        for d in range(devices):
            rows[d] += len(sp.holders(d))
    total = max(1, sum(rows))
    out = dict(report or {})
    out["rows_share"] = [round(r / total, 6) for r in rows]
    return out
