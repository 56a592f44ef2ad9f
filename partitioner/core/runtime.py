"""What a device runs, and the exact simulation of a cluster with failed devices.

A device holds the model *skeleton* (the graph outside the stages, with the parameters every
device needs) and its *shard* (for each stage, only the rows of its own neurons). Per stage:

1. `DeviceRuntime.compute_slice(i, x)`: the device's neurons of stage i. For robust, lop and
   nmr the channel-local followers (BatchNorm, ReLU, pooling) run on the slice. For cdc they do
   not: parity only holds for the linear part, so the slice is the pre-activation output.
2. The slices of all devices are gathered into one neuron-major array of the stage's ids (data
   neurons, then cdc parity rows), zeros where no copy arrived, plus the mask of what is missing.
   On a node the mesh does this over the network; `assemble` does it in-process.
3. `finish_stage` (pure): for cdc, every parity row with exactly one missing term recovers it
   by subtraction (CDC Eq. 2); then the followers run on the full tensor with full parameters.
   Whatever is still missing is filled in the stage output, for every method, by the plan's
   fill rule (plan.FILLS): 0 after its followers, exactly as the paper's zero-fill, or its
   expected value; a mean+bn plan also swaps in BatchNorm statistics recalibrated for the
   failed set (see DeviceRuntime and fill.py).

`simulate(...)` applies this to every surviving device of a plan, so its result is exactly what
the cluster computes for the same failed set; the node is tested against it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from robustdice.partitioner.core.plan import Plan, StagePlan, load_plan, plan_dir, sha256_file
from robustdice.partitioner.core.serving_stages import serving_stages
from robustdice.partitioner.core.stages import (Stage, StagedModel, apply_followers, compute_linear, follower_params,
                                                from_neuron_major, parity_params, slice_params, to_neuron_major,
                                                trace_stages)
from robustdice.partitioner.errors import PlanError
from robustdice.partitioner.zoo.checkpoint import state_digest

SHARD_FORMAT = "robustdice-shard"
SHARD_VERSION = 1
SHARD_DIR = "shards"


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer, in key order (names, dtypes, shapes, bytes)."""
    return state_digest(model.state_dict())


def shard_stage_entry(stage: Stage, stage_plan: StagePlan, device: int,
                      fill: Optional[Mapping[str, torch.Tensor]] = None,
                      recal_sets: Sequence[int] = ()) -> Dict[str, torch.Tensor]:
    """The tensors of one stage that `device` needs; rows follow `stage_plan.holders(device)`.

    A device may hold data rows and parity rows (robust+cdc): the parity rows' tensors then
    sit under `parity.*` and compute_slice appends their outputs after the data rows'.
    `fill` (see fill.py) holds this stage's fill values ("fill", every neuron: any device may
    fill any lost neuron) and its recalibrated BatchNorm statistics ("f{j}.recal_mean" and
    "f{j}.recal_var", one row per failed set listed in "recal_sets", indices into the plan's
    fill sets); only the rows of sets in `recal_sets` (those this device survives) and the
    channels it normalises are kept.
    """
    after = stage_plan.followers_after_gather
    data_ids = list(stage_plan.assignment[device])
    entry = slice_params(stage, data_ids, with_followers=not after)
    rows = stage_plan.parity.rows_on(device) if stage_plan.parity is not None else []
    if rows:
        par = parity_params(stage, [stage_plan.parity.members[j] for j in rows])
        if data_ids:
            entry.update({f"parity.{k}": v for k, v in par.items()})
        else:  # a parity-only device (cdc) keeps the layout plans had before robust+cdc
            entry = par
    if after:
        entry.update(follower_params(stage))  # followers run on the full tensor: full parameters
    if fill is not None:
        if "fill" in fill:
            entry["fill"] = fill["fill"].clone()
        channels = None if after else torch.as_tensor(data_ids, dtype=torch.long)
        survived = set(recal_sets)
        pick = torch.as_tensor([r for r, g in enumerate(fill.get("recal_sets", torch.zeros(0)).tolist())
                                if g in survived], dtype=torch.long)
        if "recal_sets" in fill:
            entry["recal_sets"] = fill["recal_sets"].index_select(0, pick).clone()
        for key, table in fill.items():
            if key.endswith((".recal_mean", ".recal_var")):
                table = table.index_select(0, pick)
                entry[key] = (table if channels is None else table.index_select(1, channels)).clone()
    entry["ids"] = torch.as_tensor(stage_plan.holders(device), dtype=torch.long)
    return entry


