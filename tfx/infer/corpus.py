"""A corpus made by translating many sentences, resumably: what sequence-level distillation
(tfx.compress.distill) and back-translation (tfx.infer.backtranslate) share.

The sentences come as an iterable of chunks (each an iterable of the caller's records, read
only when the chunk is translated, so a stream of millions of lines is never held whole). The
caller turns a chunk's records into a chunk: a dict that `translated_chunk` starts (the sources
translated, their best translations, and what the report sums) and the caller completes. Each
chunk is saved atomically as OUTPUT/chunks/<name>-NNNNNN.json; a rerun skips the chunks saved.
When every chunk is there the corpus files are written, each atomically, streaming their lines
from the chunk files (`lines(chunk)` gives a chunk's corpus lines, one string per file), and the
caller removes the chunks. OUTPUT/state.json holds the settings the corpus depends on, keyed by
the flag or config key that sets each; a rerun whose settings differ is refused, naming the key.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence

import tqdm

from tfx.core import files
from tfx.infer.translate import Hypothesis, NonFiniteScoresError, Translator, excerpt
from tfx.train.rundir import TrainedModel

STATE_FILE = "state.json"
REPORT_FILE = "report.json"
CHUNKS = "chunks"

Lines = Callable[[dict], Iterable[Sequence[str]]]


def write_json(path: str, value):
    files.write_text(path, json.dumps(value, indent=1, ensure_ascii=False))


def read_json(path: str):
    return json.loads(files.path(path).read_text(encoding="utf-8"))


def one_line(text: str) -> str:
    """`text` with line breaks made spaces, so that a sentence stays one line of the corpus."""
    return text.replace("\r", " ").replace("\n", " ")


def run_settings(model: TrainedModel, workdir: str, tool_flags: dict, content: dict) -> dict:
    """The settings of a corpus `model` translates: its run and checkpoint, `tool_flags`, its
    tokenizer and the config keys that change a translation, and `content` (what identifies
    the input), keyed by the flag or config key that sets each; as state.json gives them back."""
    config = model.config
    settings = {"--workdir": os.fspath(files.path(workdir)), "--checkpoint": model.label, **tool_flags,
                "tokenizer (sha256)": model.tokenizer.fingerprint[:16],
                "config.seed": config.seed, "config.quantization": config.quantization,
                "config.data.source_lang": config.data.source_lang,
                "config.data.target_lang": config.data.target_lang,
                "config.data.target_lang_token": config.data.target_lang_token,
                **{f"config.model.{k}": v for k, v in config.model.to_dict().items()},
                **{f"config.decode.{k}": v for k, v in config.decode.to_dict().items()},
                **content}
    return json.loads(json.dumps(settings))  # (lists, not tuples)


def open_state(output: str, settings: dict, what: str) -> dict:
    """The state of `output`, {"settings": ..., "done": {name: report}} (created if new),
    refusing settings that differ from its own. A key the saved settings lack passes (a split
    not translated before), but a flag's ("--...": another tool's output). Removes the
    temporary files a killed run left. `what` names the tool's output in the error for a
    directory that holds something else."""
    path = os.path.join(output, STATE_FILE)
    if files.path(path).is_file():
        state = read_json(path)
        for key, value in settings.items():
            if key.startswith("--") and key not in state["settings"]:
                raise ValueError(f"{key}: {output} was made without {key}, so not as {what}; "
                                 "choose a new --output.")
            saved = state["settings"].get(key, value)
            if saved != value:
                raise ValueError(f"{key}: {output} was made with {saved!r}, this run has {value!r}; "
                                 "rerun with the same arguments or choose a new --output.")
        state["settings"].update(settings)
    elif files.path(output).is_dir() and any(files.path(output).iterdir()):
        raise ValueError(f"--output={output} is not empty and has no {STATE_FILE} of {what}; "
                         "choose a new directory.")
    else:
        state = {"settings": settings, "done": {}}
        files.path(output).mkdir(parents=True, exist_ok=True)
    for folder in (output, os.path.join(output, CHUNKS)):
        for temporary in files.path(folder).glob("*.tmp"):
            temporary.unlink()  # left by a killed run.
    save_state(output, state)
    return state


def save_state(output: str, state: dict):
    write_json(os.path.join(output, STATE_FILE), state)


def translated_chunk(translator: Translator, sources: Sequence[str], indices: Sequence[int],
                     where: Callable[[int, str], str], skipped: int = 0, nbest: int = 1,
                     stream: int | None = None) -> tuple[dict, list[list[Hypothesis]]]:
    """(the chunk of `sources`, non-empty sentences, with their best translations and what the
    report sums; their `nbest` hypotheses; sampling draws from `stream`). `skipped` counts the chunk's records left out. A
    sentence without a finite hypothesis raises NonFiniteScoresError with the caller's index of
    it (`indices`) and `where(index, source excerpt)` saying where it is."""
    try:
        results, report = translator.translate(sources, nbest, stream=stream)
    except NonFiniteScoresError as error:
        index = indices[error.index]
        raise NonFiniteScoresError(index, where(index, excerpt(sources[error.index])),
                                   error.hypotheses) from None
    chunk = {"sources": list(sources), "translations": [r[0].text for r in results],
             "skipped_empty": skipped, "truncated": report.truncated, "tokens": report.tokens,
             "seconds": report.seconds}
    return chunk, results


def chunk_path(output: str, name: str, number: int) -> str:
    return os.path.join(output, CHUNKS, f"{name}-{number:06d}.json")


def translate_chunks(output: str, name: str, chunks: Iterable[Iterable],
                     make_chunk: Callable[[list, int], dict], chunk_size: int,
                     total: int | None = None, progress: bool = False) -> list[str]:
    """Saves `make_chunk(records, first)` for each of `chunks` (chunk_size records each, the
    last maybe fewer; `first` is the index of its first record) not saved yet, as
    OUTPUT/chunks/<name>-NNNNNN.json; returns the chunk files in order. A saved chunk's records
    are not read."""
    (files.path(output) / CHUNKS).mkdir(parents=True, exist_ok=True)
    paths = []
    for number, records in enumerate(tqdm.tqdm(chunks, desc=name, unit="chunk", total=total,
                                               disable=not progress)):
        paths.append(chunk_path(output, name, number))
        if not files.path(paths[-1]).is_file():
            write_json(paths[-1], make_chunk(list(records), number * chunk_size))
    return paths


def read_chunks(paths: Iterable[str]) -> Iterator[dict]:
    for path in paths:
        yield read_json(path)


def write_corpus(corpus: Sequence[str], paths: Sequence[str], lines: Lines):
    """Writes the corpus files `corpus` from the chunk files `paths`, each atomically and one
    chunk in memory at a time; `lines(chunk)` gives a chunk's lines, each a tuple of one
    sentence per corpus file."""
    for side, path in enumerate(corpus):
        files.write_text(path, _side(paths, lines, side))


def _side(paths: Sequence[str], lines: Lines, side: int) -> Iterator[str]:
    for chunk in read_chunks(paths):
        for line in lines(chunk):
            yield one_line(line[side]) + "\n"


def chunks_report(corpus: Sequence[str], paths: Sequence[str], lines: Lines) -> dict:
    """What the chunk files `paths` of the corpus files `corpus` sum to."""
    totals = dict.fromkeys(("sentences", "lines", "skipped_empty", "truncated", "empty_translations",
                            "tokens", "seconds"), 0)
    for chunk in read_chunks(paths):
        totals["sentences"] += len(chunk["translations"])
        totals["lines"] += sum(1 for _ in lines(chunk))
        totals["empty_translations"] += sum(not text.strip() for text in chunk["translations"])
        for key in ("skipped_empty", "truncated", "tokens", "seconds"):
            totals[key] += chunk[key]
    seconds = max(totals["seconds"], 1e-9)
    return {"files": list(corpus), **{key: value for key, value in totals.items() if key != "tokens"},
            "sentences_per_sec": totals["sentences"] / seconds, "tokens_per_sec": totals["tokens"] / seconds}


def write(output: str, name: str, corpus: Sequence[str], chunks: Iterable[Iterable],
          make_chunk: Callable[[list, int], dict], lines: Lines, chunk_size: int,
          total: int | None = None, progress: bool = False) -> dict:
    """Translates the chunks not saved yet (`translate_chunks`), writes the corpus files
    `corpus` (`write_corpus`) and returns their report (`chunks_report`)."""
    paths = translate_chunks(output, name, chunks, make_chunk, chunk_size, total, progress)
    write_corpus(corpus, paths, lines)
    return chunks_report(corpus, paths, lines)


def remove_chunks(output: str, name: str):
    """Removes the chunk files of `name`, and the chunks folder once empty."""
    folder = files.path(output) / CHUNKS
    for path in folder.glob(f"{name}-*.json"):
        path.unlink()
    if folder.is_dir() and not any(folder.iterdir()):  # (on Cloud Storage, gone with its files)
        folder.rmdir()
