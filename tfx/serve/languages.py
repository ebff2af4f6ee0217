"""What a served model translates: its language pairs, and the source pieces that ask it for a
target language.

A run trained on data.corpora (data.train naming them) translates each corpus's (source_lang,
target_lang); any other run data.source_lang into data.target_lang. That pair, if the model has
it, is the default (translate.py's). The model is multilingual
when config.data.target_lang_token holds '{lang}' and its pairs have several target
languages: a request then chooses its output language, whose token (e.g. '<2de>') starts each
source. Otherwise every source starts with the config's own token, if any (translate.py's).
"""
from __future__ import annotations

import dataclasses

import ml_collections

from tfx.core import config as config_lib
from tfx.data.corpora import source_token, target_token


@dataclasses.dataclass(frozen=True)
class Languages:
    pairs: tuple[tuple[str, str], ...]  # (source, target); the first is the default.
    token: str  # config.data.target_lang_token.
    fixed_token: str  # the token before every source when the model is not multilingual.

    @classmethod
    def of(cls, config: ml_collections.ConfigDict) -> Languages:
        d = config.data
        own = (d.source_lang, d.target_lang)
        pairs = [(c.source_lang, c.target_lang) for c in
                 (config_lib.corpus(config, name) for name in config_lib.corpus_names(config, "train"))] or [own]
        pairs.sort(key=lambda pair: pair != own)  # the config's own pair first, if it has one.
        return cls(tuple(dict.fromkeys(pairs)), d.target_lang_token, source_token(config))

    @property
    def source(self) -> str:
        return self.pairs[0][0]

    @property
    def target(self) -> str:
        return self.pairs[0][1]

    @property
    def multilingual(self) -> bool:
        return "{lang}" in self.token and len({target for _, target in self.pairs}) > 1

    def targets(self, source: str = "auto") -> list[str]:
        """The target languages of `source` ("auto": of any source), in pair order."""
        return list(dict.fromkeys(t for s, t in self.pairs if source in ("auto", s)))

    def codes(self) -> list[str]:
        """Every language, source or target, in pair order."""
        return list(dict.fromkeys(code for pair in self.pairs for code in pair))

    def source_pieces(self, target: str | None) -> list[str]:
        """The pieces before each source of a request for `target` (None: the model's own)."""
        if self.multilingual:
            return [target_token(self.token, target or self.target)]
        return [self.fixed_token] if self.fixed_token else []
