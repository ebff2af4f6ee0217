import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tfx.compress import heads
from tfx.core import parallel
from tfx.infer.trained import load
from tfx.model.transformer import EncoderDecoder, count_params

MODULES = {"encoder_layers/0/attention", "decoder_layers/0/self_attention",
           "decoder_layers/0/cross_attention"}


def mha_config(tiny_config, **model):
    return tiny_config(model=dict(dict(num_heads=4, num_kv_heads=4), **model))


def model_and_params(config) -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(EncoderDecoder(config.model, nnx.Rngs(0)), nnx.Param)


def replaced(params: nnx.State, pure: dict) -> nnx.State:
    """A copy of `params` with the values of `pure` (a pure dict of parameters)."""
    params = jax.tree.map(lambda x: x, params)
    nnx.replace_by_pure_dict(params, pure)
    return params


def logits(graphdef, params, pure: dict, batch) -> np.ndarray:
    """The model's logits with the parameters `pure` (shaped like `params`)."""
    return np.asarray(_logits(graphdef, replaced(params, pure), batch))


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, params, batch):
    return nnx.merge(graphdef, params)(batch["inputs"], batch["targets"])


def scaled_outs(pure: dict, scales: dict) -> dict:
    """`pure` with each module's out projection scaled per head: scales[path] is [N] (or
    [layers, N]); heads gated by xi = scale."""
    def copy(tree, path=()):
        if not isinstance(tree, dict):
            return tree
        name = "/".join(map(str, path))
        if name in scales:
            scale = jnp.asarray(scales[name])
            return dict(tree, out=tree["out"] * scale.reshape(*scale.shape, 1, 1))
        return {key: copy(subtree, (*path, key)) for key, subtree in tree.items()}
    return copy(pure)


def test_gate_derivative_and_importance_equal_finite_differences(tiny_config, make_batch):
    """dL/dxi_h of each head from the out projection's gradient equals a central difference of
    the loss in a gate on the head's output, per batch; the importance is the per-module
    L2-normalised sum over batches of its absolute value. (GELU: ReLU's kinks would bend the
    difference quotient.)"""
    config = mha_config(tiny_config, num_encoder_layers=1, num_decoder_layers=1, activation="gelu")
    graphdef, params = model_and_params(config)
    pure = nnx.to_pure_dict(params)
    batches = [{k: jnp.asarray(v) for k, v in make_batch(seed, 4, 7, 9, 50).items()} for seed in (0, 1)]

    @jax.jit
    def loss(scales, batch):  # the mean token cross-entropy, written out.
        logits_BxTxV = nnx.merge(graphdef, replaced(params, scaled_outs(pure, scales)))(
            batch["inputs"], batch["targets"])
        log_p = jnp.take_along_axis(jax.nn.log_softmax(logits_BxTxV), batch["targets"][..., None], -1)
        weights = batch["targets"] > 0
        return -jnp.sum(jnp.where(weights, log_p[..., 0], 0.0)) / jnp.sum(weights)

    epsilon, total = 3e-2, {path: np.zeros(4) for path in MODULES}
    for batch in batches:
        gates = jax.jit(functools.partial(heads.gate_gradients, config, graphdef))(params, batch)
        assert set(gates) == MODULES
        for path in MODULES:
            for head in range(4):
                up, down = ({p: np.ones(4) for p in MODULES} for _ in range(2))
                up[path][head], down[path][head] = 1 + epsilon, 1 - epsilon
                difference = (loss(up, batch) - loss(down, batch)) / (2 * epsilon)
                np.testing.assert_allclose(gates[path][head], difference, rtol=2e-3, atol=5e-5,
                                           err_msg=f"{path} head {head}")
                total[path][head] += abs(difference)
    assert min(np.min(t) for t in total.values()) > 1e-2  # the comparison is not all zeros.
    mesh = parallel.make_mesh("data:1", jax.devices()[:1])
    importance = heads.head_importance(config, graphdef, params, batches, mesh)
    for path in MODULES:
        np.testing.assert_allclose(importance[path], total[path] / np.linalg.norm(total[path]),
                                   rtol=2e-3, err_msg=path)


def test_keep_indices_drop_the_least_important_heads_per_module_and_layer():
    importance = {"a": np.array([0.3, 0.1, 0.5, 0.2]), "b": np.array([[0.9, 0.8, 0.1, 0.7],
                                                                       [0.1, 0.2, 0.3, 0.4]])}
    keep = heads.keep_indices(importance, 2)
    np.testing.assert_array_equal(keep["a"], [0, 2])
    np.testing.assert_array_equal(keep["b"], [[0, 1], [2, 3]])


