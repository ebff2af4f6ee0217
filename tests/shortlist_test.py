import collections
import hashlib

import numpy as np
import pytest

from tfx.compress import shortlist as shortlist_tool
from tfx.model import shortlist
from tfx.model.shortlist import EOS, PAD

NULL = PAD  # the source token every target token may also align to.


def reference_learn(pairs, vocab_size, per_token=50, iterations=5):
    """The former whole-corpus implementation of `learn`, kept as the independent answer: every
    source x target co-occurrence of the corpus in memory at once, EM by bincounts over them."""
    sources_E, targets_E, positions_E, target_counts_V = [], [], [], np.zeros(vocab_size, np.int64)
    position = 0  # one per target token of the corpus: the E-step normalises over its sources.
    for source, target in pairs:
        source_I = np.asarray([NULL, *source], np.int64)
        target_J = np.asarray(target, np.int64)
        target_counts_V += np.bincount(target_J, minlength=vocab_size)
        sources_E.append(np.tile(source_I, len(target_J)))
        targets_E.append(np.repeat(target_J, len(source_I)))
        positions_E.append(np.repeat(np.arange(position, position + len(target_J)), len(source_I)))
        position += len(target_J)
    sources_E, targets_E, positions_E = map(np.concatenate, (sources_E, targets_E, positions_E))
    pairs_P, pair_of_E = np.unique(sources_E * vocab_size + targets_E, return_inverse=True)
    source_P, target_P = pairs_P // vocab_size, pairs_P % vocab_size
    prob_P = np.ones(len(pairs_P))
    for _ in range(iterations):
        p_E = prob_P[pair_of_E]
        share_E = p_E / np.bincount(positions_E, p_E)[positions_E]  # expected alignment counts.
        counts_P = np.bincount(pair_of_E, share_E, minlength=len(pairs_P))
        prob_P = counts_P / np.bincount(source_P, counts_P, minlength=vocab_size)[source_P]
    order = np.lexsort((-prob_P, source_P))  # by source, most probable target first.
    source_P, target_P, prob_P = source_P[order], target_P[order], prob_P[order]
    rank_P = np.arange(len(order)) - np.searchsorted(source_P, source_P)
    kept = (rank_P < per_token) & (source_P != NULL)
    candidates_VxK = np.full((vocab_size, per_token), PAD, np.int32)
    probs_VxK = np.zeros((vocab_size, per_token), np.float32)
    candidates_VxK[source_P[kept], rank_P[kept]] = target_P[kept]
    probs_VxK[source_P[kept], rank_P[kept]] = prob_P[kept]
    return candidates_VxK, probs_VxK, target_counts_V


def random_corpus(seed=0, pairs=150, vocab=12):
    """Pairs of random token ids 2..vocab-1, each side 0 to 6 tokens long (empty sides included)."""
    rng = np.random.default_rng(seed)
    side = lambda: list(rng.integers(2, vocab, rng.integers(0, 7)))
    return [(side(), side()) for _ in range(pairs)]


def cooccurrence_counts(corpus, vocab):
    """{s * vocab + t: how often source token s (or NULL) and target token t share a pair}."""
    counts = collections.Counter()
    for source, target in corpus:
        for t in target:
            for s in [NULL, *source]:
                counts[s * vocab + t] += 1
    return counts


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


@pytest.mark.parametrize("chunk_pairs", [1, 7, 150])  # 150: the whole corpus in one chunk.
def test_learning_in_chunks_of_any_size_equals_the_whole_corpus_reference(chunk_pairs):
    """Streaming (a Sequence, and a callable returning a fresh iterator) gives the reference's
    candidates and counts, and its probabilities to float tolerance."""
    corpus = random_corpus()
    expected = reference_learn(corpus, vocab_size=12, per_token=12)
    for given in (corpus, lambda: iter(corpus)):
        candidates, probs, counts = shortlist_tool.learn(given, 12, per_token=12, chunk_pairs=chunk_pairs)
        np.testing.assert_array_equal(candidates, expected[0])
        np.testing.assert_allclose(probs, expected[1], rtol=1e-6)
        np.testing.assert_array_equal(counts, expected[2])


def test_the_pair_table_counts_every_cooccurrence_and_beyond_max_pairs_keeps_the_most_frequent():
    """Uncapped, the table is every co-occurring pair with its count; capped with the corpus in
    one chunk, the most frequent pairs (of equal counts, the smaller keys); capped in chunks of
    7, at most the cap, of observed pairs, each count at most its true one."""
    corpus, vocab = random_corpus(seed=1), 12
    true = cooccurrence_counts(corpus, vocab)
    keys, counts, _ = shortlist_tool.pair_table(corpus, vocab, chunk_pairs=7, max_pairs=0)
    assert dict(zip(keys.tolist(), counts.tolist())) == true and list(keys) == sorted(true)
    cap = len(true) // 3
    most_frequent = sorted(sorted(true), key=lambda key: -true[key])[:cap]
    keys, counts, _ = shortlist_tool.pair_table(corpus, vocab, chunk_pairs=len(corpus), max_pairs=cap)
    assert list(keys) == sorted(most_frequent) and list(counts) == [true[key] for key in keys]
    assert min(counts) >= max(true[key] for key in set(true) - set(most_frequent))
    keys, counts, _ = shortlist_tool.pair_table(corpus, vocab, chunk_pairs=7, max_pairs=cap)
    assert len(keys) <= cap and list(keys) == sorted(keys)
    assert all(0 < count <= true[key] for key, count in zip(keys.tolist(), counts.tolist()))
    candidates, probs, _ = shortlist_tool.learn(corpus, vocab, per_token=vocab, chunk_pairs=7, max_pairs=cap)
    sources, ranks = np.nonzero(probs)  # only the kept pairs are learned:
    assert set((sources * vocab + candidates[sources, ranks]).tolist()) <= set(keys.tolist())
    np.testing.assert_allclose(  # a cap above the distinct pairs changes nothing.
        shortlist_tool.learn(corpus, vocab, chunk_pairs=7, max_pairs=len(true))[1],
        reference_learn(corpus, vocab)[1], rtol=1e-6)


def test_the_token_store_gives_back_the_pairs_written_across_chunks(tmp_path):
    """Written 5 pairs at a time and read in windows of 1, 4 and 100, empty sides included; the
    command line learns from its `pairs` as from the list."""
    corpus = random_corpus(seed=2, pairs=23)
    store = shortlist_tool.TokenStore.write(str(tmp_path), iter(corpus), chunk_pairs=5)
    assert len(store) == 23
    for chunk_pairs in (1, 4, 100):
        assert [(list(s), list(t)) for s, t in store.pairs(chunk_pairs)] == corpus
    np.testing.assert_allclose(shortlist_tool.learn(store.pairs, 12)[1],
                               reference_learn(corpus, 12)[1], rtol=1e-6)


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
