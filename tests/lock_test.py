import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from tfx.core import files
from tfx.data import pipeline
from tfx.train import lock, trainer
from tfx.train.checkpoint import Checkpoints

from runs import ROOT, tiny_multi30k, train_py, train_py_processes, wait_for_step

HOLD = """
import sys, time
from tfx.train import lock
with lock.WorkdirLock(sys.argv[1], timeout_s=300):
    print("held", flush=True)
    time.sleep(600)
"""

# Each line on stdin: a workdir and a time; at that time, tries to take the workdir's lock and
# says "won" or "lost"; the next line ends the round (the winner releases) and it says "done".
RACER = """
import contextlib, sys, time
from tfx.train import lock
for line in sys.stdin:
    workdir, start_at = line.split()
    held = lock.WorkdirLock(workdir, timeout_s=300)
    while time.time() < float(start_at):
        pass
    try:
        with contextlib.redirect_stdout(sys.stderr):
            held.acquire()
        print("won", flush=True)
    except lock.WorkdirLockedError:
        held = None
        print("lost", flush=True)
    sys.stdin.readline()
    if held:
        held.release()
    print("done", flush=True)
"""


@pytest.fixture(params=["local", "gcs"])
def workdir(request, tmp_path) -> str:
    """A fresh workdir on local disk, or on the Cloud Storage emulator."""
    if request.param == "local":
        return str(tmp_path)
    return f"{request.getfixturevalue('gcs_bucket')}/lock-{uuid.uuid4().hex[:8]}"


def this_machine() -> dict[str, str]:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return dict(boot_id=f.read().strip(), pid_namespace=os.readlink("/proc/self/ns/pid"))


def write_lock(workdir: str, **holder) -> dict:
    """Puts a LOCK naming `holder` (over this machine and process, with a fresh heartbeat)
    into `workdir`, as another run would: without asking the lock's current holder."""
    record = dict(host="thief-host", **this_machine(), pid=os.getpid(), process_start="1",
                  started=time.time() - 3600, token="other", heartbeat=time.time())
    record.update(holder)
    files.write_text(files.join(workdir, lock.LOCK_FILE), json.dumps(record))
    return record


def read_lock(workdir: str) -> dict:
    return json.loads(files.path(files.join(workdir, lock.LOCK_FILE)).read_text())


def raises_within(seconds: float, check) -> str:
    """The message of the LockLostError that `check()` raises within `seconds`."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            check()
        except lock.LockLostError as error:
            return str(error)
        time.sleep(0.01)
    raise AssertionError(f"no LockLostError within {seconds} s")


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


def test_the_machine_is_told_by_boot_id_not_hostname(tmp_path):
    """A hostname is reused by containers: a lock from another boot (or another container's pid
    namespace) is judged by its heartbeat even under this hostname, and one from this boot and
    namespace by its pid even under another hostname."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(gone.stdout)
    write_lock(str(tmp_path), host=socket.gethostname(), boot_id="another-boot", pid=dead_pid)
    with pytest.raises(lock.WorkdirLockedError, match=f"host {socket.gethostname()}, pid {dead_pid},"):
        lock.WorkdirLock(str(tmp_path), timeout_s=300).acquire()
    write_lock(str(tmp_path), host=socket.gethostname(), pid_namespace="pid:[1]", pid=dead_pid)
    with pytest.raises(lock.WorkdirLockedError, match=f"pid {dead_pid},"):
        lock.WorkdirLock(str(tmp_path), timeout_s=300).acquire()
    write_lock(str(tmp_path), host="a-reused-name", pid=dead_pid)
    with lock.WorkdirLock(str(tmp_path), timeout_s=300):
        assert read_lock(str(tmp_path))["pid"] == os.getpid()


