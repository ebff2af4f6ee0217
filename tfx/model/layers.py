"""Transformer building blocks: embeddings, positions, norms, attention, MLP, dropout.

Parameters are float32 `nnx.Param`s carrying `logical_axes` metadata (see tfx/core/parallel.py);
computation runs in `dtype` (float32 or bfloat16), norms and softmax in float32.
Shape suffixes: B batch, S source length, T target (query) length, D emb_dim, N query heads,
K key/value heads, H head_dim, F mlp_dim, V vocab, R the rank of a low-rank projection.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from tfx.core.parallel import constrain, target_platform
from tfx.model import quantize

Initializer = jax.nn.initializers.Initializer
PROJECTION = "projection"  # the checkpoint name of every `project` result
RANK = "rank"  # the logical axis of a `LowRank` factor's rank: no default rule splits it.


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], logical_axes) -> nnx.Param:
    """A float32 parameter with its logical axis names attached."""
    return nnx.Param(init(rngs.params(), tuple(shape), jnp.float32), logical_axes=tuple(logical_axes))


def bias(shape: Sequence[int], logical_axes) -> nnx.Param:
    """A float32 bias parameter, initialised to zeros (draws no random numbers)."""
    return nnx.Param(jnp.zeros(tuple(shape), jnp.float32), logical_axes=tuple(logical_axes))


def add_bias(x: jax.Array, module: nnx.Module, name: str) -> jax.Array:
    """x plus `module`'s bias `name` over x's last axes, in x's dtype; x as it is when the
    module has no such bias (`config.model.use_bias` False)."""
    if not hasattr(module, name):
        return x
    b = getattr(module, name)[...]
    return x + b.reshape((1,) * (x.ndim - b.ndim) + b.shape).astype(x.dtype)


def dense_init(in_axis, out_axis) -> Initializer:
    """Xavier-uniform over possibly multi-dimensional fan-in/fan-out axes."""
    return jax.nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis, out_axis)


def factor_rank(fan_in: int, fan_out: int, rank_fraction: float) -> int:
    """The rank of a low-rank projection [fan_in, fan_out] (`config.model.rank_fraction` > 0):
    rank_fraction x min(fan_in, fan_out), rounded, at least 1."""
    return max(1, round(rank_fraction * min(fan_in, fan_out)))


def projection_weight(rngs: nnx.Rngs, shape: Sequence[int], logical_axes, fan_in_dims: int,
                      rank_fraction: float) -> nnx.Param | LowRank:
    """A projection weight whose first `fan_in_dims` axes are its fan-in: one Xavier-uniform
    parameter, or with `rank_fraction` > 0 a `LowRank` of rank `factor_rank`."""
    if rank_fraction == 0:
        init = dense_init(tuple(range(fan_in_dims)), tuple(range(fan_in_dims, len(shape))))
        return param(rngs, init, shape, logical_axes)
    rank = factor_rank(math.prod(shape[:fan_in_dims]), math.prod(shape[fan_in_dims:]), rank_fraction)
    return LowRank(shape, logical_axes, fan_in_dims, rank, rngs)


class LowRank(nnx.Module):
    """A projection weight [*fan_in, *fan_out] stored as the product of two factors,
    `a` [*fan_in, R] and `b` [R, *fan_out]: R x (fan_in + fan_out) parameters and multiply-adds
    per token instead of fan_in x fan_out. `project` multiplies x by a, then the result by b;
    `shape` is the full weight's, as a parameter's would be."""

    def __init__(self, shape: Sequence[int], logical_axes, fan_in_dims: int, rank: int, rngs: nnx.Rngs):
        """Initialised so that x a keeps the scale of x and a b has the variance of the
        Xavier-uniform full weight, 2 / (fan_in + fan_out)."""
        fan_in, fan_out = math.prod(shape[:fan_in_dims]), math.prod(shape[fan_in_dims:])
        in_axes, out_axes = tuple(range(fan_in_dims)), tuple(range(1, 1 + len(shape) - fan_in_dims))
        init_a = jax.nn.initializers.variance_scaling(1.0, "fan_in", "uniform", in_axes, fan_in_dims)
        init_b = jax.nn.initializers.variance_scaling(2 * fan_in / (fan_in + fan_out), "fan_in",
                                                      "uniform", 0, out_axes)
        self.a = param(rngs, init_a, (*shape[:fan_in_dims], rank), (*logical_axes[:fan_in_dims], RANK))
        self.b = param(rngs, init_b, (rank, *shape[fan_in_dims:]), (RANK, *logical_axes[fan_in_dims:]))

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.a.shape[:-1], *self.b.shape[1:])


def project(spec: str, x: jax.Array, weight: nnx.Param | LowRank, dtype) -> jax.Array:
    """einsum of activations with a float32 parameter, computed in `dtype`.

    Operands are cast to `dtype`, products accumulate in float32, the result is in `dtype` and
    the weight gradient in float32 (see `_projection`). Every index of one operand must appear
    in the other or in the output, as in all projections here. The result is named PROJECTION
    for rematerialisation policies. A `LowRank` weight is two such projections, by its factors.
    Under `quantize.matmuls("int8")` the product is int8 (see tfx/quantize.py).
    """
    if isinstance(weight, LowRank):
        to_rank, from_rank = _factor_specs(spec)
        return project(from_rank, project(to_rank, x, weight.a, dtype), weight.b, dtype)
    projection = quantize.einsum if quantize.active() else _projection
    return checkpoint_name(projection(spec, x.astype(dtype), weight[...]), PROJECTION)


def _factor_specs(spec: str) -> tuple[str, str]:
    """The einsum specs of x by a weight's first factor and of that by its second, the rank
    indexed "r": "btd,dnh->btnh" gives "btd,dr->btr" and "btr,rnh->btnh" (fan-in indices
    come first in a weight, as in all projections here)."""
    inputs, out = spec.split("->")
    x_axes, w_axes = inputs.split(",")
    kept = "".join(i for i in x_axes if i not in w_axes)
    fan_in = "".join(i for i in w_axes if i in x_axes)
    return f"{x_axes},{fan_in}r->{kept}r", f"{kept}r,r{w_axes[len(fan_in):]}->{out}"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _projection(spec: str, x: jax.Array, w_f32: jax.Array) -> jax.Array:
    """einsum with operands in x's dtype, float32 accumulation, a result in x's dtype.

    A custom VJP for two reasons. In bfloat16, the backward products take bfloat16 operands
    too: plain autodiff would hand them float32 cotangents, and XLA:CPU then runs every
    gradient dot in float32. In any dtype, the activation the weight gradient needs is saved
    through a `fusion_barrier`: that product transposes it, and XLA:CPU would otherwise fuse
    the activation's producers (norm, relu, dropout) into the transpose, a strided loop much
    slower than transposing a buffer.
    """
    return jnp.einsum(spec, x, w_f32.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


def _projection_fwd(spec, x, w_f32):
    return _projection(spec, x, w_f32), (fusion_barrier(x), w_f32.astype(x.dtype))


def _projection_bwd(spec, residuals, grad_out):
    x, w = residuals
    inputs, out = spec.split("->")
    x_axes, w_axes = inputs.split(",")
    grad_out = grad_out.astype(x.dtype)
    grad_x = jnp.einsum(f"{out},{w_axes}->{x_axes}", grad_out, w, preferred_element_type=jnp.float32)
    grad_w = jnp.einsum(f"{x_axes},{out}->{w_axes}", x, grad_out, preferred_element_type=jnp.float32)
    return grad_x.astype(x.dtype), grad_w


_projection.defvjp(_projection_fwd, _projection_bwd)


def dropout(x: jax.Array, rate: float, rngs: nnx.Rngs | None) -> jax.Array:
    """Inverted dropout; identity when `rngs` is None (evaluation) or rate is 0.

    Each random 32-bit word decides two elements (16 bits each, so `rate` is exact to 1/65536):
    random bits, not matmuls, are the costly part of dropout on CPU.
    """
    if rngs is None or rate == 0.0:
        return x
    threshold = round(rate * 65536)
    words = jax.random.bits(rngs.dropout(), ((x.size + 1) // 2,), jnp.uint32)
    bits = jax.lax.bitcast_convert_type(words, jnp.uint16).reshape(-1)[: x.size].reshape(x.shape)
    keep = bits >= threshold
    return jnp.where(keep, x / (1.0 - threshold / 65536), jnp.zeros_like(x))


def fusion_barrier(x: jax.Array) -> jax.Array:
    """Returns x, kept in its own buffer when compiling for XLA:CPU (elsewhere, x untouched).

    XLA:CPU fuses cheap elementwise producers into every consumer, so without a barrier each
    backward fusion that needs a layer's input recomputes the whole residual stream (every
    earlier layer's adds and dropout) from scratch.
    `optimization_barrier` would say this directly, but XLA:CPU drops it before fusion; a
    conditional cannot be fused through. Its other branch (taken only if x's first element
    is already a NaN or inf) turns all of x into NaN, which keeps the branches distinct, so
    the conditional is not simplified away, and only strengthens what a non-finite value does.
    """
    if target_platform() != "cpu":
        return x
    return jax.lax.cond(jnp.isfinite(x[(0,) * x.ndim]), lambda x: x, lambda x: jnp.full_like(x, jnp.nan), x)


def _last_axis(v: jax.Array, ndim: int) -> jax.Array:
    """Reshapes a [D] vector to broadcast explicitly against a rank-`ndim` array."""
    return v.reshape((1,) * (ndim - 1) + (-1,))


class Norm(nnx.Module):
    """LayerNorm (scale and bias) or RMSNorm (scale only), computed in float32."""

    def __init__(self, dim: int, kind: str, epsilon: float, dtype):
        self.kind, self.epsilon, self.dtype = kind, epsilon, dtype
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=("embed",))
        if kind == "layernorm":
            self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32), logical_axes=("embed",))

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        x = x_BxLxD.astype(jnp.float32)
        if self.kind == "layernorm":
            x = x - jnp.mean(x, axis=-1, keepdims=True)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
        x = x * _last_axis(self.scale[...], x.ndim)
        if self.kind == "layernorm":
            x = x + _last_axis(self.bias[...], x.ndim)
        return x.astype(self.dtype)


class Embed(nnx.Module):
    """Token embedding times sqrt(D), or as it is if not `scaled`; `attend` reuses it as the
    tied output projection."""

    def __init__(self, vocab_size: int, dim: int, dtype, rngs: nnx.Rngs, scaled: bool = True):
        self.dim, self.dtype = dim, dtype
        self.multiplier = float(np.sqrt(dim)) if scaled else 1.0
        init = jax.nn.initializers.normal(stddev=dim**-0.5)
        self.embedding = param(rngs, init, (vocab_size, dim), ("vocab", "embed"))

    def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
        return lookup(self.embedding[...], tokens_BxL, self.multiplier, self.dtype)

    def attend(self, x_BxLxD: jax.Array, dtype=None, vocab_S: jax.Array | None = None) -> jax.Array:
        """Scores [B, L, V] of x against every embedding row, computed in `dtype` (default: the
        module's); with `vocab_S` [S] (token ids), [B, L, S] against those rows only."""
        table_VxD = self.embedding if vocab_S is None else jnp.take(self.embedding[...], vocab_S, axis=0)
        return project("bld,vd->blv", x_BxLxD, table_VxD, dtype or self.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def lookup(table_VxD: jax.Array, tokens_BxL: jax.Array, scale: float, dtype) -> jax.Array:
    """Rows of a float32 table times `scale`, in `dtype`; the table's gradient is autodiff's
    scatter-add, laid out for the partitioner.

    Left to autodiff, XLA partitions the scatter-add of a table split over fsdp by all-reducing
    a float32 copy of the whole table over every device and all-gathering another, and without
    fsdp all-reduces a lookup's gradient apart from the output projection's (docs/tpu.md's
    "Before you rent a TPU" has the bytes, from `python -m tfx.tpu.aot`). Here the rows' gradients
    are first resharded onto the table's embed shards (an all-to-all of activations), so each
    device adds into its own shard, and the table's gradients are reduced together, once.
    """
    return (jnp.take(table_VxD, tokens_BxL, axis=0) * scale).astype(dtype)


def _lookup_fwd(table_VxD, tokens_BxL, scale, dtype):
    return lookup(table_VxD, tokens_BxL, scale, dtype), (table_VxD, tokens_BxL)


def _lookup_bwd(scale, dtype, residuals, grad_BxLxD):
    table_VxD, tokens_BxL = residuals
    vocab, dim = table_VxD.shape
    # ("embed", "batch"): embed claims its mesh axes before batch does, so the rows' gradients
    # are split by embed like the table and by the rest of the batch axes. Nothing follows the
    # scatter-add, so XLA adds it to the table's other gradients before reducing them all once.
    rows_DxN = (grad_BxLxD.reshape(-1, dim).astype(jnp.float32) * scale).T
    rows_DxN = constrain(rows_DxN, ("embed", "batch"))
    grad_VxD = jnp.zeros((vocab, dim), jnp.float32).at[tokens_BxL.reshape(-1)].add(rows_DxN.T)
    return constrain(grad_VxD, ("vocab", "embed")), None


lookup.defvjp(_lookup_fwd, _lookup_bwd)


def sinusoidal_positions(positions_BxL: jax.Array, dim: int) -> jax.Array:
    """Sinusoidal encodings ([sin | cos] halves, as tensor2tensor/fairseq) of integer positions.

    Marian's exactly (SinusoidalPositionEmbeddings in its src/tensors/cpu/tensor_operators.cpp):
    frequencies 10000^(-i / (D/2 - 1)), sines in the first half, cosines in the second,
    positions from 0.
    """
    half = dim // 2
    inv_freq = np.exp(-np.log(10_000.0) * np.arange(half) / max(half - 1, 1)).astype(np.float32)
    angles_BxLxH = positions_BxL.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
    enc = jnp.concatenate([jnp.sin(angles_BxLxH), jnp.cos(angles_BxLxH)], axis=-1)
    return jnp.pad(enc, ((0, 0), (0, 0), (0, dim - 2 * half)))


class LearnedPositions(nnx.Module):
    """A learned position table of `max_len` rows."""

    def __init__(self, max_len: int, dim: int, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(stddev=dim**-0.5)
        self.table = param(rngs, init, (max_len, dim), ("position", "embed"))

    def __call__(self, positions_BxL: jax.Array) -> jax.Array:
        return jnp.take(self.table[...], positions_BxL, axis=0)


class Attention(nnx.Module):
    """Multi-head attention with grouped key/value heads (MHA, GQA or MQA).

    Keys/values come from `project_kv` so a decoder can compute them once (cross-attention)
    and call `attend` directly. Decoding, a few queries at a time, uses `attend_few` on
    keys/values in a layout of its own (`project_kv(..., for_decoding=True)`), and
    `attend_cached` for self-attention over a key/value cache.
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 dropout_rate: float, dtype, rngs: nnx.Rngs, rank_fraction: float = 0.0,
                 use_bias: bool = False):
        """`rank_fraction` > 0: each projection is a `LowRank` (see `projection_weight`);
        `use_bias`: each adds a bias (one vector, low-rank or not)."""
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.dropout_rate, self.dtype = dropout_rate, dtype
        self.query = projection_weight(rngs, (dim, num_heads, head_dim), ("embed", "heads", "head_dim"),
                                       1, rank_fraction)
        self.key = projection_weight(rngs, (dim, num_kv_heads, head_dim),
                                     ("embed", "kv_heads", "head_dim"), 1, rank_fraction)
        self.value = projection_weight(rngs, (dim, num_kv_heads, head_dim),
                                       ("embed", "kv_heads", "head_dim"), 1, rank_fraction)
        self.out = projection_weight(rngs, (num_heads, head_dim, dim), ("heads", "head_dim", "embed"),
                                     2, rank_fraction)
        if use_bias:
            self.query_bias = bias((num_heads, head_dim), ("heads", "head_dim"))
            self.key_bias = bias((num_kv_heads, head_dim), ("kv_heads", "head_dim"))
            self.value_bias = bias((num_kv_heads, head_dim), ("kv_heads", "head_dim"))
            self.out_bias = bias((dim,), ("embed",))

    def project_kv(self, x_BxSxD: jax.Array, for_decoding: bool = False) -> tuple[jax.Array, jax.Array]:
        """Keys and values [B, S, K, H]; `for_decoding`: keys [B, K, H, S] and values [B, K, S, H].

        The decoding layout transposes the projections: projecting straight into it makes XLA:CPU
        transpose the weights instead, at every decoding step.
        """
        k = add_bias(project("bsd,dkh->bskh", x_BxSxD, self.key, self.dtype), self, "key_bias")
        v = add_bias(project("bsd,dkh->bskh", x_BxSxD, self.value, self.dtype), self, "value_bias")
        if for_decoding:
            return (constrain(k.transpose(0, 2, 3, 1), ("batch", "kv_heads", "head_dim", "length")),
                    constrain(v.transpose(0, 2, 1, 3), ("batch", "kv_heads", "length", "head_dim")))
        axes = ("batch", "length", "kv_heads", "head_dim")
        return constrain(k, axes), constrain(v, axes)

    def attend(self, x_BxTxD: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array,
               mask_Bx1xTxS: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
        q = add_bias(project("btd,dnh->btnh", x_BxTxD, self.query, self.dtype), self, "query_bias")
        q_BxTxNxH = constrain(q, ("batch", "length", "heads", "head_dim"))
        if rngs is not None and self.dropout_rate > 0.0:
            ctx_BxTxNxH = self._attend_with_dropout(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, rngs)
        else:
            ctx_BxTxNxH = jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask_Bx1xTxS)
        ctx_BxTxNxH = constrain(ctx_BxTxNxH, ("batch", "length", "heads", "head_dim"))
        out = add_bias(project("btnh,nhd->btd", ctx_BxTxNxH, self.out, self.dtype), self, "out_bias")
        return constrain(out, ("batch", "length", "embed"))

    def _attend_with_dropout(self, q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, rngs):
        """Explicit softmax attention, so dropout can act on the attention weights.

        The fused `jax.nn.dot_product_attention` has no dropout; this path is only taken in
        training with attention_dropout_rate > 0.
        """
        groups = self.num_heads // self.num_kv_heads
        k_BxSxNxH = jnp.repeat(k_BxSxKxH, groups, axis=2)
        v_BxSxNxH = jnp.repeat(v_BxSxKxH, groups, axis=2)
        scale = q_BxTxNxH.shape[-1] ** -0.5
        logits_BxNxTxS = jnp.einsum("btnh,bsnh->bnts", q_BxTxNxH * scale, k_BxSxNxH)
        logits_BxNxTxS = jnp.where(mask_Bx1xTxS, logits_BxNxTxS.astype(jnp.float32), -1e30)
        weights = jax.nn.softmax(logits_BxNxTxS, axis=-1).astype(self.dtype)
        weights = dropout(weights, self.dropout_rate, rngs)
        return jnp.einsum("bnts,bsnh->btnh", weights, v_BxSxNxH)

    def __call__(self, x_BxTxD, kv_BxSxD, mask_Bx1xTxS, rngs=None) -> jax.Array:
        k, v = self.project_kv(kv_BxSxD)
        return self.attend(x_BxTxD, k, v, mask_Bx1xTxS, rngs)

    def attend_few(self, x_BxTxD: jax.Array, k_BxKxHxS: jax.Array, v_BxKxSxH: jax.Array,
                   mask_Bx1xTxS: jax.Array) -> jax.Array:
        """`attend` without dropout, for a few queries (decoding) and keys/values in the decoding
        layout of `project_kv`.

        The queries of a key/value head's group are side by side, so both products are plain
        batched matmuls, faster on XLA:CPU than `attend`, whose `dot_product_attention`
        transposes [B, S, K, H] keys and values at every call.
        """
        q = add_bias(project("btd,dnh->btnh", x_BxTxD, self.query, self.dtype), self, "query_bias")
        b, t, n, h = q.shape
        k, groups, s = self.num_kv_heads, n // self.num_kv_heads, k_BxKxHxS.shape[-1]
        q_BxKxGTxH = q.reshape(b, t, k, groups, h).transpose(0, 2, 3, 1, 4).reshape(b, k, groups * t, h)
        scores = jnp.einsum("bkqh,bkhs->bkqs", q_BxKxGTxH * h**-0.5, k_BxKxHxS,
                            preferred_element_type=jnp.float32)
        scores_BxKxGxTxS = jnp.where(mask_Bx1xTxS[:, :, None], scores.reshape(b, k, groups, t, s), -1e30)
        weights = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(self.dtype).reshape(b, k, groups * t, s)
        ctx_BxKxGTxH = jnp.einsum("bkqs,bksh->bkqh", weights, v_BxKxSxH)
        ctx_BxTxNxH = ctx_BxKxGTxH.reshape(b, k, groups, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
        out = add_bias(project("btnh,nhd->btd", ctx_BxTxNxH, self.out, self.dtype), self, "out_bias")
        return constrain(out, ("batch", "length", "embed"))

    def empty_cache(self, batch: int, length: int) -> tuple[jax.Array, jax.Array]:
        """Zero self-attention keys and values of `length` slots, in the decoding layout."""
        k, h = self.key.shape[1:]
        keys = jnp.zeros((batch, k, h, length), self.dtype)
        values = jnp.zeros((batch, k, length, h), self.dtype)
        return (constrain(keys, ("batch", "kv_heads", "head_dim", "length")),
                constrain(values, ("batch", "kv_heads", "length", "head_dim")))

    def attend_cached(self, x_BxTxD: jax.Array, cache: tuple[jax.Array, jax.Array], index,
                      mask_Bx1xTxL: jax.Array, windows: tuple[int, ...] = ()
                      ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Self-attention of T new positions over a cache of L slots (see `empty_cache`), once their
        keys/values are written at slots index..index+T-1; returns the output and the cache.

        `windows`: increasing slot counts, the last L. The positions attend over the first
        `windows[i]` slots only, the smallest window holding slot index+T-1 (chosen at run time,
        `lax.switch`), so that attention costs grow with the output written, not with the cache;
        the mask must hide the slots beyond it."""
        k_new, v_new = self.project_kv(x_BxTxD, for_decoding=True)
        k_BxKxHxL = jax.lax.dynamic_update_slice_in_dim(cache[0], k_new, index, axis=3)
        v_BxKxLxH = jax.lax.dynamic_update_slice_in_dim(cache[1], v_new, index, axis=2)
        if len(windows) < 2:
            return self.attend_few(x_BxTxD, k_BxKxHxL, v_BxKxLxH, mask_Bx1xTxL), (k_BxKxHxL, v_BxKxLxH)

        def over(window: int) -> Callable[[], jax.Array]:
            return lambda: self.attend_few(x_BxTxD, k_BxKxHxL[..., :window], v_BxKxLxH[:, :, :window],
                                           mask_Bx1xTxL[..., :window])

        last_slot = index + x_BxTxD.shape[1] - 1
        branch = sum(jnp.asarray(last_slot >= window, jnp.int32) for window in windows[:-1])
        return jax.lax.switch(branch, [over(window) for window in windows]), (k_BxKxHxL, v_BxKxLxH)


def _activation(name: str, h: jax.Array) -> jax.Array:
    if name == "relu":
        return jax.nn.relu(h)
    if name == "gelu":
        return jax.nn.gelu(h)
    if name == "squared_relu":
        return jnp.square(jax.nn.relu(h))
    if name == "swish":
        return jax.nn.silu(h)
    if name == "gelu_sigmoid":  # Marian's "gelu", CTranslate2's GELUSigmoid.
        return h * jax.nn.sigmoid(1.702 * h)
    raise ValueError(f"config.model.activation={name!r} is not a pointwise activation")


class Mlp(nnx.Module):
    """Position-wise feed-forward: relu, gelu, swish, gelu_sigmoid, squared_relu (Primer) or
    swiglu (gated)."""

    def __init__(self, dim: int, mlp_dim: int, activation: str, dropout_rate: float, dtype,
                 rngs: nnx.Rngs, rank_fraction: float = 0.0, use_bias: bool = False):
        """`dropout_rate` acts on the hidden activations (fairseq's activation_dropout);
        `rank_fraction` > 0 makes each matrix a `LowRank` (see `projection_weight`);
        `use_bias`: each matrix adds a bias."""
        self.activation, self.dropout_rate, self.dtype = activation, dropout_rate, dtype
        self.wi = projection_weight(rngs, (dim, mlp_dim), ("embed", "mlp"), 1, rank_fraction)
        if activation == "swiglu":
            self.wi_gate = projection_weight(rngs, (dim, mlp_dim), ("embed", "mlp"), 1, rank_fraction)
        self.wo = projection_weight(rngs, (mlp_dim, dim), ("mlp", "embed"), 1, rank_fraction)
        if use_bias:
            self.wi_bias = bias((mlp_dim,), ("mlp",))
            if activation == "swiglu":
                self.wi_gate_bias = bias((mlp_dim,), ("mlp",))
            self.wo_bias = bias((dim,), ("embed",))

    def __call__(self, x_BxLxD: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        h = add_bias(project("bld,df->blf", x_BxLxD, self.wi, self.dtype), self, "wi_bias")
        if self.activation == "swiglu":
            gate = add_bias(project("bld,df->blf", x_BxLxD, self.wi_gate, self.dtype), self, "wi_gate_bias")
            h_BxLxF = jax.nn.silu(gate) * h
        else:
            h_BxLxF = _activation(self.activation, h)
        h_BxLxF = constrain(h_BxLxF, ("batch", "length", "mlp"))
        h_BxLxF = dropout(h_BxLxF, self.dropout_rate, rngs)
        out = add_bias(project("blf,fd->bld", h_BxLxF, self.wo, self.dtype), self, "wo_bias")
        return constrain(out, ("batch", "length", "embed"))
