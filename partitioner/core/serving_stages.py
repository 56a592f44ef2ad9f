"""The stages a node serves for a plan: what its handler gathers and its engine computes.

A split plan (robust, lop, nmr, cdc, ...) is served stage by stage: its `stages`. A rocoin plan
has no stages (plan.py): each board runs its group's student on the whole input and the boards
gather once per frame, the partitions' features, before every participant runs the teacher's
head. A node serves it as one stage whose neurons are the teacher's final-convolution channels
(named after that layer, `RocoinSpec.feature_layer`, as every stage is named after its layer)
and whose holders are the groups: device d holds its group's channels, in its student's output
order. The members of a group are then replicas of each other, and the gather's own rules give
RoCoIn's (rocoin_runtime.RocoinCluster.simulate): the first copy of each channel wins, a replica
that adds nothing is never waited for, and a partition whose whole group failed is missing,
filled by the plan's fill after the gather (rocoin_device.py).

Pure: no torch, so that the event handler (which has none) reads its stages here.
"""
from __future__ import annotations

from typing import Tuple

from robustdice.partitioner.core.plan import Plan, RocoinSpec, StagePlan


def rocoin_stage(spec: RocoinSpec) -> StagePlan:
    """The one stage a rocoin plan is served as (see the module docstring)."""
    groups = spec.device_groups
    return StagePlan(name=spec.feature_layer, kind="conv", neurons=spec.feature_shape[0], channel_dim=1,
                     followers=(), assignment=tuple(spec.groups[g].channels for g in groups))


def serving_stages(plan: Plan) -> Tuple[StagePlan, ...]:
    """The stages a node of `plan` serves, in order: the plan's own, or a rocoin plan's one."""
    if plan.rocoin is not None:
        return (rocoin_stage(plan.rocoin),)
    return plan.stages