def build_shard(staged: StagedModel, plan_stages: Sequence[StagePlan], device: int,
                fill: Optional[Mapping[str, Mapping[str, torch.Tensor]]] = None,
                fill_sets: Sequence[Sequence[int]] = ()) -> Dict[str, object]:
    """Device's shard; `fill` maps stage names to their fill tensors (see shard_stage_entry),
    `fill_sets` lists the plan's failed sets (FillSpec.sets)."""
    recal_sets = [j for j, f in enumerate(fill_sets) if device not in f]
    return {
        "stages": {s.name: shard_stage_entry(s, sp, device, None if fill is None else fill.get(s.name), recal_sets)
                   for s, sp in zip(staged.stages, plan_stages)},
        "shared": staged.shared_state(),
    }


def shard_path(directory, device: int) -> Path:
    return Path(directory) / SHARD_DIR / f"{device}.pt"


def save_shard(shard: Mapping[str, object], plan_hash: str, device: int, directory) -> Path:
    path = shard_path(directory, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(shard)
    payload.update({"format": SHARD_FORMAT, "version": SHARD_VERSION, "plan_hash": plan_hash, "device": device})
    torch.save(payload, path)
    return path


def load_shard(plan: Plan, directory, device: int) -> Dict[str, object]:
    """Load device's shard and check it belongs to `plan` (hash, device, file digest)."""
    if not 0 <= device < plan.devices:
        raise PlanError(f"device {device} is not in the plan (devices 0..{plan.devices - 1})")
    path = shard_path(plan_dir(directory), device)
    record = plan.shards.get(str(device))
    if not path.exists():
        raise PlanError(f"shard for device {device} is missing: {path}")
    # The digest is required: a signed plan.json vouches for the shards through it alone.
    if not isinstance(record, Mapping) or not isinstance(record.get("sha256"), str):
        raise PlanError(f"plan field shards.{device}.sha256 is missing: the plan cannot vouch for {path}")
    if sha256_file(path) != record["sha256"]:
        raise PlanError(f"shard {path} does not match the plan (corrupt, or from another plan)")
    try:
        shard = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged zip/pickle
        raise PlanError(f"shard {path} cannot be read: {type(exc).__name__}") from None
    if not isinstance(shard, dict) or shard.get("format") != SHARD_FORMAT:
        raise PlanError(f"{path} is not a RobustDiCE shard")
    if shard.get("plan_hash") != plan.plan_hash:
        raise PlanError(f"shard {path} belongs to plan {str(shard.get('plan_hash'))[:12]}…, "
                        f"not to this plan {plan.plan_hash[:12]}…")
    if shard.get("device") != device:
        raise PlanError(f"shard {path} is for device {shard.get('device')}, not {device}")
    return shard


def place(tensors: Mapping[str, torch.Tensor], device="cpu", dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """A stage entry on `device`, its floating tensors in `dtype` (the plan's shards stay float32
    on disk; a node computing in float16 casts them at load). Neuron ids stay on the CPU: they
    drive the assembly's bookkeeping, and are copied to the device where an index needs them."""
    out = {}
    for key, t in tensors.items():
        if key == "ids":
            out[key] = t
        elif t.is_floating_point():
            out[key] = t.to(device=device, dtype=dtype or t.dtype)
        else:
            out[key] = t.to(device=device)
    return out


def place_model(staged: StagedModel, device="cpu", dtype: Optional[torch.dtype] = None) -> StagedModel:
    """The skeleton's own parameters and buffers on `device` in `dtype` (floating ones only)."""
    staged.skeleton.to(device=device, dtype=dtype) if dtype is not None else staged.skeleton.to(device=device)
    return staged


def refuse_rocoin(plan: Plan) -> None:
    """A rocoin plan has no stages and no model skeleton: each board runs a whole student, then
    one gather and the head (rocoin_device.RocoinDeviceRuntime on a node, RocoinCluster in one
    process). What builds a skeleton says so instead of failing on what the plan lacks."""
    if plan.rocoin is not None:
        raise PlanError(f"plan {plan.plan_hash[:12]} is a rocoin plan (students and a head, one gather per frame): "
                        f"it has no stages to build a model skeleton for; its devices run "
                        f"rocoin_device.RocoinDeviceRuntime")


def build_skeleton(plan: Plan, shared: Mapping[str, torch.Tensor]) -> StagedModel:
    """The model's graph on the meta device, with the shared parameters of a shard loaded.

    Nothing of the full model is materialised: the stage layers stay on the meta device (only
    their hyperparameters are read) and their weights come from the shard. A user's own model
    is built from the graph the plan carries, so a board needs torch, not the user's code.
    """
    from robustdice.partitioner.zoo.architecture import build as build_architecture
    from robustdice.partitioner.zoo.models import build_model

    refuse_rocoin(plan)
    with torch.device("meta"):
        if plan.architecture is not None:
            model = build_architecture(plan.architecture)
        else:
            model = build_model(plan.model, weights="none", seed=plan.seed)
    staged = trace_stages(model)
    names = [s.name for s in staged.stages]
    if names != [s.name for s in plan.stages]:
        raise PlanError(f"plan stages do not match model {plan.model}: "
                        f"first difference at {next((a, b) for a, b in zip(names + [''], [s.name for s in plan.stages] + ['']) if a != b)}")
    try:
        staged.skeleton.load_state_dict(dict(shared), strict=True, assign=True)
    except RuntimeError as exc:
        raise PlanError(f"shard's shared parameters do not fit model {plan.model}: {str(exc).splitlines()[0]}") from None
    return staged


class DeviceRuntime:
    """One device's view: the skeleton, its shard, and the plan.

    `failed` arguments are the devices known to have failed when a stage runs (for a slice,
    those missing at the previous stage's gather; for `finish`, those missing at this one).
    They choose the recalibrated BatchNorm statistics of a mean+bn plan, and nothing else.
    """

    def __init__(self, plan: Plan, staged: StagedModel, shard: Mapping[str, object], device: int) -> None:
        self.plan = plan
        self.staged = staged
        self.device = device
        self.entries: List[Dict[str, torch.Tensor]] = [shard["stages"][s.name] for s in plan.stages]
        # Per stage, the row of its recalibrated statistics for each failed set that has one.
        self._recal_rows = [
            {frozenset(plan.fill.sets[g]): r for r, g in enumerate(e["recal_sets"].tolist())}
            if "recal_sets" in e and plan.fill.rule == "mean+bn" else {} for e in self.entries]

    def ids(self, i: int) -> torch.Tensor:
        return self.entries[i]["ids"]

    def params(self, i: int, failed: Iterable[int] = ()) -> Mapping[str, torch.Tensor]:
        """Stage i's tensors, with the BatchNorm statistics recalibrated for `failed` if any."""
        entry = self.entries[i]
        row = self._recal_rows[i].get(frozenset(failed))
        if row is None:  # no failure, or one whose losses do not reach this stage
            return entry
        params = dict(entry)
        for key in list(entry):
            if key.endswith(".recal_mean"):
                base = key[: -len(".recal_mean")]
                params[f"{base}.running_mean"] = entry[key][row]
                params[f"{base}.running_var"] = entry[f"{base}.recal_var"][row]
        return params

    def compute_slice(self, i: int, x: torch.Tensor, failed: Iterable[int] = ()) -> torch.Tensor:
        """This device's outputs of stage i, neuron-major, rows in `ids(i)` order."""
        stage, entry = self.staged.stages[i], self.entries[i]
        y = compute_linear(stage, entry, x)
        if "parity.weight" in entry:  # data rows, then this device's parity rows
            par = {k[len("parity."):]: v for k, v in entry.items() if k.startswith("parity.")}
            y = torch.cat([y, compute_linear(stage, par, x)], dim=stage.channel_dim)
        if not self.plan.stages[i].followers_after_gather:
            y = apply_followers(stage, self.params(i, failed), y)
        return to_neuron_major(y, stage.channel_dim)

    def finish(self, i: int, full: torch.Tensor, missing: torch.Tensor,
               failed: Iterable[int] = ()) -> Tuple[torch.Tensor, torch.Tensor]:
        return finish_stage(self.staged.stages[i], self.plan.stages[i], full, missing, self.params(i, failed))

    def start(self, x: torch.Tensor) -> FrameRun:
        """A frame suspended at its first stage, with this device's slice computed."""
        return FrameRun(self, x)

    def run(self, x: torch.Tensor,
            gather: Callable[[int, torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]],
            on_stage: Optional[Callable[[int, torch.Tensor], None]] = None) -> torch.Tensor:
        """Run one input; `gather(i, ids, slice) -> (full neuron-major, missing mask)`.

        A gather may return a third value, the failed devices of that stage (see `finish`).
        """
        known: List[frozenset] = [frozenset()]

        def stage_fn(i: int, t: torch.Tensor) -> torch.Tensor:
            gathered = gather(i, self.ids(i), self.compute_slice(i, t, known[0]))
            full, missing = gathered[0], gathered[1]
            if len(gathered) > 2:
                known[0] = frozenset(gathered[2])
            out, zero_mask = self.finish(i, full, missing, known[0])
            if on_stage is not None:
                on_stage(i, zero_mask)
            return out
        return self.staged.run(x, stage_fn)


class FrameRun:
    """One input's way through a device's stages, one stage at a time.

    The same computation as `DeviceRuntime.run`, but suspended between stages instead of
    calling a blocking `gather`: `stage`, `ids` and `slice` say what this device computed and
    must share; `advance(full, missing)` takes the gathered stage and computes the next slice.
    When it returns True the frame is done and `logits` holds the output. Nothing here waits,
    so one thread can keep many frames in flight (the node's dataflow engine).
    """

    def __init__(self, runtime: "DeviceRuntime", x: torch.Tensor) -> None:
        self.runtime = runtime
        self.zero_masks: List[torch.Tensor] = []
        self.logits: Optional[torch.Tensor] = None
        self.failed: frozenset = frozenset()   # the devices missing at the last gather
        self._steps = runtime.staged.steps(x)
        self._enter(next(self._steps))

    def _enter(self, step: Tuple[int, torch.Tensor]) -> None:
        self.stage, stage_input = step
        self.ids = self.runtime.ids(self.stage)
        self.slice = self.runtime.compute_slice(self.stage, stage_input, self.failed)

    def advance(self, full: torch.Tensor, missing: torch.Tensor, failed: Iterable[int] = ()) -> bool:
        """Finish the current stage from its gathered output; True when the frame is done.

        `failed`: the devices whose slices did not arrive at this stage (a mean+bn plan picks
        its BatchNorm statistics by it, here and for the next stage's slice).
        """
        self.failed = frozenset(failed)
        out, zero_mask = self.runtime.finish(self.stage, full, missing, self.failed)
        self.zero_masks.append(zero_mask)
        try:
            self._enter(self._steps.send(out))
        except StopIteration as end:
            self.logits = end.value
            self.slice = None
            return True
        return False

    def close(self) -> None:
        """Abandon the frame (its intermediate tensors are released)."""
        self._steps.close()


def recover_parity(stage_plan: StagePlan, full: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
    """cdc: fill each data neuron that is the only missing term of its parity row, in place.

    Returns the updated missing mask. Row j: parity_j = Σ members; if exactly one of the row's
    members and its parity value is missing and it is a member, member = parity − Σ others.
    """
    if stage_plan.parity is None:
        return missing
    missing = missing.clone()
    c = stage_plan.neurons
    for j, members in enumerate(stage_plan.parity.members):
        if not members or missing[c + j]:
            continue
        lost = [m for m in members if missing[m]]
        if len(lost) != 1:
            continue
        others = [m for m in members if m != lost[0]]
        value = full[c + j] - (full[others].sum(0) if others else 0)
        full[lost[0]] = value
        missing[lost[0]] = False
    return missing


def finish_stage(stage: Stage, stage_plan: StagePlan, full: torch.Tensor, missing: torch.Tensor,
                 params: Mapping[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Assembled ids → the stage output (channel layout), and the mask of filled neurons.

    A lost neuron's output after the followers is 0 (zero-fill), or `params["fill"]` where the
    plan's fill rule gave one (its expected value).
    """
    c = stage_plan.neurons
    missing = recover_parity(stage_plan, full, missing)
    zero_mask = missing[:c]
    y = from_neuron_major(full[:c], stage.channel_dim)
    fill = params.get("fill")
    if stage_plan.followers_after_gather:
        y = apply_followers(stage, params, y)
    if bool(zero_mask.any()) and (stage_plan.followers_after_gather or fill is not None):
        y = to_neuron_major(y, stage.channel_dim).clone()
        lost = torch.nonzero(zero_mask).flatten()
        if fill is None:
            y[lost] = 0
        else:
            y[lost] = fill[lost].to(y.dtype).reshape((-1,) + (1,) * (y.dim() - 1)).expand_as(y[lost])
        y = from_neuron_major(y, stage.channel_dim)
    return y, zero_mask


def _placement(total_ids: int, id_lists: Sequence[np.ndarray]) -> Tuple[List[Optional[np.ndarray]], np.ndarray]:
    """Which rows of each piece land where when the first copy of each id wins.

    Returns, per piece, None (every row is used) or the indices of the rows used; and the mask
    of ids that no piece holds.
    """
    missing = np.ones(total_ids, dtype=bool)
    keep: List[Optional[np.ndarray]] = []
    for index in id_lists:
        fresh = missing[index]
        if fresh.all():  # the usual case: no replica of a row already written
            keep.append(None)
        else:
            keep.append(np.flatnonzero(fresh))
        missing[index[fresh]] = False
    return keep, missing


def assemble(total_ids: int, pieces: Iterable[Tuple[torch.Tensor, torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """In-process gather: first copy of each id wins; zeros and missing=True where none came."""
    pieces = [(ids, values) for ids, values in pieces]
    keep, missing = _placement(total_ids, [ids.numpy() for ids, _ in pieces])
    return _fill(total_ids, pieces, keep, torch.from_numpy(missing), bool(missing.any()))


def _fill(total_ids: int, pieces, keep, missing: torch.Tensor, any_missing: bool):
    template = pieces[0][1]
    device = template.device
    # Not zeros: each row is written once, by its first copy or by the zero-fill at the end.
    full = template.new_empty((total_ids,) + tuple(template.shape[1:]))
    for (ids, values), rows in zip(pieces, keep):
        ids = ids if ids.device == device else ids.to(device)
        if rows is None:
            full.index_copy_(0, ids, values)
        elif len(rows):
            rows = torch.from_numpy(rows).to(device)
            full.index_copy_(0, ids[rows], values[rows])
    missing = missing if missing.device == device else missing.to(device)
    if any_missing:
        full[missing] = 0
    return full, missing


class Assembler:
    """`assemble` for one plan, when pieces come from known devices: the placement of each
    device's rows is worked out once per (stage, contributing devices) and reused, which a node
    assembling every stage of every frame needs. Devices are taken in index order, as the
    simulation does, so the result is the simulation's."""

    CACHE = 512

    def __init__(self, plan: Plan, device="cpu") -> None:
        self.plan = plan
        self.stages = serving_stages(plan)   # a rocoin plan's one: its students' channels
        # On the compute device: index_copy_ needs its indices where the tensors are.
        self.ids = [[torch.as_tensor(s.holders(d), dtype=torch.long).to(device) for d in range(plan.devices)]
                    for s in self.stages]
        self.counts = [[len(s.holders(d)) for d in range(plan.devices)] for s in self.stages]
        self._layouts: Dict[Tuple[int, Tuple[int, ...]], tuple] = {}

    def assemble(self, stage: int, rows: Mapping[int, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """`rows`: device -> its slice of `stage` (rows in the plan's order for that device)."""
        counts = self.counts[stage]
        devices = tuple(sorted(d for d in rows if counts[d]))
        key = (stage, devices)
        layout = self._layouts.get(key)
        if layout is None:
            total = self.stages[stage].total_ids
            keep, missing = _placement(total, [np.asarray(self.stages[stage].holders(d), dtype=np.int64)
                                               for d in devices])
            device = self.ids[stage][0].device
            # Per device: (its rows used, or None for all; where they land). Worked out here once,
            # not indexed again at every frame: a replica's rows are copied by one index_select.
            copies = []
            for d, k in zip(devices, keep):
                if k is None:
                    copies.append((d, None, self.ids[stage][d]))
                elif len(k):
                    rows_used = torch.from_numpy(k).to(device)
                    copies.append((d, rows_used, self.ids[stage][d][rows_used]))
            missing_ids = torch.from_numpy(np.flatnonzero(missing)).to(device)
            layout = (total, copies, torch.from_numpy(missing).to(device), missing_ids if len(missing_ids) else None)
            if len(self._layouts) >= self.CACHE:
                self._layouts.pop(next(iter(self._layouts)))
            self._layouts[key] = layout
        total, copies, missing, missing_ids = layout
        if not devices:  # nobody holds anything of this stage here: all zero
            any_rows = next(iter(rows.values()))
            full = any_rows.new_zeros((total,) + tuple(any_rows.shape[1:]))
            return full, missing
        template = rows[devices[0]]
        full = template.new_empty((total,) + tuple(template.shape[1:]))
        for d, rows_used, at in copies:
            full.index_copy_(0, at, rows[d] if rows_used is None else rows[d].index_select(0, rows_used))
        if missing_ids is not None:
            full.index_fill_(0, missing_ids, 0)
        return full, missing


class Cluster:
    """Every device of a plan in one process, for simulation and evaluation."""

    def __init__(self, directory, device="cpu", dtype: torch.dtype = torch.float32) -> None:
        self.plan = load_plan(directory)
        self.device, self.dtype = torch.device(device), dtype
        shards = [load_shard(self.plan, directory, d) for d in range(self.plan.devices)]
        self.rocoin = None
        if self.plan.rocoin is not None:   # students and a head, no stages (rocoin_runtime.py)
            from robustdice.partitioner.core.rocoin_runtime import RocoinCluster
            self.rocoin = RocoinCluster(self.plan, shards, self.device, dtype)
            self.devices, self.shard_bytes = [], self.rocoin.shard_bytes
            return
        self.staged = place_model(build_skeleton(self.plan, shards[0]["shared"]), self.device, dtype)
        placed = [{"stages": {name: place(e, self.device, dtype) for name, e in s["stages"].items()}} for s in shards]
        self.devices = [DeviceRuntime(self.plan, self.staged, s, d) for d, s in enumerate(placed)]
        self.shard_bytes = [sum(t.numel() * t.element_size() for e in s["stages"].values()
                                for k, t in e.items() if k != "ids")
                            + sum(t.numel() * t.element_size() for t in s["shared"].values())
                            for s in shards]

    def simulate(self, x: torch.Tensor, failed: Iterable[int] = (),
                 zero_masks: Optional[Dict[int, torch.Tensor]] = None,
                 stage_shapes: Optional[Dict[int, torch.Size]] = None) -> torch.Tensor:
        """Logits the cluster computes for `x` when the devices in `failed` are down (float32 on
        the CPU, whatever the cluster's device and dtype).

        Each stage runs as on the nodes: the slices are computed knowing the failed set of the
        previous gather (none before the first), and finished knowing this stage's.
        `zero_masks` and `stage_shapes`, when given, receive each stage's filled-neuron mask and
        output shape.
        """
        failed = frozenset(failed)
        if self.rocoin is not None:
            return self.rocoin.simulate(x, failed)
        alive = [d for d in self.devices if d.device not in failed]
        if not alive:
            raise PlanError("every device failed: nothing computes")
        plan = self.plan

        def stage_fn(i: int, t: torch.Tensor) -> torch.Tensor:
            known = failed if i > 0 else frozenset()
            pieces = [(d.ids(i), d.compute_slice(i, t, known)) for d in alive]
            full, missing = assemble(plan.stages[i].total_ids, pieces)
            out, zero_mask = alive[0].finish(i, full, missing, failed)
            if zero_masks is not None:
                zero_masks[i] = zero_mask
            if stage_shapes is not None:
                stage_shapes[i] = out.shape
            return out

        with torch.inference_mode():
            out = self.staged.run(x.to(device=self.device, dtype=self.dtype), stage_fn)
            return out.to(device="cpu", dtype=torch.float32)


def simulate(directory, x: torch.Tensor, failed: Sequence[int] = ()) -> torch.Tensor:
    """The pure reference: what the cluster of plan `directory` outputs with `failed` down."""
    return Cluster(directory).simulate(x, failed)
