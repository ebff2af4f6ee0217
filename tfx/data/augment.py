"""Training pairs changed as they are read (config.data.augment), like OpusTrainer's modifiers:
a model that saw some upper-cased, title-cased and misspelt sources handles them at test time
instead of spelling out letters ("Ein BAAAAAARAAAAANNDDDANNN.").

Each pair is changed or not at random with each modifier's probability, by grain's per-element
random generator (`MapDataset.random_map`), so the changes are the same on every rerun and a
resumed run continues them exactly.
"""
from __future__ import annotations

import dataclasses
import string

import grain
import numpy as np

TYPO_EVERY = 20  # characters per typo (at least one) in a source given typos.
TYPO_KINDS = ("swap", "drop", "repeat", "replace")


def title_case(text: str) -> str:
    """Each word's first character in upper case, the rest as it was (OpusTrainer's TitleCase;
    str.title would also lower-case the rest and capitalise after apostrophes)."""
    return " ".join(word[:1].upper() + word[1:] for word in text.split(" "))


def typos(text: str, rng: np.random.Generator) -> str:
    """`text` with one typo per TYPO_EVERY characters (at least one): two neighbouring
    characters swapped, one dropped, one repeated, or one replaced by a random ASCII letter,
    each at a random letter's place."""
    chars = list(text)
    for _ in range(max(1, len(text) // TYPO_EVERY)):
        letters = [i for i, c in enumerate(chars) if c.isalpha()]
        if not letters:
            break
        i = int(rng.choice(letters))
        kind = TYPO_KINDS[int(rng.integers(len(TYPO_KINDS)))]
        if kind == "swap" and i + 1 < len(chars):
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
        elif kind == "drop" and len(chars) > 1:
            del chars[i]
        elif kind == "repeat":
            chars.insert(i, chars[i])
        else:
            chars[i] = string.ascii_letters[int(rng.integers(len(string.ascii_letters)))]
    return "".join(chars)


@dataclasses.dataclass(frozen=True)
class Augment(grain.transforms.RandomMap):
    """Upper-cases or title-cases both sides of a pair, and adds typos to its source, each with
    its probability (config.data.augment)."""

    uppercase: float = 0.0
    titlecase: float = 0.0
    typos: float = 0.0

    def random_map(self, pair: dict, rng: np.random.Generator) -> dict:
        draws = rng.random(3)
        source, target = pair["source"], pair["target"]
        if draws[0] < self.uppercase:
            source, target = source.upper(), target.upper()
        elif draws[1] < self.titlecase:
            source, target = title_case(source), title_case(target)
        if draws[2] < self.typos:
            source = typos(source, rng)
        return {**pair, "source": source, "target": target}
