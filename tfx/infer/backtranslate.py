"""Back-translation (Sennrich et al., 2016; Edunov et al., 2018): a reverse-direction run
translates monolingual target-side text into synthetic sources, giving a parallel corpus on
which the forward direction trains.

    python -m tfx.infer.backtranslate --workdir runs/multi30k-de-en --input mono.de \\
        [--input more.de] --output runs/bt [--method beam|sample|noised] \\
        [--checkpoint latest|STEP|average:N] [--chunk_size 2048] [--config.decode.beam_size=8]

The reverse run's config names the languages: the input is in its source_lang (German for a
de->en run). OUTPUT/train.<source_lang> holds the input lines as given (blank ones skipped and
counted) and OUTPUT/train.<target_lang> their translations, line-aligned UTF-8, so that the
forward direction reads them as `text:OUTPUT/train`. The methods:
- beam: beam search as config.decode says (its strategy made beam);
- sample: unrestricted sampling (strategy sample, top_k 0, temperature 1, top_p 1; a
  --config.decode key given on the command line stays as given, so --config.decode.top_k=10
  is Edunov et al.'s restricted sampling);
- noised: beam search, then Edunov et al.'s noise on each translation's words: a shuffle that
  moves no word 3 places or more, each word deleted with probability 0.1, then each replaced by
  the filler token `<blank>` with probability 0.1 (`noise`; fairseq's placeholder, here a
  plain string that the forward run's tokenizer splits like any text).

Randomness depends on config.seed and the input line's index alone: a chunk samples from
config.seed's key folded with the index of its first line, a line's noise from a generator
seeded with (config.seed, its index); so a run killed and rerun with the same arguments writes
the same bytes as one that was not (given the same devices and batch size). The input is read as
a stream, chunk by chunk, and translated as distillation translates (tfx/infer/corpus.py): each
chunk saved atomically in OUTPUT/chunks/, the corpus files written when all are there.
OUTPUT/state.json holds what the corpus depends on (reverse run, checkpoint, method, tokenizer,
model and decoding settings, the input files' content, chunk size): a rerun that differs in any
is refused. OUTPUT/report.json has the sentences, blank lines skipped, seconds and sentences/s.
"""
from __future__ import annotations

import bisect
import copy
import dataclasses
import hashlib
import itertools
import os
from collections.abc import Collection, Iterable, Iterator, Sequence

import ml_collections
import numpy as np

from tfx.core import files
from tfx.data.sources import decode_lines, read_lines
from tfx.infer import corpus
from tfx.infer.translate import Translator

METHODS = ("beam", "sample", "noised")
STRATEGY = {"beam": "beam", "sample": "sample", "noised": "beam"}
UNRESTRICTED = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}  # config.decode of --method=sample.
CHUNK_SIZE = 2048
FILLER = "<blank>"
NAME = "train"  # OUTPUT/train.<language>
STATE_FILE, REPORT_FILE, CHUNKS = corpus.STATE_FILE, corpus.REPORT_FILE, corpus.CHUNKS


@dataclasses.dataclass(frozen=True)
class Monolingual:
    """Text files read as one stream of lines, checked and fingerprinted by `open_monolingual`."""
    paths: tuple[str, ...]
    fingerprints: tuple[str, ...]  # sha256 of each file's bytes (16 hex digits).
    lines: tuple[int, ...]  # per file.

    def __len__(self) -> int:
        return sum(self.lines)

    def chunks(self, size: int) -> Iterator[list[str]]:
        """The lines, `size` at a time, read as they are needed."""
        stream = itertools.chain.from_iterable(map(read_lines, self.paths))
        while chunk := list(itertools.islice(stream, size)):
            yield chunk

    def where(self, index: int) -> str:
        """FILE:LINE of line `index` (counted from 0 over all files)."""
        ends = list(itertools.accumulate(self.lines))
        number = bisect.bisect_right(ends, index)
        return f"{self.paths[number]}:{index - (ends[number] - self.lines[number]) + 1}"


