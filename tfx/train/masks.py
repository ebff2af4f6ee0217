"""Gradual magnitude pruning (Zhu and Gupta, 2017) as the last transformation of the optax chain.

The pruned matrices are the projections of attention (query, key, value, out) and of the MLP
(wi, wi_gate, wo). Embeddings (one matrix serves both input lookups and, tied, the output
projection, each of its rows a token's only representation), learned positions and the untied
output projection stay whole, as do norm scales and biases: vectors, a negligible share of the
weights, which sparse matmuls cannot use.

Each matrix keeps a boolean mask (True: kept) in the optimizer state, laid out and sharded
like the matrix (tfx/core/parallel.py shards it by the same logical axes). Where a mask is False
the update is minus the parameter, so the new parameter is exactly 0, and stays 0 whatever
Adam's moments say. Masks are recomputed per matrix (layer-wise: each matrix, each layer of a
stacked `model.scan_layers` one, reaches the same sparsity) from the magnitudes of the
parameters the update would give, at updates begin_step, begin_step + every_steps, ... and
end_step, with sparsity s_t = s_f (1 - (1 - (t - begin) / (end - begin))^3); weights already
pruned stay pruned. The 2:4 pattern (two of every four consecutive weights along the fan-in
kept, NVIDIA's structured sparsity) is applied once, at begin_step, as in NVIDIA's recipe of
pruning a trained model and fine-tuning it with the mask fixed.

`python -m tfx.compress.sparsity` reports the zeros of a run's parameters.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from tfx.core.pytree import path_name

# Prunable parameter name -> (the fan-in axis that 2:4 groups run along, the config key of
# its size). `out`'s fan-in is (heads, head_dim): groups run along head_dim, within a head.
PRUNABLE = {
    "query": (0, "model.emb_dim"), "key": (0, "model.emb_dim"), "value": (0, "model.emb_dim"),
    "out": (1, "model.head_dim"),
    "wi": (0, "model.emb_dim"), "wi_gate": (0, "model.emb_dim"), "wo": (0, "model.mlp_dim"),
}
GROUP, KEPT = 4, 2  # 2:4: KEPT of every GROUP consecutive weights.


class PruneState(NamedTuple):
    count: jax.Array  # updates so far (named like optax's counts, see steps._keep_unless).
    masks: Any  # like the parameters: a boolean mask per prunable matrix, MaskedNode elsewhere.


def enabled(config: ml_collections.ConfigDict) -> bool:
    return config.prune.sparsity > 0 or config.prune.pattern == "2:4"


def ramp(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """(begin, end): the updates between which sparsity ramps up (2:4: both begin_step)."""
    begin = config.prune.begin_step
    if config.prune.pattern == "2:4":
        return begin, begin
    end = config.prune.end_step or config.num_train_steps
    if end < begin:
        raise ValueError(f"config.prune.begin_step={begin} is after config.prune.end_step={end} "
                         f"(0: config.num_train_steps={config.num_train_steps}); pruning must "
                         "begin before it ends.")
    return begin, end


def sparsity_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Target sparsity at update t: 0 before begin, s_f (1 - (1 - (t - begin) / (end - begin))^3)
    up to end, s_f after (a step at begin when end == begin); s_f is 0.5 for 2:4."""
    final = 0.5 if config.prune.pattern == "2:4" else config.prune.sparsity
    begin, end = ramp(config)

    def schedule(step: jax.typing.ArrayLike) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        if end == begin:
            progress = (step >= begin).astype(jnp.float32)
        else:
            progress = jnp.clip((step - begin) / (end - begin), 0.0, 1.0)
        return final * (1.0 - (1.0 - progress) ** 3)

    return schedule


