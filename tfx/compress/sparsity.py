"""How sparse a run's parameters are (after `config.prune`, or any run):

    python -m tfx.compress.sparsity --workdir runs/m30k-sparse50

prints the fraction of zeros per prunable matrix and overall and the nonzero parameter count,
as JSON.
"""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
from tfx.core import cli
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
    shared = cli.define_flags(workdir="The run whose parameters are counted.", checkpoint=True)

    def report():
        model = trained.load(shared.run_config(), shared.workdir.value, shared.checkpoint.value)
        print(json.dumps({"checkpoint": model.label, **dataclasses.asdict(sparsity_report(model.params))}))

    cli.run("tfx.compress.sparsity", report)


if __name__ == "__main__":
    main()
