import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np

from tfx.core import config as config_lib
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
