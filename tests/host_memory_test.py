import os
import platform
import subprocess
import sys

import pytest

from tfx.core import host_memory

# Imports all of tfx, calls `host_memory.keep_freed_memory_on_cpu` if asked to (as launchers
# do), mallocs, touches and frees a 256 MB block twice on a worker thread (as XLA:CPU allocates
# a step's temporaries) and prints the page faults of the second time.
SECOND_TOUCH_FAULTS = """
import ctypes, resource, sys, threading
import tfx.train.trainer, tfx.infer.evaluate, tfx.infer.translate, tfx.train.plot, tfx.export.ctranslate2, tfx.core.host_memory
from absl import flags
assert "matplotlib.pyplot" not in sys.modules and not flags.FLAGS.is_parsed()
if sys.argv[1] == "launcher":
    assert tfx.core.host_memory.keep_freed_memory_on_cpu()
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


def _second_touch_faults(how: str, **env) -> int:
    environ = {k: v for k, v in os.environ.items()
               if k not in host_memory._USER_SETTINGS + (host_memory.OPT_OUT,)}
    run = subprocess.run([sys.executable, "-c", SECOND_TOUCH_FAULTS, how],
                         env={**environ, "JAX_PLATFORMS": "cpu", **env},
                         capture_output=True, text=True, check=True)
    return int(run.stdout)


@glibc_only
def test_a_launcher_opts_in_to_reusing_freed_blocks_and_importing_tfx_changes_nothing():
    pages = 256 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    assert _second_touch_faults("launcher") < pages // 100
    # Importing tfx leaves glibc's default, which maps the block afresh (and no matplotlib
    # backend is chosen, no absl flags marked parsed: see SECOND_TOUCH_FAULTS).
    assert _second_touch_faults("import") > pages // 2


@glibc_only
def test_user_settings_and_the_opt_out_stand(monkeypatch):
    monkeypatch.setenv(host_memory.OPT_OUT, "0")
    assert host_memory.keep_freed_memory_on_cpu() is False
    monkeypatch.delenv(host_memory.OPT_OUT)
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert host_memory.keep_freed_memory_on_cpu() is False
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert host_memory.keep_freed_memory() is False
