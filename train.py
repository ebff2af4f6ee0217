"""Train (or resume) a translation model.

    python train.py --config configs/multi30k.py --workdir runs/multi30k [--config.seed=1 ...]
"""
from tfx.core import cli, distributed, host_memory
from tfx.infer import evaluate
from tfx.train import lock, trainer


def main():
    shared = cli.define_flags(workdir="Checkpoints, metrics and logs go here.", config="file")

    def command():
        config = shared.config_file()
        host_memory.keep_freed_memory_on_cpu()  # before JAX starts its threads.
        distributed.initialize(config)  # before any other JAX call.
        trainer.train(config, shared.workdir.value, evaluate.periodic_bleu)

    cli.run("train.py", command, errors=(lock.WorkdirLockedError, lock.LockLostError, trainer.NonFiniteLossError))


if __name__ == "__main__":
    main()
