"""Keep freed memory in the process while the offline commands run.

glibc's malloc gives every block above its mmap threshold (dynamic, at most 32 MB on 64-bit)
its own mapping and hands it back to the kernel when freed; it also trims the heap's free top
once that passes twice the threshold. Scoring, fills, evaluation and distillation make and free
tensors of the same large sizes thousands of times, and each new one faults its pages in again,
zeroed by the kernel. Here no block of the main arena gets its own mapping (M_MMAP_MAX 0; a
thread's arena still maps a block over 64 MiB on its own) and the heap keeps up to 1 GiB of free
top, so freed blocks are reused. Measured on Lite0 (2026-12-08): `robustdice finetune --steps 10`
of its default plan 86.0 s (57.6 s in the kernel, 15.7 M page faults) before, 50.4 s (9.4 s,
2.4 M) after, its peak memory 3.76 GB before and 4.26 GB after; its default partition 101.8 s
(13.5 s, 3.3 M) with only the thresholds raised, 95.2 s (2.6 s, 0.6 M) with no mapping at all,
the same plan. s3's ablation chunks had been the worst case (scores.ABLATION_BUDGET_ELEMENTS):
with 96 MB chunks and glibc's defaults the robust partition faulted 12.7 million times and spent
41 of its 56 s in the kernel.

Only for the offline commands that run on a workstation: a node, and `robustdice profile` that
measures a board for it, run on boards whose memory the GPU shares, and keep glibc's defaults.
"""
from __future__ import annotations

import ctypes
import ctypes.util

# mallopt's parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4      # how many blocks may have their own mapping at once
TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024     # 1 GiB


def keep_freed_memory() -> bool:
    """Every block from the heap, and the heap's free top kept, for this process; False where the
    C library has no mallopt (musl, macOS) or refuses a value, which then keeps its default."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
