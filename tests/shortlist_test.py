import hashlib

import numpy as np
import pytest

from tfx.compress import shortlist as shortlist_tool
from tfx.model import shortlist
from tfx.model.shortlist import EOS, PAD


def word_by_word_corpus(seed=0, pairs=400):
    """Sources of tokens 2..9, each translated to token + 10, in shuffled order, and every
    target also holding token 30 (a word with no source, like an article)."""
    rng = np.random.default_rng(seed)
    corpus = []
    for _ in range(pairs):
        source = rng.choice(np.arange(2, 10), size=rng.integers(1, 5), replace=False)
        target = [*(source + 10), 30]
        rng.shuffle(target)
        corpus.append((list(source), target))
    return corpus


def test_ibm_model_1_finds_each_source_token_its_translation():
    """Token 30 co-occurs with every source token as often as its translation does (a count
    ratio ties them); EM explains it by the other tokens and NULL instead."""
    candidates, probs, counts = shortlist_tool.learn(word_by_word_corpus(), vocab_size=40, per_token=3)
    np.testing.assert_array_equal(candidates[2:10, 0], np.arange(12, 20))
    assert (probs[2:10, 0] > 0.5).all() and (probs[2:10, 0] > probs[2:10, 1]).all()
    assert (np.diff(probs, axis=1) <= 0).all()  # most probable first.
    assert (candidates[PAD] == PAD).all() and (probs[PAD] == 0).all()  # NULL keeps none.
    assert (candidates[10:] == PAD).all()  # never a source: no candidates.
    assert counts[30] == 400 and counts[:10].sum() == 0


def table(tmp_path, candidates, probs, counts, frequent):
    fingerprint = hashlib.sha256(b"a tokenizer's files").hexdigest()
    path = str(tmp_path / "shortlist.npz")
    shortlist.save(path, np.asarray(candidates, np.int32), np.asarray(probs, np.float32),
                   np.asarray(counts), frequent, fingerprint)
    return path, fingerprint


def hand_table(tmp_path, vocab=12):
    """Source 2 -> targets 5 (0.6), 6 (0.3); source 3 -> 7 (0.9), 8 (0.05); target 4 the most
    frequent, then 11 and 10."""
    candidates, probs = np.zeros((vocab, 2), np.int32), np.zeros((vocab, 2), np.float32)
    candidates[2], probs[2] = (5, 6), (0.6, 0.3)
    candidates[3], probs[3] = (7, 8), (0.9, 0.05)
    counts = np.zeros(vocab, np.int64)
    counts[[4, 11, 10]] = (100, 50, 20)
    return table(tmp_path, candidates, probs, counts, frequent=1)


def test_the_batch_vocabulary_takes_pad_eos_frequent_tokens_then_candidates_by_probability(tmp_path):
    path, _ = hand_table(tmp_path)
    inputs = np.array([[2, 0, 0], [3, 3, 0]], np.int32)
    vocabulary = lambda size: list(np.asarray(shortlist.vocabulary(shortlist.load(path, 12), inputs, size)))
    assert vocabulary(8) == [PAD, EOS, 4, 7, 5, 6, 8, 11]  # then the rest by frequency.
    assert vocabulary(5) == [PAD, EOS, 4, 7, 5]  # the least probable candidates are cut.
    assert sorted(vocabulary(40)) == list(range(12))  # at most the vocabulary.
    assert vocabulary(8) == list(np.asarray(shortlist.vocabulary(  # padding adds nothing.
        shortlist.load(path, 12), np.pad(inputs, ((0, 0), (0, 5))), 8)))


def test_coverage_counts_the_target_tokens_in_their_batchs_shortlist(tmp_path):
    path, _ = hand_table(tmp_path)
    table = shortlist.load(path, 12)
    pairs = [([2], [5, 6, 9]), ([3, 3], [7, 4])]
    # One batch, longest first: [PAD, EOS, 4, 7, 5] holds 5, 7 and 4 of the five targets.
    assert shortlist_tool.coverage(table, pairs, size=5, batch=2) == pytest.approx(3 / 5)
    # Alone, source [2] gets [PAD, EOS, 4, 5, 6] (not 9) and [3, 3] gets [PAD, EOS, 4, 7, 8].
    assert shortlist_tool.coverage(table, pairs, size=5, batch=1) == pytest.approx(4 / 5)
    assert shortlist_tool.coverage(table, pairs, size=12, batch=2) == 1.0


def test_a_shortlist_rewritten_in_place_is_read_again(tmp_path):
    path, _ = hand_table(tmp_path)
    assert shortlist.load(path, 12).candidates_VxK[2, 0] == 5
    candidates = np.zeros((12, 2), np.int32)
    candidates[2] = (9, 10)
    table(tmp_path, candidates, np.full((12, 2), 0.5), np.ones(12, np.int64), frequent=1)
    assert shortlist.load(path, 12).candidates_VxK[2, 0] == 9


def test_a_shortlist_for_another_vocabulary_or_tokenizer_or_no_shortlist_is_refused(tmp_path):
    path, tokenizer = hand_table(tmp_path)
    with pytest.raises(ValueError, match=r"config.decode.shortlist=.*12-token vocabulary.*vocab_size=50"):
        shortlist.load(path, 50)
    shortlist.check_tokenizer(path, tokenizer, "the tokenizer it was learned with")
    other = hashlib.sha256(b"another tokenizer's files").hexdigest()
    with pytest.raises(ValueError, match="learned with another tokenizer than .*other.model"):
        shortlist.check_tokenizer(path, other, "the SentencePiece model other.model")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    for bad in (str(tmp_path / "bad.npz"), str(tmp_path / "missing.npz")):
        with pytest.raises(ValueError, match="is not a shortlist made by `python -m tfx.compress.shortlist`"):
            shortlist.load(bad, 12)
