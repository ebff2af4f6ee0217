"""Decoding guards against runaway outputs: a per-sentence length cap (max_len_a/b), no repeated
n-grams (no_repeat_ngram_size) and a repetition penalty, against an independent greedy decoder."""
import jax
import numpy as np
import pytest
from decode_test import MODEL, build, prefixes_of, search, shortlist_file, sources, translate
from flax import nnx

from tfx.model.decode import EOS

DECODE = dict(max_length_offset=8)


def reference_greedy(model, inputs, limit, no_repeat=0, penalty=1.0):
    """Greedy decoding in numpy, one full forward pass per step: the logits of the tokens an
    output holds are divided (if positive) or multiplied by `penalty`, tokens that would repeat
    an n-gram of `no_repeat` tokens are banned, and so is PAD; EOS alone at step limit - 1."""
    graphdef, params = model
    forward = jax.jit(lambda inputs, targets: nnx.merge(graphdef, params)(inputs, targets))
    outputs = []
    for source in inputs:
        out = []
        while not out or (out[-1] != EOS and len(out) < limit):
            t = len(out)
            logits = np.array(forward(source[None], np.array([out + [2] + [0] * (limit - t - 1)], np.int32))[0, t])
            for token in set(out):
                logits[token] = logits[token] / penalty if logits[token] > 0 else logits[token] * penalty
            if no_repeat:
                for j in range(t - no_repeat + 1):
                    if out[j:j + no_repeat - 1] == out[t - no_repeat + 1:]:
                        logits[out[j + no_repeat - 1]] = -np.inf
            logits[0] = -np.inf
            out.append(EOS if t == limit - 1 else int(np.argmax(logits)))
        outputs.append(out + [0] * (limit - len(out)))
    return np.array(outputs)


def repeated_ngrams(row, n) -> int:
    tokens = list(row[:list(row).index(EOS) + 1] if EOS in row else row)
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) - len(set(grams))


@pytest.fixture
def setup(tiny_config):
    """A random model that rarely ends (no EOS boost) and sources of 1 to 8 tokens."""
    config = tiny_config(model=MODEL, decode=DECODE)
    return config, build(config, eos_boost=0.0), sources(20, 8, 8, 50)


@pytest.mark.parametrize("guards", [dict(no_repeat_ngram_size=2), dict(no_repeat_ngram_size=1),
                                    dict(repetition_penalty=1.5),
                                    dict(no_repeat_ngram_size=3, repetition_penalty=1.3)])
def test_greedy_guards_equal_an_independent_greedy_decoder(setup, guards):
    config, model, inputs = setup
    guards = dict(guards, max_len_a=0.0, max_len_b=0)  # the batch's cap alone, as the reference's.
    got = translate(config, model, inputs, strategy="greedy", **guards)
    expected = reference_greedy(model, inputs, 16, guards.get("no_repeat_ngram_size", 0),
                                guards.get("repetition_penalty", 1.0))
    np.testing.assert_array_equal(got, expected)
    unguarded = translate(config, model, inputs, strategy="greedy", max_len_a=0.0, max_len_b=0)
    assert (got != unguarded).any()  # the guard mattered.


@pytest.mark.parametrize("n", [1, 2, 3])
def test_beam_outputs_repeat_no_ngram_and_the_cache_still_equals_recompute(setup, n):
    config, model, inputs = setup
    unguarded = translate(config, model, inputs)
    assert sum(repeated_ngrams(row, n) for row in unguarded) > 0
    tokens, _ = search(config, model, inputs, no_repeat_ngram_size=n)
    assert all(repeated_ngrams(row, n) == 0 for row in tokens.reshape(-1, tokens.shape[-1]))
    np.testing.assert_array_equal(tokens[:, 0], translate(config, model, inputs, no_repeat_ngram_size=n,
                                                          full_recompute=True))


def test_each_sentence_stops_at_max_len_a_times_its_source_length_plus_max_len_b(setup):
    """Outputs that never end stop at floor(1.5 x source length (EOS included) + 2) tokens, EOS
    last, whatever else the batch holds: a sentence alone gives the same output."""
    config, model, inputs = setup
    tokens = translate(config, model, inputs, strategy="greedy", max_len_a=1.5, max_len_b=2)
    caps = np.floor(1.5 * ((inputs > 0).sum(1) + 0) + 2).astype(int)
    assert len(set(caps)) > 2
    lengths = (tokens > 0).sum(1)
    np.testing.assert_array_equal(lengths, caps)
    assert (tokens[np.arange(len(tokens)), lengths - 1] == EOS).all()
    for b in (0, 5):
        alone = translate(config, model, np.repeat(inputs[b:b + 1], 8, axis=0), strategy="greedy",
                          max_len_a=1.5, max_len_b=2)
        np.testing.assert_array_equal(alone[0, :lengths[b]], tokens[b, :lengths[b]])
    beams = translate(config, model, inputs, max_len_a=1.5, max_len_b=2)
    assert ((beams > 0).sum(1) <= caps).all()


def test_guards_map_tokens_through_a_shortlist(setup, tmp_path):
    """A shortlist of the whole vocabulary, its logits in another order, decodes as without."""
    config, model, inputs = setup
    guards = dict(no_repeat_ngram_size=2, repetition_penalty=1.5)
    np.testing.assert_array_equal(
        translate(config, model, inputs, shortlist=shortlist_file(tmp_path, 50), shortlist_size=50, **guards),
        translate(config, model, inputs, **guards))


def test_a_forced_prefix_is_kept_even_where_it_repeats_an_ngram(setup):
    config, model, inputs = setup
    prefix = prefixes_of(np.tile([[7, 8, 7, 8, 7]], (8, 1)), [5] * 8)
    tokens, scores = search(config, model, inputs, prefix, strategy="greedy", no_repeat_ngram_size=2,
                            max_len_a=1.0, max_len_b=0)
    np.testing.assert_array_equal(tokens[:, 0, :5], prefix)
    assert np.isfinite(scores).all()
    assert all(repeated_ngrams(row[4:], 2) == 0 for row in tokens[:, 0])  # after the prefix, none.
