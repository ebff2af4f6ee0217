"""Host memory reuse: freed memory stays with the process instead of going back to the OS.

XLA:CPU allocates a step's temporaries as one block (1.1 GB for :base at batch 16 x 64) from
a worker thread each time it runs the step. glibc serves a block that large with a fresh
`mmap` and unmaps it when freed, so every step faults in and zeroes its temporaries anew:
280,000 page faults and 0.5-1 s of kernel time a :base step on a 2-core CPU, a quarter of it.
With one malloc arena, no `mmap` and no trimming, the freed block is reused as it is (the
process keeps its peak heap, as accelerator allocators keep theirs). This is what the
MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_ environment variables would do,
applied when tfx is imported, before JAX starts its threads.
"""
from __future__ import annotations

import ctypes
import os
import platform

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_USER_SETTINGS = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Applies the settings above; returns whether it did.

    Does nothing off glibc, or when the user has set any glibc malloc variable (their choice
    stands). Threads that have already allocated keep their own arenas, so call it before
    JAX's first computation.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in _USER_SETTINGS):
        return False
    mallopt = ctypes.CDLL(None).mallopt
    # -1 as glibc's size_t: never trim.
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    return all(mallopt(param, value) == 1 for param, value in settings)
