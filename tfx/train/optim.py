"""Learning-rate schedules and the optax optimizer chain."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from tfx.core.config import OPTIMIZERS, SCHEDULES, choice_error
from tfx.train import masks


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """The schedule named by `config.schedule`; `config.learning_rate` is its peak.

    'rsqrt': lr * min(step / warmup, sqrt(warmup / step)), i.e. linear warmup from 0 then the
    inverse square root decay of Vaswani et al.; with warmup_steps=0, lr / sqrt(max(step, 1)).
    'cosine': linear warmup from 0, then cosine decay to lr * cosine_end_fraction at
    num_train_steps.
    """
    peak, warmup = config.learning_rate, config.warmup_steps
    if config.schedule == "rsqrt":
        def rsqrt(step: jax.typing.ArrayLike) -> jax.Array:
            step = jnp.asarray(step, jnp.float32)
            if warmup == 0:
                return peak * jax.lax.rsqrt(jnp.maximum(step, 1.0))
            return peak * jnp.minimum(step / warmup, jnp.sqrt(warmup / jnp.maximum(step, 1.0)))
        return rsqrt
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=peak, warmup_steps=warmup,
            decay_steps=max(config.num_train_steps, warmup + 1),
            end_value=peak * config.cosine_end_fraction)
    raise choice_error("schedule", config.schedule, SCHEDULES)


def decayed(params) -> object:
    """A tree like `params`: True where weight decay applies, False for norm scales and
    biases (the parameters named `scale`, `bias` or `*_bias`), which decay would pull to 0."""
    def matrix(path, _) -> bool:
        names = [str(getattr(key, "key", getattr(key, "name", key))) for key in path]
        return not any(name in ("scale", "bias") or name.endswith("_bias") for name in names)
    return jax.tree_util.tree_map_with_path(matrix, params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Global-norm clipping (unless grad_clip_norm is 0), then AdamW or Adafactor on the schedule,
    then, if config.prune asks, magnitude pruning (tfx/prune.py), which keeps pruned weights 0.

    Weight decay skips norm scales and biases (see `decayed`) unless config.weight_decay_norms.
    """
    schedule = learning_rate_schedule(config)
    mask = None if config.weight_decay_norms else decayed
    if config.optimizer == "adamw":
        optimizer = optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2,
                                eps=config.adam_eps, weight_decay=config.weight_decay, mask=mask)
    elif config.optimizer == "adafactor":
        optimizer = optax.adafactor(schedule, weight_decay_rate=config.weight_decay or None,
                                    weight_decay_mask=mask)
    else:
        raise choice_error("optimizer", config.optimizer, OPTIMIZERS)
    clip = [optax.clip_by_global_norm(config.grad_clip_norm)] if config.grad_clip_norm > 0 else []
    pruning = [masks.magnitude_pruning(config)] if masks.enabled(config) else []
    return optax.chain(*clip, optimizer, *pruning)
