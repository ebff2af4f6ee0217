import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfx.train import losses

# Jitted once per shape: much faster on CPU than op-by-op dispatch, and how the steps call them.
token_losses = jax.jit(losses.token_losses, static_argnums=(2, 3))
metric_sums = jax.jit(losses.metric_sums, static_argnums=(3, 4))
summarize = jax.jit(losses.summarize)

def smoothed(targets_BxL: np.ndarray, vocab: int, smoothing: float) -> np.ndarray:
    """The smoothed target distribution, built in numpy."""
    q_BxLxV = np.full(targets_BxL.shape + (vocab,), smoothing / (vocab - 1))
    np.put_along_axis(q_BxLxV, targets_BxL[..., None], 1.0 - smoothing, axis=-1)
    return q_BxLxV


def random_case(seed: int = 0, batch: int = 2, length: int = 5, vocab: int = 7):
    rng = np.random.default_rng(seed)
    logits_BxLxV = rng.normal(size=(batch, length, vocab)).astype(np.float32) * 3
    targets_BxL = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    return logits_BxLxV, targets_BxL


def test_loss_is_zero_when_predicting_the_smoothed_distribution():
    targets_BxL = np.array([[0, 3, 2], [1, 1, 4]], np.int32)
    logits_BxLxV = np.log(smoothed(targets_BxL, vocab=5, smoothing=0.1)).astype(np.float32)
    loss_BxL, nll_BxL = token_losses(logits_BxLxV, targets_BxL, 0.1, 0.0)
    np.testing.assert_allclose(loss_BxL, 0.0, atol=1e-6)
    np.testing.assert_allclose(nll_BxL, -math.log(0.9), rtol=1e-6)


def test_loss_matches_hand_computed_kl_divergence():
    logits = [1.0, 2.0, 0.5, -1.0]
    lse = math.log(sum(math.exp(x) for x in logits))
    log_p = [x - lse for x in logits]
    q = [0.1 / 3, 0.9, 0.1 / 3, 0.1 / 3]  # target 1, smoothing 0.1, V=4.
    kl = sum(qi * (math.log(qi) - lpi) for qi, lpi in zip(q, log_p))
    loss_BxL, nll_BxL = token_losses(
        jnp.array([[logits]]), jnp.array([[1]]), label_smoothing=0.1, z_loss=0.0)
    assert loss_BxL.shape == nll_BxL.shape == (1, 1)
    np.testing.assert_allclose(loss_BxL[0, 0], kl, rtol=1e-6)
    np.testing.assert_allclose(nll_BxL[0, 0], -log_p[1], rtol=1e-6)


def test_no_smoothing_equals_plain_nll():
    logits_BxLxV, targets_BxL = random_case()
    log_p_BxLxV = logits_BxLxV - np.log(np.exp(logits_BxLxV).sum(-1, keepdims=True))
    expected_BxL = -np.take_along_axis(log_p_BxLxV, targets_BxL[..., None], -1)[..., 0]
    loss_BxL, nll_BxL = token_losses(logits_BxLxV, targets_BxL, 0.0, 0.0)
    np.testing.assert_allclose(loss_BxL, expected_BxL, rtol=1e-5)
    np.testing.assert_allclose(nll_BxL, expected_BxL, rtol=1e-5)


def test_z_loss_adds_z_times_squared_logsumexp_and_leaves_nll_alone():
    logits_BxLxV, targets_BxL = random_case()
    lse_BxL = np.log(np.exp(logits_BxLxV.astype(np.float64)).sum(-1))
    base_BxL, nll_BxL = token_losses(logits_BxLxV, targets_BxL, 0.1, 0.0)
    with_z_BxL, nll_z_BxL = token_losses(logits_BxLxV, targets_BxL, 0.1, 1e-2)
    np.testing.assert_allclose(with_z_BxL - base_BxL, 1e-2 * lse_BxL**2, rtol=1e-4)
    np.testing.assert_array_equal(nll_z_BxL, nll_BxL)


