"""Sentence-pair sources with random access (`len` and `[i]`), as grain's samplers need.

`ParallelText` reads line-aligned local files (the bundled corpora in `data/`, or any
`<prefix>.<lang>` pair). Each record is {"source": str, "target": str}.
"""
from __future__ import annotations

import os


def read_lines(path: str) -> list[str]:
    """The lines of a UTF-8 text file (without their newlines); errors name the file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist.")
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise ValueError(
            f"{path}:{line}: invalid UTF-8 (byte {data[error.start]:#04x} at column {column}); "
            "tfx reads corpora as UTF-8 text."
        ) from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


class ParallelText:
    """Line-aligned `<prefix>.<source_lang>` and `<prefix>.<target_lang>` files.

    Pairs with an empty (or whitespace-only) side are skipped and counted in `skipped_empty`.
    """

    def __init__(self, prefix: str, source_lang: str, target_lang: str):
        self.source_path = f"{prefix}.{source_lang}"
        self.target_path = f"{prefix}.{target_lang}"
        sources, targets = read_lines(self.source_path), read_lines(self.target_path)
        if len(sources) != len(targets):
            raise ValueError(
                f"{self.source_path} has {len(sources)} lines but {self.target_path} has "
                f"{len(targets)}; the two sides of a parallel corpus must be line-aligned."
            )
        self.pairs = [(s, t) for s, t in zip(sources, targets) if s.strip() and t.strip()]
        self.skipped_empty = len(sources) - len(self.pairs)
        if not self.pairs:
            raise ValueError(
                f"{self.source_path} / {self.target_path}: no sentence pairs with text on both "
                f"sides ({len(sources)} lines read)."
            )

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, str]:
        source, target = self.pairs[index]
        return {"source": source, "target": target}
