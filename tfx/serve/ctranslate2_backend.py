"""The server's CTranslate2 backend: a `python -m tfx.export ctranslate2` directory decoded by
CTranslate2 on the CPU, without JAX.

The export's tfx_config.json gives the languages (tfx.serve.languages), config.decode (a
request's options on top, validated as tfx validates them), the rows of a batch
(per_device_eval_batch_size) and the lengths; its SentencePiece model(s) turn text into
CTranslate2's pieces and back. Decoding follows tfx's (tfx/model/decode.py: beam search,
greedy decoding or sampling, forced prefixes, sources cut to model.max_len tokens, outputs as
long as tfx allows) with these differences:

- Scores divide a hypothesis' log-probability (EOS included) by CTranslate2's length penalty,
  length ** length_penalty, not by GNMT's ((5 + length) / 6) ** length_penalty, so they differ
  from tfx's, and beam search may rank hypotheses of different lengths otherwise; and the
  probabilities are tfx's renormalised without token 0 (see tfx/export/ctranslate2.py). A
  forced prefix's tokens add nothing to the score (tfx adds their log-probabilities), though
  they count in its length.
- Beam search stops when its best hypothesis and the n-best have finished (tfx's as
  config.decode.beam_stop says).
- Samples are drawn by CTranslate2's random generator, not from config.seed; sampling with
  top_k=1 is greedy decoding and gives one hypothesis.
- max_len_a/b caps a batch's outputs at the largest of its sentences' caps (CTranslate2 has
  one cap per batch), where tfx caps each sentence at its own.
- A hypothesis that reaches the length limit ends without EOS, and its score without EOS's
  log-probability, where tfx forces EOS as its last token: the texts are the same.
"""
from __future__ import annotations

import os

import ctranslate2
import ml_collections
import sentencepiece as spm

from tfx.core import config as config_lib
from tfx.data.tokenizer import SOURCE_FILE, TARGET_FILE
from tfx.export.layout import SENTENCEPIECE_FILE, TFX_CONFIG_FILE
from tfx.serve.api import BadRequest, Request, decoding_config
from tfx.serve.batcher import Item
from tfx.serve.languages import Languages


class CTranslate2Backend:
    name = "ctranslate2"

    def __init__(self, model_dir: str):
        path = os.path.join(model_dir, TFX_CONFIG_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist: --model must be a directory that "
                                    "`python -m tfx.export ctranslate2` wrote.")
        with open(path, encoding="utf-8") as f:
            self.config = config_lib.from_json(f.read(), path)
        self.languages = Languages.of(self.config)
        self.rows = self.config.per_device_eval_batch_size
        joint = os.path.join(model_dir, SENTENCEPIECE_FILE)
        if os.path.isfile(joint):
            self._source = self._target = spm.SentencePieceProcessor(model_file=joint)
        else:  # a mapped tokenizer's export.
            self._source = spm.SentencePieceProcessor(model_file=os.path.join(model_dir, SOURCE_FILE))
            self._target = spm.SentencePieceProcessor(model_file=os.path.join(model_dir, TARGET_FILE))
        self.translator = ctranslate2.Translator(model_dir, device="cpu", compute_type="default",
                                                 inter_threads=1, intra_threads=len(os.sched_getaffinity(0)))

    def check(self, request: Request):
        """Refuses (BadRequest) decoding options config.decode refuses, and an n-best the
        decoding cannot give."""
        options = self._options(request.decoding)
        if options.strategy == "beam":
            most, hint = options.beam_size, f" (config.decode.beam_size={options.beam_size})."
        elif options.strategy == "sample" and options.top_k != 1:
            return  # each hypothesis is a sample of its own.
        else:
            most, hint = 1, "; use strategy beam, or sample with top_k other than 1, for more than one."
        if request.nbest > most:
            raise BadRequest(f"nbest {request.nbest}: {options.strategy} decoding gives at most {most} "
                             f"{'hypothesis' if most == 1 else 'hypotheses'} per sentence{hint}")

    def _options(self, decoding: tuple) -> ml_collections.ConfigDict:
        """config.decode with a request's `decoding` overrides, validated."""
        return decoding_config(self.config, decoding).decode

    def decode(self, items: list[Item]) -> list[list[tuple[str, float]]]:
        """Each item's hypotheses, best first; an empty sentence's is ("", 0.0), undecoded."""
        decoding, nbest, target_lang = items[0].key
        options = self._options(decoding)
        results = [[("", 0.0)] for _ in items]
        todo = [i for i, item in enumerate(items) if item.sentence.strip()]
        if not todo:
            return results
        max_len = self.config.model.max_len
        first = self.languages.source_pieces(target_lang)
        sources = [first + pieces for pieces in
                   self._source.encode([items[i].sentence for i in todo], out_type=str)]
        prefixes = [self._target.encode(items[i].prefix, out_type=str)[:max_len - 1]
                    if items[i].prefix.strip() else [] for i in todo]
        found = self.translator.translate_batch(
            sources, prefixes if any(prefixes) else None, num_hypotheses=nbest, return_scores=True,
            length_penalty=options.length_penalty, max_input_length=max_len, min_decoding_length=0,
            max_decoding_length=self._output_limit(options, sources, prefixes),
            use_vmap=bool(options.shortlist), no_repeat_ngram_size=options.no_repeat_ngram_size,
            repetition_penalty=options.repetition_penalty, **self._search(options))
        for i, result in zip(todo, found):
            results[i] = [(" ".join(self._target.decode(pieces).splitlines()), score)  # one line, as tfx.
                          for pieces, score in zip(result.hypotheses, result.scores)]
        return results

    def _search(self, options: ml_collections.ConfigDict) -> dict:
        """translate_batch's search arguments for config.decode's strategy (CTranslate2's
        sampling_topk: 0 samples from every token, 1 is greedy)."""
        if options.strategy == "beam":
            return dict(beam_size=options.beam_size)
        if options.strategy == "greedy":
            return dict(beam_size=1)
        top_k = options.top_k if options.top_k < self.config.model.vocab_size else 0
        return dict(beam_size=1, sampling_topk=top_k, sampling_topp=options.top_p,
                    sampling_temperature=options.temperature)

    def _output_limit(self, options: ml_collections.ConfigDict, sources: list[list[str]],
                      prefixes: list[list[str]]) -> int:
        """max_decoding_length: tfx's output length (the longest source, EOS included, plus
        max_length_offset, and with max_len_a/b the largest of the sentences' caps; room for
        the longest prefix and a token; within max_length and model.max_len) less its last
        token, which tfx keeps for EOS."""
        max_len = self.config.model.max_len
        lengths = [min(len(pieces) + 1, max_len) for pieces in sources]
        wanted = max(lengths) + options.max_length_offset
        if options.max_len_a or options.max_len_b:
            wanted = min(wanted, max(int(options.max_len_a * n + options.max_len_b) for n in lengths))
        wanted = max(wanted, *(len(prefix) + 1 for prefix in prefixes))
        return max(min(wanted, options.max_length or max_len, max_len) - 1, 1)
