"""Keep freed memory in the process while the offline commands run.

glibc's malloc gives every block above its mmap threshold (at most 32 MB on 64-bit) its own
mapping and hands it back to the kernel when freed; it also trims the heap's free top once that
passes twice the threshold. Scoring, fills and evaluation make and free tensors of the same
large sizes thousands of times, and each new one faults its pages in again, zeroed by the
kernel. With the threshold fixed at glibc's ceiling and the heap's free top kept, freed blocks
are reused: `robustdice partition --model efficientnet_lite0 --method robust --fill mean
--memory 0.5` made 2.0-2.2 million page faults and spent 7.9-8.4 s in the kernel, against
2.9-4.1 million and 9.6-15.7 s with glibc's defaults (two runs each, alternating, 2026-12-08).
The larger share of what it saved came from s3's ablation chunks, now sized under the ceiling
(scores.ABLATION_BUDGET_ELEMENTS): with chunks of 96 MB the same partition faulted 12.7 million
times and spent 41 of its 56 s in the kernel.

Only for the offline commands: a node runs for months on a board whose memory the GPU shares,
and keeps glibc's defaults.
"""
from __future__ import annotations

import ctypes
import ctypes.util

# mallopt's parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024    # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: mallopt refuses more
TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where the C library has
    no mallopt (musl, macOS) or refuses the values, which then keep their defaults."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
