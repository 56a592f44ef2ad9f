"""One device of a rocoin plan on a node: its student, the head and the fill, served as one stage.

A node serves a rocoin plan as the single stage serving_stages.rocoin_stage gives: the teacher's
final-convolution channels, device d holding its group's. The engine drives it like any plan's
`DeviceRuntime` (runtime.py), through the same interface:

    start(x)                   the student on the whole input: the frame's `slice` is this
                               device's channels, neuron-major (rows in `ids(0)` order), as
                               every slice is
    advance(full, missing, failed)   the gathered channels (runtime.Assembler: the first copy of
                               each wins, zeros where none came) with the channels of a whole
                               failed group replaced by the plan's fill (zero, or the teacher's
                               mean features), then the head: `logits`; returns True, the frame
                               is done after its one gather

This is RocoinCluster.simulate (rocoin_runtime.py, the one definition of what a rocoin plan
computes) spread over the nodes: there the first surviving device of each group gives its
partition, here the first copy to arrive, which is the same values (the devices of a group run
the same student on the same input); a partition no device delivered is filled with the fill
of the device running the head, which is every device's. The student, head and fill come from
the shard through rocoin_runtime.device_parts, as the simulation takes them: built from the
graphs the plan stores, never from code.
"""
from __future__ import annotations

from typing import Iterable, List, Mapping, Optional

import torch

from robustdice.partitioner.core.plan import Plan
from robustdice.partitioner.core.rocoin_runtime import device_parts
from robustdice.partitioner.core.serving_stages import rocoin_stage
from robustdice.partitioner.core.stages import from_neuron_major, to_neuron_major


class RocoinDeviceRuntime:
    """What a node's engine runs of a rocoin plan (the counterpart of runtime.DeviceRuntime)."""

    def __init__(self, plan: Plan, shard: Mapping, device: int, compute="cpu", dtype=torch.float32) -> None:
        self.plan, self.device = plan, device
        self.stage = rocoin_stage(plan.rocoin)
        self.student, self.head, self.fill = device_parts(plan, shard, device, torch.device(compute), dtype)
        for module in (self.student, self.head):   # weights to run, never to train
            module.requires_grad_(False)
        self._ids = torch.as_tensor(self.stage.holders(device), dtype=torch.long)

    def ids(self, i: int) -> torch.Tensor:
        return self._ids

    def start(self, x: torch.Tensor) -> "RocoinRun":
        return RocoinRun(self, x)


class RocoinRun:
    """One input through a rocoin device: runtime.FrameRun's interface, with one stage."""

    def __init__(self, runtime: RocoinDeviceRuntime, x: torch.Tensor) -> None:
        self.runtime = runtime
        self.stage = 0
        self.ids = runtime.ids(0)
        self.zero_masks: List[torch.Tensor] = []
        self.logits: Optional[torch.Tensor] = None
        self.failed: frozenset = frozenset()
        self.slice: Optional[torch.Tensor] = to_neuron_major(runtime.student(x), 1)

    def advance(self, full: torch.Tensor, missing: torch.Tensor, failed: Iterable[int] = ()) -> bool:
        """`full`: every channel, neuron-major (C, B, h, w); `missing`: the channels no copy of
        reached (a whole group failed). Fills them, runs the head; True: the frame is done."""
        self.failed = frozenset(failed)
        features = from_neuron_major(full, 1)
        if bool(missing.any()):
            features = features.clone()
            lost = torch.nonzero(missing).flatten()
            features[:, lost] = self.runtime.fill[lost].to(features.dtype)
        self.zero_masks.append(missing)
        self.logits = self.runtime.head(features.contiguous())
        self.slice = None
        return True

    def close(self) -> None:
        """Abandon the frame (nothing is held between its start and its one gather but the slice)."""
        self.slice = None
