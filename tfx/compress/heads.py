"""Attention-head pruning by importance (Michel, Levy and Neubig, 2019), removing the heads.

The importance of head h of an attention module is |dL/dxi_h|, where xi_h gates the head's
output (xi = 1 is the model as it is) and L is a batch's mean token cross-entropy under teacher
forcing (no label smoothing, no dropout), summed over batches, as Michel et al.'s code does,
and normalised per module (L2) as they do. The head's output is linear in its slice of the out
projection, so gating the head is scaling that slice, and dL/dxi_h = sum(W_out[h] * dL/dW_out[h]):
the parameters' gradient gives it, with no change to the model.

`keep_indices` then drops the K least important heads of every attention module (encoder self-,
decoder self- and cross-attention) and `remove_heads` takes their slices out of query [D, N, H],
key and value [D, N, H], out [N, H, D] and, with model.use_bias, the query, key and value
biases [N, H] (out's bias [D] stays whole). Every module loses the same number of heads, so the
result is again a uniform Transformer that a config describes (num_heads N - K and an explicit
head_dim); Michel et al. rank the heads of all modules together, which leaves modules with
different head counts. Grouped-query attention (num_kv_heads < num_heads) is refused: a
key/value head serves a group of query heads, and removing query heads would unbalance groups.

    python -m tfx.compress.heads --workdir runs/multi30k --prune 1 --output runs/multi30k-heads \\
        [--checkpoint latest] [--batches 20] [--split eval]

writes the pruned parameters as a checkpoint of the output workdir (step 0, the optimizer
state fresh), its config.json and the run's tokenizer, and prints the importance of every head
and the commands that evaluate the output (eval.py --workdir OUTPUT: its config.json says the
rest) and fine-tune it (train.py --config.init_from=OUTPUT, with the config overrides the
pruned model needs, `overrides`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from tfx.core import config as config_lib
from tfx.core import parallel
from tfx.data import pipeline
from tfx.infer import evaluate, trained
from tfx.model.params import abstract_params
from tfx.model.transformer import count_params
from tfx.train import losses, rundir, steps

ATTENTION = ("query", "key", "value", "out")  # the parameters of an attention module.
HEAD_AXIS = {"query": 1, "key": 1, "value": 1, "out": 0,  # their heads axis (unstacked),
             "query_bias": 0, "key_bias": 0, "value_bias": 0}  # and their biases' (model.use_bias).


def check_prunable(config: ml_collections.ConfigDict, count: int):
    """Raises ValueError unless `count` heads can come out of each of config's attention modules."""
    m = config.model
    if m.num_kv_heads != m.num_heads:
        raise ValueError(
            f"config.model.num_kv_heads={m.num_kv_heads} < config.model.num_heads={m.num_heads}: "
            "head pruning needs multi-head attention (each query head with its own key/value "
            "head); with grouped-query attention, removing query heads would unbalance groups.")
    if m.rank_fraction:
        raise ValueError(f"config.model.rank_fraction={m.rank_fraction}: head pruning needs full "
                         "projection matrices, not low-rank factors.")
    if not 0 < count < m.num_heads:
        raise ValueError(f"--prune={count}: remove at least 1 head and fewer than "
                         f"config.model.num_heads={m.num_heads} from each attention module.")


def pruned_config(config: ml_collections.ConfigDict, count: int) -> ml_collections.ConfigDict:
    """`config` for the model with `count` heads fewer per attention module (validated)."""
    pruned = config.copy_and_resolve_references()
    heads = config.model.num_heads - count
    pruned.model.update(num_heads=heads, num_kv_heads=heads, head_dim=config_lib.head_dim(config.model))
    return config_lib.validate(pruned)


def overrides(config: ml_collections.ConfigDict) -> str:
    """The command-line flags that turn the unpruned config into `config` (a pruned one)."""
    m = config.model
    return (f"--config.model.num_heads={m.num_heads} --config.model.num_kv_heads={m.num_kv_heads} "
            f"--config.model.head_dim={m.head_dim}")


def attention_modules(tree, path: tuple = ()) -> Iterator[tuple[str, dict]]:
    """("path/to/module", its dict) for every attention module of a pure dict of parameters."""
    if isinstance(tree, dict):
        if set(ATTENTION) <= tree.keys():
            yield "/".join(map(str, path)), tree
            return
        for key, subtree in tree.items():
            yield from attention_modules(subtree, (*path, key))


