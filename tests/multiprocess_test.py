"""Multi-process training (2 processes x 4 CPU devices over gloo on 127.0.0.1), restoring a
checkpoint onto another mesh or device count, and a process that dies."""
import os
import shutil
import signal
import time

import pytest

from tfx.train.checkpoint import Checkpoints

from runs import finish, losses, train_py, train_py_processes, wait_for_step

# rsqrt: the learning rate does not depend on num_train_steps, so a run continued to more
# steps equals one that was always going to. Two data shards feed the 16-row global batch.
RUN = dict(schedule="rsqrt", per_device_batch_size=4, num_train_steps=6, checkpoint_every_steps=3,
           mesh_shape="data:4,fsdp:1,tensor:2", **{"data.shards": 2})


@pytest.fixture(scope="module")
def single(tmp_path_factory, data_dir):
    """One process with 8 devices: 6 steps, then continued to 9 on the same mesh."""
    workdir = tmp_path_factory.mktemp("single")
    finish(train_py(workdir, data_dir, **RUN))
    first = losses(workdir)
    finish(train_py(workdir, data_dir, **{**RUN, "num_train_steps": 9}))
    return first, losses(workdir)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, data_dir, single):
    """The same 6 steps on 2 processes of 4 devices; returns the workdir and the outputs."""
    workdir = tmp_path_factory.mktemp("two")
    outputs = [finish(run) for run in train_py_processes(workdir, data_dir, 2, 4, **RUN)]
    return workdir, outputs


def test_two_processes_reach_the_losses_of_one(two_processes, single):
    workdir, outputs = two_processes
    expected, got = single[0], losses(workdir)
    assert sorted(got) == list(range(1, 7))
    assert got == pytest.approx(expected, rel=1e-5)
    # Logging is process 0's; the checkpoint holds the data position of both processes' shards.
    (out0, err0), (out1, err1) = outputs
    assert "training data:" in out0 and "step 6/6: loss" in out0
    assert "training data:" not in out1 and "step 6/6" not in out1
    assert sorted(os.listdir(workdir / "checkpoints" / "6" / "data")) == [
        "commit_success.txt", "shard_0-of-2.json", "shard_1-of-2.json"]


@pytest.mark.parametrize("devices, overrides", [
    (8, {"mesh_shape": "data:1,fsdp:8,tensor:1", "per_device_batch_size": 2}),
    (4, {"mesh_shape": "data:2,fsdp:1,tensor:2", "per_device_batch_size": 8}),
])
def test_checkpoint_restores_onto_another_mesh_and_device_count(
        two_processes, single, tmp_path, data_dir, devices, overrides):
    """Saved by 2 processes on data=4,tensor=2; continued by one process on another mesh
    (same global batch): the losses of the run that never left the original mesh."""
    workdir = tmp_path / "elastic"
    _copy_checkpoint(two_processes[0], workdir, step=6)
    out, _ = finish(train_py(workdir, data_dir, devices, **{**RUN, **overrides, "num_train_steps": 9}))
    assert "resuming from step 6" in out
    expected = {step: loss for step, loss in single[1].items() if step > 6}
    got = {step: loss for step, loss in losses(workdir).items() if step > 6}
    assert got == pytest.approx(expected, rel=1e-4)


def test_a_changed_global_batch_is_refused_unless_the_data_is_reset(two_processes, tmp_path, data_dir):
    workdir = tmp_path / "smaller"
    _copy_checkpoint(two_processes[0], workdir, step=6)
    smaller = {**RUN, "mesh_shape": "data:2,fsdp:1,tensor:2", "num_train_steps": 7}
    run = train_py(workdir, data_dir, 4, **smaller)
    _, err = run.communicate(timeout=300)
    assert run.returncode != 0
    assert "global batch of 16 rows, but this run's is 8" in err and "reset_position" in err
    out, _ = finish(train_py(workdir, data_dir, 4, **smaller, **{"data.reset_position": True}))
    assert "resuming from step 6" in out and "data afresh" in out and 7 in losses(workdir)


