"""Learn a lexical shortlist for a run (Marian's `--shortlist`, with which Mozilla's Bergamot
students ship); `tfx.model.shortlist` decodes with it.

    python -m tfx.compress.shortlist --workdir runs/multi30k --output runs/multi30k/shortlist.npz \\
        [--frequent 100] [--per_token 50] [--max_pairs 50000000]

Learning (`learn`): IBM Model 1 (Brown et al., 1993) translation probabilities p(t | s) of
target token t given source token s, by EM over the training split in the run's tokens (the
source's as `encode_source` gives them, language token included), each source with a NULL token.
Each source token keeps its `per_token` most probable targets; the `frequent` most frequent
target tokens go in every shortlist.

Memory does not grow with the corpus: the corpus is read in chunks of pairs, once to collect the
distinct co-occurring (source, target) pairs (`pair_table`, at most V^2 of them, capped by
`max_pairs`) and once per EM iteration; memory holds that table and one chunk. The command line
tokenizes the training split once into a temporary `TokenStore` on disk that every pass reads.
"""
from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
from absl import flags

from tfx.core import cli
from tfx.data import corpora, pipeline
from tfx.infer import trained
from tfx.model.shortlist import PAD, Shortlist, load, save, vocabulary

NULL = PAD  # the source token every target token may also align to.
CHUNK_PAIRS = 10_000  # sentence pairs a pass over the corpus holds at a time.
MAX_PAIRS = 50_000_000  # distinct (source, target) pairs the table keeps; 0: no cap.

Pair = tuple[Sequence[int], Sequence[int]]
Corpus = Sequence[Pair] | Callable[[], Iterable[Pair]]


