"""glibc malloc settings for the training stages on the CPU.

The chunked loss makes and frees a few [chunk, V] float32 temporaries per chunk (8 MB each at 256
positions and an 8k vocabulary). With glibc's defaults those come back as fresh pages from the
kernel nearly every time: blocks this size are mmap'd, or the heap top is trimmed on free, and a
fresh page is zeroed on first touch: tens of thousands of page faults per training step, a
measurable share of the step (benchmarks/RESULTS.md, "Page faults"). Keeping blocks up to 32 MB on
the heap and the freed heap top mapped removes them: the process keeps up to 1 GB of freed memory
for reuse, as jemalloc and tcmalloc (which PyTorch's CPU tuning guide recommends preloading) do by
design.

Skipped when the C library is not glibc, when the user set MALLOC_MMAP_THRESHOLD_ or
MALLOC_TRIM_THRESHOLD_ themselves, or with MIXCPT_MALLOC_TUNING=0.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
MMAP_THRESHOLD = 32 * 2**20  # the largest glibc accepts on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 2**30


def keep_freed_memory() -> bool:
    """Set glibc's mmap threshold to 32 MB and its trim threshold to 1 GB for this process (both
    must be set: setting either one turns off glibc's adaptive threshold). Idempotent. Returns
    True when the settings are in effect, False when skipped (see the module docstring)."""
    if os.environ.get("MIXCPT_MALLOC_TUNING", "1") == "0":
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return (
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    )
