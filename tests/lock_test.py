import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tfx.train import lock

from runs import ROOT, train_py

HOLD = """
import sys, time
from tfx.train import lock
with lock.WorkdirLock(sys.argv[1], timeout_s=300):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_run_on_the_workdir_refuses_in_one_line_naming_the_holder(tmp_path, data_dir):
    with lock.WorkdirLock(str(tmp_path), timeout_s=300):
        run = train_py(tmp_path, data_dir)
        out, err = run.communicate(timeout=300)
    assert run.returncode == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"train.py: {tmp_path} is in use by another run "
                                                   f"(host {socket.gethostname()}, pid {os.getpid()}, started ")
    assert not (tmp_path / "checkpoints").exists()
    assert not (tmp_path / lock.LOCK_FILE).exists()  # released by its holder.


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE,
                              text=True, cwd=ROOT)
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(lock.WorkdirLockedError, match=f"pid {holder.pid}, started"):
        lock.WorkdirLock(str(tmp_path), timeout_s=300).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with lock.WorkdirLock(str(tmp_path), timeout_s=300):
        with open(tmp_path / lock.LOCK_FILE) as f:
            assert json.load(f)["pid"] == os.getpid()
    assert not (tmp_path / lock.LOCK_FILE).exists()


def test_another_hosts_lock_is_stale_only_when_its_heartbeat_is_old(tmp_path):
    def write(heartbeat_age_s):
        with open(tmp_path / lock.LOCK_FILE, "w") as f:
            json.dump(dict(host="elsewhere", pid=os.getpid(), process_start="1", started=time.time() - 3600,
                           heartbeat=time.time() - heartbeat_age_s), f)

    write(heartbeat_age_s=10)
    with pytest.raises(lock.WorkdirLockedError, match="in use by another run \\(host elsewhere"):
        lock.WorkdirLock(str(tmp_path), timeout_s=300).acquire()
    write(heartbeat_age_s=301)
    with lock.WorkdirLock(str(tmp_path), timeout_s=300):
        with open(tmp_path / lock.LOCK_FILE) as f:
            assert json.load(f)["host"] == socket.gethostname()