def learn(corpus: Corpus, vocab_size: int, per_token: int = 50, iterations: int = 5,
          chunk_pairs: int = CHUNK_PAIRS, max_pairs: int = MAX_PAIRS,
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(candidates [V, per_token], their p(t | s) [V, per_token], target token counts [V]) of
    token-id pairs without EOS, by `iterations` EM steps of IBM Model 1 from uniform p(t | s).

    `corpus` is read 1 + `iterations` times, `chunk_pairs` pairs at a time: a Sequence of
    (source ids, target ids), or a callable that returns a fresh iterable of them. Exact up to
    `max_pairs` distinct co-occurring pairs (0: no cap); beyond, approximate (`pair_table`)."""
    keys_P, _, target_counts_V = pair_table(corpus, vocab_size, chunk_pairs, max_pairs)
    source_P = keys_P // vocab_size
    prob_P = np.ones(len(keys_P))
    for _ in range(iterations):
        counts_P = expected_counts(corpus, keys_P, prob_P, vocab_size, chunk_pairs)
        prob_P = counts_P / np.bincount(source_P, counts_P, minlength=vocab_size)[source_P]
    return (*most_probable(source_P, keys_P % vocab_size, prob_P, vocab_size, per_token),
            target_counts_V)


def pair_table(corpus: Corpus, vocab_size: int, chunk_pairs: int = CHUNK_PAIRS,
               max_pairs: int = MAX_PAIRS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sorted keys s * V + t of the distinct co-occurring (source token or NULL, target token)
    pairs [P], their co-occurrence counts [P], target token counts [V]), by one pass over
    `corpus`, each chunk's pairs merged into the table.

    Whenever the table exceeds `max_pairs` (0: never), it keeps the `max_pairs` pairs counted
    most often so far (of equal counts, the smaller keys). That is approximate: a pair dropped
    early and seen again restarts from 0, so counts are lower bounds and a pair frequent late in
    the corpus may be missing."""
    keys_P, counts_P = np.zeros(0, np.int64), np.zeros(0, np.int64)
    target_counts_V = np.zeros(vocab_size, np.int64)
    for chunk in _chunks(corpus, vocab_size, chunk_pairs):
        target_counts_V += np.bincount(chunk[2], minlength=vocab_size)
        keys_E = _cooccurrences(*chunk, vocab_size)[0]
        first_U = np.flatnonzero(np.diff(keys_E, prepend=-1))  # where each run of a key starts.
        keys_U, counts_U = keys_E[first_U], np.diff(first_U, append=len(keys_E))
        slot_U, seen_U = _find(keys_P, keys_U)
        counts_P[slot_U[seen_U]] += counts_U[seen_U]
        new_U = ~seen_U
        keys_P = np.insert(keys_P, slot_U[new_U], keys_U[new_U])
        counts_P = np.insert(counts_P, slot_U[new_U], counts_U[new_U])
        if max_pairs and len(keys_P) > max_pairs:
            keys_P, counts_P = _most_frequent(keys_P, counts_P, max_pairs)
    if not target_counts_V.any():
        raise ValueError("the corpus has no target tokens to learn a shortlist from.")
    return keys_P, counts_P, target_counts_V


def expected_counts(corpus: Corpus, keys_P: np.ndarray, prob_P: np.ndarray, vocab_size: int,
                    chunk_pairs: int = CHUNK_PAIRS) -> np.ndarray:
    """The E-step: expected alignment counts [P] of the table's pairs (`pair_table`'s keys_P)
    under p(t | s) = prob_P, by one pass over `corpus`. Each target token's count of 1 is shared
    among its sentence's source tokens and NULL in proportion to p(t | s); a pair missing from
    the table (cut by `pair_table`'s `max_pairs`) has p = 0."""
    counts_P = np.zeros(len(keys_P))
    for chunk in _chunks(corpus, vocab_size, chunk_pairs):
        keys_E, token_E = _cooccurrences(*chunk, vocab_size)
        slot_E, found_E = _find(keys_P, keys_E)
        slot_E = np.minimum(slot_E, len(keys_P) - 1)
        p_E = np.where(found_E, prob_P[slot_E], 0.0)
        total_E = np.bincount(token_E, p_E)[token_E]
        np.add.at(counts_P, slot_E, np.divide(p_E, total_E, out=np.zeros_like(p_E), where=total_E > 0))
    return counts_P


def most_probable(source_P: np.ndarray, target_P: np.ndarray, prob_P: np.ndarray,
                  vocab_size: int, per_token: int) -> tuple[np.ndarray, np.ndarray]:
    """(candidates [V, per_token], their probabilities [V, per_token]): each source token's
    `per_token` most probable targets (of equal probability, the smaller ids), PAD-padded; NULL
    keeps none."""
    order = np.lexsort((-prob_P, source_P))  # by source, most probable target first.
    source_P, target_P, prob_P = source_P[order], target_P[order], prob_P[order]
    rank_P = np.arange(len(order)) - np.searchsorted(source_P, source_P)
    kept = (rank_P < per_token) & (source_P != NULL)
    candidates_VxK = np.full((vocab_size, per_token), PAD, np.int32)
    probs_VxK = np.zeros((vocab_size, per_token), np.float32)
    candidates_VxK[source_P[kept], rank_P[kept]] = target_P[kept]
    probs_VxK[source_P[kept], rank_P[kept]] = prob_P[kept]
    return candidates_VxK, probs_VxK


def _chunks(corpus: Corpus, vocab_size: int, chunk_pairs: int) -> Iterator[tuple[np.ndarray, ...]]:
    """The corpus `chunk_pairs` pairs at a time, each chunk flat (int64): (source ids, each
    source led by NULL [I], source lengths with NULL [N], target ids [J], target lengths [N])."""
    pairs = iter(corpus() if callable(corpus) else corpus)
    while chunk := list(itertools.islice(pairs, chunk_pairs)):
        source_lengths = np.fromiter((len(s) + 1 for s, _ in chunk), np.int64, len(chunk))
        target_lengths = np.fromiter((len(t) for _, t in chunk), np.int64, len(chunk))
        words = [np.concatenate([np.asarray(side, np.int64) for side in sides]) for sides in zip(*chunk)]
        for ids in words:
            if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
                raise ValueError(f"token id {ids.min() if ids.min() < 0 else ids.max()} is not in "
                                 f"the vocabulary of {vocab_size} (config.model.vocab_size).")
        sources_I = np.full(source_lengths.sum(), NULL, np.int64)
        is_word_I = np.ones(len(sources_I), bool)
        is_word_I[np.cumsum(source_lengths) - source_lengths] = False
        sources_I[is_word_I] = words[0]
        yield sources_I, source_lengths, words[1], target_lengths


def _cooccurrences(sources_I: np.ndarray, source_lengths: np.ndarray, targets_J: np.ndarray,
                   target_lengths: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(keys_E = s * V + t, token_E) of every (target token t, source token or NULL s of its
    pair) of a chunk (`_chunks`), sorted by key: token_E is the target token's index in the
    chunk, over which the E-step normalises. Key and token are sorted packed in one int64, as
    numpy sorts values much faster than it argsorts them."""
    token_bits = len(targets_J).bit_length()
    if (vocab_size * vocab_size).bit_length() + token_bits > 63:
        raise ValueError(f"a chunk of {len(targets_J)} target tokens is too large for a vocabulary "
                         f"of {vocab_size}: lower chunk_pairs.")
    sources_per_token_J = np.repeat(source_lengths, target_lengths)
    first_entry_J = np.cumsum(sources_per_token_J) - sources_per_token_J
    first_source_J = np.repeat(np.cumsum(source_lengths) - source_lengths, target_lengths)
    source_E = sources_I[np.arange(sources_per_token_J.sum()) +
                         np.repeat(first_source_J - first_entry_J, sources_per_token_J)]
    packed_E = source_E * (vocab_size << token_bits) + np.repeat(
        (targets_J << token_bits) + np.arange(len(targets_J)), sources_per_token_J)
    packed_E.sort()
    return packed_E >> token_bits, packed_E & ((1 << token_bits) - 1)


def _find(keys_P: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(where each of `keys` is or would go in the sorted `keys_P`, whether it is there)."""
    slots = np.searchsorted(keys_P, keys)
    if not len(keys_P):
        return slots, np.zeros(len(keys), bool)
    return slots, keys_P[np.minimum(slots, len(keys_P) - 1)] == keys


def _most_frequent(keys_P: np.ndarray, counts_P: np.ndarray, kept: int) -> tuple[np.ndarray, np.ndarray]:
    """The `kept` pairs of the highest counts (of equal counts, the smaller keys), in key order."""
    threshold = np.partition(counts_P, len(counts_P) - kept)[len(counts_P) - kept]
    keep_P = counts_P > threshold
    keep_P[np.flatnonzero(counts_P == threshold)[:kept - keep_P.sum()]] = True
    return keys_P[keep_P], counts_P[keep_P]


class TokenStore:
    """Token-id pairs in a directory, written once and read back chunk by chunk through
    np.memmap windows, so that memory holds one chunk: `ids.int32` holds each pair's source ids
    then its target ids, `offsets.int64` where each side starts and, last, the end."""

    def __init__(self, directory: str):
        self.ids_path = os.path.join(directory, "ids.int32")
        self.offsets_path = os.path.join(directory, "offsets.int64")
        self.size = (os.path.getsize(self.offsets_path) // 8 - 1) // 2

    @classmethod
    def write(cls, directory: str, pairs: Iterable[Pair], chunk_pairs: int = CHUNK_PAIRS) -> TokenStore:
        """Writes `pairs` (source ids, target ids) to `directory`, `chunk_pairs` at a time."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "ids.int32"), "wb") as ids, \
                open(os.path.join(directory, "offsets.int64"), "wb") as offsets:
            end, pairs = 0, iter(pairs)
            offsets.write(np.zeros(1, np.int64).tobytes())
            while chunk := list(itertools.islice(pairs, chunk_pairs)):
                sides = [np.asarray(side, np.int32) for pair in chunk for side in pair]
                offsets.write((end + np.cumsum([len(side) for side in sides], dtype=np.int64)).tobytes())
                ids.write(np.concatenate(sides).tobytes())
                end += sum(len(side) for side in sides)
        return cls(directory)

    def __len__(self) -> int:
        return self.size

    def pairs(self, chunk_pairs: int = CHUNK_PAIRS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The pairs in order: (source ids, target ids), int32 views of one chunk's window."""
        for start in range(0, self.size, chunk_pairs):
            stop = min(start + chunk_pairs, self.size)
            offsets = np.memmap(self.offsets_path, np.int64, "r", offset=16 * start,
                                shape=(2 * (stop - start) + 1,)).tolist()
            first, last = offsets[0], offsets[-1]
            ids = np.zeros(0, np.int32) if first == last else np.memmap(
                self.ids_path, np.int32, "r", offset=4 * first, shape=(last - first,)).view(np.ndarray)
            for side in range(0, len(offsets) - 1, 2):
                yield (ids[offsets[side] - first:offsets[side + 1] - first],
                       ids[offsets[side + 1] - first:offsets[side + 2] - first])


def coverage(table: Shortlist, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], size: int,
             batch: int) -> float:
    """The share of the target tokens of `pairs` (token ids) that their batch's shortlist of
    `size` holds, the sources in batches of `batch`, longest first, as eval.py decodes them."""
    covered = total = 0
    for chosen in pipeline.longest_first([len(pairs[i][0]) for i in range(len(pairs))], batch):
        inputs_BxS = np.zeros((len(chosen), max(len(pairs[i][0]) for i in chosen)), np.int32)
        for row, i in enumerate(chosen):
            inputs_BxS[row, :len(pairs[i][0])] = pairs[i][0]
        targets = np.concatenate([np.asarray(pairs[i][1], np.int32) for i in chosen])
        covered += np.isin(targets, np.asarray(vocabulary(table, inputs_BxS, size))).sum()
        total += len(targets)
    return covered / max(total, 1)


def main():
    """The command line (absl flags, defined here so that importing the module defines none)."""
    shared = cli.define_flags(workdir="The run whose tokenizer the table is in.")
    output = flags.DEFINE_string("output", None, "The table's file (.npz).")
    frequent = flags.DEFINE_integer("frequent", 100, "Most frequent target tokens in every shortlist.")
    per_token = flags.DEFINE_integer("per_token", 50, "Most probable targets kept per source token.")
    iterations = flags.DEFINE_integer("iterations", 5, "EM iterations of IBM Model 1.")
    max_pairs = flags.DEFINE_integer(
        "max_pairs", MAX_PAIRS, "Distinct (source, target) token pairs learned, the most frequent: "
        "bounds memory (a few dozen bytes a pair); beyond it, learning is approximate. 0: all.")
    cli.alias("per-token", "per_token")
    flags.mark_flag_as_required("output")

    def run():
        config = shared.run_config()
        if frequent.value < 0 or per_token.value < 1 or iterations.value < 1 or max_pairs.value < 0:
            raise ValueError("--frequent and --max_pairs must be >= 0, --per_token and --iterations >= 1.")
        tokenizer = trained.tokenizer_for(config, shared.workdir.value)
        d = config.data
        encode = lambda pair: (tokenizer.encode_source(pair["source"], pair.get("prefix"))[:-1],
                               tokenizer.encode_target(pair["target"])[:-1])  # without EOS.
        train = corpora.open_split(config, "train")
        with tempfile.TemporaryDirectory() as directory:  # each pass reads the tokens from disk.
            store = TokenStore.write(directory, (encode(train[i]) for i in range(len(train))))
            save(output.value, *learn(store.pairs, config.model.vocab_size, per_token.value,
                                      iterations.value, max_pairs=max_pairs.value),
                 frequent.value, tokenizer.fingerprint)
        eval_split = corpora.open_split(config, "eval")
        held_out = [encode(eval_split[i]) for i in range(len(eval_split))]
        print(f"{output.value}: {per_token.value} candidates per source token and the "
              f"{frequent.value} most frequent targets, from {len(train)} pairs of {d.train}")
        table, batch = load(output.value, config.model.vocab_size), config.per_device_eval_batch_size
        sizes = sorted({256, 512, 1024, 2048, config.decode.shortlist_size})
        print(f"{d.eval}: reference tokens in their batch's shortlist (batches of {batch}): " + ", ".join(
            f"{size}: {100 * coverage(table, held_out, size, batch):.1f}%" for size in sizes))

    cli.run("tfx.compress.shortlist", run)


if __name__ == "__main__":
    main()
