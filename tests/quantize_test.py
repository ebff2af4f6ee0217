"""int8 matmuls (config.quantization="int8", tfx/model/quantize.py) against integer arithmetic done
here in numpy, the float model, one device, and the float gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend.core import jaxprs_in_params

from tfx.core import config as config_lib
from tfx.core import parallel
from tfx.infer import trained
from tfx.model import decode, quantize
from tfx.model.transformer import EncoderDecoder
from tfx.train import steps

from runs import validation_batch

# The projections of the model: queries/keys/values, attention output, tied output projection.
SPECS = [("btd,dnh->btnh", (2, 3, 8), (8, 4, 5)), ("btnh,nhd->btd", (2, 3, 4, 5), (4, 5, 8)),
         ("bld,vd->blv", (2, 3, 8), (11, 8))]


def contracted(indices: str, out: str) -> tuple[int, ...]:
    return tuple(axis for axis, index in enumerate(indices) if index not in out)


def peak_positive(x: np.ndarray, indices: str, out: str) -> np.ndarray:
    """x with each slice's sign flipped so that its largest magnitude is positive: the int8
    bound puts that element at +-127.5 exactly, where the last bit of the scale decides the
    rounding of a negative one (-127 or -128, both half a step off)."""
    axes = contracted(indices, out)
    peak = np.abs(x) == np.abs(x).max(axis=axes, keepdims=True)
    negative = np.where(peak, x, 0).sum(axis=axes, keepdims=True) < 0
    return np.where(negative, -x, x)


def int8_reference(x: np.ndarray, indices: str, out: str) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values as int64, scales) of x: symmetric, one scale per index kept in `out`,
    scale = absmax / 127.5 (1 for an all-zero slice), values rounded half to even."""
    absmax = np.abs(x).max(axis=contracted(indices, out), keepdims=True)
    scale = np.where(absmax > 0, absmax / np.float32(127.5), np.float32(1.0))
    return np.clip(np.round(x / scale), -128, 127).astype(np.int64), scale


@pytest.mark.parametrize("spec,x_shape,w_shape", SPECS)
def test_int8_einsum_is_an_integer_product_rescaled(spec, x_shape, w_shape):
    """Per-token activations (one of them all zero, scale 1) and per-channel weights, multiplied
    as integers (int64 here, int32 in the traced dot of int8 operands), then scaled."""
    inputs, out = spec.split("->")
    x_indices, w_indices = inputs.split(",")
    rng = np.random.default_rng(0)
    x = peak_positive(rng.normal(size=x_shape).astype(np.float32), x_indices, out)
    w = peak_positive(rng.normal(size=w_shape).astype(np.float32), w_indices, out)
    x[0, 0] = 0.0
    qx, sx = int8_reference(x, x_indices, out)
    qw, sw = int8_reference(w, w_indices, out)
    expected = np.einsum(spec, qx, qw) * np.einsum(spec, sx, sw)  # scales: contracted axes are 1
    got = jax.jit(quantize.einsum, static_argnums=0)(spec, x, w)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    dots = dot_generals(jax.make_jaxpr(quantize.einsum, static_argnums=0)(spec, x, w).jaxpr)
    types = [([v.aval.dtype for v in e.invars], e.outvars[0].aval.dtype) for e in dots]
    assert ([jnp.int8, jnp.int8], jnp.int32) in types  # the other: scales' outer product


