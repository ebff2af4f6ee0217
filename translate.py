"""Translate text with a trained run (one sentence per line), or score given pairs.

    echo "A man is riding a bike." | python translate.py --workdir runs/multi30k
    python translate.py --workdir W [--checkpoint latest|STEP|average:N]
        [--input FILE] [--output FILE] [--stream] [--prefix FILE] [--beam N]
        [--strategy beam|greedy|sample] [--temperature T] [--top_k K] [--top_p P]
        [--length_penalty A] [--max_length N] [--max_len_a A --max_len_b B]
        [--no_repeat_ngram_size N] [--repetition_penalty P] [--nbest K] [--target_lang LANG]
        [--config.KEY=VALUE ...]
    python translate.py --workdir W --score --source S --target T [--output FILE]

The run's config is its config.json; --config FILE[:variant] and --config.KEY=VALUE may change
what may change at inference (decoding, batch sizes, mesh), not its model. The decoding flags
are shorthands of config.decode keys (--beam of --config.decode.beam_size). --target_lang deu
chooses a multilingual model's output language: it puts OPUS-MT's token '>>deu<<' before every
source (config.data.target_lang_token); a language the vocabulary has no token for is an error
listing those it has. --prefix FILE, line-aligned with the input (an empty line: none), forces
each translation to begin with its line (CTranslate2's target_prefix): terminology, or
interactive translation that continues what a translator typed.

Translations go one per line in input order; with --nbest K, lines of
index<TAB>rank<TAB>score<TAB>translation (index from 0, rank 1 is the best). --score writes
sum<TAB>mean<TAB>tokens of each target's token log-probabilities. The input is read and
checked whole before anything is written, and --output is written atomically; but with
--stream, translate.py reads stdin a line at a time and writes and flushes the translations
of the lines already waiting as soon as they are done (to stdout), for pipes and interactive
use, stopping at the first invalid line.
"""
import sys

from absl import flags, logging

from tfx.core import cli, files, host_memory
from tfx.core import config as config_lib
from tfx.data.sources import decode_lines, read_lines
from tfx.data.corpora import language_token
from tfx.infer import stream as stream_lib
from tfx.infer import trained
from tfx.infer.translate import Hypothesis, Translator


def main():
    shared = cli.define_flags(workdir="The training run's workdir.", checkpoint=True)
    inputs = flags.DEFINE_string("input", None, "Sentences to translate, one per line (default: stdin).")
    output = flags.DEFINE_string("output", None, "Where to write (default: stdout).")
    nbest = flags.DEFINE_integer("nbest", 0, "Write the best K hypotheses of each sentence with scores.")
    score = flags.DEFINE_bool("score", False, "Score the pairs of --source and --target.")
    source = flags.DEFINE_string("source", None, "Score mode: source sentences, one per line.")
    target = flags.DEFINE_string("target", None, "Score mode: their translations, line-aligned.")
    prefix = flags.DEFINE_string("prefix", None, "Forced target prefixes, one per input line (empty: none).")
    stream = flags.DEFINE_bool("stream", False, "Translate stdin a line at a time, flushing each batch.")
    decode = {  # each overrides its config.decode key.
        "beam_size": flags.DEFINE_integer("beam", None, "Beam size (config.decode.beam_size)."),
        "strategy": flags.DEFINE_enum("strategy", None, list(config_lib.DECODE_STRATEGIES),
                                      "Decoding strategy."),
        "temperature": flags.DEFINE_float("temperature", None, "Sampling temperature."),
        "top_k": flags.DEFINE_integer("top_k", None, "Sample among the K most likely tokens (0: all)."),
        "top_p": flags.DEFINE_float("top_p", None, "Sample within the top-p probability mass."),
        "length_penalty": flags.DEFINE_float("length_penalty", None, "GNMT length penalty alpha."),
        "max_length": flags.DEFINE_integer("max_length", None, "Longest output in tokens, EOS included."),
        "max_len_a": flags.DEFINE_float("max_len_a", None, "Outputs stop at A * source length + B tokens."),
        "max_len_b": flags.DEFINE_integer("max_len_b", None, "See --max_len_a."),
        "no_repeat_ngram_size": flags.DEFINE_integer("no_repeat_ngram_size", None,
                                                     "No n-gram of N tokens twice in an output (0: off)."),
        "repetition_penalty": flags.DEFINE_float("repetition_penalty", None,
                                                 "> 1 penalises the tokens an output already holds."),
    }
    target_lang = flags.DEFINE_string(
        "target_lang", None, "A multilingual model's output language: OPUS-MT's '>>LANG<<' token "
        "starts every source (config.data.target_lang_token).")
    for old in ("top-k", "top-p", "length-penalty", "max-length", "target-lang", "max-len-a", "max-len-b",
                "no-repeat-ngram-size", "repetition-penalty"):
        cli.alias(old, old.replace("-", "_"))

    def command():
        config = shared.run_config()
        for key, flag in decode.items():
            if flag.value is not None:
                config.decode[key] = flag.value
        if target_lang.value is not None:
            config.data.target_lang_token = language_token(target_lang.value, config.data.target_lang_token)
        config = config_lib.validate(config)
        args = (shared.workdir.value, shared.checkpoint.value)
        host_memory.keep_freed_memory_on_cpu()
        if score.value:
            if not (source.value and target.value) or inputs.value or prefix.value or stream.value:
                raise ValueError("--score needs --source and --target (and no --input, --prefix or --stream).")
            score_pairs(config, *args, source.value, target.value, output.value)
            return
        if source.value or target.value:
            raise ValueError("--source and --target are for --score; translate --input FILE or stdin.")
        prefixes = list(read_lines(prefix.value)) if prefix.value else None
        if stream.value:
            if inputs.value or output.value:
                raise ValueError("--stream reads stdin and writes stdout; leave out --input and --output.")
            translate_stream(Translator(trained.load(config, *args)), nbest.value, prefixes, prefix.value)
        else:
            translate_file(config, *args, inputs.value, output.value, nbest.value, prefixes, prefix.value)

    # ERROR: orbax warns of every read-only checkpoint directory.
    cli.run("translate.py", command, verbosity=logging.ERROR)