def magnitude_pruning(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The transformation that prunes as `config.prune` says (see the module doc); put it last
    in the chain, so it sees the final updates. Its `update` needs the parameters."""
    if config.model.rank_fraction:
        raise ValueError(f"config.prune prunes full projection matrices, but config.model."
                         f"rank_fraction={config.model.rank_fraction} factors them; use one or "
                         "the other.")
    schedule = sparsity_schedule(config)
    begin, end = ramp(config)
    every = config.prune.every_steps
    two_four = config.prune.pattern == "2:4"

    def init(params) -> PruneState:
        def ones(path, leaf):
            name = leaf_name(path)
            if name not in PRUNABLE:
                return optax.MaskedNode()
            if two_four:
                _check_groups(name, path, leaf)
            return jax.tree.map(lambda p: jnp.ones(p.shape, jnp.bool_), leaf)

        masks = jax.tree_util.tree_map_with_path(ones, params, is_leaf=is_variable)
        return PruneState(jnp.zeros([], jnp.int32), masks)

    def update(updates, state: PruneState, params=None):
        if params is None:
            raise ValueError("magnitude pruning needs the parameters: pass them to update().")
        count = state.count
        due = (count >= begin) & (count <= end) & (((count - begin) % every == 0) | (count == end))
        sparsity = schedule(count)

        def new_mask(path, mask, update, param):
            if isinstance(mask, optax.MaskedNode):
                return mask
            name, stacked = leaf_name(path), is_stacked(mask)

            def recompute(mask, update, param):
                magnitude = jnp.where(mask, jnp.abs(param + update), -1.0)  # pruned stay pruned.
                if two_four:
                    return _two_four_mask(magnitude, PRUNABLE[name][0] + stacked)
                layers = magnitude.shape[0] if stacked else 1
                return _smallest_pruned(magnitude.reshape(layers, -1), sparsity).reshape(mask.shape)

            return jax.tree.map(recompute, mask, update, param)

        masks = jax.lax.cond(due, lambda: _map_masks(new_mask, state.masks, updates, params),
                             lambda: state.masks)

        def apply(path, mask, update, param):
            if isinstance(mask, optax.MaskedNode):
                return update
            return jax.tree.map(lambda m, u, p: jnp.where(m, u, -p), mask, update, param)

        return _map_masks(apply, masks, updates, params), PruneState(count + 1, masks)

    return optax.GradientTransformation(init, update)


def _map_masks(fn, masks, updates, params):
    """fn(path, mask, update, param) for each parameter (mask a MaskedNode if not prunable)."""
    return jax.tree_util.tree_map_with_path(
        fn, masks, updates, params, is_leaf=lambda x: isinstance(x, (nnx.Variable, optax.MaskedNode)))


def _smallest_pruned(magnitude_LxM: jax.Array, sparsity: jax.Array) -> jax.Array:
    """Per row, False at the floor(sparsity x M) smallest magnitudes (of equal ones, the first)."""
    pruned = jnp.floor(sparsity * magnitude_LxM.shape[1]).astype(jnp.int32)
    rank_LxM = jnp.argsort(jnp.argsort(magnitude_LxM, axis=1), axis=1)  # 0: the smallest.
    return rank_LxM >= pruned


def _two_four_mask(magnitude: jax.Array, axis: int) -> jax.Array:
    """True at the KEPT largest magnitudes of every GROUP consecutive entries along `axis` (of
    equal ones, the first)."""
    moved = jnp.moveaxis(magnitude, axis, -1)
    groups = moved.reshape(*moved.shape[:-1], -1, GROUP)
    rank = jnp.argsort(jnp.argsort(-groups, axis=-1), axis=-1)  # 0: the largest.
    return jnp.moveaxis((rank < KEPT).reshape(moved.shape), -1, axis)


def _check_groups(name: str, path, leaf):
    axis, key = PRUNABLE[name]
    size = leaf.shape[axis + is_stacked(leaf)]
    if size % GROUP:
        raise ValueError(f"config.prune.pattern='2:4' groups {GROUP} consecutive weights along the "
                         f"fan-in, but {path_name(path)} has {size} there ({key}); make {key} a "
                         f"multiple of {GROUP}.")


def is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def is_stacked(leaf) -> bool:
    """Whether a parameter stacks layers on its leading axis (model.scan_layers)."""
    return is_variable(leaf) and leaf.get_metadata().get("logical_axes", ())[:1] == ("layers",)


def leaf_name(path) -> str:
    return str(getattr(path[-1], "key", getattr(path[-1], "name", path[-1])))
