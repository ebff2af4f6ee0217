"""Encoder-decoder Transformer ("Attention Is All You Need") in Flax NNX.

Packed rows: `*_segment_ids` ids (0 = padding) keep pairs that share a row from attending to
each other, and `*_positions` restarts at 0 for each pair. Unpacked batches may omit both.

`config.model.remat` recomputes each layer's activations in the backward pass, and
`config.model.scan_layers` stacks the parameters of the encoder's (decoder's) layers on a
leading "layers" axis and runs them with one `lax.scan`, so compile time stays flat in depth.
`config.model.rank_fraction` > 0 makes each attention and MLP projection the product of two
low-rank factors (`layers.LowRank`); embeddings and the output projection stay whole.

Options of Marian's Transformer (OPUS-MT), all off by default: `use_bias` (a bias on every
attention and MLP projection), `output_bias` (on the logits), `embedding_norm` (a norm after
embeddings plus positions), `scale_embeddings=False` (no sqrt(D)), and
`start_from_zero_embedding` (the decoder's start token, 0, embeds as a zero vector).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from tfx.core import precision
from tfx.core.config import head_dim
from tfx.core.parallel import constrain
from tfx.model.layers import (
    PROJECTION,
    Attention,
    Embed,
    LearnedPositions,
    Mlp,
    Norm,
    bias,
    dense_init,
    dropout,
    fusion_barrier,
    param,
    project,
    sinusoidal_positions,
)

ACTIVATION_AXES = ("batch", "length", "embed")

# What the backward pass keeps of a layer: "full" only its inputs; "dots" also the outputs of
# its projections by weights (`project`, most of a layer's FLOPs), while the attention scores
# and weights, batched matmuls of [B, N, T, S] that grow with the square of the length, are
# recomputed with the elementwise rest (norms, activations, dropout).
REMAT_POLICY = {"full": None, "dots": jax.checkpoint_policies.save_only_these_names(PROJECTION)}

# Per-layer values (cross-attention keys/values, self-attention caches): a list with an entry per
# layer, or with scan_layers a single entry whose arrays are stacked on a leading layers axis.
PerLayer = Any


def attention_mask(q_segment_BxT: jax.Array, kv_segment_BxS: jax.Array, causal: bool) -> jax.Array:
    """[B, 1, T, S] boolean mask: same non-padding segment, and no look-ahead if causal."""
    same = (q_segment_BxT[:, :, None] == kv_segment_BxS[:, None, :]) & (kv_segment_BxS[:, None, :] > 0)
    if causal:
        t, s = q_segment_BxT.shape[1], kv_segment_BxS.shape[1]
        same = same & (jnp.arange(t)[:, None] >= jnp.arange(s)[None, :])[None, :, :]
    return same[:, None, :, :]


def shift_right(targets_BxT: jax.Array, segment_BxT: jax.Array) -> jax.Array:
    """Decoder inputs: targets shifted right by one within each segment, 0 (= BOS/pad) first."""
    shifted = jnp.pad(targets_BxT, ((0, 0), (1, 0)))[:, :-1]
    prev_segment = jnp.pad(segment_BxT, ((0, 0), (1, 0)))[:, :-1]
    return jnp.where(prev_segment == segment_BxT, shifted, 0)


def default_layout(tokens_BxL: jax.Array, segment_BxL, position_BxL):
    """Segment ids and positions for an unpacked (one pair per row, right-padded) batch."""
    if segment_BxL is None:
        segment_BxL = (tokens_BxL > 0).astype(jnp.int32)
    if position_BxL is None:
        position_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
    return segment_BxL, position_BxL


class EncoderLayer(nnx.Module):
    def __init__(self, cfg: ml_collections.ConfigDict, dtype, rngs: nnx.Rngs):
        self.pre_norm, self.dropout_rate = cfg.norm_position == "pre", cfg.dropout_rate
        self.attention_norm = Norm(cfg.emb_dim, cfg.norm, cfg.norm_epsilon, dtype)
        self.attention = Attention(cfg.emb_dim, cfg.num_heads, cfg.num_kv_heads, head_dim(cfg),
                                   cfg.attention_dropout_rate, dtype, rngs, cfg.rank_fraction, cfg.use_bias)
        self.mlp_norm = Norm(cfg.emb_dim, cfg.norm, cfg.norm_epsilon, dtype)
        self.mlp = Mlp(cfg.emb_dim, cfg.mlp_dim, cfg.activation, cfg.activation_dropout_rate, dtype, rngs,
                       cfg.rank_fraction, cfg.use_bias)

    def __call__(self, x_BxSxD, mask_Bx1xSxS, rngs):
        x_BxSxD = residual(x_BxSxD, self.attention_norm, self.pre_norm, self.dropout_rate, rngs,
                           lambda h: self.attention(h, h, mask_Bx1xSxS, rngs))
        return residual(x_BxSxD, self.mlp_norm, self.pre_norm, self.dropout_rate, rngs,
                        lambda h: self.mlp(h, rngs))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ml_collections.ConfigDict, dtype, rngs: nnx.Rngs):
        self.pre_norm, self.dropout_rate = cfg.norm_position == "pre", cfg.dropout_rate
        args = (cfg.emb_dim, cfg.num_heads, cfg.num_kv_heads, head_dim(cfg), cfg.attention_dropout_rate,
                dtype)
        self.self_attention_norm = Norm(cfg.emb_dim, cfg.norm, cfg.norm_epsilon, dtype)
        self.self_attention = Attention(*args, rngs, cfg.rank_fraction, cfg.use_bias)
        self.cross_attention_norm = Norm(cfg.emb_dim, cfg.norm, cfg.norm_epsilon, dtype)
        self.cross_attention = Attention(*args, rngs, cfg.rank_fraction, cfg.use_bias)
        self.mlp_norm = Norm(cfg.emb_dim, cfg.norm, cfg.norm_epsilon, dtype)
        self.mlp = Mlp(cfg.emb_dim, cfg.mlp_dim, cfg.activation, cfg.activation_dropout_rate, dtype, rngs,
                       cfg.rank_fraction, cfg.use_bias)

    def __call__(self, y_BxTxD, cross_kv, self_mask_Bx1xTxL, cross_mask_Bx1xTxS, rngs, cache=None, index=0,
                 windows=()):
        """The layer over T positions, given its cross-attention (keys, values) of the encoder states.

        Returns y and the updated self-attention cache (None without one). In incremental
        decoding, `cache` holds the self-attention keys/values of L slots (the T positions'
        are written at slots index..index+T-1, and `self_mask_Bx1xTxL` says which slots each
        attends to), and it and `cross_kv` are in `Attention`'s decoding layout; `windows`: see
        `Attention.attend_cached`.
        """
        if cache is None:
            def self_attention(h_BxTxD):
                k, v = self.self_attention.project_kv(h_BxTxD)
                return self.self_attention.attend(h_BxTxD, k, v, self_mask_Bx1xTxL, rngs), None

            def cross_attention(h_BxTxD):
                return self.cross_attention.attend(h_BxTxD, *cross_kv, cross_mask_Bx1xTxS, rngs)
        else:
            def self_attention(h_BxTxD):
                return self.self_attention.attend_cached(h_BxTxD, cache, index, self_mask_Bx1xTxL, windows)

            def cross_attention(h_BxTxD):
                return self.cross_attention.attend_few(h_BxTxD, *cross_kv, cross_mask_Bx1xTxS)

        y_BxTxD, cache = residual(y_BxTxD, self.self_attention_norm, self.pre_norm, self.dropout_rate, rngs,
                                  self_attention, has_aux=True)
        y_BxTxD = residual(y_BxTxD, self.cross_attention_norm, self.pre_norm, self.dropout_rate, rngs,
                           cross_attention)
        y_BxTxD = residual(y_BxTxD, self.mlp_norm, self.pre_norm, self.dropout_rate, rngs,
                           lambda h: self.mlp(h, rngs))
        return y_BxTxD, cache


def residual(x_BxLxD, norm: Norm, pre_norm: bool, rate: float, rngs, sublayer, has_aux: bool = False):
    """x + dropout(sublayer(norm(x))) for pre-LN; norm(x + dropout(sublayer(x))) for post-LN.

    With `has_aux` (as in jax.grad), `sublayer` returns (out, aux), and so does `residual`.
    """
    out = sublayer(norm(x_BxLxD) if pre_norm else x_BxLxD)
    out, aux = out if has_aux else (out, None)
    out_BxLxD = x_BxLxD + dropout(out, rate, rngs)
    if not pre_norm:
        out_BxLxD = norm(out_BxLxD)
    out_BxLxD = fusion_barrier(constrain(out_BxLxD, ACTIVATION_AXES))
    return (out_BxLxD, aux) if has_aux else out_BxLxD


def stack_layers(layers: list[nnx.Module]) -> nnx.Module:
    """One module like `layers[0]` whose parameters are those of `layers` stacked on a leading axis.

    The axis is named "layers" in each parameter's `logical_axes`, so the other axes are
    sharded as in one layer (see tfx/core/parallel.py).
    """
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(layer) for layer in layers])
    module = nnx.merge(nnx.graphdef(layers[0]), stacked)
    for _, variable in nnx.iter_graph(module):
        if isinstance(variable, nnx.Param):
            variable.set_metadata(logical_axes=("layers", *variable.get_metadata()["logical_axes"]))
    return module


class EncoderDecoder(nnx.Module):
    """The full translation model: `encode` a source batch, `decode` target logits from it.

    `cross_kv`, `empty_cache`, `decoder_states` and `logits` are the parts of `decode` that
    incremental decoding (tfx/model/decode.py) calls step by step; it passes their `PerLayer`
    values on as they are.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, rngs: nnx.Rngs):
        self.emb_dim, self.dropout_rate, self.positions = cfg.emb_dim, cfg.dropout_rate, cfg.positions
        self.max_len, self.vocab_size = cfg.max_len, cfg.vocab_size
        self.pre_norm, self.logits_via_embedding = cfg.norm_position == "pre", cfg.logits_via_embedding
        self.remat, self.scan_layers = cfg.remat, cfg.scan_layers
        self.start_from_zero_embedding = cfg.start_from_zero_embedding
        dtype = precision.compute_dtype(cfg.dtype)
        self.logits_dtype = jnp.dtype(jnp.float32) if cfg.float32_logits else dtype
        self.source_embed = Embed(cfg.vocab_size, cfg.emb_dim, dtype, rngs, cfg.scale_embeddings)
        self.target_embed = (self.source_embed if cfg.share_embeddings
                             else Embed(cfg.vocab_size, cfg.emb_dim, dtype, rngs, cfg.scale_embeddings))
        if cfg.positions == "learned":
            self.source_positions = LearnedPositions(cfg.max_len, cfg.emb_dim, rngs)
            self.target_positions = LearnedPositions(cfg.max_len, cfg.emb_dim, rngs)
        if cfg.embedding_norm:
            self.source_embed_norm = Norm(cfg.emb_dim, cfg.norm, cfg.norm_epsilon, dtype)
            self.target_embed_norm = Norm(cfg.emb_dim, cfg.norm, cfg.norm_epsilon, dtype)
        # Built one by one in both layouts, so scan_layers does not change the initialisation.
        encoder_layers = [EncoderLayer(cfg, dtype, rngs) for _ in range(cfg.num_encoder_layers)]
        decoder_layers = [DecoderLayer(cfg, dtype, rngs) for _ in range(cfg.num_decoder_layers)]
        layout = stack_layers if cfg.scan_layers else nnx.List
        self.encoder_layers, self.decoder_layers = layout(encoder_layers), layout(decoder_layers)
        if cfg.norm_position == "pre":
            self.encoder_norm = Norm(cfg.emb_dim, cfg.norm, cfg.norm_epsilon, dtype)
            self.decoder_norm = Norm(cfg.emb_dim, cfg.norm, cfg.norm_epsilon, self.logits_dtype)
        if not cfg.logits_via_embedding:
            self.logits_projection = param(rngs, dense_init(0, 1), (cfg.emb_dim, cfg.vocab_size),
                                           ("embed", "vocab"))
        if cfg.output_bias:
            self.logits_bias = bias((cfg.vocab_size,), ("vocab",))

    def _embed(self, side: str, tokens_BxL, position_BxL, rngs):
        """The `side` ("source" or "target") embedding of tokens, plus positions, normed
        (`embedding_norm`), with dropout. With `start_from_zero_embedding` the target's token 0
        (the decoder's start token) embeds as zeros."""
        x_BxLxD = getattr(self, f"{side}_embed")(tokens_BxL)
        if side == "target" and self.start_from_zero_embedding:
            x_BxLxD = jnp.where((tokens_BxL == 0)[..., None], jnp.zeros_like(x_BxLxD), x_BxLxD)
        if self.positions == "learned":
            pos_BxLxD = getattr(self, f"{side}_positions")(position_BxL)
        else:
            pos_BxLxD = sinusoidal_positions(position_BxL, self.emb_dim)
        x_BxLxD = x_BxLxD + pos_BxLxD.astype(x_BxLxD.dtype)
        if hasattr(self, f"{side}_embed_norm"):
            x_BxLxD = getattr(self, f"{side}_embed_norm")(x_BxLxD)
        return constrain(dropout(x_BxLxD, self.dropout_rate, rngs), ACTIVATION_AXES)

    def encode(self, inputs_BxS, inputs_segment_ids=None, inputs_positions=None, rngs=None):
        """Encoder states [B, S, D]; `rngs` (with a `dropout` stream) turns dropout on."""
        segment_BxS, position_BxS = default_layout(inputs_BxS, inputs_segment_ids, inputs_positions)
        x_BxSxD = self._embed("source", inputs_BxS, position_BxS, rngs)
        mask_Bx1xSxS = attention_mask(segment_BxS, segment_BxS, causal=False)

        def encoder_layer(layer, x_BxSxD, _, rngs):
            return layer(x_BxSxD, mask_Bx1xSxS, rngs), None

        x_BxSxD, _ = self._run_layers(self.encoder_layers, encoder_layer, x_BxSxD, (), rngs)
        if self.pre_norm:
            x_BxSxD = self.encoder_norm(x_BxSxD)
        return x_BxSxD

    def decode(self, encoded_BxSxD, inputs_segment_ids_BxS, decoder_inputs_BxT,
               targets_segment_ids_BxT, targets_positions_BxT, rngs=None):
        """Logits [B, T, V] (float32) for decoder inputs that are already shifted right."""
        self_mask = attention_mask(targets_segment_ids_BxT, targets_segment_ids_BxT, causal=True)
        cross_mask = attention_mask(targets_segment_ids_BxT, inputs_segment_ids_BxS, causal=False)
        y_BxTxD, _ = self.decoder_states(decoder_inputs_BxT, targets_positions_BxT,
                                         self.cross_kv(encoded_BxSxD), self_mask, cross_mask, rngs)
        return self.logits(y_BxTxD)

    def cross_kv(self, encoded_BxSxD, for_decoding: bool = False) -> PerLayer:
        """Each decoder layer's cross-attention (keys, values) of the encoder states, in the
        decoding layout if `for_decoding` (see `Attention.project_kv`)."""
        return self._each_layer(self.decoder_layers,
                                lambda layer: layer.cross_attention.project_kv(encoded_BxSxD, for_decoding))

    def empty_cache(self, batch: int, length: int) -> PerLayer:
        """Each decoder layer's self-attention cache of `length` slots, for `decoder_states`."""
        return self._each_layer(self.decoder_layers,
                                lambda layer: layer.self_attention.empty_cache(batch, length))

    def decoder_states(self, decoder_inputs_BxT, positions_BxT, cross_kv, self_mask_Bx1xTxL,
                       cross_mask_Bx1xTxS, rngs=None, caches=None, index=0, windows=()):
        """The last decoder layer's states [B, T, D], and the updated caches (None without).

        Incremental decoding passes `cross_kv(..., for_decoding=True)` and `caches` from
        `empty_cache`: the T positions are written at slots index..index+T-1 and
        `self_mask_Bx1xTxL` says which slots each position attends to, within the smallest of
        the `windows` (slot counts) that holds them, if any (see `DecoderLayer`).
        """
        y_BxTxD = self._embed("target", decoder_inputs_BxT, positions_BxT, rngs)

        def decoder_layer(layer, y_BxTxD, kv_and_cache, rngs):
            return layer(y_BxTxD, kv_and_cache[0], self_mask_Bx1xTxL, cross_mask_Bx1xTxS, rngs,
                         kv_and_cache[1], index, windows)

        y_BxTxD, new_caches = self._run_layers(self.decoder_layers, decoder_layer, y_BxTxD,
                                               (cross_kv, caches), rngs)
        return y_BxTxD, None if caches is None else new_caches

    def _each_layer(self, layers, fn):
        """[fn(layer) for each layer], or with `scan_layers` its results stacked (one vmap)."""
        if self.scan_layers:
            return nnx.vmap(fn)(layers)
        return [fn(layer) for layer in layers]

    def _run_layers(self, layers, fn, x, xs: tuple[PerLayer, ...], rngs):
        """x through each layer in turn, `x, out = fn(layer, x, xs_i, rngs)`: final x and the outs.

        `xs` holds per-layer inputs (None: none) and `xs_i` the layer's entries. Unrolled, they
        and the outs are lists and every layer draws from `rngs`; with `scan_layers`, they are
        stacked on a leading axis like the parameters, and each layer gets its own dropout key
        split from `rngs`. Each layer is rematerialised as `config.model.remat` says.
        """
        if self.remat != "none":
            # prevent_cse keeps XLA from merging the recomputation back into the forward pass
            # (which would undo it); a scan rules that out by construction, so it is needed
            # only unrolled, as in MaxText. (On XLA:CPU it costs: unrolled remat=full is much
            # slower than remat=none; use scan_layers there.)
            fn = nnx.remat(fn, policy=REMAT_POLICY[self.remat], prevent_cse=not self.scan_layers)
        if not self.scan_layers:
            outs = []
            for i, layer in enumerate(layers):
                x, out = fn(layer, x, tuple(None if a is None else a[i] for a in xs), rngs)
                outs.append(out)
            return x, outs
        graphdef, params = nnx.split(layers)
        num_layers = jax.tree.leaves(params)[0].shape[0]
        keys = None if rngs is None else jax.random.split(rngs.dropout(), num_layers)

        def step(x, params_xs_key):
            params_i, xs_i, key = params_xs_key
            return fn(nnx.merge(graphdef, params_i), x, xs_i, None if key is None else nnx.Rngs(dropout=key))

        return jax.lax.scan(step, x, (params, xs, keys))

    def logits(self, y_BxTxD, vocab_S: jax.Array | None = None) -> jax.Array:
        """Logits [B, T, V] (float32) of decoder states: final norm (pre-LN), output projection
        (plus `output_bias`); with `vocab_S` [S] (token ids: a decoding shortlist), [B, T, S] of
        those tokens only.

        With `model.float32_logits` the final norm's output and the projection are float32
        whatever `model.dtype` is, so the loss, beam scores and sampling never see logits
        rounded to bfloat16 (MaxText's logits_dot_in_fp32).
        """
        if self.pre_norm:
            y_BxTxD = self.decoder_norm(y_BxTxD)
        if self.logits_via_embedding:
            logits_BxTxV = self.target_embed.attend(y_BxTxD, self.logits_dtype, vocab_S)
        else:
            weight_DxV = self.logits_projection
            if vocab_S is not None:
                weight_DxV = jnp.take(weight_DxV[...], vocab_S, axis=1)
            logits_BxTxV = project("btd,dv->btv", y_BxTxD, weight_DxV, self.logits_dtype)
        logits_BxTxV = constrain(logits_BxTxV, ("batch", "length", "vocab")).astype(jnp.float32)
        if hasattr(self, "logits_bias"):
            bias_V = self.logits_bias[...] if vocab_S is None else jnp.take(self.logits_bias[...], vocab_S)
            logits_BxTxV = logits_BxTxV + bias_V[None, None, :]
        return logits_BxTxV

    def __call__(self, inputs, targets, inputs_segment_ids=None, targets_segment_ids=None,
                 inputs_positions=None, targets_positions=None, rngs=None):
        """Teacher-forced logits [B, T, V] for [B, S] `inputs` and [B, T] `targets` (batch keys).

        The model shifts the targets right itself to form the decoder inputs.
        """
        inputs_segment_ids, inputs_positions = default_layout(inputs, inputs_segment_ids,
                                                              inputs_positions)
        targets_segment_ids, targets_positions = default_layout(targets, targets_segment_ids,
                                                                targets_positions)
        encoded_BxSxD = self.encode(inputs, inputs_segment_ids, inputs_positions, rngs)
        decoder_inputs_BxT = shift_right(targets, targets_segment_ids)
        return self.decode(encoded_BxSxD, inputs_segment_ids, decoder_inputs_BxT,
                           targets_segment_ids, targets_positions, rngs)


def count_params(params: nnx.State) -> int:
    """Number of scalar parameters in a (possibly abstract) State."""
    return sum(int(x.size) for x in jax.tree.leaves(params))