def write(lines: list[str], path: str | None):
    """All of `lines` to `path` (atomically: a temporary file renamed) or to stdout."""
    text = "".join(line + "\n" for line in lines)
    if path is None:
        sys.stdout.write(text)
        return
    files.write_text(path, text)


def score_pairs(config, workdir: str, checkpoint: str, source: str, target: str, output: str | None):
    """Writes sum, mean and count of each target's token log-probabilities given its source."""
    sources, targets = list(read_lines(source)), list(read_lines(target))
    if len(sources) != len(targets):
        raise ValueError(f"{source} has {len(sources)} lines but {target} has "
                         f"{len(targets)}; sources and targets must be line-aligned.")
    translator = Translator(trained.load(config, workdir, checkpoint))
    scores, report = translator.score(sources, targets, progress=True)
    write([f"{total:.6f}\t{total / max(tokens, 1):.6f}\t{tokens}" for total, tokens in scores], output)
    print(f"scored {report}", file=sys.stderr)


def translate_file(config, workdir: str, checkpoint: str, inputs: str | None, output: str | None,
                   nbest: int, prefixes: list[str] | None, prefix_file: str | None):
    """Translates all of `inputs` (or stdin), then writes the translations to `output`."""
    sentences = list(read_lines(inputs) if inputs else decode_lines(sys.stdin.buffer, "<stdin>"))
    if prefixes is not None and len(prefixes) != len(sentences):
        raise ValueError(f"--prefix {prefix_file} has {len(prefixes)} lines but the input has "
                         f"{len(sentences)}; give one prefix per input line (an empty line: none).")
    translator = Translator(trained.load(config, workdir, checkpoint))
    results, report = translator.translate(sentences, max(nbest, 1), progress=inputs is not None,
                                           prefixes=prefixes)
    write(output_lines(results, nbest), output)
    print(f"translated {report}", file=sys.stderr)


def translate_stream(translator: Translator, nbest: int, prefixes: list[str] | None, prefix_file: str | None):
    """Translates stdin a batch of waiting lines at a time, flushing each batch's translations."""
    done = 0
    for batch in stream_lib.waiting_batches(decode_lines(sys.stdin.buffer, "<stdin>"), translator.rows):
        forced = None
        if prefixes is not None:
            if done + len(batch) > len(prefixes):
                raise ValueError(f"--prefix {prefix_file} has {len(prefixes)} lines but the input has more; "
                                 "give one prefix per input line (an empty line: none).")
            forced = prefixes[done:done + len(batch)]
        results, _ = translator.translate(batch, max(nbest, 1), stream=done, prefixes=forced)
        write(output_lines(results, nbest, first=done), None)
        sys.stdout.flush()
        done += len(batch)


def output_lines(results: list[list[Hypothesis]], nbest: int, first: int = 0) -> list[str]:
    """The best translation of each sentence; with `nbest`, index, rank, score and translation
    of each hypothesis (indices from `first`)."""
    if not nbest:
        return [hypotheses[0].text for hypotheses in results]
    return [f"{index}\t{rank}\t{h.score:.6f}\t{h.text}" for index, hypotheses in enumerate(results, start=first)
            for rank, h in enumerate(hypotheses, start=1)]


if __name__ == "__main__":
    main()
