"""Learning-rate schedules and the optax optimizer chain."""
from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """`config.schedule`: 'rsqrt' (linear warmup, then inverse square root, as Vaswani et al.)
    or 'cosine' (linear warmup, then cosine decay to learning_rate * cosine_end_fraction).
    `config.learning_rate` is the peak, reached at the end of warmup."""
    peak, warmup = config.learning_rate, config.warmup_steps
    if config.schedule == "rsqrt":
        def rsqrt(step):
            step = jnp.asarray(step, jnp.float32)
            if warmup == 0:
                return peak * jnp.ones_like(step)
            return peak * jnp.minimum(step / warmup, jnp.sqrt(warmup / jnp.maximum(step, 1.0)))
        return rsqrt
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, peak, warmup, max(config.num_train_steps, warmup + 1),
            end_value=peak * config.cosine_end_fraction)
    raise ValueError(f"config.schedule={config.schedule!r} is not one of 'rsqrt', 'cosine'.")


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Global-norm clipping (unless grad_clip_norm is 0), then AdamW or Adafactor."""
    schedule = learning_rate_schedule(config)
    if config.optimizer == "adamw":
        optimizer = optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2,
                                eps=config.adam_eps, weight_decay=config.weight_decay)
    elif config.optimizer == "adafactor":
        optimizer = optax.adafactor(schedule, weight_decay_rate=config.weight_decay or None)
    else:
        raise ValueError(f"config.optimizer={config.optimizer!r} is not one of 'adamw', 'adafactor'.")
    if config.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), optimizer)
    return optimizer