def test_bfloat16_logits_give_float32_losses():
    logits_BxLxV, targets_BxL = random_case()
    bf16_BxLxV = jnp.asarray(logits_BxLxV, jnp.bfloat16)
    loss_BxL, nll_BxL = token_losses(bf16_BxLxV, targets_BxL, 0.1, 1e-4)
    assert loss_BxL.dtype == nll_BxL.dtype == jnp.float32
    ref_BxL, _ = token_losses(bf16_BxLxV.astype(jnp.float32), targets_BxL, 0.1, 1e-4)
    np.testing.assert_array_equal(loss_BxL, ref_BxL)


def test_weights_zero_out_padding():
    logits_BxLxV, targets_BxL = random_case()
    weights_BxL = np.ones(targets_BxL.shape, np.float32)
    weights_BxL[:, 3:] = 0.0
    changed_BxLxV = logits_BxLxV.copy()
    changed_BxLxV[:, 3:] = np.random.default_rng(1).normal(size=changed_BxLxV[:, 3:].shape) * 10
    sums = metric_sums(logits_BxLxV, targets_BxL, weights_BxL, 0.1, 1e-4)
    changed = metric_sums(changed_BxLxV, targets_BxL, weights_BxL, 0.1, 1e-4)
    for key in ("loss", "nll", "correct", "weight"):
        assert sums[key].shape == ()
        np.testing.assert_allclose(changed[key], sums[key], rtol=1e-6)
    loss_BxL, nll_BxL = token_losses(logits_BxLxV, targets_BxL, 0.1, 1e-4)
    np.testing.assert_allclose(sums["loss"], loss_BxL[:, :3].sum(), rtol=1e-5)
    np.testing.assert_allclose(sums["nll"], nll_BxL[:, :3].sum(), rtol=1e-5)
    assert sums["weight"] == 6.0


def test_accuracy_counts_weighted_argmax_hits():
    logits_BxLxV = np.zeros((1, 4, 3), np.float32)
    logits_BxLxV[0, np.arange(4), [0, 1, 2, 0]] = 5.0  # argmax per token: 0, 1, 2, 0.
    targets_BxL = np.array([[0, 1, 0, 1]], np.int32)  # hits, hits, miss, miss.
    weights_BxL = np.array([[1, 0, 1, 1]], np.float32)  # the second hit is padding.
    sums = metric_sums(logits_BxLxV, targets_BxL, weights_BxL, 0.0, 0.0)
    assert sums["correct"] == 1.0
    assert sums["weight"] == 3.0


def test_summarize_divides_once_by_the_total_weight():
    sums = {k: jnp.asarray(v, jnp.float32)
            for k, v in dict(loss=12.0, nll=6.0, correct=3.0, weight=4.0).items()}
    metrics = summarize(sums)
    np.testing.assert_allclose(metrics["loss"], 3.0)
    np.testing.assert_allclose(metrics["nll"], 1.5)
    np.testing.assert_allclose(metrics["accuracy"], 0.75)
    np.testing.assert_allclose(metrics["perplexity"], math.exp(1.5), rtol=1e-6)
    assert metrics["weight"] == 4.0


def test_summed_microbatches_equal_one_big_batch():
    logits_BxLxV, targets_BxL = random_case(batch=4)
    weights_BxL = (np.arange(5)[None, :] < np.array([5, 2, 3, 1])[:, None]).astype(np.float32)
    whole = metric_sums(logits_BxLxV, targets_BxL, weights_BxL, 0.1, 0.0)
    halves = [metric_sums(logits_BxLxV[s], targets_BxL[s], weights_BxL[s], 0.1, 0.0)
              for s in (slice(0, 2), slice(2, 4))]
    added = jax.tree.map(jnp.add, *halves)
    for key, value in summarize(added).items():
        np.testing.assert_allclose(value, summarize(whole)[key], rtol=1e-6)


def test_summarize_with_no_weight_is_finite():
    sums = {k: jnp.zeros((), jnp.float32) for k in ("loss", "nll", "correct", "weight")}
    metrics = summarize(sums)
    assert all(np.isfinite(v) for v in metrics.values())
    assert metrics["perplexity"] == 1.0


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_loss_is_nonnegative(smoothing):
    logits_BxLxV, targets_BxL = random_case(seed=2)
    loss_BxL, _ = token_losses(logits_BxLxV, targets_BxL, smoothing, 0.0)
    assert np.all(np.asarray(loss_BxL) >= -1e-6)
