"""Model FLOPs: the useful work of the Transformer, one formula for the benchmarks, tfx.tpu.aot and
docs/benchmarks.md.

Counted, at 2 FLOPs per multiply-add: every product with a weight matrix, and the attention
products (scores and weighted values) within each sentence pair, the causal half of them for
the decoder's self-attention. A low-rank projection (model.rank_fraction > 0) is its two
factors' products. Not counted: padding, norms, softmax, activations, the optimizer.
Training is 3 forward passes' worth (the backward pass computes two products for each one of
the forward pass).
"""
from __future__ import annotations

from collections.abc import Sequence

import ml_collections

from tfx.core.config import head_dim
from tfx.model.layers import factor_rank

Pairs = Sequence[tuple[int, int]]  # (source tokens, target tokens) of each sentence pair.


def _weights_per_token(cfg: ml_collections.ConfigDict) -> tuple[int, int]:
    """Multiply-adds with weights per (source token, target token).

    A source token goes through the encoder and the decoder's cross-attention keys/values; a
    target token (in decoding: each beam at each step) through the decoder's self-attention,
    cross-attention queries/outputs and MLP, and the output projection.
    """
    d, h = cfg.emb_dim, head_dim(cfg)
    query_out = 2 * _projection(cfg, d, cfg.num_heads * h)
    key_value = 2 * _projection(cfg, d, cfg.num_kv_heads * h)
    mlp = _projection(cfg, d, cfg.mlp_dim) * (3 if cfg.activation == "swiglu" else 2)
    source = cfg.num_encoder_layers * (query_out + key_value + mlp) + cfg.num_decoder_layers * key_value
    target = cfg.num_decoder_layers * (2 * query_out + key_value + mlp) + d * cfg.vocab_size
    return source, target


def _projection(cfg: ml_collections.ConfigDict, fan_in: int, fan_out: int) -> int:
    """Multiply-adds per token of a projection [fan_in, fan_out] (or [fan_out, fan_in]): the
    matrix's, or its factors' [fan_in, R] and [R, fan_out] (`layers.LowRank`)."""
    if not cfg.rank_fraction:
        return fan_in * fan_out
    return factor_rank(fan_in, fan_out, cfg.rank_fraction) * (fan_in + fan_out)


def forward_flops(cfg: ml_collections.ConfigDict, pairs: Pairs) -> float:
    """FLOPs of one forward pass (teacher forcing) over the sentence pairs of a batch."""
    source, target = _weights_per_token(cfg)
    qk_width = cfg.num_heads * head_dim(cfg)
    total = 0.0
    for s, t in pairs:
        attended = cfg.num_encoder_layers * s * s + cfg.num_decoder_layers * (t * (t + 1) / 2 + t * s)
        total += 2 * (source * s + target * t) + 4 * qk_width * attended
    return total


def train_flops(cfg: ml_collections.ConfigDict, pairs: Pairs) -> float:
    """FLOPs of a training step (forward and backward) over the sentence pairs of a batch."""
    return 3 * forward_flops(cfg, pairs)


def decode_flops(cfg: ml_collections.ConfigDict, sentences: int, beam: int, source_len: int,
                 output_len: int) -> float:
    """FLOPs of translating `sentences` sources of `source_len` tokens into `output_len` tokens
    with `beam` hypotheses each, with a key/value cache: the encoder and the cross-attention
    keys/values once, then at every step for every beam the decoder's projections, attention
    over the output so far and over the source, and the output projection."""
    source, target = _weights_per_token(cfg)
    qk_width = cfg.num_heads * head_dim(cfg)
    encoder = 2 * source * source_len + 4 * qk_width * cfg.num_encoder_layers * source_len**2
    attended = cfg.num_decoder_layers * (output_len * (output_len + 1) / 2 + output_len * source_len)
    steps = 2 * target * output_len + 4 * qk_width * attended
    return sentences * (encoder + beam * steps)
