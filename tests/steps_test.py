
import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from transformer_test import stack_layer_lists

from tfx.core import parallel
from tfx.infer import trained
from tfx.train import steps

from runs import validation_batch


def run_steps(config, batches, mesh_shape, devices=None):
    mesh = parallel.make_mesh(mesh_shape, devices)
    graphdef, state, shardings = steps.create_train_state(config, mesh)
    train_step = steps.make_train_step(config, graphdef, mesh, shardings)
    history = []
    for batch in batches:
        state, metrics = train_step(state, parallel.shard_batch(batch, mesh, config.logical_axis_rules))
        history.append(jax.device_get(metrics))
    return jax.device_get(state.params), history


def assert_mesh_matches_one_device(config, make_batch, mesh_shape):
    """Two train steps on `mesh_shape` give one device's losses, grad norms and parameters."""
    batches = [make_batch(seed, 16, 9, 11, config.model.vocab_size) for seed in range(2)]
    ref_params, ref_history = run_steps(config, batches, "data:1", jax.devices()[:1])
    params, history = run_steps(config, batches, mesh_shape)
    for ref, got in zip(ref_history, history):
        np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-5)
        np.testing.assert_allclose(got["grad_norm"], ref["grad_norm"], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 params, ref_params)


def sharding_config(tiny_config):
    # Sizes that every mesh axis of 8 divides, so heads, mlp and vocab really are split.
    return tiny_config(model=dict(vocab_size=64, emb_dim=32, num_heads=8, num_kv_heads=8,
                                  mlp_dim=64, dropout_rate=0.1))


@pytest.mark.parametrize("mesh_shape", ["data:8", "fsdp:8,data:1", "tensor:8,data:1",
                                        "data:2,fsdp:2,tensor:2"])
def test_sharded_train_steps_equal_one_device(tiny_config, make_batch, mesh_shape):
    assert_mesh_matches_one_device(sharding_config(tiny_config), make_batch, mesh_shape)


def test_state_is_created_sharded_by_the_rules(tiny_config):
    config = sharding_config(tiny_config)
    mesh = parallel.make_mesh("data:2,fsdp:2,tensor:2")
    _, state, _ = steps.create_train_state(config, mesh)
    wi = state.params["encoder_layers"][0]["mlp"]["wi"][...]
    assert wi.sharding.spec == P("fsdp", "tensor")
    assert {s.data.shape for s in wi.addressable_shards} == {(16, 32)}
    adam_mu = state.opt_state[1][0].mu["encoder_layers"][0]["mlp"]["wi"][...]
    assert adam_mu.sharding.spec == P("fsdp", "tensor")
    assert state.params["source_embed"]["embedding"][...].sharding.spec == P("tensor", "fsdp")


def test_scanned_layers_train_on_a_mesh_like_unrolled_layers(tiny_config, make_batch):
    """Same initialisation, same steps; stacked parameters keep the layers axis whole."""
    model = dict(vocab_size=64, emb_dim=32, num_heads=8, num_kv_heads=8, mlp_dim=64)
    config, scanned = tiny_config(model=model), tiny_config(model=dict(model, scan_layers=True))
    batches = [make_batch(seed, 16, 9, 11, 64) for seed in range(2)]
    params, history = run_steps(config, batches, "data:2,fsdp:2,tensor:2")
    scanned_params, scanned_history = run_steps(scanned, batches, "data:2,fsdp:2,tensor:2")
    for ref, got in zip(history, scanned_history):
        np.testing.assert_allclose(got["loss"], ref["loss"], rtol=1e-5)
        np.testing.assert_allclose(got["grad_norm"], ref["grad_norm"], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 nnx.to_pure_dict(scanned_params), stack_layer_lists(nnx.to_pure_dict(params)))

    _, state, _ = steps.create_train_state(scanned, parallel.make_mesh("data:2,fsdp:2,tensor:2"))
    wi = state.params["decoder_layers"]["mlp"]["wi"][...]
    assert wi.sharding.spec == P(None, "fsdp", "tensor")
    assert {s.data.shape for s in wi.addressable_shards} == {(2, 16, 32)}
    adam_mu = state.opt_state[1][0].mu["decoder_layers"]["mlp"]["wi"][...]
    assert adam_mu.sharding.spec == P(None, "fsdp", "tensor")


