"""partitioner/allocator.py: the offline commands keep freed memory for reuse instead of giving
it back to the kernel and faulting fresh pages in for the next large tensor (Lite0's partition:
12.7 million page faults, 41 s of 56 in the kernel, when it also made 96 MB chunks; Lite0's
distillation 86 s before, 50 s after)."""
import ctypes
import ctypes.util
import os
import platform
import subprocess
import sys

import pytest

# A 100 MB block (above glibc's largest mmap threshold), malloc'd and freed: where it came from
# (its own mapping, or the heap) and what the heap keeps of it once freed, from glibc's mallinfo2.
PROGRAM = """
import ctypes, ctypes.util, sys
from robustdice.partitioner.allocator import keep_freed_memory

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
if sys.argv[1] == "keep":
    assert keep_freed_memory()
block = libc.malloc(100 * 1024 * 1024)
ctypes.memset(block, 1, 100 * 1024 * 1024)
mapped = libc.mallinfo2().hblkhd
libc.free(block)
print(mapped, libc.mallinfo2().fordblks)
"""
MB = 1024 * 1024


def block_fate(mode: str):
    """(bytes in their own mappings while the block lives, free bytes the heap keeps after)."""
    # glibc's own malloc with its defaults: no preloaded allocator, no tunables from the environment
    env = {k: v for k, v in os.environ.items()
           if k != "LD_PRELOAD" and not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    mapped, kept = (int(v) for v in out.stdout.split())
    return mapped, kept


def _has_mallinfo2() -> bool:
    if platform.libc_ver()[0] != "glibc":
        return False
    return hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallinfo2")


@pytest.mark.skipif(not _has_mallinfo2(), reason="mallopt and mallinfo2 (glibc >= 2.33) are glibc's")
def test_a_freed_large_block_stays_in_the_heap_for_the_next():
    mapped, kept = block_fate("default")
    assert mapped >= 100 * MB and kept < 100 * MB, (mapped, kept)   # its own mapping, unmapped when freed
    mapped, kept = block_fate("keep")
    assert mapped < 100 * MB and kept >= 100 * MB, (mapped, kept)   # from the heap, and kept there