def gate_gradients(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, params: nnx.State,
                   batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """dL/dxi per attention module at xi = 1: [N], or [layers, N] for stacked layers
    (model.scan_layers). L is the batch's mean token cross-entropy under teacher forcing: the
    "nll" of the eval step's `steps.metric_sums` (no smoothing, no dropout)."""
    def loss(params):
        return losses.summarize(steps.metric_sums(graphdef, params, batch, config))["nll"]

    grads = nnx.to_pure_dict(jax.grad(loss)(params))
    outs = dict(attention_modules(nnx.to_pure_dict(params)))
    return {path: jnp.sum(outs[path]["out"] * module["out"], axis=(-2, -1))
            for path, module in attention_modules(grads)}


def head_importance(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, params: nnx.State,
                    batches: Sequence[dict[str, jax.Array]], mesh) -> dict[str, np.ndarray]:
    """Michel et al.'s importance per attention module, [N] or [layers, N]: the sum over
    `batches` of |dL/dxi|, divided by its L2 norm over the module's heads."""
    rules = config.logical_axis_rules

    @jax.jit
    def batch_importance(params, batch):
        with parallel.activation_sharding(mesh, rules):
            return jax.tree.map(jnp.abs, gate_gradients(config, graphdef, params, batch))

    total = None
    for batch in batches:
        scores = batch_importance(params, batch)
        total = scores if total is None else jax.tree.map(jnp.add, total, scores)
    if total is None:
        raise ValueError("no batches to score the heads on.")
    return {path: np.asarray(s / jnp.linalg.norm(s, axis=-1, keepdims=True))
            for path, s in jax.device_get(total).items()}


def keep_indices(importance: dict[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
    """The heads each module keeps, in their order: all but its `count` least important."""
    return {path: np.sort(np.argsort(scores, axis=-1, kind="stable")[..., count:], axis=-1)
            for path, scores in importance.items()}


def remove_heads(params: dict, keep: dict[str, np.ndarray]) -> dict:
    """A copy of a pure dict of parameters whose attention modules have only the heads `keep`
    names (per module: [N'] indices, or [layers, N'] for stacked layers)."""
    def copy(tree, path=()):
        if not isinstance(tree, dict):
            return tree
        name = "/".join(map(str, path))
        if name in keep:
            kept = np.asarray(keep[name])
            return {key: _take_heads(np.asarray(value), kept, HEAD_AXIS[key]) if key in HEAD_AXIS
                    else value for key, value in tree.items()}
        return {key: copy(subtree, (*path, key)) for key, subtree in tree.items()}
    return copy(params)


def _take_heads(value: np.ndarray, kept: np.ndarray, axis: int) -> np.ndarray:
    if kept.ndim == 1:
        return np.take(value, kept, axis=axis)
    return np.stack([np.take(layer, k, axis=axis) for layer, k in zip(value, kept, strict=True)])


@dataclasses.dataclass(frozen=True)
class Pruned:
    config: ml_collections.ConfigDict  # the pruned model's (see `pruned_config`).
    label: str  # the source checkpoint: "step2500", "average5-step2500".
    importance: dict[str, np.ndarray]  # per attention module, [N] or [layers, N].
    params_before: int
    params_after: int


def prune_heads(config: ml_collections.ConfigDict, workdir: str, checkpoint: str, count: int,
                output: str, batches: int, split: str = "eval") -> Pruned:
    """Removes the `count` least important heads of each attention module of `workdir`'s
    `checkpoint` (importance on the first `batches` batches of config.data.<split>) and writes
    the result as the workdir `output` (see the module doc)."""
    check_prunable(config, count)
    if not config.data[split]:
        raise ValueError(f"config.data.{split} is empty: name a split to score the heads on.")
    rundir.check_new_run(output)
    source = trained.load(config, workdir, checkpoint)
    label, params = source.label, source.params
    sharding, shard = pipeline.batch_layout(config, source.mesh, config.per_device_eval_batch_size)
    split_batches = pipeline.eval_batches(config, evaluate.open_split(config, split),
                                          source.tokenizer, shard)
    scored = [pipeline.to_global({k: v for k, v in batch.items() if k != "index"}, sharding, shard)
              for batch in split_batches[:batches]]
    importance = head_importance(config, source.graphdef, params, scored, source.mesh)
    pruned = pruned_config(config, count)
    _, host_params, _ = abstract_params(pruned, source.mesh)
    nnx.replace_by_pure_dict(host_params, remove_heads(nnx.to_pure_dict(jax.device_get(params)),
                                                       keep_indices(importance, count)))
    rundir.write_run(pruned, source.mesh, host_params, source.tokenizer, output)
    return Pruned(pruned, label, importance, count_params(params), count_params(host_params))


def main():
    """The command line (absl flags, defined here so that importing tfx.compress.heads defines none)."""
    from absl import flags

    from tfx.core import cli

    shared = cli.define_flags(workdir="The run whose heads are pruned.", checkpoint=True)
    prune = flags.DEFINE_integer("prune", None, "Heads removed from every attention module.")
    output = flags.DEFINE_string("output", None, "Workdir to write the pruned model to.")
    batches = flags.DEFINE_integer("batches", 20, "Batches of --split the importance is summed over.")
    split = flags.DEFINE_enum("split", "eval", ["train", "eval", "test"],
                              "The config.data split the importance is computed on.")
    flags.mark_flags_as_required(["prune", "output"])

    def prune_command():
        config, workdir = shared.run_config(), shared.workdir.value
        done = prune_heads(config, workdir, shared.checkpoint.value, prune.value, output.value,
                           batches.value, split.value)
        print(f"head importance on {split.value} (|dL/dxi| summed over {batches.value} batches, "
              "L2-normalised per module):")
        width = max(map(len, done.importance))
        for path, scores in done.importance.items():
            print(f"  {path:<{width}}  {np.array2string(scores, precision=3)}")
        print(f"removed the {prune.value} least important of {config.model.num_heads} heads of each "
              f"attention module of {workdir} ({done.label}) into {output.value}: "
              f"{done.params_before:,} -> {done.params_after:,} parameters")
        print(f"evaluate:  python eval.py --workdir {output.value}")
        changed = {f"model.{key}": done.config.model[key]
                   for key in ("num_heads", "num_kv_heads", "head_dim")}
        print(f"fine-tune: {shared.train_command(output.value, changed)}")

    cli.run("tfx.compress.heads", prune_command)


if __name__ == "__main__":
    main()
