"""int8 matmuls (`config.quantization="int8"`), quantized with Qwix.

    with quantize.matmuls(config.quantization):  # while tracing a step
        logits_BxTxV = model(...)

Inside the context every projection by a weight (`layers.project`: attention, MLP, the output
projection; their low-rank factors too) is an int8 x int8 product accumulated in int32, then
rescaled: weights symmetric per output channel, activations symmetric per token (dynamic),
each scale from the absolute maximum over the contracted indices (see `quantized`). Attention
scores and weighted sums (activation x activation) stay in the compute dtype.

Evaluation, scoring and decoding are post-training quantization (PTQ): the weights are
quantized from the float32 parameters inside each compiled call (once per call in decoding:
XLA moves their quantization out of the decoding loop), so checkpoints stay float32.
Training is quantization-aware (QAT): the forward pass is the same int8 product and its
gradient is the float projection's at the same operands (a straight-through estimator: the
rounding counts as the identity), for a short fine-tune from a float run (`config.init_from`).

Qwix's own integration, `qwix.quantize_model`, does not reach these projections: it patches
`jax.numpy.einsum` and `jax.lax.dot_general` only while the one wrapped method of an NNX model
runs (`__call__`; decoding calls `encode`, `decoder_states` and `logits`), and recognises a
weight by finding the traced array among the calling module's `nnx.Param`s. Under `jit` the
einsum inside `layers._projection`, a `custom_vjp`, sees fresh tracers, so that search falls
back to matching shapes: GQA's key and value weights are then taken for activations and MHA's
query, key and value fail as ambiguous. Its PTQ provider also replaces the tied embedding with
a quantized array its lookup cannot read. Hence an explicit hook in `layers.project`, with
Qwix's quantization (`qwix.quantize`) and an int8 einsum of our own (see `einsum`).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
import qwix

_INT8: contextvars.ContextVar[bool] = contextvars.ContextVar("tfx_int8_matmuls", default=False)


@contextlib.contextmanager
def matmuls(quantization: str):
    """Within this context (while tracing), projections are int8 if `quantization` is "int8"
    (`config.quantization`; "none" leaves them as they are)."""
    token = _INT8.set(quantization == "int8")
    try:
        yield
    finally:
        _INT8.reset(token)


def active() -> bool:
    """Whether projections traced now are int8 (see `matmuls`)."""
    return _INT8.get()


def quantized(x: jax.Array, indices: str, out: str) -> qwix.QArray:
    """Symmetric int8 of an einsum operand with einsum `indices`, one scale for each index
    combination kept in the output `out`: round(x / scale) (half to even), clipped to
    [-128, 127], with scale = absmax over the contracted indices / 127.5 (Qwix's bound, so
    that the top bucket, [126.5, 127.5), is as wide as the others); 1 for an all-zero slice."""
    kept = [axis for axis, index in enumerate(indices) if index in out]
    return qwix.quantize(x.astype(jnp.float32), jnp.int8, channelwise_axes=kept)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def einsum(spec: str, x: jax.Array, w_f32: jax.Array) -> jax.Array:
    """`spec` einsum of activations (per-token int8) and a float32 weight (per-channel int8) with
    int32 accumulation, rescaled to x's dtype. The gradient is straight-through (see module).

    The int8 product is `spec` itself, activations first; `qwix.einsum` lets opt_einsum order
    the operands, weight first here, and XLA:CPU then upcasts that dot to int32 x int32 instead
    of running its int8 kernel. The scales' einsum contracts axes of size 1: their outer product.
    """
    inputs, out = spec.split("->")
    x_indices, w_indices = inputs.split(",")
    qx, qw = quantized(x, x_indices, out), quantized(w_f32, w_indices, out)
    product = jnp.einsum(spec, qx.qvalue, qw.qvalue, preferred_element_type=jnp.int32)
    return (product * jnp.einsum(spec, qx.scale, qw.scale)).astype(x.dtype)


def _float_einsum(spec: str, x: jax.Array, w_f32: jax.Array) -> jax.Array:
    """The float projection whose gradient `einsum` takes (as `layers.project` computes it)."""
    return jnp.einsum(spec, x, w_f32.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


def _einsum_fwd(spec, x, w_f32):
    return einsum(spec, x, w_f32), (x, w_f32)


def _einsum_bwd(spec, residuals, grad_out):
    return jax.vjp(functools.partial(_float_einsum, spec), *residuals)[1](grad_out)


einsum.defvjp(_einsum_fwd, _einsum_bwd)
