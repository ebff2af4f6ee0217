import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tfx.compress import sparsity
from tfx.core import parallel
from tfx.core.pytree import path_name
from tfx.model.transformer import EncoderDecoder
from tfx.train import checkpoint, masks, optim, steps

PRUNABLE = set(masks.PRUNABLE)


def pruning_config(tiny_config, model=None, prune_keys=None, **overrides):
    """tiny_config without clipping or warmup, 100 steps, and `prune_keys` in config.prune."""
    config = tiny_config(model=model, grad_clip_norm=0.0, warmup_steps=0, num_train_steps=100,
                         **overrides)
    config.prune.update(prune_keys or {})
    return config


def model_params(config) -> nnx.State:
    return nnx.state(EncoderDecoder(config.model, nnx.Rngs(0)), nnx.Param)


def random_grads(params, seed: int):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def named_leaves(tree) -> dict:
    """{path: leaf} of a tree of parameters (or their shardings' specs), arrays as numpy."""
    def value(leaf):
        leaf = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        return np.asarray(leaf) if isinstance(leaf, jax.Array) else leaf
    return {path_name(path): value(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(
        tree, is_leaf=lambda x: isinstance(x, nnx.Variable))}


def cubic(step: int, final: float, begin: int, end: int) -> float:
    return final * (1 - (1 - min(max((step - begin) / (end - begin), 0), 1)) ** 3)


def test_sparsity_follows_the_cubic_schedule(tiny_config):
    schedule = masks.sparsity_schedule(pruning_config(
        tiny_config, prune_keys=dict(sparsity=0.8, begin_step=10, end_step=50)))
    for step, expected in ((0, 0.0), (10, 0.0), (30, 0.8 * (1 - 0.5**3)), (50, 0.8), (90, 0.8)):
        np.testing.assert_allclose(schedule(step), expected, rtol=1e-6, atol=1e-7)
    two_four = masks.sparsity_schedule(pruning_config(tiny_config, prune_keys=dict(pattern="2:4",
                                                                           begin_step=10)))
    assert float(two_four(9)) == 0.0 and float(two_four(10)) == float(two_four(99)) == 0.5


@pytest.mark.parametrize("scan_layers", [False, True])
def test_every_matrix_reaches_the_scheduled_sparsity_at_each_recompute(tiny_config, scan_layers):
    """Masks recomputed at updates 2, 5 and 8: after update t every prunable matrix (every layer
    of a stacked one) has floor(s x size) zeros for the s of the last recompute, the rest none."""
    config = pruning_config(tiny_config, dict(scan_layers=scan_layers),
                            dict(sparsity=0.8, begin_step=2, end_step=8, every_steps=3))
    params = model_params(config)
    tx = optim.make_optimizer(config)
    opt_state = tx.init(params)
    update = jax.jit(tx.update)
    for t in range(10):
        updates, opt_state = update(random_grads(params, t), opt_state, params)
        params = optax.apply_updates(params, updates)
        recomputed = [d for d in (2, 5, 8) if d <= t]
        sparsity = cubic(recomputed[-1], 0.8, 2, 8) if recomputed else 0.0
        for name, value in named_leaves(params).items():
            per_matrix = value.reshape(value.shape[0] if scan_layers and value.ndim > 2 else 1, -1)
            zeros = np.mean(per_matrix == 0, axis=1)
            if name.split("/")[-1] in PRUNABLE:
                np.testing.assert_allclose(zeros, sparsity, atol=1 / per_matrix.shape[1], err_msg=name)
            else:
                assert not zeros.any(), name
    assert sparsity == 0.8


def test_pruned_weights_stay_exactly_zero_although_adam_momentum_would_revive_them(tiny_config):
    """Half of each matrix is pruned at update 5; for 40 more updates the gradient keeps pushing
    every weight, and Adam alone would move the pruned ones at once."""
    config = pruning_config(tiny_config, prune_keys=dict(sparsity=0.5, begin_step=5, end_step=5))
    # wi = 0.1, 0.2, ..., 6.4 row by row: Adam moves them all alike, keeping their order.
    params = {"mlp": {"wi": 0.1 * jnp.arange(1.0, 65.0).reshape(8, 8), "wo": jnp.ones((8, 4))},
              "norm": {"scale": jnp.ones((8,))}}
    adam = optax.adam(1e-2)
    tx = optax.chain(adam, masks.magnitude_pruning(config))
    opt_state = tx.init(params)
    update = jax.jit(tx.update)
    for t in range(45):
        grads = jax.tree.map(lambda p: jnp.full_like(p, 1.0 + t % 3), params)
        updates, opt_state = update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if t >= 5:
            for name in ("wi", "wo"):
                assert (params["mlp"][name] == 0).sum() == params["mlp"][name].size // 2, (t, name)
    pruned_wi = np.asarray(params["mlp"]["wi"]) == 0
    assert pruned_wi[:4].all() and not pruned_wi[4:].any()  # the 32 smallest |wi|.
    adam_updates, _ = adam.update(grads, opt_state[0], params)
    assert np.all(np.asarray(adam_updates["mlp"]["wi"])[pruned_wi] != 0)
    assert not (params["norm"]["scale"] == 0).any()


def fan_in_groups(name: str, value: np.ndarray, stacked: bool) -> np.ndarray:
    """[groups, 4]: runs of 4 consecutive weights along the fan-in (out: along head_dim)."""
    axis = (1 if name == "out" else 0) + stacked
    return np.moveaxis(value, axis, -1).reshape(-1, 4)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_two_four_keeps_the_two_largest_of_every_four_fan_in_weights(tiny_config, scan_layers):
    """At begin_step (update 1) each group of 4 keeps the 2 weights largest after the update;
    later updates keep the pattern."""
    config = pruning_config(tiny_config, dict(scan_layers=scan_layers),
                            dict(pattern="2:4", begin_step=1), learning_rate=1e-3)
    params = model_params(config)
    tx = optim.make_optimizer(config)
    unpruned = optax.adamw(1e-3, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                           weight_decay=0.0)
    opt_state, reference_state = tx.init(params), unpruned.init(params)
    update, reference_update = jax.jit(tx.update), jax.jit(unpruned.update)
    for t in range(4):
        grads = random_grads(params, t)
        reference, reference_state = reference_update(grads, reference_state, params)
        updates, opt_state = update(grads, opt_state, params)
        expected = named_leaves(optax.apply_updates(params, reference))
        params = optax.apply_updates(params, updates)
        for path, value in named_leaves(params).items():
            name = path.split("/")[-1]
            if name not in PRUNABLE:
                continue
            kept = fan_in_groups(name, value, scan_layers) != 0
            if t == 0:
                assert kept.all(), path
                continue
            assert (kept.sum(axis=1) == 2).all(), path
            if t == 1:
                magnitude = np.abs(fan_in_groups(name, expected[path], scan_layers))
                largest = np.zeros_like(kept)
                np.put_along_axis(largest, np.argsort(-magnitude, axis=1)[:, :2], True, axis=1)
                np.testing.assert_array_equal(kept, largest, err_msg=path)


def test_two_four_refuses_a_fan_in_that_groups_of_four_do_not_divide(tiny_config):
    config = pruning_config(tiny_config, dict(emb_dim=24, num_heads=4, num_kv_heads=4),
                            dict(pattern="2:4"))
    with pytest.raises(ValueError, match=r"out has 6 there \(model.head_dim\).*multiple of 4"):
        optim.make_optimizer(config).init(model_params(config))


@pytest.mark.parametrize("model, prune_keys, message", [
    (None, dict(sparsity=0.5, begin_step=200),  # end_step 0: num_train_steps=100.
     "config.prune.begin_step=200 is after config.prune.end_step=100"),
    (dict(rank_fraction=0.5), dict(sparsity=0.5), "config.model.rank_fraction=0.5 factors them"),
])
def test_impossible_pruning_is_refused_naming_the_key(tiny_config, model, prune_keys, message):
    with pytest.raises(ValueError, match=message):
        optim.make_optimizer(pruning_config(tiny_config, model, prune_keys))


def test_without_pruning_the_chain_has_no_masks(tiny_config):
    config = tiny_config()
    opt_state = optim.make_optimizer(config).init(model_params(config))
    assert not any(isinstance(s, masks.PruneState) for s in opt_state)


def test_masks_shard_like_their_parameters_update_like_one_device_and_save(tiny_config, tmp_path):
    """On a data x fsdp x tensor mesh, each mask has its parameter's sharding; 6 updates (masks
    recomputed at 0-4) give one device's parameters and masks bit for bit; the state saves and
    restores."""
    config = pruning_config(tiny_config, dict(num_heads=8, num_kv_heads=8, vocab_size=64,
                                              num_encoder_layers=1, num_decoder_layers=1),
                            dict(sparsity=0.6, begin_step=0, end_step=4, every_steps=1),
                            mesh_shape="data:2,fsdp:2,tensor:2")
    mesh = parallel.make_mesh(config.mesh_shape)
    _, state, shardings = steps.create_train_state(config, mesh)
    params_specs = named_leaves(jax.tree.map(lambda s: s.spec, shardings.params))
    mask_specs = named_leaves(jax.tree.map(lambda s: s.spec, shardings.opt_state[-1].masks))
    assert set(mask_specs) == {k for k in params_specs if k.split("/")[-1] in PRUNABLE}
    assert all(mask_specs[k] == params_specs[k] for k in mask_specs)
    assert mask_specs["encoder_layers/0/mlp/wi"] == jax.sharding.PartitionSpec("fsdp", "tensor")
    tx = optim.make_optimizer(config)

    def step(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def run(params, opt_state, step_shardings):
        update = jax.jit(step, **step_shardings)
        for t in range(6):
            params, opt_state = update(params, opt_state, random_grads(params, t))
        return params, opt_state

    sharded = run(state.params, state.opt_state,
                  dict(out_shardings=(shardings.params, shardings.opt_state)))
    one_device = run(*jax.device_put(jax.device_get((state.params, state.opt_state)),
                                     jax.devices()[0]), {})
    assert jax.tree.all(jax.tree.map(np.array_equal, jax.device_get(sharded), jax.device_get(one_device)))
    masks = named_leaves(sharded[1][-1].masks)
    assert all(np.sum(~m) == np.floor(0.6 * m.size) for m in masks.values())

    initial, state = state, state.replace(step=state.step + 6, params=sharded[0], opt_state=sharded[1])
    saved = checkpoint.Checkpoints(str(tmp_path), config)
    saved.save(state)
    saved.wait()
    restored = saved.restore(6, initial)
    saved.close()
    assert jax.tree.all(jax.tree.map(np.array_equal, jax.device_get(restored), jax.device_get(state)))


def test_sparsity_report_counts_zeros_per_matrix_per_layer_and_overall():
    params = {
        "encoder_layers": {"mlp": {"wi": nnx.Param(jnp.array([[[0.0, 1.0], [0.0, 0.0]],
                                                              [[1.0, 1.0], [1.0, 0.0]]]),
                                                   logical_axes=("layers", "embed", "mlp"))}},
        "attention": {"query": jnp.array([[0.0, 2.0, 3.0, 4.0]])},
        "norm": {"scale": jnp.array([0.0, 1.0])},
    }
    report = sparsity.sparsity_report(params)
    assert report.matrices == {"encoder_layers/mlp/wi[0]": 0.75, "encoder_layers/mlp/wi[1]": 0.25,
                               "attention/query": 0.25}
    assert report.prunable_zeros == 5 / 12
    assert (report.nonzero_params, report.params) == (8, 14)
