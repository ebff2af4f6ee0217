"""Train (or resume) a translation model.

    python train.py --config configs/multi30k.py --workdir runs/multi30k [--config.seed=1 ...]
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from tfx.core import config as config_lib
from tfx.core import distributed, host_memory
from tfx.infer import evaluate
from tfx.train import lock, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:variant].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and logs go here.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # orbax and TFDS log every step of their work at INFO.
    try:
        config = config_lib.validate(_CONFIG.value)
        host_memory.keep_freed_memory_on_cpu()  # before JAX starts its threads.
        distributed.initialize(config)  # before any other JAX call.
        trainer.train(config, _WORKDIR.value, evaluate.periodic_bleu)
    except (ValueError, FileNotFoundError, lock.WorkdirLockedError, trainer.NonFiniteLossError) as error:
        sys.exit(f"train.py: {error}")


if __name__ == "__main__":
    app.run(main)
