"""Lexical shortlists: each batch decodes over the target tokens its sources can translate to,
not the whole vocabulary (Marian's `--shortlist`, with which Mozilla's Bergamot students ship).

    python -m tfx.data.shortlist --config configs/multi30k.py --workdir runs/multi30k \\
        --output runs/multi30k/shortlist.npz [--frequent 100] [--per-token 50]
    python eval.py ... --config.decode.shortlist=runs/multi30k/shortlist.npz \\
        [--config.decode.shortlist_size=1024]

Learning (`learn`): IBM Model 1 (Brown et al., 1993) translation probabilities p(t | s) of
target token t given source token s, by EM over the training split in the run's SentencePiece
tokens, each source with a NULL token. Each source token keeps its `per_token` most probable
targets; the `frequent` most frequent target tokens go in every shortlist.

Decoding (`vocabulary`): a batch's shortlist is its `size` target tokens of highest priority:
PAD and EOS (first, so that their positions in the shortlist are their ids), the frequent
tokens, the candidates of the batch's source tokens (by probability: they are cut first when
there are more than `size`), then any other tokens by frequency to fill it. Beam search then
scores the shortlist's tokens only, with the softmax over them, as Marian does.
"""
from __future__ import annotations

import functools
import hashlib
import os
import sys
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tfx.data import pipeline

PAD, EOS = 0, 1
NULL = PAD  # the source token every target token may also align to.


class Shortlist(NamedTuple):
    """A lexical table: for source token s, candidates_VxK[s] (PAD-padded) with probabilities
    probs_VxK[s] (0 for padding), and each target token's priority without candidates."""

    candidates_VxK: np.ndarray  # int32
    probs_VxK: np.ndarray  # float32
    base_priority_V: np.ndarray  # float32


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


def save(path: str, candidates_VxK, probs_VxK, target_counts_V, frequent: int, tokenizer_path: str):
    """Writes the table (npz) atomically, with the SentencePiece model's digest."""
    temporary = f"{path}.tmp.npz"
    np.savez(temporary, candidates=candidates_VxK, probs=probs_VxK, target_counts=target_counts_V,
             frequent=frequent, tokenizer_sha256=_digest(tokenizer_path))
    os.replace(temporary, path)


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _read(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as f:
            return {key: f[key] for key in ("candidates", "probs", "target_counts", "frequent",
                                             "tokenizer_sha256")}
    except (OSError, KeyError, ValueError) as error:
        raise ValueError(f"config.decode.shortlist={path!r} is not a shortlist made by "
                         f"`python -m tfx.data.shortlist` ({error}).") from None


def load(path: str, vocab_size: int) -> Shortlist:
    """The table at `path` (config.decode.shortlist) for a `vocab_size`-token model, read again
    once the file is replaced (`save` writes a new inode)."""
    try:
        stat = os.stat(path)
        version = (stat.st_ino, stat.st_mtime_ns)
    except OSError:
        version = None  # _read names the missing file.
    return _load(path, version, vocab_size)


@functools.lru_cache(maxsize=4)
def _load(path: str, version: tuple[int, int] | None, vocab_size: int) -> Shortlist:
    """`load`, cached by the file's `version` too."""
    f = _read(path)
    candidates_VxK, target_counts_V = f["candidates"], f["target_counts"]
    if candidates_VxK.shape[0] != vocab_size:
        raise ValueError(f"config.decode.shortlist={path!r} is for a {candidates_VxK.shape[0]}-token "
                         f"vocabulary, but config.model.vocab_size={vocab_size}.")
    # Below every candidate (priority 1 to 1.5) but the frequent tokens (2 to 2.5), by frequency.
    base_priority_V = 0.5 * target_counts_V / (target_counts_V.max() + 1)
    base_priority_V[np.argsort(-target_counts_V, kind="stable")[:int(f["frequent"])]] += 2.0
    base_priority_V[EOS], base_priority_V[PAD] = 3.0, 4.0
    return Shortlist(candidates_VxK, f["probs"], base_priority_V.astype(np.float32))


def check_tokenizer(path: str, tokenizer_path: str):
    """Refuses a shortlist learned in another SentencePiece model's tokens."""
    if str(_read(path)["tokenizer_sha256"]) != _digest(tokenizer_path):
        raise ValueError(f"config.decode.shortlist={path!r} was learned with another tokenizer "
                         f"than {tokenizer_path}; make it again with this run's.")


def vocabulary(table: Shortlist, inputs_BxS: jax.Array, size: int) -> jax.Array:
    """The batch's shortlist [size]: target token ids, PAD and EOS at positions 0 and 1, the
    rest by priority (see the module doc). Traceable."""
    candidates_N = jnp.asarray(table.candidates_VxK)[inputs_BxS].reshape(-1)
    probs_N = jnp.asarray(table.probs_VxK)[inputs_BxS].reshape(-1)
    priority_V = jnp.asarray(table.base_priority_V).at[candidates_N].max(1.0 + 0.5 * probs_N)
    return jax.lax.top_k(priority_V, min(size, priority_V.shape[0]))[1]


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


def always_listed(table: Shortlist) -> np.ndarray:
    """The tokens in every shortlist: PAD, EOS and the frequent ones."""
    return np.flatnonzero(table.base_priority_V >= 2.0)


def main():
    """The command line (absl flags, defined here so that importing the module defines none)."""
    from absl import app, flags
    from ml_collections import config_flags

    from tfx import config as config_lib
    from tfx import trained
    from tfx.data.sources import open_split

    config_flag = config_flags.DEFINE_config_file("config", None, "The run's config file[:variant].",
                                                  lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, "The run whose tokenizer the table is in.")
    output = flags.DEFINE_string("output", None, "The table's file (.npz).")
    frequent = flags.DEFINE_integer("frequent", 100, "Most frequent target tokens in every shortlist.")
    per_token = flags.DEFINE_integer("per_token", 50, "Most probable targets kept per source token.")
    iterations = flags.DEFINE_integer("iterations", 5, "EM iterations of IBM Model 1.")
    flags.mark_flags_as_required(["config", "workdir", "output"])

    def run(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        try:
            config = config_lib.validate(config_flag.value)
            if frequent.value < 0 or per_token.value < 1 or iterations.value < 1:
                raise ValueError("--frequent must be >= 0, --per_token and --iterations >= 1.")
            tokenizer = trained.tokenizer_for(config, workdir.value)
            d = config.data
            encode = lambda split: [(tokenizer.encode(split[i]["source"])[:-1],  # without EOS.
                                     tokenizer.encode(split[i]["target"])[:-1]) for i in range(len(split))]
            train = encode(open_split(d.train, "data.train", d.source_lang, d.target_lang, d.data_dir))
            save(output.value, *learn(train, config.model.vocab_size, per_token.value, iterations.value),
                 frequent.value, tokenizer.path)
            held_out = encode(open_split(d.eval, "data.eval", d.source_lang, d.target_lang, d.data_dir))
        except (ValueError, FileNotFoundError) as error:
            sys.exit(f"tfx.data.shortlist: {error}")
        print(f"{output.value}: {per_token.value} candidates per source token and the "
              f"{frequent.value} most frequent targets, from {len(train)} pairs of {d.train}")
        table, batch = load(output.value, config.model.vocab_size), config.per_device_eval_batch_size
        sizes = sorted({256, 512, 1024, 2048, config.decode.shortlist_size})
        print(f"{d.eval}: reference tokens in their batch's shortlist (batches of {batch}): " + ", ".join(
            f"{size}: {100 * coverage(table, held_out, size, batch):.1f}%" for size in sizes))

    app.run(run)


if __name__ == "__main__":
    main()
