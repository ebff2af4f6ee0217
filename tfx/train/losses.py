"""Token losses and metrics: label-smoothed cross-entropy, z-loss, distillation, accuracy,
perplexity.

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


def distill_kl(logits_BxLxV: jax.Array, teacher_logits_BxLxV: jax.Array,
               temperature: float) -> jax.Array:
    """KL(softmax(teacher / temperature) || softmax(student / temperature)) per token, [B, L],
    in float32 (word-level distillation, Hinton et al. 2015).

    sum_v p_v (log p_v - log q_v) with log q_v = s_v - logsumexp(s): the student's log-softmax
    is never built as a [B, L, V] array of its own.
    """
    s_BxLxV = logits_BxLxV.astype(jnp.float32) / temperature
    log_p_BxLxV = jax.nn.log_softmax(teacher_logits_BxLxV.astype(jnp.float32) / temperature)
    return (jnp.sum(jnp.exp(log_p_BxLxV) * (log_p_BxLxV - s_BxLxV), axis=-1)
            + jax.nn.logsumexp(s_BxLxV, axis=-1))


def metric_sums(logits_BxLxV: jax.Array, targets_BxL: jax.Array, weights_BxL: jax.Array,
                label_smoothing: float, z_loss: float, teacher_logits_BxLxV: jax.Array | None = None,
                distill_weight: float = 0.0, temperature: float = 1.0) -> dict[str, jax.Array]:
    """Scalar weighted sums (not means): 'loss', 'nll', 'correct' (target has the top logit),
    'weight', and with a teacher's logits 'distill' (the `distill_kl` of each token).

    With a teacher the token loss is (1 - distill_weight) x `token_losses`' loss (label-smoothed
    cross-entropy, plus z-loss if set) + distill_weight x temperature^2 x `distill_kl`; the
    temperature^2 keeps the KL term's gradients at the scale of temperature 1's.
    Sums add over gradient-accumulation microbatches and eval batches; `summarize` divides once.
    """
    loss_BxL, nll_BxL = token_losses(logits_BxLxV, targets_BxL, label_smoothing, z_loss)
    weights_BxL = weights_BxL.astype(jnp.float32)
    if teacher_logits_BxLxV is not None:
        kl_BxL = distill_kl(logits_BxLxV, teacher_logits_BxLxV, temperature)
        loss_BxL = (1.0 - distill_weight) * loss_BxL + distill_weight * temperature**2 * kl_BxL
    # Correct when the target's logit is the maximum (a plain max is cheaper than argmax; an
    # exact tie, which has measure zero in float32, would count as correct).
    target_logit_BxL = _target_logit(logits_BxLxV, targets_BxL)
    correct_BxL = (target_logit_BxL >= jnp.max(logits_BxLxV, axis=-1)).astype(jnp.float32)
    sums = {
        "loss": jnp.sum(loss_BxL * weights_BxL),
        "nll": jnp.sum(nll_BxL * weights_BxL),
        "correct": jnp.sum(correct_BxL * weights_BxL),
        "weight": jnp.sum(weights_BxL),
    }
    if teacher_logits_BxLxV is not None:
        sums["distill"] = jnp.sum(kl_BxL * weights_BxL)
    return sums


def summarize(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-token loss, nll, accuracy, perplexity and, when distilling, distill_kl from
    `metric_sums` (added over batches).

    A zero total weight gives zeros (perplexity 1) rather than NaN.
    """
    weight = jnp.maximum(sums["weight"], 1e-9)
    nll = sums["nll"] / weight
    metrics = {"loss": sums["loss"] / weight, "nll": nll, "accuracy": sums["correct"] / weight,
               "perplexity": jnp.exp(nll), "weight": sums["weight"]}
    if "distill" in sums:
        metrics["distill_kl"] = sums["distill"] / weight
    return metrics
