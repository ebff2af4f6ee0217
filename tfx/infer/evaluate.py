"""Translate a split and score it with sacreBLEU (BLEU, chrF2, TER on request).

Scores come from sacrebleu's own metrics and signatures, on detokenized text, so a tfx figure
equals what the `sacrebleu` command gives for the same hypothesis and reference files.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np
import sacrebleu
import tqdm
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from tfx.core import distributed, files
from tfx.data import corpora
from tfx.data.pipeline import Shard, batch_layout, decode_batches, to_global
from tfx.data.tokenizer import EOS_ID, BaseTokenizer
from tfx.infer import trained
from tfx.model import decode
from tfx.train.experiment import Experiment


def translate_batches(translate: Callable, params, batches: Sequence[dict[str, np.ndarray]],
                      sharding: NamedSharding, shard: Shard, tokenizer: BaseTokenizer,
                      progress: bool = False, warm_up: bool = False
                      ) -> tuple[list[str], dict[str, float]]:
    """Detokenized translations of the `batches` (pipeline.eval_batches or decode_batches), in
    the order of their examples, and the decoding speed (sentences/s, generated tokens/s). With
    `warm_up`, `translate` first runs on one batch of each shape (compiling it) before the clock
    starts."""
    translations: dict[int, str] = {}
    generated = 0
    for batch in ({b["inputs"].shape: b for b in batches}.values() if warm_up else ()):
        arrays = to_global({"inputs": batch["inputs"]}, sharding, shard)
        jax.block_until_ready(translate(params, arrays["inputs"]))
    start = time.perf_counter()
    show = progress and jax.process_index() == 0
    for batch in tqdm.tqdm(batches, desc="decoding", unit="batch", disable=not show):
        arrays = to_global({"inputs": batch["inputs"], "index": batch["index"]}, sharding, shard)
        tokens_BxT = translate(params, arrays["inputs"])
        tokens_BxT, index_B = (multihost_utils.process_allgather(x, tiled=True)
                               for x in (tokens_BxT, arrays["index"]))
        for row, index in enumerate(index_B):
            if index >= 0:
                ids = tokens_BxT[row].tolist()
                generated += ids.index(EOS_ID) + 1 if EOS_ID in ids else len(ids)
                translations[int(index)] = tokenizer.decode(ids)
    elapsed = time.perf_counter() - start
    speed = {"sentences_per_sec": len(translations) / elapsed,
             "generated_tokens_per_sec": generated / elapsed}
    return [translations[i] for i in sorted(translations)], speed


def score(hypotheses: Sequence[str], references: Sequence[Sequence[str]], metrics=("bleu", "chrf"),
          tokenize: str | None = None, lowercase: bool = False) -> dict[str, dict]:
    """sacreBLEU scores of `hypotheses` against one or more reference streams:
    {metric: {"score": float, "signature": str, "text": str}}."""
    if not hypotheses:
        raise ValueError("there are no hypotheses to score.")
    for stream in references:
        if len(stream) != len(hypotheses):
            raise ValueError(f"{len(hypotheses)} hypotheses but a reference stream has "
                             f"{len(stream)} lines; they must be line-aligned.")
    scorers = {"bleu": lambda: sacrebleu.BLEU(lowercase=lowercase, tokenize=tokenize),
               "chrf": lambda: sacrebleu.CHRF(lowercase=lowercase),
               "ter": lambda: sacrebleu.TER(case_sensitive=not lowercase)}
    results = {}
    for name in metrics:
        scorer = scorers[name]()
        result = scorer.corpus_score(list(hypotheses), [list(r) for r in references])
        results[name] = {"score": result.score, "signature": str(scorer.get_signature()),
                         "text": str(result)}
    return results


def periodic_bleu(config: ml_collections.ConfigDict, experiment: Experiment, batches: list
                  ) -> Callable[[nnx.State], dict[str, float]]:
    """The trainer's periodic BLEU (`trainer.train`'s `make_bleu`): a function of the parameters
    that translates the eval `batches` and returns their BLEU and the decoding speed."""
    translate = decode.make_translate(config, experiment.graphdef, experiment.mesh,
                                      experiment.shardings.params)
    references = experiment.references("eval", batches)

    def bleu(params: nnx.State) -> dict[str, float]:
        hypotheses, speed = translate_batches(translate, params, batches, experiment.sharding,
                                              experiment.eval_shard, experiment.tokenizer)
        return {"bleu": score(hypotheses, [references], metrics=("bleu",))["bleu"]["score"], **speed}

    return bleu


def open_split(config: ml_collections.ConfigDict, split: str) -> corpora.Split:
    """config.data.<split> ("train", "eval" or "test"), prepared on first use by process 0."""
    if not config.data[split]:
        raise ValueError(f"config.data.{split} is empty; there is no {split} split to evaluate.")
    with distributed.process_0_first(f"tfx: data.{split} ready"):
        return corpora.open_split(config, split)


class SplitDecoder:
    """A checkpoint of `workdir` ready to decode `split` in batches of similar source length
    (pipeline.decode_batches). Each call decodes the whole split, compiling on the first, and
    gives the translations in source order and the speed, timed after compilation.

    The run is loaded as translate.py loads it (`trained.load`: parameters only, the workdir's
    tokenizer first) unless `model` is given; of the data, only `split` is opened unless its
    `source` is given, or of it only the corpus named `corpus` (a split that names several is
    scored corpus by corpus)."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, split: str = "test",
                 checkpoint: str = "latest", corpus: str | None = None,
                 model: trained.TrainedModel | None = None, source: corpora.Split | None = None):
        self.config, self.workdir, self.split, self.corpus = config, workdir, split, corpus
        self.source = source or open_split(config, split)
        if corpus is not None:
            self.source = self.source.only(corpus)
        self.model = model or trained.load(config, workdir, checkpoint)
        self.label, self.params = self.model.label, self.model.params
        self.sharding, self.shard = batch_layout(config, self.model.mesh,
                                                 config.per_device_eval_batch_size)
        self.batches = decode_batches(config, self.source, self.model.tokenizer, self.shard)
        self._translate = decode.make_translate(config, self.model.graphdef, self.model.mesh,
                                                self.model.params_shardings)
        self._compiled = False

    def __call__(self, progress: bool = False) -> tuple[list[str], dict[str, float]]:
        decoded = translate_batches(self._translate, self.params, self.batches, self.sharding,
                                    self.shard, self.model.tokenizer, progress=progress,
                                    warm_up=not self._compiled)
        self._compiled = True
        return decoded

    def results(self, hypotheses: Sequence[str], speed: dict[str, float], metrics=("bleu", "chrf")) -> dict:
        """Scores the split's `hypotheses` and writes them
        (`<split>-<checkpoint>[-int8][-shortlist<size>].hyp.txt`, one per line in source order),
        the references and a JSON results file into the workdir. Returns the results."""
        config, split = self.config, self.split
        references = [self.source[i]["target"] for i in range(len(self.source))]
        shortlist = dict(shortlist=config.decode.shortlist,
                         shortlist_size=config.decode.shortlist_size) if config.decode.shortlist else {}
        named = {} if self.corpus is None else {"corpus": self.corpus,
                                                "languages": "-".join(self.source.languages)}
        results = {"split": split, "spec": config.data[split], **named, "checkpoint": self.label,
                   "quantization": config.quantization, **shortlist,
                   "scores": score(hypotheses, [references], metrics), **speed}
        if jax.process_index() == 0:
            suffix = "" if config.quantization == "none" else f"-{config.quantization}"
            if shortlist:
                suffix += f"-shortlist{config.decode.shortlist_size}"
            name = self.corpus or split
            prefix = files.join(self.workdir, f"{name}-{self.label}{suffix}")
            results.update(hypotheses=f"{prefix}.hyp.txt",
                           references=files.join(self.workdir, f"{name}.ref.txt"))
            for path, lines in ((results["hypotheses"], hypotheses), (results["references"], references)):
                files.write_text(path, (line + "\n" for line in lines))
            files.write_text(f"{prefix}.json", json.dumps(results, indent=2))
        return results


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, split: str = "test",
                        checkpoint: str = "latest", metrics=("bleu", "chrf")) -> dict:
    """Decodes `split` with a checkpoint of `workdir` (`SplitDecoder`), scores it and writes the
    hypotheses, references and results into the workdir (`SplitDecoder.results`). A split of
    several corpora (a multilingual model's language pairs) is scored corpus by corpus: the
    results are {"split", "spec", "checkpoint", "corpora": {name: that corpus's results}}."""
    source = open_split(config, split)
    if len(source.corpora) == 1:
        decoder = SplitDecoder(config, workdir, split, checkpoint, source=source)
        return decoder.results(*decoder(progress=True), metrics)
    model = trained.load(config, workdir, checkpoint)
    per_corpus = {}
    for corpus in source.corpora:
        decoder = SplitDecoder(config, workdir, split, checkpoint, corpus.name, model, source)
        per_corpus[corpus.name] = decoder.results(*decoder(progress=True), metrics)
    return {"split": split, "spec": config.data[split], "checkpoint": model.label,
            "corpora": per_corpus}
