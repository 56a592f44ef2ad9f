"""The fault schedule of a stream: which device is killed, paused, resumed or restarted at which frame.

    --kill D@FRAME   --restart D@FRAME   --pause D@FROM:TO
"""
from __future__ import annotations

import dataclasses
import re
from typing import List, Optional, Sequence

from ..errors import NodeError


@dataclasses.dataclass(frozen=True)
class Fault:
    kind: str          # kill | restart | pause | resume
    device: int
    frame: int


def parse_faults(kills: Sequence[str], restarts: Sequence[str], pauses: Sequence[str],
                 devices: Optional[int]) -> List[Fault]:
    """The fault schedule, checked; device indices are checked against `devices` unless None."""
    faults: List[Fault] = []
    for kind, specs in (("kill", kills), ("restart", restarts)):
        for spec in specs:
            m = re.fullmatch(r"(\d+)@(\d+)", spec.strip())
            if not m:
                raise NodeError(f"--{kind} {spec!r}: expected DEVICE@FRAME, e.g. 2@150")
            faults.append(Fault(kind, int(m.group(1)), int(m.group(2))))
    for spec in pauses:
        m = re.fullmatch(r"(\d+)@(\d+):(\d+)", spec.strip())
        if not m or int(m.group(3)) <= int(m.group(2)):
            raise NodeError(f"--pause {spec!r}: expected DEVICE@FROM:TO with TO > FROM, e.g. 1@100:200")
        faults += [Fault("pause", int(m.group(1)), int(m.group(2))), Fault("resume", int(m.group(1)), int(m.group(3)))]
    for f in faults:
        if devices is not None and not 0 <= f.device < devices:
            option = "pause" if f.kind == "resume" else f.kind
            raise NodeError(f"--{option}: device {f.device} is not in the plan (0..{devices - 1})")
    for f in faults:
        if f.kind == "restart" and not any(k.kind == "kill" and k.device == f.device and k.frame < f.frame for k in faults):
            raise NodeError(f"--restart {f.device}@{f.frame}: device {f.device} is not killed before frame {f.frame}")
    return sorted(faults, key=lambda f: (f.frame, f.kind != "kill"))
