import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from tfx.model.transformer import EncoderDecoder
from tfx.train import optim


def make_config(**overrides) -> ml_collections.ConfigDict:
    config = dict(optimizer="adamw", learning_rate=2e-3, schedule="rsqrt", warmup_steps=100,
                  num_train_steps=1000, cosine_end_fraction=0.1, adam_b1=0.9, adam_b2=0.98,
                  adam_eps=1e-9, weight_decay=0.0, weight_decay_norms=False, grad_clip_norm=0.0,
                  prune=dict(sparsity=0.0, pattern="unstructured"))
    config.update(overrides)
    return ml_collections.ConfigDict(config)


def test_rsqrt_warms_up_linearly_to_the_peak_then_decays_as_inverse_sqrt():
    schedule = optim.learning_rate_schedule(make_config())
    assert schedule(0) == 0.0
    for step in (1, 25, 50, 99):
        np.testing.assert_allclose(schedule(step), 2e-3 * step / 100, rtol=1e-6)
    np.testing.assert_allclose(schedule(100), 2e-3, rtol=1e-6)
    for step in (101, 400, 10_000):
        np.testing.assert_allclose(schedule(step), 2e-3 * math.sqrt(100 / step), rtol=1e-6)


def test_rsqrt_without_warmup_is_finite_and_starts_at_the_peak():
    schedule = optim.learning_rate_schedule(make_config(warmup_steps=0))
    np.testing.assert_allclose(schedule(0), 2e-3, rtol=1e-6)
    np.testing.assert_allclose(schedule(1), 2e-3, rtol=1e-6)
    np.testing.assert_allclose(schedule(400), 2e-3 / 20, rtol=1e-6)


def test_rsqrt_works_under_jit_with_a_traced_step():
    schedule = optim.learning_rate_schedule(make_config())
    np.testing.assert_allclose(jax.jit(schedule)(jnp.int32(400)), 1e-3, rtol=1e-6)


def test_cosine_warms_up_then_reaches_the_end_fraction():
    schedule = optim.learning_rate_schedule(make_config(schedule="cosine"))
    assert schedule(0) == 0.0
    np.testing.assert_allclose(schedule(50), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(schedule(100), 2e-3, rtol=1e-6)
    np.testing.assert_allclose(schedule(550), 2e-3 * (0.1 + 0.9 * 0.5), rtol=1e-5)
    np.testing.assert_allclose(schedule(1000), 2e-4, rtol=1e-5)
    np.testing.assert_allclose(schedule(5000), 2e-4, rtol=1e-5)


def first_update(config: ml_collections.ConfigDict, grads: dict) -> dict:
    params = jax.tree.map(jnp.zeros_like, grads)
    tx = optim.make_optimizer(config)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    return updates


def test_clipping_rescales_a_huge_gradient_to_the_clip_norm():
    # Adam's first step is -lr * g / (|g| + eps); a large eps keeps it proportional to g, so
    # the update shows the gradient the optimizer received.
    config = dict(warmup_steps=0, learning_rate=1.0, adam_eps=1e3)
    grads = {"w": jnp.full((3, 4), 1e6), "b": jnp.full((4,), 1e6)}  # norm 4e6, 16 entries.
    clipped = first_update(make_config(grad_clip_norm=1.0, **config), grads)
    unclipped = first_update(make_config(grad_clip_norm=0.0, **config), grads)
    for name in grads:
        np.testing.assert_allclose(clipped[name], -0.25 / (0.25 + 1e3), rtol=1e-5)
        np.testing.assert_allclose(unclipped[name], -1e6 / (1e6 + 1e3), rtol=1e-5)
    assert optax.tree.norm(clipped) < 1e-3 < 1.0 < optax.tree.norm(unclipped)


def test_clipping_leaves_a_small_gradient_alone():
    config = dict(warmup_steps=0, learning_rate=1.0, adam_eps=1e3)
    grads = {"w": jnp.full((2, 2), 0.1)}  # norm 0.2 < 1.
    clipped = first_update(make_config(grad_clip_norm=1.0, **config), grads)
    unclipped = first_update(make_config(grad_clip_norm=0.0, **config), grads)
    np.testing.assert_allclose(clipped["w"], unclipped["w"], rtol=1e-6)


def test_adamw_step_matches_optax_adamw():
    config = make_config(weight_decay=0.01, grad_clip_norm=0.0, warmup_steps=0)
    params = {"w": jnp.arange(6.0).reshape(2, 3)}
    grads = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)}
    tx = optim.make_optimizer(config)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    reference = optax.adamw(2e-3, b1=0.9, b2=0.98, eps=1e-9, weight_decay=0.01)
    expected, _ = jax.jit(reference.update)(grads, reference.init(params), params)
    np.testing.assert_allclose(updates["w"], expected["w"], rtol=1e-6)


def test_adafactor_builds_and_updates_a_pytree():
    config = make_config(optimizer="adafactor", grad_clip_norm=1.0, warmup_steps=10)
    params = {"dense": {"kernel": jnp.ones((128, 8)), "bias": jnp.zeros((8,))}}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    tx = optim.make_optimizer(config)
    state = tx.init(params)
    step = jax.jit(tx.update)
    for _ in range(3):
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
    assert jax.tree.structure(params) == jax.tree.structure(grads)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))
    assert float(params["dense"]["kernel"][0, 0]) < 1.0  # moved against the positive gradient.


@pytest.mark.parametrize("key, value, message", [
    ("optimizer", "sgd", "config.optimizer='sgd' is not one of 'adamw', 'adafactor'"),
    ("schedule", "linear", "config.schedule='linear' is not one of 'rsqrt', 'cosine'"),
])
def test_unknown_names_raise_naming_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        optim.make_optimizer(make_config(**{key: value}))


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
@pytest.mark.parametrize("scan_layers", [False, True])
def test_weight_decay_skips_norm_scales_and_biases_unless_asked(tiny_config, optimizer, scan_layers):
    """With zero gradients an update is pure decay (AdamW: exactly -lr * decay * param), so it
    is nonzero exactly where decay applies: not the norms' scale and bias nor the projections'
    and output's biases (use_bias, output_bias), unless asked."""
    model_config = tiny_config(model=dict(scan_layers=scan_layers, use_bias=True, output_bias=True,
                                          embedding_norm=True)).model
    params = nnx.state(EncoderDecoder(model_config, nnx.Rngs(0)), nnx.Param)
    params = jax.tree.map(lambda x: x + 1.0, params)  # norm biases start at 0.
    grads = jax.tree.map(jnp.zeros_like, params)
    names = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    is_norm = ["'scale'" in name or "bias'" in name for name in names]
    assert any(is_norm) and not all(is_norm)
    for norms in (False, True):
        config = make_config(optimizer=optimizer, weight_decay=0.1, weight_decay_norms=norms,
                             warmup_steps=0, learning_rate=1.0)
        tx = optim.make_optimizer(config)
        updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
        for name, norm, update, param in zip(names, is_norm, jax.tree.leaves(updates), jax.tree.leaves(params)):
            decays = norms or not norm
            assert bool(jnp.any(update != 0)) == decays, name
            if optimizer == "adamw":
                np.testing.assert_allclose(update, -0.1 * param if decays else 0.0, rtol=1e-6, err_msg=name)
