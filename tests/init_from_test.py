"""config.init_from: a new run starts from another run's parameters with a fresh optimizer."""
import shutil

import jax
import numpy as np
import pytest

from tfx.core import parallel
from tfx.train import steps, trainer
from tfx.train.checkpoint import Checkpoints, ShapeMismatchError
from tfx.train.experiment import Experiment
from tfx.train.rundir import init_params

from runs import tiny_multi30k


def test_a_run_starts_from_the_parameters_of_another_with_a_fresh_optimizer(trained, tmp_path, data_dir,
                                                                            capsys):
    """Step 4 of the `trained` run (adamw, data:8), restored onto another mesh under another
    optimizer (adafactor, whose state the saved one does not fit): its parameters exactly, placed
    by this run's shardings, at step 0 with the optimizer state initialised and the seed's RNG."""
    source_config, workdir = trained
    config = tiny_multi30k(data_dir, init_from=workdir, init_checkpoint="4", optimizer="adafactor",
                           mesh_shape="data:2,fsdp:2,tensor:2", seed=3)
    experiment = Experiment(config)
    checkpoints = Checkpoints(str(tmp_path), config)
    state = trainer.starting_state(config, experiment, checkpoints, None)
    checkpoints.close()
    assert capsys.readouterr().out == f"initialised from {workdir} step4\n"

    _, source_state, _ = steps.create_train_state(source_config, parallel.make_mesh("data:8"))
    saved = Checkpoints(workdir).restore(4, source_state).params  # all of the saved state
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), jax.device_get(saved))
    jax.tree.map(lambda a, s: a.sharding == s or pytest.fail(f"{a.sharding} != {s}"),
                 state.params, experiment.shardings.params)
    fresh = experiment.state  # what a random initialisation gives
    assert int(state.step) == 0
    np.testing.assert_array_equal(state.rng, fresh.rng)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.opt_state),
                 jax.device_get(fresh.opt_state))


@pytest.mark.parametrize("model, message", [
    (dict(mlp_dim=128), r"^config.init_from='.*': .*/checkpoints/6: params/.*/wi/value has shape "
                        r"\(32, 64\) in the checkpoint but \(32, 128\) in the config"),
    (dict(positions="learned"), r"^config.init_from='.*': .*/checkpoints/6: "
                                r"params/source_positions/.* is not in the checkpoint"),
])
def test_parameters_that_do_not_fit_are_named(trained, data_dir, model, message):
    _, workdir = trained
    config = tiny_multi30k(data_dir, init_from=workdir)
    config.model.update(model)
    _, state, _ = steps.create_train_state(config, parallel.make_mesh("data:8"))
    with pytest.raises(ShapeMismatchError, match=message):
        init_params(config, state)


def test_a_run_with_checkpoints_resumes_and_ignores_init_from(trained, tmp_path, data_dir, capsys):
    source_config, source = trained
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    config = tiny_multi30k(data_dir, init_from=str(tmp_path / "nowhere"))
    checkpoints = Checkpoints(str(workdir), config)
    state = trainer.starting_state(config, Experiment(config), checkpoints, None)
    checkpoints.close()
    assert capsys.readouterr().out == (f"resuming from step 6 in {workdir}/checkpoints; "
                                       f"config.init_from='{tmp_path}/nowhere' is ignored\n")
    assert int(state.step) == 6