@pytest.mark.parametrize("broken", ["data position of shard 1", "array file"])
def test_a_checkpoint_that_does_not_restore_everywhere_is_skipped_by_both(
        two_processes, single, tmp_path, data_dir, broken):
    """Step 6 lacks the data position of shard 1, which only process 1 reads (its check finds
    that), or has a truncated array file (the restore on both finds that): the processes agree
    on step 3 and both resume from it, process 0 moves step 6 aside once they have, and the
    losses are those of the uninterrupted run."""
    workdir = tmp_path / "broken"
    shutil.copytree(two_processes[0], workdir)
    step_6 = workdir / "checkpoints" / "6"
    if broken == "array file":
        largest = max((step_6 / "state" / "d").iterdir(), key=os.path.getsize)
        os.truncate(largest, os.path.getsize(largest) // 2)
    else:
        os.remove(step_6 / "data" / "shard_1-of-2.json")
    (out0, err0), (_, err1) = [finish(p) for p in train_py_processes(
        workdir, data_dir, 2, 4, **{**RUN, "num_train_steps": 9})]
    assert "resuming from step 3" in out0
    if broken == "array file":
        for err in (err0, err1):  # the check passes; the restore meets it on both.
            assert f"skipping checkpoint step 6: {step_6} does not restore (ValueError: OUT_OF_RANGE" in err
    else:
        assert f"skipping checkpoint step 6: {step_6} does not restore on process 1" in err0
        assert f"skipping checkpoint step 6: {step_6} does not restore (FileNotFoundError: " in err1
        assert "shard_1-of-2.json is missing" in err1
    (moved,) = os.listdir(workdir / "corrupt_checkpoints")
    assert moved.startswith("6-") and Checkpoints(str(workdir)).steps() == [3, 6, 9]
    assert losses(workdir) == pytest.approx(single[1], rel=1e-5)


def test_a_signal_to_one_process_saves_the_same_step_on_both_and_resumes_to_the_same_losses(
        tmp_path, data_dir, single):
    """SIGTERM reaches process 1 only: both agree on the step to save at and exit cleanly;
    restarted, they finish with the losses of the uninterrupted single-process run."""
    workdir = tmp_path / "preempted"
    run = {**RUN, "num_train_steps": 9}
    first, second = train_py_processes(workdir, data_dir, 2, 4, **run)
    wait_for_step(workdir, 2, first)
    second.send_signal(signal.SIGTERM)
    outputs = [finish(p) for p in (first, second)]
    saved = Checkpoints(str(workdir)).latest_step()
    assert 2 <= saved < 9
    assert f"a signal to another process: saved step {saved}, exiting." in outputs[0][0]
    assert f"SIGTERM: saved step {saved}, exiting." in outputs[1][0]
    for p in train_py_processes(workdir, data_dir, 2, 4, **run):
        finish(p)
    assert losses(workdir) == pytest.approx(single[1], rel=1e-5)


def test_a_dead_process_stops_the_other_and_a_restart_resumes(tmp_path, data_dir):
    """SIGKILL one of two processes: the other exits with an error within the heartbeat
    timeout, not hanging in a collective; both restarted resume from the last checkpoint."""
    workdir = tmp_path / "dead"
    endless = {**RUN, "num_train_steps": 10_000, "distributed.heartbeat_timeout_s": 5}
    survivor, victim = train_py_processes(workdir, data_dir, 2, 4, **endless)
    wait_for_step(workdir, 4, survivor)
    deadline = time.time() + 120
    while not os.path.isdir(workdir / "checkpoints" / "3") and time.time() < deadline:
        time.sleep(0.1)  # the asynchronous save of step 3 is complete once renamed.
    victim.send_signal(signal.SIGKILL)
    killed_at = time.time()
    _, err = survivor.communicate(timeout=120)
    assert survivor.returncode != 0 and time.time() - killed_at < 60
    assert "stopped sending heartbeats" in err or "another task died" in err, err[-3000:]
    victim.wait()

    saved = Checkpoints(str(workdir)).latest_step()
    assert saved >= 3
    restarted = train_py_processes(workdir, data_dir, 2, 4, **{**endless, "num_train_steps": saved + 2})
    out, _ = [finish(run) for run in restarted][0]
    assert f"resuming from step {saved}" in out
    # The killed run may have logged steps past `saved`; the restart ends with its own final save.
    assert Checkpoints(str(workdir)).latest_step() == saved + 2


def _copy_checkpoint(source_workdir, workdir, step: int):
    """A new workdir holding only checkpoint `step` of `source_workdir`."""
    shutil.copytree(source_workdir / "checkpoints" / str(step), workdir / "checkpoints" / str(step))
