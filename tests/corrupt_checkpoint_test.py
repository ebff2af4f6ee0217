"""Checkpoints that are listed but do not restore: resume and `latest` fall back, named."""
import json
import os
import shutil

import pytest

from tfx.train import rundir, trainer
from tfx.train.checkpoint import Checkpoints, CorruptCheckpointError

from runs import tiny_multi30k


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
    elif how == "empty step directory":
        shutil.rmtree(step_dir)
        step_dir.mkdir()


@pytest.mark.parametrize("how", ["truncated array file", "missing metadata file", "empty step directory"])
def test_latest_falls_back_to_the_newest_checkpoint_that_restores(run, tmp_path, data_dir, how, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(run, workdir)
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


def test_resume_moves_a_corrupt_checkpoint_aside_and_continues_as_from_the_one_before(run, tmp_path, data_dir):
    workdir = tmp_path / "run"
    shutil.copytree(run, workdir)
    corrupt(workdir / "checkpoints" / "8", "truncated array file")
    trainer.train(tiny_multi30k(data_dir, num_train_steps=12, schedule="rsqrt"), str(workdir))
    (moved,) = os.listdir(workdir / "corrupt_checkpoints")
    assert moved.startswith("8-") and Checkpoints(str(workdir)).steps() == [4, 8, 12]
    with open(workdir / "metrics.jsonl") as f:  # every record: the first run's 8, then the resumed run's.
        train = [(r["step"], r["loss"]) for r in map(json.loads, f) if r["split"] == "train"]
    first, resumed = dict(train[:8]), dict(train[8:])
    assert sorted(resumed) == list(range(5, 13))
    assert {s: resumed[s] for s in range(5, 9)} == {s: first[s] for s in range(5, 9)}
