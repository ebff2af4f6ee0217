"""How sparse a run's parameters are (after `config.prune`, or any run):

    python -m tfx.compress.sparsity --config configs/multi30k.py --workdir runs/m30k-sparse50

prints the fraction of zeros per prunable matrix and overall and the nonzero parameter count,
as JSON.
"""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from ml_collections import config_flags

from tfx.core import config as config_lib
from tfx.core.pytree import path_name
from tfx.infer import trained
from tfx.train.masks import PRUNABLE, is_stacked, is_variable, leaf_name


@dataclasses.dataclass(frozen=True)
class SparsityReport:
    matrices: dict[str, float]  # fraction of zeros of each prunable matrix ("path[layer]" if stacked).
    prunable_zeros: float  # fraction of zeros over all prunable matrices together.
    nonzero_params: int  # nonzero parameters of the whole model (the tied embedding once).
    params: int  # all parameters.


def sparsity_report(params) -> SparsityReport:
    """Zeros in a parameter tree: per prunable matrix, over them all, and nonzeros overall."""
    matrices, zeros, prunable, nonzero, total = {}, 0, 0, 0, 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params, is_leaf=is_variable):
        value = leaf[...] if is_variable(leaf) else leaf
        leaf_nonzero = int(jnp.count_nonzero(value))
        nonzero, total = nonzero + leaf_nonzero, total + value.size
        if leaf_name(path) not in PRUNABLE:
            continue
        zeros, prunable = zeros + value.size - leaf_nonzero, prunable + value.size
        if is_stacked(leaf):
            per_layer = jnp.count_nonzero(value.reshape(value.shape[0], -1), axis=1)
            for layer, count in enumerate(jax.device_get(per_layer)):
                matrices[f"{path_name(path)}[{layer}]"] = 1.0 - int(count) / value[0].size
        else:
            matrices[path_name(path)] = 1.0 - leaf_nonzero / value.size
    return SparsityReport(matrices, zeros / max(prunable, 1), nonzero, total)


def main():
    """The command line (absl flags, defined here so that importing the module defines none)."""
    config_flag = config_flags.DEFINE_config_file("config", None, "Config file[:variant].",
                                                  lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, "The run whose parameters are counted.")
    checkpoint = flags.DEFINE_string("checkpoint", "latest", "latest, a step, or average:N.")
    flags.mark_flags_as_required(["config", "workdir"])

    def report(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        logging.set_verbosity(logging.WARNING)
        model = trained.load(config_lib.validate(config_flag.value), workdir.value, checkpoint.value)
        print(json.dumps({"checkpoint": model.label, **dataclasses.asdict(sparsity_report(model.params))}))

    app.run(report)


if __name__ == "__main__":
    main()
