"""Translate a split with a trained checkpoint and score it with sacreBLEU, or score given files.

    python eval.py --workdir runs/multi30k [--split test] [--checkpoint latest|STEP|average:N]
                   [--metrics bleu,chrf,ter] [--target_lang LANG] [--config.decode.beam_size=2 ...]
    python eval.py --hyp hyps.txt --ref ref1.txt [--ref ref2.txt ...] [--tokenize 13a] [--lowercase]

The run's config is its config.json; --config FILE[:variant] and --config.KEY=VALUE may change
what may change at inference (decoding, batch sizes, mesh, data splits), not its model.
--target_lang deu chooses a multilingual model's output language: OPUS-MT's token '>>deu<<'
before every source (config.data.target_lang_token).
"""
import json

import jax
from absl import app, flags

from tfx.core import cli, distributed, host_memory
from tfx.data.sources import read_lines
from tfx.data.corpora import language_token
from tfx.infer import evaluate


def main():
    shared = cli.define_flags(workdir="The training run's workdir.", checkpoint=True,
                              workdir_required=False)
    split = flags.DEFINE_enum("split", "test", ["train", "eval", "test"], "Which config.data split.")
    metrics = flags.DEFINE_list("metrics", ["bleu", "chrf"], "Any of bleu, chrf, ter.")
    hyp = flags.DEFINE_string("hyp", None, "Score mode: hypotheses, one per line.")
    ref = flags.DEFINE_multi_string("ref", None, "Score mode: reference file(s), line-aligned.")
    tokenize = flags.DEFINE_string("tokenize", None, "sacreBLEU tokenizer for BLEU (default 13a).")
    lowercase = flags.DEFINE_bool("lowercase", False, "Case-insensitive scores.")
    target_lang = flags.DEFINE_string(
        "target_lang", None, "A multilingual model's output language: OPUS-MT's '>>LANG<<' token "
        "starts every source (config.data.target_lang_token).")
    cli.alias("target-lang", "target_lang")

    def command():
        if hyp.value:
            scores = score_files(hyp.value, ref.value, tuple(metrics.value), tokenize.value,
                                 lowercase.value)
        elif shared.workdir.value:
            scores = evaluate_run(shared, split.value, tuple(metrics.value), target_lang.value)
        else:
            raise app.UsageError("give --workdir, or --hyp and --ref.")
        if scores is None:
            return
        for result in scores.values():
            print(f"{result['text']}  ({result['signature']})")
        print(json.dumps({name: round(result["score"], 2) for name, result in scores.items()}))

    cli.run("eval.py", command)


def score_files(hyp: str, refs: list[str] | None, metrics: tuple[str, ...], tokenize: str | None,
                lowercase: bool) -> dict:
    """The scores of the hypotheses in the file `hyp` against the line-aligned files `refs`."""
    if not refs:
        raise app.UsageError("--hyp needs at least one --ref file.")
    hypotheses = list(read_lines(hyp))
    if not hypotheses:
        raise ValueError(f"{hyp} is empty: there is nothing to score.")
    references = [list(read_lines(path)) for path in refs]
    for path, stream in zip(refs, references):
        if len(stream) != len(hypotheses):
            raise ValueError(f"{hyp} has {len(hypotheses)} lines but {path} has "
                             f"{len(stream)}; hypotheses and references must be line-aligned.")
    return evaluate.score(hypotheses, references, metrics, tokenize, lowercase)


def evaluate_run(shared: cli.SharedFlags, split: str, metrics: tuple[str, ...],
                 target_lang: str | None = None) -> dict | None:
    """The scores of --checkpoint of the run on `split` (None but on process 0), with
    `target_lang`'s token before every source if given."""
    config = shared.run_config()
    if target_lang is not None:
        config.data.target_lang_token = language_token(target_lang, config.data.target_lang_token)
    host_memory.keep_freed_memory_on_cpu()  # before JAX starts its threads.
    distributed.initialize(config)  # before any other JAX call.
    results = evaluate.evaluate_checkpoint(config, shared.workdir.value, split,
                                           shared.checkpoint.value, metrics)
    if jax.process_index() != 0:
        return None
    if "corpora" not in results:
        print_decoded(results, f"{results['split']} ({results['spec']})")
        return results["scores"]
    for name, result in results["corpora"].items():  # a multilingual model's language pairs.
        print_decoded(result, f"{split} corpus {name} ({result['languages']})")
        for score in result["scores"].values():
            print(f"  {score['text']}  ({score['signature']})")
    print(json.dumps({name: {metric: round(score["score"], 2) for metric, score in result["scores"].items()}
                      for name, result in results["corpora"].items()}))
    return None


def print_decoded(results: dict, what: str):
    print(f"{what}, {results['checkpoint']}: {results['sentences_per_sec']:.1f} sentences/s, "
          f"{results['generated_tokens_per_sec']:.0f} tokens/s; hypotheses in "
          f"{results['hypotheses']}")


if __name__ == "__main__":
    main()
