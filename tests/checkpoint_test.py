import json
import os
import subprocess
import sys
import uuid

import jax.numpy as jnp
import numpy as np

from tfx.core import config as config_lib
from tfx.core import files
from tfx.train import budget
from tfx.train.checkpoint import Checkpoints
from tfx.train.steps import TrainState


def state_at(step: int) -> TrainState:
    return TrainState(step=jnp.asarray(step, jnp.int32), params={"w": jnp.full((4,), float(step))},
                      opt_state=(), rng=jnp.zeros((2,), jnp.uint32))


def test_keeps_the_latest_k_and_the_best_by_bleu(tmp_path):
    config = config_lib.default_config()
    config.keep_checkpoints = 2
    checkpoints = Checkpoints(str(tmp_path), config)
    for step, bleu in zip(range(1, 7), [5.0, 9.0, 3.0, None, 4.0, 2.0]):
        checkpoints.save(state_at(step), metrics=None if bleu is None else {"bleu": bleu})
    checkpoints.wait()
    assert checkpoints.steps() == [2, 5, 6]  # best BLEU (step 2) and the latest two
    restored = checkpoints.restore(2, state_at(0))
    np.testing.assert_array_equal(restored.params["w"], np.full((4,), 2.0))
    assert int(restored.step) == 2
    checkpoints.close()


def test_average_is_the_mean_of_the_parameters_and_keeps_the_last_state(tmp_path):
    config = config_lib.default_config()
    checkpoints = Checkpoints(str(tmp_path), config)
    for step in (2, 4, 9):
        checkpoints.save(state_at(step))
    checkpoints.wait()
    averaged = checkpoints.average([2, 4, 9], state_at(0))
    np.testing.assert_allclose(averaged.params["w"], np.full((4,), 5.0))
    assert int(averaged.step) == 9
    checkpoints.close()


# Opens and at once closes the checkpoints of fresh workdirs, as a run that fails before its
# first save does; orbax's background clean-up of temporary directories must not outlive close.
OPEN_AND_CLOSE = """
import sys, tempfile
from tfx.core import config as config_lib
from tfx.train.checkpoint import Checkpoints
for _ in range(int(sys.argv[1])):
    Checkpoints(tempfile.mkdtemp(dir=sys.argv[2]), config_lib.default_config()).close()
"""


def test_closing_before_the_first_save_leaves_no_background_error(tmp_path):
    run = subprocess.run([sys.executable, "-c", OPEN_AND_CLOSE, "30", str(tmp_path)],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr[-2000:]


def test_on_cloud_storage_a_resume_falls_back_moves_the_corrupt_step_aside_and_keeps_the_plan(gcs_bucket):
    """gs:// paths stay gs:// (not made absolute as local ones); moving aside copies and
    deletes; the budget's plan saved with a checkpoint brings train_steps.json back."""
    workdir = f"{gcs_bucket}/checkpoints-{uuid.uuid4().hex[:8]}"
    config = config_lib.default_config()
    config.train_minutes = 2.0
    checkpoints = Checkpoints(workdir, config)
    plan = {"train_minutes": 2.0, "num_train_steps": 9, "step_time_s": 0.1, "timed_steps": 2,
            "planned_at_step": 3}
    checkpoints.plan = plan
    for step in (4, 8):
        checkpoints.save(state_at(step))
    checkpoints.wait()
    assert checkpoints.directory == f"{workdir}/checkpoints" and checkpoints.saved_plan(8) == plan
    (files.path(checkpoints.directory) / "8" / "state" / "_METADATA").unlink()
    step, restored = checkpoints.resume(state_at(0))
    assert step == 4 and int(restored.step) == 4 and checkpoints.steps() == [4]
    (moved,) = [p.name for p in (files.path(workdir) / "corrupt_checkpoints").iterdir()]
    assert moved.startswith("8-")
    assert budget.recorded(workdir, config, checkpoints.saved_plan(4)) == plan
    assert json.loads((files.path(workdir) / budget.PLAN_FILE).read_text()) == plan
    checkpoints.close()
