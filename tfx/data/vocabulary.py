"""The vocabulary file of a mapped tokenizer (config.tokenizer.vocabulary_path): one id space
over a source and a target SentencePiece model, as an imported model (OPUS-MT's vocab.yml) has.

    {"pieces": ["<pad>", "</s>", "<unk>", ...],  # the piece of each id, in id order
     "source_ids": [...],  # the ids the source side may produce
     "target_ids": [...]}  # the ids the target side may produce

The first three pieces are tfx's special ids (pad, end of sentence, unknown). A piece that a
side's SentencePiece model gives but whose id is not in that side's ids becomes unknown.
"""
from __future__ import annotations

import dataclasses
import json

from tfx.core import files

SPECIAL_PIECES = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2: tfx's pad, EOS and unknown.
KEYS = ("pieces", "source_ids", "target_ids")


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    pieces: tuple[str, ...]  # the piece of each id.
    source_ids: frozenset[int]
    target_ids: frozenset[int]

    def side(self, ids: frozenset[int]) -> dict[str, int]:
        """piece -> id of one side's `ids`."""
        return {self.pieces[i]: i for i in ids}

    def to_json(self) -> str:
        """The file `read` reads back."""
        return json.dumps({"pieces": list(self.pieces), "source_ids": sorted(self.source_ids),
                           "target_ids": sorted(self.target_ids)}, ensure_ascii=False)


def read(path: str) -> Vocabulary:
    """The vocabulary file at `path` (local or gs://), checked: errors name the file and what
    is wrong with it."""
    if not files.path(path).is_file():
        raise FileNotFoundError(f"vocabulary file {path!r} does not exist.")
    try:
        data = json.loads(files.path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"vocabulary file {path}: not UTF-8 JSON ({error}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"vocabulary file {path}: not a JSON object with the keys {', '.join(KEYS)}.")
    for key in KEYS:
        if key not in data:
            raise ValueError(f"vocabulary file {path}: the key {key!r} is missing.")
    pieces = _pieces(path, data["pieces"])
    source_ids, target_ids = (_ids(path, key, data[key], len(pieces)) for key in KEYS[1:])
    return Vocabulary(pieces, source_ids, target_ids)


def _pieces(path: str, pieces) -> tuple[str, ...]:
    if not isinstance(pieces, list) or not all(isinstance(p, str) for p in pieces):
        raise ValueError(f"vocabulary file {path}: 'pieces' must be a list of strings.")
    if tuple(pieces[:3]) != SPECIAL_PIECES:
        raise ValueError(f"vocabulary file {path}: the first three pieces are {pieces[:3]}; "
                         f"tfx needs {list(SPECIAL_PIECES)} (ids 0, 1 and 2).")
    first: dict[str, int] = {}
    for i, piece in enumerate(pieces):
        if piece in first:
            raise ValueError(f"vocabulary file {path}: the piece {piece!r} has two ids, "
                             f"{first[piece]} and {i}.")
        first[piece] = i
    return tuple(pieces)


def _ids(path: str, key: str, ids, size: int) -> frozenset[int]:
    if not isinstance(ids, list) or not all(type(i) is int for i in ids):
        raise ValueError(f"vocabulary file {path}: {key!r} must be a list of integer ids.")
    for i in ids:
        if not 0 <= i < size:
            raise ValueError(f"vocabulary file {path}: {key!r} holds the id {i}, out of range for "
                             f"{size} pieces.")
    return frozenset(ids)
