"""Learn a lexical shortlist for a run (Marian's `--shortlist`, with which Mozilla's Bergamot
students ship); `tfx.model.shortlist` decodes with it.

    python -m tfx.compress.shortlist --workdir runs/multi30k --output runs/multi30k/shortlist.npz \\
        [--frequent 100] [--per_token 50]

Learning (`learn`): IBM Model 1 (Brown et al., 1993) translation probabilities p(t | s) of
target token t given source token s, by EM over the training split in the run's tokens (the
source's as `encode_source` gives them, language token included), each source with a NULL token. Each source token keeps its `per_token` most probable
targets; the `frequent` most frequent target tokens go in every shortlist.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from absl import flags

from tfx.core import cli
from tfx.data import pipeline
from tfx.data.sources import open_split
from tfx.infer import trained
from tfx.model.shortlist import PAD, Shortlist, load, save, vocabulary

NULL = PAD  # the source token every target token may also align to.


def learn(pairs: Iterable[tuple[Sequence[int], Sequence[int]]], vocab_size: int,
          per_token: int = 50, iterations: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(candidates [V, per_token], their p(t | s) [V, per_token], target token counts [V]) of
    token-id pairs without EOS, by `iterations` EM steps of IBM Model 1 from uniform p(t | s)."""
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
    if not position:
        raise ValueError("the corpus has no target tokens to learn a shortlist from.")
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
    cli.alias("per-token", "per_token")
    flags.mark_flag_as_required("output")

    def run():
        config = shared.run_config()
        if frequent.value < 0 or per_token.value < 1 or iterations.value < 1:
            raise ValueError("--frequent must be >= 0, --per_token and --iterations >= 1.")
        tokenizer = trained.tokenizer_for(config, shared.workdir.value)
        d = config.data
        encode = lambda split: [(tokenizer.encode_source(split[i]["source"])[:-1],  # without EOS.
                                 tokenizer.encode_target(split[i]["target"])[:-1])
                                for i in range(len(split))]
        train = encode(open_split(d.train, "data.train", d.source_lang, d.target_lang, d.data_dir))
        save(output.value, *learn(train, config.model.vocab_size, per_token.value, iterations.value),
             frequent.value, tokenizer.fingerprint)
        held_out = encode(open_split(d.eval, "data.eval", d.source_lang, d.target_lang, d.data_dir))
        print(f"{output.value}: {per_token.value} candidates per source token and the "
              f"{frequent.value} most frequent targets, from {len(train)} pairs of {d.train}")
        table, batch = load(output.value, config.model.vocab_size), config.per_device_eval_batch_size
        sizes = sorted({256, 512, 1024, 2048, config.decode.shortlist_size})
        print(f"{d.eval}: reference tokens in their batch's shortlist (batches of {batch}): " + ", ".join(
            f"{size}: {100 * coverage(table, held_out, size, batch):.1f}%" for size in sizes))

    cli.run("tfx.compress.shortlist", run)


if __name__ == "__main__":
    main()