def open_monolingual(paths: Sequence[str]) -> Monolingual:
    """`paths` read once: each must exist and be UTF-8 (errors name the file and line), and
    together hold a line that is not blank."""
    fingerprints, lines, has_text = [], [], False
    for path in paths:
        if not files.path(path).is_file():
            raise FileNotFoundError(f"--input={path} does not exist.")
        digest, count = hashlib.sha256(), 0
        with files.path(path).open("rb") as f:
            for count, line in enumerate(decode_lines(_hashing(f, digest), path), start=1):
                has_text = has_text or bool(line.strip())
        fingerprints.append(digest.hexdigest()[:16])
        lines.append(count)
    if not has_text:
        raise ValueError(f"--input={','.join(paths)}: no text to translate (only blank lines).")
    return Monolingual(tuple(paths), tuple(fingerprints), tuple(lines))


def _hashing(stream: Iterable[bytes], digest) -> Iterator[bytes]:
    """The lines of `stream`, each added to `digest` as it passes."""
    for line in stream:
        digest.update(line)
        yield line


def method_config(config: ml_collections.ConfigDict, method: str, given: Collection[str] = ()
                  ) -> ml_collections.ConfigDict:
    """A copy of `config` decoding as `method` does (see the module doc); the keys in `given`
    (flattened, "decode.top_k": the --config overrides of the command line) stay as they are."""
    check_method(method)
    if "decode.strategy" in given and config.decode.strategy != STRATEGY[method]:
        raise ValueError(f"--config.decode.strategy={config.decode.strategy}: --method={method} "
                         f"decodes with {STRATEGY[method]}; leave it out.")
    config = copy.deepcopy(config)
    config.decode.strategy = STRATEGY[method]
    if method == "sample":
        config.decode.update({key: value for key, value in UNRESTRICTED.items()
                              if f"decode.{key}" not in given})
    return config


def check_method(method: str):
    if method not in METHODS:
        raise ValueError(f"--method={method!r}: use one of {', '.join(METHODS)}.")


def check_arguments(config: ml_collections.ConfigDict, method: str, chunk_size: int):
    """Errors naming the flag, before the reverse run is loaded."""
    check_method(method)
    if config.decode.strategy != STRATEGY[method]:
        raise ValueError(f"--method={method} decodes with {STRATEGY[method]}, but "
                         f"config.decode.strategy={config.decode.strategy!r}; use method_config.")
    if chunk_size < 1:
        raise ValueError(f"--chunk_size={chunk_size} must be positive.")


def noise_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of line `index`'s noise."""
    return np.random.default_rng((seed % 2**64, index))


def noise(text: str, rng: np.random.Generator, delete: float = 0.1, blank: float = 0.1,
          distance: int = 3) -> str:
    """Edunov et al. (2018)'s noise on the words of `text` (split at whitespace, joined by one
    space), in fairseq's order: the words sorted by position + U(0, `distance`), which moves
    none `distance` places or more; each deleted with probability `delete` (one kept if none is
    left); each replaced by FILLER with probability `blank`."""
    words = text.split()
    if not words:
        return ""
    order = np.argsort(np.arange(len(words)) + rng.uniform(0, distance, len(words)), kind="stable")
    shuffled = [words[i] for i in order]
    kept = [word for word, u in zip(shuffled, rng.random(len(words))) if u >= delete]
    kept = kept or [shuffled[rng.integers(len(words))]]
    return " ".join(FILLER if u < blank else word for word, u in zip(kept, rng.random(len(kept))))


def _translate_chunk(translator: Translator, text: Monolingual, lines: Sequence[str], first: int,
                     method: str) -> dict:
    """The translations of `lines`, lines `first`... of `text` (blank ones skipped), and with
    method noised their noised copies."""
    kept = [i for i, line in enumerate(lines) if line.strip()]
    chunk, _ = corpus.translated_chunk(
        translator, [lines[i] for i in kept], [first + i for i in kept],
        lambda index, source: f"{text.where(index)} ({source!r})", skipped=len(lines) - len(kept),
        stream=first)
    if method == "noised":
        seed = translator.model.config.seed
        chunk["noised"] = [noise(translation, noise_rng(seed, first + i))
                           for translation, i in zip(chunk["translations"], kept)]
    return chunk


