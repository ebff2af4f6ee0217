"""Writes the average of a run's last N checkpoints as a checkpoint of its own.

    python -m tfx.compress.average --workdir runs/multi30k --last 5 --output runs/multi30k-avg5
    python eval.py --workdir runs/multi30k-avg5

(`eval.py --checkpoint average:N` averages on the fly without writing anything.)
"""
from __future__ import annotations

from tfx.core import config as config_lib
from tfx.core import parallel
from tfx.model.params import placed
from tfx.train.checkpoint import Checkpoints
from tfx.train.steps import abstract_train_state


def average_last(config, workdir: str, last: int, output: str) -> int:
    """Saves the mean parameters of `workdir`'s last `last` checkpoints into `output` (at the
    step of the latest, with that checkpoint's optimizer state) and returns that step. Nothing
    is allocated before the restore, and no data is read."""
    source = Checkpoints(workdir)
    steps = source.steps()
    if not 0 < last <= len(steps):
        raise ValueError(f"--last={last}, but {source.directory} has {len(steps)} checkpoints: {steps}.")
    _, abstract, shardings = abstract_train_state(config, parallel.make_mesh(config.mesh_shape))
    state = source.average(steps[-last:], placed(abstract, shardings))
    target = Checkpoints(output, config)
    target.save(state)
    target.wait()
    target.close()
    return steps[-1]


def main():
    """The command line (absl flags, defined here so that importing tfx.compress.average defines none)."""
    from absl import flags

    from tfx.core import cli
    from tfx.infer import trained
    from tfx.train import rundir

    shared = cli.define_flags(workdir="The run whose checkpoints are averaged.")
    last = flags.DEFINE_integer("last", 5, "How many of the latest checkpoints to average.")
    output = flags.DEFINE_string("output", None, "Workdir for the averaged checkpoint.")
    flags.mark_flag_as_required("output")

    def average():
        config = shared.run_config()
        step = average_last(config, shared.workdir.value, last.value, output.value)
        # The output is a run of its own, with the config and tokenizer of its source.
        config_lib.save_run(config, output.value)
        rundir.keep_tokenizer(trained.tokenizer_for(config, shared.workdir.value), output.value)
        print(f"averaged the last {last.value} checkpoints of {shared.workdir.value} into "
              f"{output.value} (step {step})")

    cli.run("tfx.compress.average", average)


if __name__ == "__main__":
    main()
