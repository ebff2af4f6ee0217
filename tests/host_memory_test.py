import os
import platform
import subprocess
import sys

import pytest

from tfx import host_memory

# Mallocs, touches and frees a 256 MB block twice on a worker thread (as XLA:CPU allocates a
# step's temporaries) and prints the page faults of the second time.
SECOND_TOUCH_FAULTS = """
import ctypes, resource, threading
import tfx
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def touch(n=256 * 2**20):
    block = libc.malloc(n)
    ctypes.memset(block, 1, n)
    libc.free(block)
def second_touch_faults():
    touch()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    touch()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
faults = []
worker = threading.Thread(target=second_touch_faults)
worker.start()
worker.join()
print(faults[0])
"""

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc settings")


def _second_touch_faults(**env) -> int:
    environ = {k: v for k, v in os.environ.items() if k not in host_memory._USER_SETTINGS}
    run = subprocess.run([sys.executable, "-c", SECOND_TOUCH_FAULTS], env={**environ, **env},
                         capture_output=True, text=True, check=True)
    return int(run.stdout)


@glibc_only
def test_freed_block_is_reused_without_page_faults():
    pages = 256 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    assert _second_touch_faults() < pages // 100
    # A user's own malloc setting is left alone: glibc's default maps the block afresh.
    assert _second_touch_faults(MALLOC_ARENA_MAX="8") > pages // 2


@glibc_only
def test_user_settings_stand(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert host_memory.keep_freed_memory() is False
