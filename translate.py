"""Translate text with a trained run (one sentence per line), or score given pairs.

    echo "A man is riding a bike." | python translate.py --config configs/multi30k.py --workdir runs/multi30k
    python translate.py --config C --workdir W [--checkpoint latest|STEP|average:N]
        [--input FILE] [--output FILE] [--beam N] [--strategy beam|greedy|sample]
        [--temperature T] [--top-k K] [--top-p P] [--length-penalty A] [--max-length N]
        [--nbest K]
    python translate.py --config C --workdir W --score --source S --target T [--output FILE]

Translations go one per line in input order; with --nbest K, lines of
index<TAB>rank<TAB>score<TAB>translation (index from 0, rank 1 is the best). --score writes
sum<TAB>mean<TAB>tokens of each target's token log-probabilities. The input is read and
checked whole before anything is written, and --output is written atomically.
"""
import os
import sys
import tempfile

from absl import app, flags, logging
from ml_collections import config_flags

from tfx.core import config as config_lib
from tfx.core import host_memory
from tfx.data.sources import decode_lines, read_lines
from tfx.infer import trained
from tfx.infer.translate import Translator

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file[:variant].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "latest", "latest, a step, or average:N.")
_INPUT = flags.DEFINE_string("input", None, "Sentences to translate, one per line (default: stdin).")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write (default: stdout).")
_NBEST = flags.DEFINE_integer("nbest", 0, "Write the best K hypotheses of each sentence with scores.")
_SCORE = flags.DEFINE_bool("score", False, "Score the pairs of --source and --target.")
_SOURCE = flags.DEFINE_string("source", None, "Score mode: source sentences, one per line.")
_TARGET = flags.DEFINE_string("target", None, "Score mode: their translations, line-aligned.")
# Decoding: each flag overrides its config.decode key.
_DECODE = {
    "beam_size": flags.DEFINE_integer("beam", None, "Beam size (config.decode.beam_size)."),
    "strategy": flags.DEFINE_enum("strategy", None, list(config_lib.DECODE_STRATEGIES), "Decoding strategy."),
    "temperature": flags.DEFINE_float("temperature", None, "Sampling temperature."),
    "top_k": flags.DEFINE_integer("top-k", None, "Sample among the K most likely tokens (0: all)."),
    "top_p": flags.DEFINE_float("top-p", None, "Sample within the top-p probability mass."),
    "length_penalty": flags.DEFINE_float("length-penalty", None, "GNMT length penalty alpha."),
    "max_length": flags.DEFINE_integer("max-length", None, "Longest output in tokens, EOS included."),
}
flags.mark_flags_as_required(["config", "workdir"])


def write(lines: list[str], path: str | None):
    """All of `lines` to `path` (atomically: a temporary file renamed) or to stdout."""
    text = "".join(line + "\n" for line in lines)
    if path is None:
        sys.stdout.write(text)
        return
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=os.path.dirname(os.path.abspath(path)),
                                     suffix=".tmp", delete=False) as f:
        f.write(text)
    os.replace(f.name, path)


def run():
    config = _CONFIG.value
    for key, flag in _DECODE.items():
        if flag.value is not None:
            config.decode[key] = flag.value
    config = config_lib.validate(config)
    host_memory.keep_freed_memory_on_cpu()
    if _SCORE.value:
        if not (_SOURCE.value and _TARGET.value) or _INPUT.value:
            raise ValueError("--score needs --source and --target (and no --input).")
        sources, targets = list(read_lines(_SOURCE.value)), list(read_lines(_TARGET.value))
        if len(sources) != len(targets):
            raise ValueError(f"{_SOURCE.value} has {len(sources)} lines but {_TARGET.value} has "
                             f"{len(targets)}; sources and targets must be line-aligned.")
        translator = Translator(trained.load(config, _WORKDIR.value, _CHECKPOINT.value))
        scores, report = translator.score(sources, targets, progress=True)
        lines = [f"{total:.6f}\t{total / max(tokens, 1):.6f}\t{tokens}" for total, tokens in scores]
    else:
        if _SOURCE.value or _TARGET.value:
            raise ValueError("--source and --target are for --score; translate --input FILE or stdin.")
        sentences = list(read_lines(_INPUT.value) if _INPUT.value
                         else decode_lines(sys.stdin.buffer, "<stdin>"))
        translator = Translator(trained.load(config, _WORKDIR.value, _CHECKPOINT.value))
        results, report = translator.translate(sentences, max(_NBEST.value, 1),
                                               progress=_INPUT.value is not None)
        if _NBEST.value:
            lines = [f"{index}\t{rank}\t{h.score:.6f}\t{h.text}" for index, hypotheses in enumerate(results)
                     for rank, h in enumerate(hypotheses, start=1)]
        else:
            lines = [hypotheses[0].text for hypotheses in results]
    write(lines, _OUTPUT.value)
    print(f"{'scored' if _SCORE.value else 'translated'} {report}", file=sys.stderr)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.ERROR)  # orbax warns of every read-only checkpoint directory.
    try:
        run()
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"translate.py: {error}")


if __name__ == "__main__":
    app.run(main)