def test_two_racers_for_a_stale_lock_never_both_win(workdir):
    """100 rounds on local disk, 50 on the emulator: both racers judge the same lock stale at
    the same moment; exactly one takes it, and the lock names that one."""
    racers = [subprocess.Popen([sys.executable, "-c", RACER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, cwd=ROOT) for _ in range(2)]
    try:
        for round_ in range(100 if files.is_local(workdir) else 50):
            directory = files.join(workdir, f"round{round_}")
            if files.is_local(directory):
                os.makedirs(directory)
            write_lock(directory, host=socket.gethostname(), heartbeat=time.time() - 3600)
            start_at = time.time() + 0.01
            lead_s = (round_ % 10) * 30e-6  # interleavings across rounds: one racer a little ahead.
            for racer, delay_s in zip(racers, (0.0, lead_s)[::1 if round_ % 20 < 10 else -1]):
                racer.stdin.write(f"{directory} {start_at + delay_s}\n")
                racer.stdin.flush()
            results = [racer.stdout.readline().strip() for racer in racers]
            assert sorted(results) == ["lost", "won"], f"round {round_}: {results}"
            assert read_lock(directory)["pid"] == racers[results.index("won")].pid
            for racer in racers:
                racer.stdin.write("\n")
                racer.stdin.flush()
            assert [racer.stdout.readline() for racer in racers] == ["done\n", "done\n"]
    finally:
        for racer in racers:
            racer.kill()
            racer.wait()


def test_a_stolen_lock_is_seen_by_the_heartbeat_and_by_a_verifying_check(workdir, monkeypatch):
    monkeypatch.setattr(lock, "HEARTBEAT_S", 3600.0)
    with lock.WorkdirLock(workdir, timeout_s=300) as held:
        held.check(verify=True)
        write_lock(workdir, pid=4242)
        held.check()  # no heartbeat since: not yet seen.
        with pytest.raises(lock.LockLostError, match=r"^lost the lock \S+LOCK: host thief-host, pid 4242, "
                                                     r"started \S+ holds it now\. Two runs must not"):
            held.check(verify=True)
    assert read_lock(workdir)["pid"] == 4242  # the thief's lock is left alone.

    monkeypatch.setattr(lock, "HEARTBEAT_S", 0.01)
    with lock.WorkdirLock(files.join(workdir, "again"), timeout_s=300) as held:
        write_lock(files.join(workdir, "again"), pid=4243)
        assert re.search(r"pid 4243, started \S+ holds it now", raises_within(10, held.check))
    assert read_lock(files.join(workdir, "again"))["pid"] == 4243


def test_a_failing_heartbeat_is_retried_then_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(lock, "HEARTBEAT_S", 0.01)
    failures = []
    rewrite = lock._LocalFile.rewrite

    def full_disk(self, version, text):
        if len(failures) < failures_wanted:
            failures.append(time.time())
            raise OSError(28, "No space left on device")
        return rewrite(self, version, text)

    monkeypatch.setattr(lock._LocalFile, "rewrite", full_disk)
    failures_wanted = 3  # failures for far less than half of timeout_s: the lock stays.
    with lock.WorkdirLock(str(tmp_path / "blip"), timeout_s=10.0) as held:
        deadline = time.time() + 10
        while len(failures) < failures_wanted or read_lock(str(tmp_path / "blip"))["heartbeat"] < failures[-1]:
            assert time.time() < deadline, "no heartbeat after the failures"
            time.sleep(0.01)
        held.check(verify=True)

    failures_wanted = 10**6
    with lock.WorkdirLock(str(tmp_path / "full"), timeout_s=0.2) as held:
        assert re.match(r"the heartbeat of the lock \S+LOCK has failed for \d+ s \(OSError: \[Errno 28\] "
                        r"No space left on device\), so another run could take the lock over; make the "
                        r"workdir writable again, then resume\.$", raises_within(10, held.check))
    assert not (tmp_path / "full" / lock.LOCK_FILE).exists()  # still this run's: released.


def test_a_run_whose_lock_is_stolen_stops_at_a_step_without_saving(tmp_path, data_dir, monkeypatch):
    """The lock is replaced while step 3 is dispatched; step 4 would save, so its stop flags are
    read from the lock itself: the run stops there, saving nothing after step 2."""
    config = tiny_multi30k(data_dir, num_train_steps=8, checkpoint_every_steps=2)
    workdir = str(tmp_path)
    to_global, calls = pipeline.to_global, []

    def stealing_at_step_3(batch, *args):
        if "stop" in batch:  # a train batch.
            calls.append(batch)
            if len(calls) == 3:
                write_lock(workdir, pid=4242)
        return to_global(batch, *args)

    monkeypatch.setattr(trainer.pipeline, "to_global", stealing_at_step_3)
    with pytest.raises(lock.LockLostError, match=r"^stopped at step 4 without saving it: lost the lock "
                                                 r"\S+LOCK: host thief-host, pid 4242,"):
        trainer.train(config, workdir)
    assert [int(batch["stop"].max()) for batch in calls[:4]] == [0, 0, 0, trainer.Preemption.LOCK_LOST]
    assert Checkpoints(workdir).latest_step() == 2
    assert read_lock(workdir)["pid"] == 4242


def test_both_processes_of_a_run_whose_lock_is_stolen_stop_at_the_same_step(tmp_path, data_dir):
    """Process 0 holds the lock; once it is replaced, the next step that would save is read
    from it, and both processes stop at that step, saving nothing after the theft."""
    run = dict(per_device_batch_size=4, num_train_steps=10_000, checkpoint_every_steps=3,
               mesh_shape="data:4,fsdp:1,tensor:2", **{"data.shards": 2})
    processes = train_py_processes(tmp_path, data_dir, 2, 4, **run)
    try:
        wait_for_step(tmp_path, 2, processes[0])
        write_lock(str(tmp_path), pid=4242)
        stopped_at = []
        for process in processes:
            _, err = process.communicate(timeout=60)
            assert process.returncode != 0
            stopped_at.append(re.findall(r"stopped at step (\d+) without saving it: (lost the lock \S+LOCK: "
                                         r"host thief-host, pid 4242,|process 0 lost the lock of )", err))
    finally:
        for process in processes:
            process.kill()
            process.wait()
    (first_stop, first_why), = stopped_at[0]
    assert stopped_at[1] == [(first_stop, "process 0 lost the lock of ")]
    assert first_why.startswith("lost the lock")
    assert Checkpoints(str(tmp_path)).latest_step() < int(first_stop)
    assert read_lock(str(tmp_path))["pid"] == 4242
