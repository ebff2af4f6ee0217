"""Writes the average of a run's last N checkpoints as a checkpoint of its own.

    python -m tfx.compress.average --config configs/multi30k.py --workdir runs/multi30k --last 5 \\
        --output runs/multi30k-avg5
    python eval.py --config configs/multi30k.py --workdir runs/multi30k-avg5

(`eval.py --checkpoint average:N` averages on the fly without writing anything.)
"""
from __future__ import annotations

from tfx.core import config as config_lib
from tfx.train.checkpoint import Checkpoints
from tfx.train.experiment import Experiment


def average_last(config, workdir: str, last: int, output: str) -> int:
    """Saves the mean parameters of `workdir`'s last `last` checkpoints into `output` (at the
    step of the latest) and returns that step."""
    source = Checkpoints(workdir)
    steps = source.steps()
    if not 0 < last <= len(steps):
        raise ValueError(f"--last={last}, but {source.directory} has {len(steps)} checkpoints: {steps}.")
    state = source.average(steps[-last:], Experiment(config).state)
    target = Checkpoints(output, config)
    target.save(state)
    target.wait()
    target.close()
    return steps[-1]


def main():
    """The command line (absl flags, defined here so that importing tfx.compress.average defines none)."""
    from absl import app, flags, logging
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file("config", None, "Config file[:variant].",
                                                  lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, "The run whose checkpoints are averaged.")
    last = flags.DEFINE_integer("last", 5, "How many of the latest checkpoints to average.")
    output = flags.DEFINE_string("output", None, "Workdir for the averaged checkpoint.")
    flags.mark_flags_as_required(["config", "workdir", "output"])

    def average(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        logging.set_verbosity(logging.WARNING)
        step = average_last(config_lib.validate(config_flag.value), workdir.value, last.value,
                            output.value)
        print(f"averaged the last {last.value} checkpoints of {workdir.value} into {output.value} "
              f"(step {step})")

    app.run(average)


if __name__ == "__main__":
    main()