def dot_generals(jaxpr):
    """The dot_general equations of a jaxpr and of the jaxprs inside it."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for inner in jaxprs_in_params(eqn.params):
            yield from dot_generals(inner)


@pytest.mark.parametrize("spec,x_shape,w_shape", SPECS)
def test_int8_gradient_is_the_float_gradient(spec, x_shape, w_shape):
    """Straight-through: rounding counts as the identity, so the cotangents of activations and
    weights are those of the float einsum at the same operands."""
    rng = np.random.default_rng(1)
    x, w = rng.normal(size=x_shape).astype(np.float32), rng.normal(size=w_shape).astype(np.float32)
    out_shape = jax.eval_shape(lambda: jnp.einsum(spec, x, w)).shape
    g = rng.normal(size=out_shape).astype(np.float32)

    def grads(einsum):
        return jax.grad(lambda x, w: jnp.sum(g * einsum(spec, x, w)), argnums=(0, 1))(x, w)

    for got, want in zip(grads(quantize.einsum), grads(jnp.einsum)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def forward(graphdef, params, batch, quantization):
    def logits(params):
        with quantize.matmuls(quantization):
            return nnx.merge(graphdef, params)(batch["inputs"], batch["targets"])
    return np.asarray(jax.jit(logits)(params))


@pytest.mark.parametrize("model_overrides", [
    dict(), dict(rank_fraction=0.5, activation="swiglu", share_embeddings=False,
                 logits_via_embedding=False, scan_layers=True)])
def test_int8_logits_are_within_3_percent_of_float(tiny_config, make_batch, model_overrides):
    """Rounding to 255 levels of each slice's absmax errs by about 1% of an operand's RMS; a
    few layers of such errors, partly cancelling, stay under 3% of the logits' norm."""
    config = tiny_config(model=model_overrides)
    graphdef, params = nnx.split(EncoderDecoder(config.model, nnx.Rngs(params=0)))
    batch = make_batch(0, 8, 9, 11, config.model.vocab_size)
    reference = forward(graphdef, params, batch, "none")
    error = np.linalg.norm(forward(graphdef, params, batch, "int8") - reference)
    assert 0 < error < 0.03 * np.linalg.norm(reference)


def test_none_traces_the_float_model_unchanged(tiny_config, make_batch):
    """quantization="none" traces exactly the program of a model called outside the context."""
    config = tiny_config()
    graphdef, params = nnx.split(EncoderDecoder(config.model, nnx.Rngs(params=0)))
    batch = make_batch(0, 2, 5, 6, config.model.vocab_size)

    def jaxpr(quantization=None):
        def logits(params):
            return nnx.merge(graphdef, params)(batch["inputs"], batch["targets"])
        if quantization is None:
            return str(jax.make_jaxpr(logits)(params))
        with quantize.matmuls(quantization):
            return str(jax.make_jaxpr(logits)(params))

    assert jaxpr("none") == jaxpr() and "i8[" not in jaxpr()
    assert "i8[" in jaxpr("int8")


def test_qat_train_step_forward_is_ptq_and_moves_every_parameter(tiny_config, make_batch):
    """Without dropout, the QAT train step reports the loss the PTQ eval step computes on the
    same parameters (not the float loss), and its straight-through gradients, finite, reach
    every parameter: the second step (the first one's learning rate is 0) moves each one."""
    config = tiny_config(quantization="int8")
    mesh = parallel.make_mesh("data:1", jax.devices()[:1])
    graphdef, state, shardings = steps.create_train_state(config, mesh)
    embedding = state.params["source_embed"]["embedding"]  # larger logits: a loss int8 moves.
    embedding.set_value(embedding.get_value() * 4)
    batch = make_batch(5, 8, 9, 11, config.model.vocab_size)
    loss = {}
    for quantization in ("none", "int8"):
        config.quantization = quantization
        sums = steps.make_eval_step(config, graphdef, mesh, shardings.params)(state.params, batch)
        loss[quantization] = float(sums["loss"] / sums["weight"])
    train_step = steps.make_train_step(config, graphdef, mesh, shardings)
    state, metrics = train_step(state, batch)
    np.testing.assert_allclose(metrics["loss"], loss["int8"], rtol=1e-6)
    assert abs(loss["int8"] - loss["none"]) > 1e-4 * loss["none"], loss
    before = jax.device_get(state.params)
    state, metrics = train_step(state, batch)
    assert np.isfinite(metrics["grad_norm"])
    moved = jax.tree.map(lambda new, old: bool(np.all(np.isfinite(new)) and np.any(new != old)),
                         jax.device_get(state.params), before)
    assert all(jax.tree.leaves(moved)), moved


@pytest.mark.parametrize("spec,x_axes,w_axes", [
    ("btd,dnh->btnh", ("batch", "length", "embed"), ("embed", "heads", "head_dim")),
    ("btnh,nhd->btd", ("batch", "length", "heads", "head_dim"), ("heads", "head_dim", "embed")),
    ("bld,vd->blv", ("batch", "length", "embed"), ("vocab", "embed"))])