def test_gradient_accumulation_equals_one_big_batch(tiny_config, make_batch):
    batches = [make_batch(seed, 16, 9, 11, 50) for seed in range(2)]
    big_params, big_history = run_steps(tiny_config(), batches, "data:8")
    acc_params, acc_history = run_steps(tiny_config(grad_accum_steps=4, per_device_batch_size=4), batches,
                                        "data:2,fsdp:2,tensor:2")
    for big, acc in zip(big_history, acc_history):
        for key in ("loss", "accuracy", "weight", "grad_norm"):
            np.testing.assert_allclose(acc[key], big[key], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 acc_params, big_params)


def test_tiny_model_learns_to_copy(tiny_config):
    config = tiny_config(label_smoothing=0.0, learning_rate=3e-3, warmup_steps=20,
                         model=dict(vocab_size=20, emb_dim=64, mlp_dim=128))
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, 20, (32, 8)).astype(np.int32)
    batch = {"inputs": tokens, "targets": tokens}
    _, history = run_steps(config, [batch] * 250, "data:1", jax.devices()[:1])
    assert history[0]["accuracy"] < 0.2
    assert history[-1]["accuracy"] == 1.0
    assert history[-1]["nll"] < 0.05


def test_adafactor_state_shards_and_matches_one_device(tiny_config, make_batch):
    config = tiny_config(optimizer="adafactor",
                         model=dict(vocab_size=64, emb_dim=32, num_heads=8, num_kv_heads=8, mlp_dim=64))
    assert_mesh_matches_one_device(config, make_batch, "data:2,fsdp:2,tensor:2")


def test_batch_that_microbatches_cannot_split_is_refused(tiny_config, make_batch):
    with pytest.raises(ValueError, match="per_device_batch_size=2 is not divisible by config.grad_accum_steps=3"):
        tiny_config(grad_accum_steps=3)
    config = tiny_config(grad_accum_steps=2)  # a batch of other rows than the config's
    with pytest.raises(ValueError, match="config.grad_accum_steps=2"):
        run_steps(config, [make_batch(0, 24, 9, 11, 50)], "data:8")


def test_every_option_shards_like_one_device(tiny_config, make_batch):
    """Untied embeddings, learned positions, swiglu, GQA, RMSNorm, post-LN, attention dropout."""
    config = tiny_config(model=dict(
        vocab_size=64, emb_dim=32, num_heads=8, num_kv_heads=2, mlp_dim=64, dropout_rate=0.1,
        attention_dropout_rate=0.1, activation_dropout_rate=0.1, share_embeddings=False,
        logits_via_embedding=False, positions="learned", activation="swiglu", norm="rmsnorm",
        norm_position="post"))
    assert_mesh_matches_one_device(config, make_batch, "data:2,fsdp:2,tensor:2")


