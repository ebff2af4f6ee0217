"""The decode-time lexical shortlist: each batch decodes over the target tokens its sources can
translate to, not the whole vocabulary (Marian's `--shortlist`). `python -m
tfx.compress.shortlist` learns the table this module reads.

    python eval.py ... --config.decode.shortlist=runs/multi30k/shortlist.npz \\
        [--config.decode.shortlist_size=1024]

A batch's shortlist (`vocabulary`) is its `size` target tokens of highest priority:
PAD and EOS (first, so that their positions in the shortlist are their ids), the frequent
tokens, the candidates of the batch's source tokens (by probability: they are cut first when
there are more than `size`), then any other tokens by frequency to fill it. Beam search then
scores the shortlist's tokens only, with the softmax over them, as Marian does.
"""
from __future__ import annotations

import functools
import io
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tfx.core import files

PAD, EOS = 0, 1


class Shortlist(NamedTuple):
    """A lexical table: for source token s, candidates_VxK[s] (PAD-padded) with probabilities
    probs_VxK[s] (0 for padding), and each target token's priority without candidates."""

    candidates_VxK: np.ndarray  # int32
    probs_VxK: np.ndarray  # float32
    base_priority_V: np.ndarray  # float32


def save(path: str, candidates_VxK, probs_VxK, target_counts_V, frequent: int,
         tokenizer_fingerprint: str):
    """Writes the table (npz) atomically, with the fingerprint of the tokenizer whose tokens it
    is in (`tokenizer.fingerprint`: a joint tokenizer's is the sha256 of its model's bytes)."""
    with files.replacing(path, "wb") as f:
        np.savez(f, candidates=candidates_VxK, probs=probs_VxK, target_counts=target_counts_V,
                 frequent=frequent, tokenizer_sha256=tokenizer_fingerprint)


def _read(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(files.path(path).read_bytes())) as f:
            return {key: f[key] for key in ("candidates", "probs", "target_counts", "frequent",
                                             "tokenizer_sha256")}
    except (OSError, KeyError, ValueError) as error:
        raise ValueError(f"config.decode.shortlist={path!r} is not a shortlist made by "
                         f"`python -m tfx.compress.shortlist` ({error}).") from None


def load(path: str, vocab_size: int) -> Shortlist:
    """The table at `path` (config.decode.shortlist, local or gs://) for a `vocab_size`-token
    model, read again once the file is replaced (`save` writes a new inode, or a new object)."""
    try:
        if files.is_local(path):
            stat = os.stat(path)
            version = (stat.st_ino, stat.st_mtime_ns)
        else:
            stat = files.path(path).stat()
            version = (stat.length, stat.mtime)
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


def check_tokenizer(path: str, tokenizer_fingerprint: str, tokenizer_name: str):
    """Refuses a shortlist learned in another tokenizer's tokens than the one with
    `tokenizer_fingerprint`, which `tokenizer_name` names."""
    if str(_read(path)["tokenizer_sha256"]) != tokenizer_fingerprint:
        raise ValueError(f"config.decode.shortlist={path!r} was learned with another tokenizer "
                         f"than {tokenizer_name}; make it again with this run's.")


def vocabulary(table: Shortlist, inputs_BxS: jax.Array, size: int, forced: jax.Array | None = None) -> jax.Array:
    """The batch's shortlist [size]: target token ids, PAD and EOS at positions 0 and 1, the
    rest by priority (see the module doc), the `forced` tokens (a forced prefix's) before the
    frequent ones. Traceable."""
    candidates_N = jnp.asarray(table.candidates_VxK)[inputs_BxS].reshape(-1)
    probs_N = jnp.asarray(table.probs_VxK)[inputs_BxS].reshape(-1)
    priority_V = jnp.asarray(table.base_priority_V).at[candidates_N].max(1.0 + 0.5 * probs_N)
    if forced is not None:
        priority_V = priority_V.at[forced.reshape(-1)].max(2.9)
    return jax.lax.top_k(priority_V, min(size, priority_V.shape[0]))[1]


def always_listed(table: Shortlist) -> np.ndarray:
    """The tokens in every shortlist: PAD, EOS and the frequent ones."""
    return np.flatnonzero(table.base_priority_V >= 2.0)