@pytest.mark.parametrize("scan_layers", [False, True])
def test_removing_heads_equals_masking_their_out_projection(tiny_config, make_batch, scan_layers):
    """Two of four heads out of each encoder self-, decoder self- and cross-attention module (other
    heads in each module and layer): the smaller model's logits are the original's with those
    heads' out projections zeroed, and it has 4 x 2 x D x H parameters fewer per module."""
    config = mha_config(tiny_config, scan_layers=scan_layers)
    graphdef, params = model_and_params(config)
    pure = nnx.to_pure_dict(params)
    rng = np.random.default_rng(0)
    shape = (2, 4) if scan_layers else (4,)
    keep = heads.keep_indices({path: rng.random(shape) for path, _ in heads.attention_modules(pure)}, 2)
    assert len(keep) == (3 if scan_layers else 6)
    masks = {path: np.isin(np.arange(4), kept) if kept.ndim == 1 else
             np.stack([np.isin(np.arange(4), k) for k in kept]) for path, kept in keep.items()}
    batch = {k: jnp.asarray(v) for k, v in make_batch(0, 4, 7, 9, 50).items()}

    masked = logits(graphdef, params, scaled_outs(pure, masks), batch)
    pruned = heads.pruned_config(config, 2)
    pruned_graphdef, pruned_params = model_and_params(pruned)
    removed = logits(pruned_graphdef, pruned_params, heads.remove_heads(pure, keep), batch)
    np.testing.assert_allclose(removed, masked, rtol=1e-5, atol=1e-5)
    assert np.abs(masked - logits(graphdef, params, pure, batch)).max() > 1e-2
    d, h = config.model.emb_dim, 8
    assert count_params(params) - count_params(pruned_params) == 6 * 4 * 2 * d * h
    assert heads.overrides(pruned) == ("--config.model.num_heads=2 --config.model.num_kv_heads=2 "
                                       "--config.model.head_dim=8")


@pytest.mark.parametrize("model, count, message", [
    (dict(num_heads=4, num_kv_heads=2), 1, "config.model.num_kv_heads=2 < config.model.num_heads=4"),
    (dict(num_heads=4, num_kv_heads=4), 4, "--prune=4: .* fewer than config.model.num_heads=4"),
    (dict(num_heads=4, num_kv_heads=4), 0, "--prune=0: remove at least 1 head"),
])
def test_grouped_query_attention_and_impossible_counts_are_refused(tiny_config, model, count, message):
    with pytest.raises(ValueError, match=message):
        heads.check_prunable(tiny_config(model=model), count)


def test_prune_heads_writes_a_model_that_eval_loads_with_the_printed_overrides(trained, tmp_path,
                                                                              make_batch):
    """The CLI's work on a trained tiny run (2 heads): each module keeps its more important
    head; the output workdir, loaded with the pruned config, gives the original's logits
    with the other head masked."""
    config, workdir = trained
    output = str(tmp_path / "pruned")
    done = heads.prune_heads(config, workdir, "latest", 1, output, batches=2)
    pruned, importance = done.config, done.importance
    assert sorted(os.listdir(output)) == ["checkpoints", "config.json", "tokenizer.model"]
    with open(os.path.join(output, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["model"]["num_heads"] == 1
    assert (pruned.model.num_heads, pruned.model.num_kv_heads, pruned.model.head_dim) == (1, 1, 16)

    original, loaded = load(config, workdir), load(pruned, output)
    assert done.params_before - done.params_after == 3 * 4 * 32 * 16  # modules x (q, k, v, out) x D x H.
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        heads.prune_heads(config, workdir, "latest", 1, output, batches=2)
    assert loaded.tokenizer.path == os.path.join(output, "tokenizer.model")
    batch = make_batch(0, 4, 7, 9, config.model.vocab_size)
    pure = nnx.to_pure_dict(jax.device_get(original.params))
    masks = {path: scores == scores.max() for path, scores in importance.items()}
    assert len(masks) == 3 and all(m.sum() == 1 for m in masks.values())
    np.testing.assert_allclose(
        logits(loaded.graphdef, loaded.params, nnx.to_pure_dict(jax.device_get(loaded.params)), batch),
        logits(original.graphdef, original.params, scaled_outs(pure, masks), batch),
        rtol=1e-5, atol=1e-5)
