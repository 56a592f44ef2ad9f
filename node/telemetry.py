"""Process and board telemetry: psutil everywhere, jtop power rails on a Jetson, NVML elsewhere.

Energy, GPU load and GPU power are reported only when jtop's service or NVML answers; elsewhere
they are "not available", never an invented number.

jtop is jetson-stats' client (`pip install .[jetson]`). What this module uses of it follows
jetson-stats 4.2 (its documented `jtop` class): `jtop()` then `start()` (or the context manager),
`close()`, `ok()`, `stats` (a dict with "GPU" in percent), and `power`, a dict
{"rail": {name: {"volt", "curr", "power", ...}}, "tot": {"volt", "curr", "power"}} in mV, mA, mW.
`start()` raises JtopException where the jtop service does not run (any machine but a Jetson).
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


class EnergyMeter:
    """The board's energy in joules: power readings (mW, at the times they were taken) integrated
    by the trapezoid rule. A missing reading (None) ends the current run of readings: the gap
    is not counted, never guessed. Pure: the caller reads the power and the clock."""

    def __init__(self) -> None:
        self.joules = 0.0
        self.covered_s = 0.0             # the time the integral spans (gaps excluded)
        self._last: Optional[tuple] = None   # (t_s, mW) of the previous reading

    def sample(self, now_s: float, power_mw: Optional[float]) -> None:
        if power_mw is None:
            self._last = None
            return
        if self._last is not None and now_s > self._last[0]:
            t0, p0 = self._last
            self.joules += (now_s - t0) * (p0 + power_mw) / 2.0 / 1000.0
            self.covered_s += now_s - t0
        self._last = (now_s, float(power_mw))