def backtranslate(translator: Translator, workdir: str, text: Monolingual, output: str,
                  method: str = "beam", chunk_size: int = CHUNK_SIZE, progress: bool = False) -> dict:
    """Writes the back-translation of `text` into `output` (see the module doc), resuming an
    interrupted run, and returns the report also written to OUTPUT/report.json.

    `translator` holds the reverse run, decoding as `method_config(config, method)` says;
    `workdir` is the reverse run."""
    config = translator.model.config
    check_arguments(config, method, chunk_size)
    settings = corpus.run_settings(translator.model, workdir,
                                   {"--method": method, "--chunk_size": chunk_size},
                                   {"--input (sha256)": list(text.fingerprints)})
    state = corpus.open_state(output, settings, "a back-translation")
    if NAME not in state["done"]:
        synthetic = "noised" if method == "noised" else "translations"
        state["done"][NAME] = corpus.write(
            output, NAME, [os.path.join(output, f"{NAME}.{language}")
                           for language in (config.data.source_lang, config.data.target_lang)],
            text.chunks(chunk_size),
            lambda lines, first: _translate_chunk(translator, text, lines, first, method),
            lambda chunk: zip(chunk["sources"], chunk[synthetic]), chunk_size,
            total=-(-len(text) // chunk_size), progress=progress)
        corpus.save_state(output, state)
    corpus.remove_chunks(output, NAME)
    report = {"reverse_run": settings["--workdir"], "checkpoint": translator.model.label,
              "method": method, "decode": config.decode.to_dict(), "inputs": list(text.paths),
              **state["done"][NAME]}
    corpus.write_json(os.path.join(output, REPORT_FILE), report)
    return report


def summary(report: dict) -> str:
    """The report in a few lines, for the terminal."""
    return (f"reverse run {report['reverse_run']} ({report['checkpoint']}), method {report['method']}: "
            f"{report['sentences']} sentences in {report['seconds']:.1f} s "
            f"({report['sentences_per_sec']:.1f} sentences/s); {report['skipped_empty']} blank lines "
            f"skipped, {report['truncated']} truncated, {report['empty_translations']} empty "
            f"translations\n{report['lines']} lines in {', '.join(report['files'])}")


def main():
    """The command line (absl flags, defined here so that importing this module defines none)."""
    from absl import flags, logging
    from ml_collections import config_flags

    from tfx.core import cli, host_memory
    from tfx.infer import trained

    shared = cli.define_flags(workdir="The reverse-direction run: its source language is the input's.",
                              checkpoint=True)
    inputs = flags.DEFINE_multi_string("input", None, "Monolingual UTF-8 text, a sentence a line; "
                                       "repeat the flag for more files.")
    output = flags.DEFINE_string("output", None, "Directory for the corpus; a rerun resumes there.")
    method = flags.DEFINE_enum("method", "beam", METHODS,
                               "Beam search, unrestricted sampling, or beam search with noise.")
    chunk_size = flags.DEFINE_integer("chunk_size", CHUNK_SIZE, "Lines per resumable chunk.")
    flags.mark_flags_as_required(["input", "output"])

    def run():
        given = config_flags.get_override_values(flags.FLAGS[shared.config.name])
        config = method_config(shared.run_config(), method.value, given)
        check_arguments(config, method.value, chunk_size.value)
        text = open_monolingual(inputs.value)
        host_memory.keep_freed_memory_on_cpu()
        translator = Translator(trained.load(config, shared.workdir.value, shared.checkpoint.value))
        report = backtranslate(translator, shared.workdir.value, text, output.value, method.value,
                               chunk_size.value, progress=True)
        print(summary(report))
        print(f"report: {os.path.join(output.value, REPORT_FILE)}")

    # ERROR: orbax warns of every read-only checkpoint directory.
    cli.run("tfx.infer.backtranslate", run, verbosity=logging.ERROR)


if __name__ == "__main__":
    main()
