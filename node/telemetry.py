"""Process and board telemetry: psutil everywhere, jtop power rails on a Jetson.

Energy is reported only when jtop's service answers; elsewhere it is "not available", never an
invented number.
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
