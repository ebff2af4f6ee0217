"""kill -9 at random moments, during checkpoint writes too: the resumed run is the
uninterrupted one, loss for loss and parameter for parameter."""
import os
import random
import time

import jax
import numpy as np
import pytest

from tfx.train.checkpoint import Checkpoints
from tfx.train.experiment import Experiment

from runs import finish, losses, tiny_multi30k, train_py, wait_for_step

KILLS = 3  # each kill restarts train.py (about 10 s); kills 1 and 3 wait for a checkpoint write.
STEPS = 120
RUN = dict(num_train_steps=STEPS, checkpoint_every_steps=10, schedule="rsqrt", log_every_steps=1)


def _latest_logged_step(workdir) -> int:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    for line in reversed(lines):
        if line.startswith(b'{"split": "train", "step": '):
            return int(line.split(b'"step": ')[1].split(b",")[0])
    return 0


def _saving(workdir) -> bool:
    directory = os.path.join(workdir, "checkpoints")
    return os.path.isdir(directory) and any(".orbax-checkpoint-tmp" in name for name in os.listdir(directory))


def chaos_seed() -> int:
    """$TFX_CHAOS_SEED (a failed run's, to replay its kill steps and pauses), else a fresh seed."""
    given = os.environ.get("TFX_CHAOS_SEED", "").strip()
    if not given:
        return random.SystemRandom().randrange(2**32)
    if not given.isdigit():
        raise ValueError(f"TFX_CHAOS_SEED={given!r}: give the non-negative integer a chaos run printed.")
    return int(given)


def test_the_seed_is_fresh_unless_TFX_CHAOS_SEED_gives_it(monkeypatch):
    monkeypatch.delenv("TFX_CHAOS_SEED", raising=False)
    assert len({chaos_seed() for _ in range(3)}) > 1
    monkeypatch.setenv("TFX_CHAOS_SEED", "1234")
    assert chaos_seed() == 1234
    monkeypatch.setenv("TFX_CHAOS_SEED", "12a")
    with pytest.raises(ValueError, match="TFX_CHAOS_SEED='12a'"):
        chaos_seed()


def test_random_kills_resume_to_the_uninterrupted_run(tmp_path, data_dir):
    seed = chaos_seed()
    print(f"chaos seed {seed}; replay with TFX_CHAOS_SEED={seed}")  # pytest shows it on failure.
    rng = random.Random(seed)
    straight = train_py(tmp_path / "straight", data_dir, **RUN)
    wait_for_step(tmp_path / "straight", 1, straight)  # the data is prepared once, by this run.

    workdir = tmp_path / "killed"
    killed_while_saving = 0
    for kill in range(KILLS):
        run = train_py(workdir, data_dir, **RUN)
        start = _latest_logged_step(workdir)
        target = start + rng.randint(1, 25)
        during_save = kill % 2 == 0  # every other kill waits for a checkpoint write in flight.
        deadline = time.time() + 120
        while run.poll() is None and time.time() < deadline:
            step = _latest_logged_step(workdir)
            if (during_save and step >= target and _saving(workdir)) or (not during_save and step >= target):
                break
            time.sleep(0.002)
        assert run.poll() is None, f"seed {seed}: the run ended before kill {kill + 1}"
        if not during_save:
            time.sleep(rng.uniform(0, 0.05))
        killed_while_saving += _saving(workdir)
        run.kill()
        run.wait()
    finish(train_py(workdir, data_dir, **RUN))
    finish(straight)

    assert killed_while_saving >= 1, f"seed {seed}: no kill landed in a checkpoint write"
    expected, got = losses(tmp_path / "straight"), losses(workdir)
    assert sorted(got) == list(range(1, STEPS + 1)) and got == expected, f"seed {seed}"
    template = Experiment(tiny_multi30k(data_dir)).state
    a = Checkpoints(str(tmp_path / "straight")).restore(STEPS, template)
    b = Checkpoints(str(workdir)).restore(STEPS, template)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"seed {seed}")