def test_eval_step_sums_match_the_train_step_metrics(tiny_config, make_batch):
    """Without dropout, eval on the pre-update params sees what the train step reported."""
    config = tiny_config()
    mesh = parallel.make_mesh("data:2,fsdp:2,tensor:2")
    graphdef, state, shardings = steps.create_train_state(config, mesh)
    eval_step = steps.make_eval_step(config, graphdef, mesh, shardings.params)
    train_step = steps.make_train_step(config, graphdef, mesh, shardings)
    batch = parallel.shard_batch(make_batch(5, 16, 9, 11, 50), mesh, config.logical_axis_rules)
    sums = jax.device_get(eval_step(state.params, batch))
    _, metrics = train_step(state, batch)
    np.testing.assert_allclose(sums["loss"] / sums["weight"], metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(sums["correct"] / sums["weight"], metrics["accuracy"], rtol=1e-5)
    assert sums["weight"] == int((np.asarray(batch["targets"]) > 0).sum())


@pytest.mark.parametrize("mesh_shape", ["data:1", "data:2,fsdp:2,tensor:2", "data:8"])
def test_score_step_sums_the_target_log_probabilities_of_each_pair(tiny_config, make_batch, mesh_shape):
    """Per pair, the sum of log softmax(logits)[target] over its real target tokens, computed
    here by brute force in numpy from the unsharded model's logits."""
    config = tiny_config(model=dict(dropout_rate=0.3))  # scoring must not drop out
    devices = jax.devices()[:1] if mesh_shape == "data:1" else None
    mesh = parallel.make_mesh(mesh_shape, devices)
    graphdef, state, shardings = steps.create_train_state(config, mesh)
    score_step = steps.make_score_step(config, graphdef, mesh, shardings.params)
    batch = make_batch(3, 16, 9, 11, 50)
    batch["inputs"][-1] = batch["targets"][-1] = 0  # a padding row
    log_prob, tokens = jax.device_get(
        score_step(state.params, parallel.shard_batch(batch, mesh, config.logical_axis_rules)))

    model = nnx.merge(graphdef, jax.device_get(state.params))
    logits = np.asarray(model(batch["inputs"], batch["targets"]), np.float64)
    log_softmax = logits - logits.max(-1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
    target_log_p = np.take_along_axis(log_softmax, batch["targets"][..., None], -1)[..., 0]
    real = batch["targets"] > 0
    np.testing.assert_allclose(log_prob, (target_log_p * real).sum(1), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(tokens, real.sum(1))
    assert tokens[-1] == 0 and log_prob[-1] == 0 and (log_prob[:-1] < 0).all()


def test_batch_with_unknown_keys_is_refused(tiny_config, make_batch):
    batch = make_batch(0, 16, 9, 11, 50)
    batch["inputs_segmentation"] = np.ones_like(batch["inputs"])
    with pytest.raises(ValueError, match=r"unknown keys \['inputs_segmentation'\]"):
        run_steps(tiny_config(), [batch], "data:8")


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_nonfinite_step_is_skipped_or_reported(tiny_config, make_batch, policy):
    """An infinite embedding makes the loss NaN: 'skip' leaves parameters and moments as they
    were (the step counter and the optimizer's counts still advance, so the learning rate stays
    the schedule's at the step); 'stop' applies the NaN update for the trainer to catch."""
    config = tiny_config(nonfinite_loss=policy)
    mesh = parallel.make_mesh("data:8")
    graphdef, state, shardings = steps.create_train_state(config, mesh)
    embedding = state.params["source_embed"]["embedding"]
    embedding.set_value(embedding.get_value().at[5].set(np.inf))
    before = jax.device_get((state.params, state.opt_state))
    train_step = steps.make_train_step(config, graphdef, mesh, shardings)
    batch = make_batch(0, 16, 9, 11, 50)
    batch["inputs"][:, 0] = 5
    state, metrics = train_step(state, parallel.shard_batch(batch, mesh, config.logical_axis_rules))
    assert not np.isfinite(metrics["loss"]) and int(state.step) == 1
    after = jax.device_get((state.params, state.opt_state))
    if policy == "skip":
        assert int(metrics["skipped"]) == 1

        def check(path, new, old):
            is_count = str(getattr(path[-1], "name", "")) == "count"
            np.testing.assert_array_equal(new, old + 1 if is_count else old, err_msg=str(path))
            return is_count
        counts = jax.tree_util.tree_map_with_path(check, after, before)
        assert any(jax.tree.leaves(counts))
    else:
        assert "skipped" not in metrics
        assert np.isnan(after[0]["decoder_norm"]["scale"].get_value()).any()


def test_bfloat16_eval_loss_of_a_trained_model_is_within_one_percent_of_float32(converged):
    """The converged tiny model's loss on 64 validation pairs, computed in bfloat16 (float32
    logits, norms and softmax) and in float32 from the same parameters."""
    config, workdir = converged
    nll = {}
    for dtype in ("float32", "bfloat16"):
        config = config.copy_and_resolve_references()
        config.model.dtype = dtype
        model = trained.load(config, workdir)
        batch = validation_batch(model.tokenizer)
        eval_step = steps.make_eval_step(config, model.graphdef, model.mesh, model.params_shardings)
        sums = eval_step(model.params, batch)
        nll[dtype] = float(sums["nll"] / sums["weight"])
    assert nll["float32"] < 4.5  # trained: well below log(1000) = 6.9.
    assert abs(nll["bfloat16"] - nll["float32"]) < 0.01 * nll["float32"], nll
