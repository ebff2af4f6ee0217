"""The server's JAX backend: a trained run's checkpoint, decoded as translate.py decodes it.

Each set of decoding options a request asks for gets its own `Translator` (its own compiled
searches), up to MOST_DECODINGS of them; the run's own config.decode is compiled for every
padded source length at start-up (`warm_up`), others on first use. A multilingual model's
output languages share them: a request's language is only the token before its sources.
"""
from __future__ import annotations

import dataclasses
import itertools

import jax
import ml_collections

from tfx.infer import trained
from tfx.infer.translate import Translator
from tfx.serve.api import BadRequest, Request, decoding_config
from tfx.serve.batcher import Item
from tfx.serve.languages import Languages

MOST_DECODINGS = 8
LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"  # each new program or shape.


class JaxBackend:
    name = "jax"

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, checkpoint: str):
        self.model = trained.load(config, workdir, checkpoint)
        self.languages = Languages.of(config)
        self._translators: dict[tuple, Translator] = {}
        self._batches = itertools.count()  # sampling draws differently in each batch.
        self.rows = self._translator(()).rows
        self.compilations = 0  # programs JAX has lowered (and compiled or read from its cache).
        jax.monitoring.register_event_duration_secs_listener(self._count_compilation)

    def _count_compilation(self, event: str, seconds: float, **kwargs):
        if event == LOWERING_EVENT:
            self.compilations += 1

    def warm_up(self):
        self._translator(()).compile_all()

    def check(self, request: Request):
        """Refuses (BadRequest) decoding options that config.decode or the n-best would refuse."""
        try:
            self._translator(request.decoding).check_nbest(request.nbest)
        except ValueError as error:
            raise BadRequest(str(error).replace("--nbest", "nbest", 1)) from None

    def _translator(self, decoding: tuple) -> Translator:
        if decoding not in self._translators:
            if len(self._translators) >= MOST_DECODINGS:
                raise BadRequest(f"this server keeps {MOST_DECODINGS} sets of decoding options; "
                                 f"use one of theirs: {[dict(d) for d in self._translators]}.")
            config = decoding_config(self.model.config, decoding)
            self._translators[decoding] = Translator(dataclasses.replace(self.model, config=config))
        return self._translators[decoding]

    def decode(self, items: list[Item]) -> list[list[tuple[str, float]]]:
        decoding, nbest, target_lang = items[0].key
        prefixes = [item.prefix for item in items]
        results, _ = self._translator(decoding).translate(
            [item.sentence for item in items], nbest, stream=next(self._batches),
            prefixes=prefixes if any(prefixes) else None,
            source_prefix=self.languages.source_pieces(target_lang))
        return [[(h.text, h.score) for h in hypotheses] for hypotheses in results]
