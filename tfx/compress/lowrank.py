"""Low-rank factorization of a trained model's projections by truncated SVD, to fine-tune.

    python -m tfx.compress.lowrank --workdir runs/multi30k --checkpoint average:5 \\
        --rank_fraction 0.25 --output runs/multi30k-rank25
    python eval.py --workdir runs/multi30k-rank25
    python train.py --config configs/multi30k.py --workdir runs/multi30k-rank25-ft \\
        --config.model.rank_fraction=0.25 --config.init_from=runs/multi30k-rank25

Each attention and MLP projection W (multi-axis weights read as a matrix [fan-in, fan-out])
becomes the factors a [fan-in, R] and b [R, fan-out] of `layers.LowRank`, R = `factor_rank`:
with W = U S V^T, a = U_R sqrt(S_R) and b = sqrt(S_R) V_R^T, so a b is the best rank-R
approximation of W (Eckart-Young) and both factors have the same scale. Embeddings, norms and
the output projection are copied. `--output` is a workdir holding one checkpoint (step 0, the
optimizer state fresh) of the config with model.rank_fraction set, its config.json and the
run's tokenizer: eval.py reads it as it is, and a fine-tune starts from it with init_from.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import operator

import jax
import ml_collections
import numpy as np
from flax import nnx

from tfx.core import config as config_lib
from tfx.core import files
from tfx.infer import trained
from tfx.model.layers import LowRank
from tfx.model.params import abstract_params
from tfx.model.transformer import count_params
from tfx.train import rundir


def truncated_svd(w_MxN: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Factors a [M, R] and b [R, N] whose product is the best rank-R approximation of w, each
    carrying the square root of the singular values; leading axes are a batch of matrices."""
    u, s, vt = np.linalg.svd(w_MxN.astype(np.float64), full_matrices=False)
    root_R = np.sqrt(s[..., :rank])
    return u[..., :rank] * root_R[..., None, :], root_R[..., :, None] * vt[..., :rank, :]


def factorize(params: dict, model: nnx.Module) -> tuple[dict, dict[str, list[float]]]:
    """A full-rank model's `params` (a pure dict, as `nnx.to_pure_dict` gives) laid out for
    `model`, the same architecture with `LowRank` projections (abstract will do): each
    projection's factors from its `truncated_svd`, the other parameters as they are.

    Also returns the relative Frobenius error |W - a b| / |W| of each matrix, by kind
    ("encoder attention.query", ...): one per layer.
    """
    params = jax.tree.map(np.asarray, params)  # new dicts, so the caller's stay as they are.
    errors: dict[str, list[float]] = {}
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, LowRank):
            continue
        parent = functools.reduce(operator.getitem, path[:-1], params)
        w = parent[path[-1]]
        # Axes that neither factor splits lead all three (the stacked layers of scan_layers).
        lead = w.shape[:len(node.a.shape) + len(node.b.shape) - 2 - w.ndim]
        fan_in = math.prod(node.a.shape[len(lead):-1])
        w_LxMxN = w.reshape(*lead, fan_in, -1)
        a_LxMxR, b_LxRxN = (x.astype(w.dtype) for x in truncated_svd(w_LxMxN, node.a.shape[-1]))
        parent[path[-1]] = {"a": a_LxMxR.reshape(node.a.shape), "b": b_LxRxN.reshape(node.b.shape)}
        residual_LxMxN = w_LxMxN.astype(np.float64) - a_LxMxR.astype(np.float64) @ b_LxRxN
        relative_L = (np.linalg.norm(residual_LxMxN, axis=(-2, -1))
                      / np.linalg.norm(w_LxMxN, axis=(-2, -1)))
        kind = f"{path[0].removesuffix('_layers')} {path[-2]}.{path[-1]}"
        errors.setdefault(kind, []).extend(np.ravel(relative_L).tolist())
    return params, errors


@dataclasses.dataclass(frozen=True)
class Factorized:
    config: ml_collections.ConfigDict  # the source's, with model.rank_fraction set.
    label: str  # the source checkpoint: "step2500", "average5-step2500".
    params_before: int
    params_after: int
    errors: dict[str, float]  # mean relative Frobenius error per kind of matrix.


def factorize_run(config: ml_collections.ConfigDict, workdir: str, checkpoint: str,
                  rank_fraction: float, output: str) -> Factorized:
    """Writes `checkpoint` of the full-rank run `workdir` (trained with `config`), factorized
    at `rank_fraction`, as the workdir `output` (see the module doc)."""
    if config.model.rank_fraction:
        raise ValueError(f"config.model.rank_fraction={config.model.rank_fraction}: give the config "
                         "the full-rank run was trained with (rank_fraction 0).")
    if not 0 < rank_fraction <= 1:
        raise ValueError(f"--rank_fraction={rank_fraction} must be in (0, 1].")
    rundir.check_new_run(output)
    source = trained.load(config, workdir, checkpoint)
    low_rank = config.copy_and_resolve_references()
    low_rank.model.rank_fraction = rank_fraction
    config_lib.validate(low_rank)
    graphdef, host_params, _ = abstract_params(low_rank, source.mesh)
    params, errors = factorize(jax.device_get(nnx.to_pure_dict(source.params)),
                               nnx.merge(graphdef, host_params))
    nnx.replace_by_pure_dict(host_params, params)
    files.path(output).mkdir(parents=True, exist_ok=True)
    rundir.write_run(low_rank, source.mesh, host_params, source.tokenizer, output)
    return Factorized(low_rank, source.label, count_params(source.params), count_params(host_params),
                      {kind: float(np.mean(values)) for kind, values in errors.items()})


def main():
    """The command line (absl flags, defined here so that importing tfx.compress.lowrank defines none)."""
    from absl import flags

    from tfx.core import cli

    shared = cli.define_flags(workdir="The full-rank run's workdir.", checkpoint=True)
    rank_fraction = flags.DEFINE_float("rank_fraction", None, "Rank of each factorized projection "
                                       "as a fraction of min(fan-in, fan-out), in (0, 1].")
    cli.alias("rank-fraction", "rank_fraction")
    output = flags.DEFINE_string("output", None, "Workdir to write the factorized checkpoint to.")
    flags.mark_flags_as_required(["rank_fraction", "output"])

    def factorize_command():
        workdir = shared.workdir.value
        done = factorize_run(shared.run_config(), workdir, shared.checkpoint.value,
                             rank_fraction.value, output.value)
        print(f"factorized {workdir} ({done.label}) at rank fraction {rank_fraction.value} "
              f"into {output.value}: {done.params_before:,} -> {done.params_after:,} parameters")
        print("relative Frobenius error |W - a b| / |W|, mean over layers:")
        width = max(map(len, done.errors))
        for kind, error in done.errors.items():
            print(f"  {kind:<{width}}  {error:.4f}")
        print(f"evaluate:  python eval.py --workdir {output.value}")
        changed = {"model.rank_fraction": rank_fraction.value}
        print(f"fine-tune: {shared.train_command(output.value, changed)}")

    cli.run("tfx.compress.lowrank", factorize_command)


if __name__ == "__main__":
    main()
