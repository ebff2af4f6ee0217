"""Token losses and metrics: label-smoothed cross-entropy, z-loss, accuracy, perplexity.

The loss is normalised as in T5X and the Flax WMT example: the entropy of the smoothed target
distribution is subtracted, so predicting that distribution exactly gives loss 0.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def token_losses(logits_BxLxV: jax.Array, targets_BxL: jax.Array, label_smoothing: float,
                 z_loss: float) -> tuple[jax.Array, jax.Array]:
    """(loss_BxL, nll_BxL): smoothed, normalised cross-entropy (+ z-loss) and plain NLL."""
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    vocab = logits_BxLxV.shape[-1]
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    entropy = -(confidence * np.log(confidence) + (vocab - 1) * low * np.log(low + 1e-20))
    soft_BxLxV = jax.nn.one_hot(targets_BxL, vocab) * (confidence - low) + low
    loss_BxL = optax.softmax_cross_entropy(logits_BxLxV, soft_BxLxV) - entropy
    nll_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL)
    if z_loss > 0.0:
        loss_BxL = loss_BxL + z_loss * jnp.square(jax.nn.logsumexp(logits_BxLxV, axis=-1))
    return loss_BxL, nll_BxL


def metric_sums(logits_BxLxV: jax.Array, targets_BxL: jax.Array, weights_BxL: jax.Array,
                label_smoothing: float, z_loss: float) -> dict[str, jax.Array]:
    """Weighted sums (not means) of loss, nll and correct tokens, and the weight itself.

    Sums add over gradient-accumulation microbatches and eval batches; `summarize` divides once.
    """
    loss_BxL, nll_BxL = token_losses(logits_BxLxV, targets_BxL, label_smoothing, z_loss)
    correct_BxL = (jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL).astype(jnp.float32)
    return {
        "loss": jnp.sum(loss_BxL * weights_BxL),
        "nll": jnp.sum(nll_BxL * weights_BxL),
        "correct": jnp.sum(correct_BxL * weights_BxL),
        "weight": jnp.sum(weights_BxL),
    }


def summarize(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Per-token loss, nll, accuracy and perplexity from `metric_sums` (added over batches)."""
    weight = jnp.maximum(sums["weight"], 1e-9)
    nll = sums["nll"] / weight
    return {"loss": sums["loss"] / weight, "nll": nll, "accuracy": sums["correct"] / weight,
            "perplexity": jnp.exp(nll), "weight": sums["weight"]}
