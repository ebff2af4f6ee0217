"""Translate a split with a trained checkpoint and score it with sacreBLEU, or score given files.

    python eval.py --config configs/multi30k.py --workdir runs/multi30k [--split test]
                   [--checkpoint latest|STEP|average:N] [--metrics bleu,chrf,ter]
    python eval.py --hyp hyps.txt --ref ref1.txt [ref2.txt ...] [--tokenize 13a] [--lowercase]
"""
import json
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from tfx.core import config as config_lib
from tfx.core import distributed, host_memory
from tfx.data.sources import read_lines
from tfx.infer import evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:variant].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
_SPLIT = flags.DEFINE_enum("split", "test", ["train", "eval", "test"], "Which config.data split.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "latest", "latest, a step, or average:N.")
_METRICS = flags.DEFINE_list("metrics", ["bleu", "chrf"], "Any of bleu, chrf, ter.")
_HYP = flags.DEFINE_string("hyp", None, "Score mode: hypotheses, one per line.")
_REF = flags.DEFINE_multi_string("ref", None, "Score mode: reference file(s), line-aligned.")
_TOKENIZE = flags.DEFINE_string("tokenize", None, "sacreBLEU tokenizer for BLEU (default 13a).")
_LOWERCASE = flags.DEFINE_bool("lowercase", False, "Case-insensitive scores.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)
    try:
        run()
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"eval.py: {error}")


def run():
    metrics = tuple(_METRICS.value)
    if _HYP.value:
        if not _REF.value:
            raise app.UsageError("--hyp needs at least one --ref file.")
        hypotheses = list(read_lines(_HYP.value))
        if not hypotheses:
            raise ValueError(f"{_HYP.value} is empty: there is nothing to score.")
        references = [list(read_lines(path)) for path in _REF.value]
        for path, stream in zip(_REF.value, references):
            if len(stream) != len(hypotheses):
                raise ValueError(f"{_HYP.value} has {len(hypotheses)} lines but {path} has "
                                 f"{len(stream)}; hypotheses and references must be line-aligned.")
        scores = evaluate.score(hypotheses, references, metrics, _TOKENIZE.value, _LOWERCASE.value)
    else:
        if _CONFIG.value is None or not _WORKDIR.value:
            raise app.UsageError("give --config and --workdir, or --hyp and --ref.")
        config = config_lib.validate(_CONFIG.value)
        host_memory.keep_freed_memory_on_cpu()  # before JAX starts its threads.
        distributed.initialize(config)  # before any other JAX call.
        results = evaluate.evaluate_checkpoint(config, _WORKDIR.value, _SPLIT.value,
                                               _CHECKPOINT.value, metrics)
        if jax.process_index() != 0:
            return
        scores = results["scores"]
        print(f"{results['split']} ({results['spec']}), {results['checkpoint']}: "
              f"{results['sentences_per_sec']:.1f} sentences/s, "
              f"{results['generated_tokens_per_sec']:.0f} tokens/s; hypotheses in "
              f"{results['hypotheses']}")
    for result in scores.values():
        print(f"{result['text']}  ({result['signature']})")
    print(json.dumps({name: round(result["score"], 2) for name, result in scores.items()}))


if __name__ == "__main__":
    app.run(main)
