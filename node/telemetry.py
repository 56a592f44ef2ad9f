"""Process and board telemetry: psutil everywhere, jtop power rails on a Jetson, NVML elsewhere.

Energy, GPU load and GPU power are reported only when jtop's service or NVML answers; elsewhere
they are "not available", never an invented number.
"""
from __future__ import annotations

import logging
from typing import Dict, Iterable, Optional

import psutil

log = logging.getLogger(__name__)


def rss_bytes(pids: Iterable[int]) -> Dict[str, int]:
    out = {}
    for pid in pids:
        try:
            out[str(pid)] = psutil.Process(pid).memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


class Power:
    """Board power in milliwatts from jtop (INA3221 rails), or None when not available."""

    def __init__(self) -> None:
        self._jtop = None
        self.reason = "jtop not installed"
        try:
            from jtop import jtop
        except Exception:  # jetson-stats absent or broken: not a Jetson for our purposes
            return
        try:
            handle = jtop()
            handle.start()
            self._jtop = handle
            self.reason = ""
        except Exception as exc:  # JtopException off-Jetson: the jtop service is not running
            self.reason = f"jtop service not available ({type(exc).__name__})"

    @property
    def available(self) -> bool:
        return self._jtop is not None

    def total_mw(self) -> Optional[float]:
        if self._jtop is None:
            return None
        try:
            power = self._jtop.power
            total = power.get("tot") or {}
            return float(total.get("power")) if total.get("power") is not None else None
        except Exception:  # a closing service: report not available rather than fail status
            return None

    def close(self) -> None:
        if self._jtop is not None:
            try:
                self._jtop.close()
            except Exception:
                pass
            self._jtop = None


class Gpu:
    """GPU utilisation, memory and power: jtop on a Jetson (its service is already open in
    `power`), NVML (the `nvidia-ml-py` package) elsewhere; an empty reading with the reason when
    neither answers. The handler never imports torch, so the engine reports its own allocations."""

    def __init__(self, power: Power) -> None:
        self.power = power
        self._nvml = None
        self.reason = "no GPU reading: jtop's service is not available and NVML (nvidia-ml-py) is not"
        if power.available:
            self.reason = ""
            return
        try:
            import pynvml
            pynvml.nvmlInit()
            self._nvml = pynvml
            self.reason = ""
        except Exception:  # absent package, or no driver: not a GPU machine for our purposes
            pass

    def read(self, pids: Iterable[int] = ()) -> Dict[str, object]:
        try:
            if self.power.available:
                stats = self.power._jtop.stats  # noqa: SLF001 - jtop's own reading
                return {"source": "jtop", "utilisation_pct": stats.get("GPU")}
            if self._nvml is not None:
                nv = self._nvml
                handle = nv.nvmlDeviceGetHandleByIndex(0)
                mine = set(pids)
                used = sum(p.usedGpuMemory or 0 for p in nv.nvmlDeviceGetComputeRunningProcesses(handle)
                           if p.pid in mine)
                return {"source": "nvml", "name": nv.nvmlDeviceGetName(handle),
                        "utilisation_pct": nv.nvmlDeviceGetUtilizationRates(handle).gpu,
                        "power_mw": nv.nvmlDeviceGetPowerUsage(handle), "node_memory_bytes": used}
        except Exception as exc:  # a driver hiccup must not fail status
            return {"source": None, "note": f"{type(exc).__name__}: {exc}"[:200]}
        return {"source": None, "note": self.reason}
