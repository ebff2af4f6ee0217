"""Checkpoints that are listed but do not restore: resume and `latest` fall back, named, and
move the corrupt ones aside; any other error of reading one stops the run and moves nothing."""
import json
import os
import shutil

import jax
import orbax.checkpoint as ocp
import pytest

from tfx.core import cli
from tfx.train import rundir, steps, trainer
from tfx.train.checkpoint import (CheckpointReadError, Checkpoints, CorruptCheckpointError,
                                  is_corruption)

from runs import tiny_multi30k, train_py


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):
    """A tiny run with checkpoints at steps 4 and 8 (rsqrt: continuing it to more steps
    changes no learning rate)."""
    workdir = tmp_path_factory.mktemp("run")
    trainer.train(tiny_multi30k(data_dir, num_train_steps=8, schedule="rsqrt"), str(workdir))
    return workdir


def corrupt(step_dir, how: str):
    if how == "truncated array file":
        data = step_dir / "state" / "d"  # the arrays, merged from each process's files.
        largest = max((data / name for name in os.listdir(data)), key=os.path.getsize)
        with open(largest, "r+b") as f:
            f.truncate(os.path.getsize(largest) // 2)
    elif how == "missing metadata file":
        os.remove(step_dir / "state" / "_METADATA")
    elif how == "unparseable metadata":
        (step_dir / "state" / "_METADATA").write_text('{"tree_metadata": {"params": ')
    elif how == "empty step directory":
        shutil.rmtree(step_dir)
        step_dir.mkdir()


def copy_of(run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(run, workdir)
    return workdir


@pytest.mark.parametrize("how", ["truncated array file", "missing metadata file", "empty step directory"])
def test_latest_falls_back_to_the_newest_checkpoint_that_restores(run, tmp_path, data_dir, how, caplog):
    workdir = copy_of(run, tmp_path)
    corrupt(workdir / "checkpoints" / "8", how)
    config = tiny_multi30k(data_dir)
    state = trainer.Experiment(config).state

    label, _ = rundir.restore_params(str(workdir), "latest", state.params)
    assert label == "step4"
    assert any(f"skipping checkpoint step 8: {workdir}/checkpoints/8 does not restore" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(CorruptCheckpointError, match=f"^--checkpoint=8: {workdir}/checkpoints/8 does not restore"):
        rundir.restore_params(str(workdir), "8", state.params)
    with pytest.raises(CorruptCheckpointError, match=f"--checkpoint=average:2: {workdir}/checkpoints/8 does"):
        rundir.restore_params(str(workdir), "average:2", state.params)
    assert (workdir / "checkpoints" / "8").exists()  # reading tools leave the workdir alone.


def train_records(workdir) -> list[tuple[int, float]]:
    with open(workdir / "metrics.jsonl") as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if r["split"] == "train"]


@pytest.mark.parametrize("how", ["truncated array file", "unparseable metadata"])
def test_resume_moves_a_corrupt_checkpoint_aside_and_continues_as_from_the_one_before(
        run, tmp_path, data_dir, how, monkeypatch):
    """The resumed run restores into the abstract state: no random initial state is made."""
    workdir = copy_of(run, tmp_path)
    corrupt(workdir / "checkpoints" / "8", how)
    monkeypatch.setattr(steps, "random_state", lambda *_: pytest.fail("a resume made a random state"))
    trainer.train(tiny_multi30k(data_dir, num_train_steps=12, schedule="rsqrt"), str(workdir))
    (moved,) = os.listdir(workdir / "corrupt_checkpoints")
    assert moved.startswith("8-") and Checkpoints(str(workdir)).steps() == [4, 8, 12]
    train = train_records(workdir)  # every record: the first run's 8, then the resumed run's.
    first, resumed = dict(train[:8]), dict(train[8:])
    assert sorted(resumed) == list(range(5, 13))
    assert {s: resumed[s] for s in range(5, 9)} == {s: first[s] for s in range(5, 9)}


# Errors that say nothing of the files, as the reads of orbax, TensorStore and gcsfs raise them.
FAILURES = {
    "permission": PermissionError(13, "Permission denied", "checkpoints/8/state/d/1a2b"),
    "permission on gcs": ValueError('PERMISSION_DENIED: Error reading "params.w/0.0" in OCDBT '
                                    'database at gs://b/run/checkpoints/8/state/: HTTP response code: 403'),
    "network": ConnectionResetError(104, "Connection reset by peer"),
    "network on gcs": ValueError('UNAVAILABLE: Error reading "params.w/0.0": HTTP response code: 503'),
    "out of memory": jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 268435456 bytes."),
    "newer format": ValueError('DATA_LOSS: Error opening "zarr" driver: Error decoding manifest: '
                               "Maximum supported version is 0 but received: 1"),
}


@pytest.mark.parametrize("what", ["arrays", "metadata"])
@pytest.mark.parametrize("failure", FAILURES)
def test_a_read_failure_stops_the_run_naming_the_checkpoint_and_moves_nothing(
        run, tmp_path, data_dir, monkeypatch, failure, what):
    workdir = copy_of(run, tmp_path)
    error = FAILURES[failure]

    def fail(*args, **kwargs):
        raise error
    monkeypatch.setattr(ocp.StandardCheckpointHandler, "restore" if what == "arrays" else "metadata", fail)
    with pytest.raises(CheckpointReadError) as raised:
        trainer.train(tiny_multi30k(data_dir, num_train_steps=12, schedule="rsqrt"), str(workdir))
    message = str(raised.value)
    assert message.startswith(f"{workdir}/checkpoints/8 could not be read ({type(error).__name__}: ")
    assert "nothing was moved" in message and "\n" not in message
    assert isinstance(raised.value, cli.ERRORS)  # train.py prints it as its one line.
    assert not (workdir / "corrupt_checkpoints").exists()
    assert Checkpoints(str(workdir)).steps() == [4, 8] and len(train_records(workdir)) == 8


def test_a_workdir_whose_checkpoints_all_fail_is_refused_not_trained_from_step_0(run, tmp_path, data_dir):
    """Even with config.init_from: train.py exits 1 with one line that names the checkpoints,
    why, and how to start afresh on purpose; nothing is moved or trained."""
    workdir = copy_of(run, tmp_path)
    corrupt(workdir / "checkpoints" / "8", "missing metadata file")
    corrupt(workdir / "checkpoints" / "4", "unparseable metadata")
    result = train_py(workdir, data_dir, init_from=str(run))
    _, stderr = result.communicate(timeout=300)
    assert result.returncode == 1, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"train.py: no checkpoint in {workdir}/checkpoints restores (step 8: ")
    assert "; step 4: " in last and "JSONDecodeError" in last and "FileNotFoundError" in last
    assert last.endswith(f"nothing was moved. To start afresh on purpose, move {workdir}/checkpoints "
                         "away or use another workdir.")
    assert "Traceback" not in stderr
    assert not (workdir / "corrupt_checkpoints").exists() and len(train_records(workdir)) == 8


@pytest.mark.parametrize("error, corruption", [
    (FileNotFoundError(2, "No such file or directory"), True),
    (json.JSONDecodeError("Expecting value", "", 0), True),
    (ValueError('NOT_FOUND: Error reading "params.v/.zarray" in OCDBT database'), True),
    (ValueError("OUT_OF_RANGE: Requested byte range [0, 1938183) is not valid for value of size 969271"), True),
    (ValueError("DATA_LOSS: Error decoding manifest: Length in header (115) does not match actual length (57)"), True),
    (ValueError('FAILED_PRECONDITION: Error reading local file "state/_sharding": Invalid JSON'), True),
    (ValueError("FAILED_PRECONDITION: Truncated Zstd-compressed stream; at byte 0"), True),
    (ValueError("FAILED_PRECONDITION: ZSTD_decompressStream() failed: Unknown frame descriptor"), True),
    (ValueError('FAILED_PRECONDITION: Error opening "zarr" driver: Expected "shape" of [4] but received: [8]'), False),
    (ValueError("DATA_LOSS: Maximum supported version is 0 but received: 1"), False),
    (ValueError("DATA_LOSS: Unsupported compression format: 7"), False),
    (ValueError("PERMISSION_DENIED: HTTP response code: 403"), False),
    (ValueError("UNAVAILABLE: HTTP response code: 503"), False),
    (PermissionError(13, "Permission denied"), False),
    (TimeoutError("timed out"), False),
    (MemoryError(), False),
    (KeyError("params"), False),
])
def test_only_missing_truncated_or_unparseable_files_are_corruption(error, corruption):
    """As TensorStore and orbax word them (seen on real checkpoints with files deleted,
    truncated or overwritten); a wrapper is judged by the error it was raised from."""
    assert is_corruption(error) is corruption
    try:
        raise Exception("Encountered error while reading array index") from error
    except Exception as wrapped:
        assert is_corruption(wrapped) is corruption
