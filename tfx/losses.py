"""Token losses and metrics: label-smoothed cross-entropy, z-loss, accuracy, perplexity.

The loss is normalised as in T5X and the Flax WMT example: the entropy of the smoothed target
distribution is subtracted, so predicting that distribution exactly gives loss 0.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _target_logit(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
    """The logit of each target token, [B, L]."""
    return jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]


def token_losses(logits_BxLxV: jax.Array, targets_BxL: jax.Array, label_smoothing: float,
                 z_loss: float) -> tuple[jax.Array, jax.Array]:
    """(loss_BxL, nll_BxL) in float32 whatever the logits dtype.

    loss_BxL: cross-entropy against the smoothed target (1 - label_smoothing on the target,
    label_smoothing / (V - 1) elsewhere) minus that distribution's entropy, plus
    z_loss * logsumexp(logits)**2 when z_loss > 0. nll_BxL: plain NLL of the target, for
    perplexity.
    """
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    vocab = logits_BxLxV.shape[-1]
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    entropy = -(confidence * math.log(confidence) + (vocab - 1) * low * math.log(low + 1e-20))
    # Cross-entropy against the smoothed target without materialising it as a [B, L, V] array:
    # -sum_v soft_v log p_v = -(confidence - low) log p_target - low sum_v log p_v.
    lse_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    nll_BxL = lse_BxL - _target_logit(logits_BxLxV, targets_BxL)
    sum_log_p_BxL = jnp.sum(logits_BxLxV, axis=-1) - vocab * lse_BxL
    loss_BxL = (confidence - low) * nll_BxL - low * sum_log_p_BxL - entropy
    if z_loss > 0.0:
        loss_BxL = loss_BxL + z_loss * jnp.square(lse_BxL)
    return loss_BxL, nll_BxL


def metric_sums(logits_BxLxV: jax.Array, targets_BxL: jax.Array, weights_BxL: jax.Array,
                label_smoothing: float, z_loss: float) -> dict[str, jax.Array]:
    """Scalar weighted sums (not means): 'loss', 'nll', 'correct' (target has the top logit),
    'weight'.

    Sums add over gradient-accumulation microbatches and eval batches; `summarize` divides once.
    """
    loss_BxL, nll_BxL = token_losses(logits_BxLxV, targets_BxL, label_smoothing, z_loss)
    weights_BxL = weights_BxL.astype(jnp.float32)
    # Correct when the target's logit is the maximum (a plain max is cheaper than argmax; an
    # exact tie, which has measure zero in float32, would count as correct).
    target_logit_BxL = _target_logit(logits_BxLxV, targets_BxL)
    correct_BxL = (target_logit_BxL >= jnp.max(logits_BxLxV, axis=-1)).astype(jnp.float32)
    return {
        "loss": jnp.sum(loss_BxL * weights_BxL),
        "nll": jnp.sum(nll_BxL * weights_BxL),
        "correct": jnp.sum(correct_BxL * weights_BxL),
        "weight": jnp.sum(weights_BxL),
    }


def summarize(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-token loss, nll, accuracy and perplexity from `metric_sums` (added over batches).

    A zero total weight gives zeros (perplexity 1) rather than NaN.
    """
    weight = jnp.maximum(sums["weight"], 1e-9)
    nll = sums["nll"] / weight
    return {"loss": sums["loss"] / weight, "nll": nll, "accuracy": sums["correct"] / weight,
            "perplexity": jnp.exp(nll), "weight": sums["weight"]}
