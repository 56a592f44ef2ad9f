"""Logging that a flood cannot turn into a flood of log lines.

`RateLimitedLog.log(key, ...)` writes the first line of a key at once, then at most one line per
`interval_s` per key, each saying how many were left out since the last one. 10,000 garbage
messages give a handful of lines, and the counters keep the exact numbers.
"""
from __future__ import annotations

import logging
from typing import Dict, Tuple

DEFAULT_INTERVAL_S = 10.0


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._last: Dict[str, Tuple[float, int]] = {}   # key -> (when last written, suppressed since)

    def log(self, key: str, level: int, now_s: float, msg: str, *args, exc_info=None) -> bool:
        """Write `msg % args` unless `key` was written less than `interval_s` ago; True if written."""
        last_s, suppressed = self._last.get(key, (None, 0))
        if last_s is not None and now_s - last_s < self.interval_s:
            self._last[key] = (last_s, suppressed + 1)
            return False
        if suppressed:
            msg = f"{msg} (and {suppressed} more like it in the last {now_s - last_s:.0f} s)"
        self.logger.log(level, msg, *args, exc_info=exc_info)
        self._last[key] = (now_s, 0)
        return True
