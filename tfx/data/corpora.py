"""A config's splits as corpora: `config.data.train`, `eval` and `test` are each a split spec
(one corpus) or names of `config.data.corpora` (several, each with its own languages, tag and
weight).

A `Split` reads its corpora one after another as one random-access source; each record is
{"source", "target"} plus, for a named corpus, "prefix": the pieces put before its source
ids (the target-language token of config.data.target_lang_token, then the corpus's tag), which
then stand in for the tokenizer's own source prefix. Training mixes a split's corpora by
`mixing_weights` (tfx/data/pipeline.py); evaluation scores each corpus on its own.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import ml_collections
import numpy as np

from tfx.core import config as config_lib
from tfx.data import clean, sources
from tfx.data.sources import PairSource


def language_token(language: str, template: str = "") -> str:
    """The output-language token of `language`: by `template` when it holds '{lang}'
    (config.data.target_lang_token, e.g. '<2{lang}>'), else OPUS-MT's '>>LANG<<'."""
    return target_token(template if "{lang}" in template else ">>{lang}<<", language)


def target_token(token: str, language: str) -> str:
    """config.data.target_lang_token `token` for output `language`: its '{lang}' replaced, or
    the token as it is."""
    return token.replace("{lang}", language)


def source_token(config: ml_collections.ConfigDict) -> str:
    """The piece before every source of a plain split and of translate.py's sentences:
    config.data.target_lang_token, its '{lang}' the config's target language."""
    return target_token(config.data.target_lang_token, config.data.target_lang)


@dataclasses.dataclass(frozen=True)
class Corpus:
    """One corpus of a split: its pairs, its share of a training mix, and the pieces before its
    sources (None: the tokenizer's own prefix, as for a plain split spec)."""

    name: str
    pairs: PairSource
    weight: float = 1.0
    prefix: tuple[str, ...] | None = None
    tokens: object = None  # its ids, tokenized once (config.data.pretokenize): a tokenized.TokenSource.

    @property
    def languages(self) -> tuple[str, str]:
        return self.pairs.languages


class Split:
    """A config split: its corpora read one after another (`len`, `split[i]`)."""

    def __init__(self, key: str, value: str, corpora: list[Corpus]):
        self.key, self.spec, self.corpora = key, value, corpora
        self.ends = np.cumsum([len(corpus.pairs) for corpus in corpora])
        self.fingerprint = ";".join(c.pairs.fingerprint + (f" prefix {' '.join(c.prefix)}" if c.prefix else "")
                                    for c in corpora)
        self.skipped_empty = sum(corpus.pairs.skipped_empty for corpus in corpora)

    @property
    def languages(self) -> tuple[str, str]:
        """The split's languages; an error for a split whose corpora differ."""
        found = {corpus.languages for corpus in self.corpora}
        if len(found) > 1:
            raise ValueError(f"config.{self.key}={self.spec!r} holds several language pairs "
                             f"({', '.join('-'.join(pair) for pair in sorted(found))}); name one corpus.")
        return found.pop()

    def only(self, name: str) -> Split:
        """The split of its corpus `name` alone."""
        return Split(self.key, name, [corpus for corpus in self.corpora if corpus.name == name])

    def __len__(self) -> int:
        return int(self.ends[-1])

    def __getitem__(self, index: int) -> dict:
        which = int(np.searchsorted(self.ends, index, side="right"))
        corpus = self.corpora[which]
        record = corpus.pairs[index - (int(self.ends[which - 1]) if which else 0)]
        return record if corpus.prefix is None else {**record, "prefix": corpus.prefix}


def corpus_prefix(config: ml_collections.ConfigDict, settings: ml_collections.ConfigDict
                  ) -> tuple[str, ...]:
    """The pieces before a named corpus's sources: its target-language token, then its tag."""
    language = target_token(config.data.target_lang_token, settings.target_lang)
    return tuple(piece for piece in (language, settings.tag) if piece)


def open_corpus(config: ml_collections.ConfigDict, name: str, cleaned: bool,
                prepare: bool = True, beam_flags: Sequence[str] | None = None) -> Corpus:
    """data.corpora.`name`, prepared on first use, `cleaned` by its filters if any is on (on
    Apache Beam with `beam_flags`, as `clean.open_cleaned`)."""
    settings = config_lib.corpus(config, name)
    pairs = sources.open_split(settings.spec, f"data.corpora.{name}.spec", settings.source_lang,
                               settings.target_lang, config.data.data_dir, prepare)
    if cleaned:
        pairs = clean_pairs(pairs, settings.clean, f"data.corpora.{name}.clean", prepare,
                            beam_flags)
    return Corpus(name, pairs, settings.weight, corpus_prefix(config, settings))


def clean_pairs(pairs: PairSource, settings: ml_collections.ConfigDict, key: str, prepare: bool,
                beam_flags: Sequence[str] | None = None) -> PairSource:
    """`pairs` cleaned by `settings` (config.`key`, checked), or as they are when those drop
    nothing more than the split does already (the default); on Apache Beam with `beam_flags`."""
    settings = clean.validate(settings, key)
    if clean.is_off(settings):
        return pairs
    return clean.open_cleaned(pairs, settings, key, prepare, beam_flags)


def open_split(config: ml_collections.ConfigDict, which: str, prepare: bool = True,
               beam_flags: Sequence[str] | None = None) -> Split:
    """config.data.`which` ("train", "eval" or "test") as a `Split`, prepared on first use; the
    training corpora cleaned by their filters (config.data.clean), on Apache Beam with
    `beam_flags` (Beam's pipeline flags, --runner among them)."""
    value = config.data[which]
    if not value:
        raise ValueError(f"config.data.{which} is empty; set it to {sources.SPEC_FORMS} or to "
                         "names of config.data.corpora.")
    names = config_lib.corpus_names(config, which)
    cleaned = which == "train"
    if names:
        return Split(f"data.{which}", value,
                     [open_corpus(config, name, cleaned, prepare, beam_flags) for name in names])
    pairs = sources.open_split(value, f"data.{which}", config.data.source_lang,
                               config.data.target_lang, config.data.data_dir, prepare)
    if cleaned:
        pairs = clean_pairs(pairs, config.data.clean, "data.clean", prepare, beam_flags)
    return Split(f"data.{which}", value, [Corpus(which, pairs)])


def open_splits(config: ml_collections.ConfigDict, prepare: bool = True,
                beam_flags: Sequence[str] | None = None) -> dict[str, Split]:
    """The config's train/eval/test splits that are set (train is required: `open_split` says
    so when it is empty); `beam_flags`: the training corpora are cleaned on Apache Beam."""
    return {which: open_split(config, which, prepare, beam_flags)
            for which in config_lib.SPLITS if which == "train" or config.data[which]}


def mixing_weights(corpora: list[Corpus], temperature: float) -> np.ndarray:
    """Each corpus's share of a training mix: proportional to its weight, or with temperature
    T > 0 to (pairs x weight) ** (1 / T)."""
    weights = np.array([corpus.weight for corpus in corpora], np.float64)
    if temperature > 0:
        sizes = np.array([len(corpus.pairs) for corpus in corpora], np.float64)
        weights = (sizes * weights) ** (1.0 / temperature)
    return weights / weights.sum()


def vocabulary_symbols(config: ml_collections.ConfigDict) -> list[str]:
    """The pieces a trained vocabulary must hold whole: every corpus's prefix pieces and the
    plain splits' source token."""
    symbols = [source_token(config)]
    for name in config.data.corpora:
        symbols.extend(corpus_prefix(config, config_lib.corpus(config, name)))
    return sorted({symbol for symbol in symbols if symbol})