def test_sharded_int8_einsum_equals_one_device(spec, x_axes, w_axes):
    """Operands split as the default rules split them on data:2,fsdp:2,tensor:2 (weights' embed
    over fsdp, heads and vocab over tensor): the scales are maxima over whole slices and the
    int32 sums are exact, so the result is the one device's."""
    sizes = dict(b=4, t=3, l=3, d=8, n=4, h=2, v=6)
    inputs, _ = spec.split("->")
    rng = np.random.default_rng(2)
    x, w = (rng.normal(size=[sizes[i] for i in indices]).astype(np.float32)
            for indices in inputs.split(","))
    einsum = jax.jit(quantize.einsum, static_argnums=0)
    mesh = parallel.make_mesh("data:2,fsdp:2,tensor:2")
    rules = config_lib.DEFAULT_LOGICAL_AXIS_RULES
    placed = [jax.device_put(a, jax.sharding.NamedSharding(mesh, parallel.logical_to_spec(
        axes, a.shape, rules, mesh))) for a, axes in ((x, x_axes), (w, w_axes))]
    assert placed[1].sharding.spec != jax.sharding.PartitionSpec()
    np.testing.assert_allclose(einsum(spec, *placed), einsum(spec, x, w), rtol=1e-6, atol=1e-7)


def test_data_parallel_int8_eval_and_decoding_equal_one_device_row_by_row(tiny_config, make_batch):
    """int8 rounding turns float noise into whole steps that then propagate: an XLA kernel
    picked for another shape flips a few roundings and moves the logits by a fair part of the
    quantization error. So one row per device on data:8 is compared with one device given the
    rows one at a time (the same local shapes), sums and greedy tokens."""
    config = tiny_config(quantization="int8", decode=dict(strategy="greedy", max_length_offset=4))
    graphdef, params = nnx.split(EncoderDecoder(config.model, nnx.Rngs(params=1)))
    batch = make_batch(2, 8, 9, 11, config.model.vocab_size)
    batch["inputs"][batch["inputs"] == 0] = 2  # unpadded: the longest source sets the limit.

    def run(mesh, batch):
        shardings = parallel.state_shardings(params, mesh, config.logical_axis_rules)
        placed = jax.device_put(params, shardings)
        eval_step = steps.make_eval_step(config, graphdef, mesh, shardings)
        translate = decode.make_translate(config, graphdef, mesh, shardings)
        return [(jax.device_get(eval_step(placed, b)), np.asarray(translate(placed, b["inputs"])))
                for b in batch]

    [(sums, tokens)] = run(parallel.make_mesh("data:8"), [batch])
    rows = run(parallel.make_mesh("data:1", jax.devices()[:1]),
               [{k: v[i:i + 1] for k, v in batch.items()} for i in range(8)])
    jax.tree.map(lambda total, *parts: np.testing.assert_allclose(total, sum(parts), rtol=1e-6),
                 sums, *[row_sums for row_sums, _ in rows])
    np.testing.assert_array_equal(tokens, np.concatenate([row_tokens for _, row_tokens in rows]))


def test_int8_eval_and_greedy_translations_of_a_trained_model_stay_near_float(converged):
    """The converged tiny model on 64 validation pairs, int8 PTQ of its float checkpoint: the
    rounding noise is unbiased, so the eval loss moves under 1% (the bfloat16 test's bound),
    and most greedy translations come out token for token the same (one near-tie the noise
    reorders changes the rest of a translation, so not all)."""
    config, workdir = converged
    nll, outputs = {}, {}
    for quantization in ("none", "int8"):
        config = config.copy_and_resolve_references()
        config.quantization = quantization
        config.decode.update(strategy="greedy", max_length_offset=8)
        model = trained.load(config, workdir)
        batch = validation_batch(model.tokenizer)
        sums = steps.make_eval_step(config, model.graphdef, model.mesh, model.params_shardings)(
            model.params, batch)
        nll[quantization] = float(sums["nll"] / sums["weight"])
        outputs[quantization] = np.asarray(decode.make_translate(
            config, model.graphdef, model.mesh, model.params_shardings)(model.params, batch["inputs"]))
    assert abs(nll["int8"] - nll["none"]) < 0.01 * nll["none"], nll
    same = np.mean([np.array_equal(a, b) for a, b in zip(outputs["none"], outputs["int8"])])
    assert same >= 0.6, same
