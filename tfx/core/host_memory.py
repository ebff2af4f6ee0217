"""Host memory reuse: freed memory stays with the process instead of going back to the OS.

XLA:CPU allocates a step's temporaries as one large block from a worker thread each time it
runs the step. glibc serves a block that large with a fresh `mmap` and unmaps it when freed,
so every step faults in and zeroes its temporaries anew: page faults and kernel time that
are a sizeable part of a CPU train step.
With one malloc arena, no `mmap` and no trimming, the freed block is reused as it is (the
process keeps its peak heap, as accelerator allocators keep theirs). This is what the
MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_ environment variables would do.

It is process-wide and cannot be undone, and it suits XLA:CPU only, so importing tfx does not
apply it: launchers call `keep_freed_memory_on_cpu()` before their first computation.
TFX_KEEP_FREED_MEMORY=0, or any glibc malloc variable of your own, leaves glibc as it is.
"""
from __future__ import annotations

import ctypes
import glob
import os
import platform

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
OPT_OUT = "TFX_KEEP_FREED_MEMORY"
ACCELERATOR_DEVICES = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*", "/dev/kfd")
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


def keep_freed_memory_on_cpu() -> bool:
    """For launchers: `keep_freed_memory()` when JAX will compute on the CPU, unless
    TFX_KEEP_FREED_MEMORY=0; returns whether it applied the settings.

    Call it before JAX starts its backend (any device query or computation): XLA's threads
    allocate when the backend starts, and threads that have allocated keep their arenas. So
    the backend is judged without starting it: JAX_PLATFORMS if set, else whether the machine
    has an accelerator device file (NVIDIA, TPU, AMD).
    """
    if os.environ.get(OPT_OUT, "1") == "0":
        return False
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        on_cpu = platforms.split(",")[0].strip() == "cpu"
    else:
        on_cpu = not any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICES)
    return on_cpu and keep_freed_memory()
