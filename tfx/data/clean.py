"""Corpus cleaning: filters that drop bad sentence pairs, applied (and counted) when a corpus is
prepared.

The settings are `config.data.clean` (a corpus may override some of them). The filters run in
the order of `FILTERS`; a dropped pair is counted once, under the first filter that drops it.
`Cleaner.drop_reason` decides one pair alone (pure, so a distributed pipeline can map it);
`dedup` alone looks across pairs and runs on the pairs that pass the others.

`CleanedBuilder` prepares the kept pairs of a `PairSource` (tfx/data/sources.py) as array_record
files, in their original order, keyed by a hash of the source's content, the settings and the
languages: changing a setting prepares a new copy, the same settings reuse the prepared one. Its
metadata keeps the counts (`counts(builder)`; `table(rows)` prints several corpora's).

It prepares in this process, or on Apache Beam (the optional `beam` extra) when given a Beam
runner (`open_cleaned(..., beam_flags=["--runner=..."])`): workers decide batches of index
ranges with the same `Cleaner.codes`, dedup keeps the lowest index of each `pair_hash`, and TFDS
writes the kept pairs in index order, so both give the same files' content and counts.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import math
import numbers
import operator
import os
import tempfile
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import tensorflow_datasets as tfds

from tfx.core import files
from tfx.data import sources

if TYPE_CHECKING:  # (Beam is optional and imported where it runs.)
    from apache_beam.options.pipeline_options import PipelineOptions

# What each filter drops (its config default), in the order they run.
FILTERS = {
    "empty": "a pair with a side that is empty or whitespace-only (default: on)",
    "max_chars": "a pair with a side of more characters than this (default 0: no limit)",
    "max_words": "a pair with a side of more whitespace-separated words than this (default 0: "
                 "no limit)",
    "max_ratio": "a pair whose longer side has over this many times the shorter side's characters; "
                 "an empty side against a non-empty one is over any ratio (default 0: off)",
    "identical": "a pair whose source equals its target after stripping whitespace (default: off)",
    "min_letters": "a pair with a side whose share of letters (Unicode L*, with the combining "
                   "marks M* that belong to them) among its non-space characters is below this; "
                   "an empty side has none (default 0: off)",
    "nonprinting": "a pair with a side holding a non-printing character (Unicode Cc, Cf, Co, Cs, "
                   "Cn) other than tab and the zero-width (non-)joiners that Persian, Indic "
                   "scripts and emoji sequences spell words with (default: off)",
    "langid": "a pair with a side that py3langid does not identify as its language (default: off)",
    "dedup": "a later exact copy of a kept pair; the first stays (default: off)",
}
COUNTS = ("read", *FILTERS, "kept")  # what a cleaned corpus's metadata keeps.
CODES = {name: code for code, name in enumerate(FILTERS, start=1)}  # a pair's fate; 0: kept.
SWITCHES = ("empty", "identical", "nonprinting", "langid", "dedup")
LIMITS = ("max_chars", "max_words")
PRINTABLE_EXCEPTIONS = frozenset("\t\u200c\u200d")  # tab, zero-width non-joiner, joiner.
NONPRINTING_CATEGORIES = frozenset({"Cc", "Cf", "Co", "Cs", "Cn"})
ASCII_CHARACTERS = dict.fromkeys(range(128))  # a str.translate table that deletes them.
READ_BATCH = 10_000  # pairs read at once: array_record reads a batch much faster than one by one.
# Dedup's memory: hashes held before they go to bucket files, and the records per bucket file.
DEDUP_BUFFER = 1 << 18
DEDUP_BUCKET = 1 << 18
COUNTS_FILE = "clean_counts.json"  # Beam's counts, in the folder being prepared until read back.


def _problem(name: str, value) -> str | None:
    """What `value` must be for setting `name`, or None when it is fine."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if name in SWITCHES:
        return None if isinstance(value, bool) else "True or False"
    if name in LIMITS:
        whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        return None if whole and value >= 0 else "a whole number: 0 (no limit) or above"
    if name == "max_ratio":
        return None if real and (value == 0 or value > 1) else "0 (off) or above 1"
    return None if real and 0 <= value <= 1 else "between 0 (off) and 1"  # min_letters


def validate(settings: Mapping, key: str) -> dict:
    """The settings checked and normalised (ints, floats, bools); errors name `config.{key}.*`."""
    settings = dict(settings.items())
    unknown = sorted(set(settings) - set(FILTERS))
    missing = [name for name in FILTERS if name not in settings]
    if unknown or missing:
        wrong = f"has no key {unknown[0]!r}" if unknown else f"lacks the key {missing[0]!r}"
        raise ValueError(f"config.{key} {wrong}; its keys are: {', '.join(FILTERS)}.")
    for name, value in settings.items():
        problem = _problem(name, value)
        if problem:
            raise ValueError(f"config.{key}.{name}={value!r} must be {problem}.")
    kind = {name: bool if name in SWITCHES else int if name in LIMITS else float for name in FILTERS}
    return {name: kind[name](settings[name]) for name in FILTERS}


@functools.cache
def _language_identifier():
    """py3langid's model, shipped in its wheel (nothing is downloaded), over all its languages."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE)


def letter_share(text: str) -> float:
    """Letters and their combining marks over the non-space characters of `text` (0 when none)."""
    non_space = len(text) - sum(map(str.isspace, text))
    if not non_space:
        return 0.0
    marks = 0 if text.isascii() else sum(  # (no ASCII character is a mark.)
        unicodedata.category(char)[0] == "M" for char in text.translate(ASCII_CHARACTERS))
    return (sum(map(str.isalpha, text)) + marks) / non_space


def has_nonprinting(text: str) -> bool:
    """Whether `text` holds a non-printing character other than PRINTABLE_EXCEPTIONS."""
    if text.isprintable():  # (False for every C* character: the fast common case.)
        return False
    return any(char not in PRINTABLE_EXCEPTIONS and unicodedata.category(char) in
               NONPRINTING_CATEGORIES for char in text)


class Cleaner:
    """The per-pair filters of some settings for one language pair (source, target).

    `drop_reason` is pure and the object pickles small (the langid model reloads from the
    wheel), so a distributed pipeline can ship it to workers. Errors name `config.{key}.*`.
    """

    def __init__(self, settings: Mapping, languages: Sequence[str], key: str = "data.clean"):
        self.settings, self.languages, self.key = validate(settings, key), tuple(languages), key
        self.checks = [(name, getattr(self, f"_{name}")) for name in FILTERS
                       if name != "dedup" and self.settings[name]]
        if self.settings["langid"]:
            self.identifier = _language_identifier()
            for code in self.languages:
                if code not in self.identifier.nb_classes:
                    raise ValueError(
                        f"config.{key}.langid=True, but the language identifier (py3langid) does "
                        f"not know the language code {code!r}; it knows: "
                        f"{', '.join(sorted(set(self.identifier.nb_classes)))}. Turn langid off "
                        "for this corpus.")

    def __reduce__(self):
        return Cleaner, (self.settings, self.languages, self.key)

    def drop_reason(self, pair: Mapping[str, str]) -> str | None:
        """The first filter that drops `pair` ({"source", "target"}), or None to keep it."""
        source, target = pair["source"], pair["target"]
        for name, drops in self.checks:
            if drops(source, target):
                return name
        return None

    def codes(self, pairs: Sequence[Mapping[str, str]]) -> np.ndarray:
        """Each pair's fate (uint8): 0 kept, else the CODES of the filter that drops it (dedup,
        which looks across pairs, aside)."""
        reasons = map(self.drop_reason, pairs)
        return np.fromiter((CODES[r] if r else 0 for r in reasons), np.uint8, len(pairs))

    def _empty(self, source: str, target: str) -> bool:
        return not source.strip() or not target.strip()

    def _max_chars(self, source: str, target: str) -> bool:
        return max(len(source), len(target)) > self.settings["max_chars"]

    def _max_words(self, source: str, target: str) -> bool:
        return max(len(source.split()), len(target.split())) > self.settings["max_words"]

    def _max_ratio(self, source: str, target: str) -> bool:
        shorter, longer = sorted((len(source), len(target)))
        return longer > self.settings["max_ratio"] * shorter  # (both empty: not over.)

    def _identical(self, source: str, target: str) -> bool:
        return source.strip() == target.strip()

    def _min_letters(self, source: str, target: str) -> bool:
        return min(letter_share(source), letter_share(target)) < self.settings["min_letters"]

    def _nonprinting(self, source: str, target: str) -> bool:
        return has_nonprinting(source) or has_nonprinting(target)

    def _langid(self, source: str, target: str) -> bool:
        return any(self.identifier.classify(text)[0] != language
                   for text, language in zip((source, target), self.languages))


def read_pairs(pairs, indices: Sequence[int]) -> list[dict[str, str]]:
    """`pairs[i]` for each index: a PairSource's batched read, else one by one."""
    if not len(indices):  # (array_record's batched read refuses an empty list.)
        return []
    if hasattr(pairs, "read"):
        return pairs.read(indices)
    return [pairs[int(i)] for i in indices]


def pair_hash(pair: Mapping[str, str]) -> bytes:
    """128 bits that tell pairs apart (the source's length makes the split point unambiguous)."""
    source = pair["source"].encode()
    data = len(source).to_bytes(8, "little") + source + pair["target"].encode()
    return hashlib.blake2b(data, digest_size=16).digest()


HASH_RECORD = np.dtype([("high", np.uint64), ("low", np.uint64), ("index", np.int64)])


class Duplicates:
    """Finds later copies of pairs in bounded memory, and marks them in `codes` (on disk).

    `add` takes kept pairs in index order; their hashes wait in memory until DEDUP_BUFFER of
    them, where copies within the buffer are marked and the first of each goes to a bucket file
    chosen by the hash's high bits; `finish` then marks the copies within each bucket file, one
    file (about DEDUP_BUCKET records) at a time. A pair repeated many times thus costs one record
    per buffer, and memory stays the same however large the corpus.
    """

    def __init__(self, codes: np.ndarray, code: int, work_dir: str):
        self.codes, self.code, self.work_dir = codes, code, work_dir
        self.bucket_bits = max(0, math.ceil(math.log2(max(1, len(codes)) / DEDUP_BUCKET)))
        self.waiting: list[np.ndarray] = []

    def add(self, indices: Sequence[int], pairs: Sequence[Mapping[str, str]]):
        """Hashes `pairs`, kept ones at `indices` (ascending, after those of earlier calls)."""
        hashes = np.frombuffer(b"".join(map(pair_hash, pairs)), np.uint64).reshape(-1, 2)
        batch = np.empty(len(hashes), HASH_RECORD)
        batch["high"], batch["low"], batch["index"] = hashes[:, 0], hashes[:, 1], indices
        self.waiting.append(batch)
        if sum(map(len, self.waiting)) >= DEDUP_BUFFER:
            self._spill()

    def finish(self):
        """Marks the copies whose first occurrence came in an earlier buffer."""
        self._spill()
        for bucket in range(1 << self.bucket_bits):
            path = self._bucket_path(bucket)
            if os.path.exists(path):
                self._mark_copies(np.fromfile(path, HASH_RECORD))
                os.remove(path)

    def _spill(self):
        if not self.waiting:
            return
        firsts = self._mark_copies(np.concatenate(self.waiting))
        self.waiting = []
        buckets = firsts["high"] >> np.uint64(64 - self.bucket_bits) if self.bucket_bits else (
            np.zeros(len(firsts), np.uint64))
        order = np.argsort(buckets, kind="stable")
        firsts, buckets = firsts[order], buckets[order]
        starts = np.flatnonzero(np.r_[True, buckets[1:] != buckets[:-1]])
        for start, stop in zip(starts, np.r_[starts[1:], len(buckets)]):
            with open(self._bucket_path(int(buckets[start])), "ab") as f:
                firsts[start:stop].tofile(f)

    def _mark_copies(self, records: np.ndarray) -> np.ndarray:
        """Marks all but the lowest index of each hash in `codes`; returns those lowest."""
        records = records[np.lexsort((records["index"], records["low"], records["high"]))]
        copy = np.r_[False, (records["high"][1:] == records["high"][:-1]) &
                     (records["low"][1:] == records["low"][:-1])]
        self.codes[records["index"][copy]] = self.code
        return records[~copy]

    def _bucket_path(self, bucket: int) -> str:
        return os.path.join(self.work_dir, f"bucket-{bucket:05d}.bin")


def _batches(pairs) -> Iterator[tuple[int, list[dict[str, str]]]]:
    for start in range(0, len(pairs), READ_BATCH):
        yield start, read_pairs(pairs, range(start, min(start + READ_BATCH, len(pairs))))


def _config_name(fingerprint: str, cleaner: Cleaner) -> str:
    """The languages and a hash of what decides the kept pairs (the langid model's version too)."""
    identity = dict(pairs=fingerprint, settings=cleaner.settings, languages=cleaner.languages)
    if cleaner.settings["langid"]:
        identity["langid"] = importlib.metadata.version("py3langid")
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return "-".join(cleaner.languages + (digest,))


class CleanedBuilder(tfds.core.GeneratorBasedBuilder):
    """TFDS builder of the pairs of `pairs` (a PairSource) that the settings keep, in order.

    One split, sources.TEXT_SPLIT; the dataset's metadata keeps the counts (`counts`). Dedup's
    scratch files go to a temporary folder in `data_dir` (local disk, as sources checks).
    Prepared with a Beam runner or options (tfds.download.DownloadConfig), it runs on Beam
    (`_beam_cleaned`), which writes the counts to COUNTS_FILE, read back once the pipeline ran.
    """

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, pairs, settings: Mapping, data_dir: str, key: str = "data.clean",
                 **kwargs):
        self.pairs, self.cleaner = pairs, Cleaner(settings, pairs.languages, key)
        self.scratch_root, self.on_beam = data_dir, False
        kwargs.setdefault("file_format", "array_record")
        name = _config_name(pairs.fingerprint, self.cleaner)
        super().__init__(config=tfds.core.BuilderConfig(name=name), data_dir=data_dir, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.Translation(languages=self.cleaner.languages),
            disable_shuffling=True, metadata=tfds.core.MetadataDict())

    def _download_and_prepare(self, dl_manager, download_config):
        self.on_beam = (download_config.beam_runner is not None
                        or download_config.beam_options is not None)
        super()._download_and_prepare(dl_manager, download_config)

    def _split_generators(self, dl_manager):
        if self.on_beam:  # (self.data_dir: the temporary folder TFDS renames once complete.)
            self.counts_path = os.path.join(self.data_dir, COUNTS_FILE)
            return {sources.TEXT_SPLIT: _beam_cleaned(self.pairs, self.cleaner, self.counts_path)}
        return {sources.TEXT_SPLIT: self._generate_examples()}

    def _process_pipeline_result(self, pipeline_result):
        """Reads back the counts the Beam pipeline wrote (TFDS calls this once it ran)."""
        path = files.path(self.counts_path)
        totals = json.loads(path.read_text())
        path.unlink()
        self._record(np.array(totals, np.int64))

    def _generate_examples(self):
        totals = np.zeros(len(FILTERS) + 1, np.int64)  # kept, then each filter's drops.
        for start, codes, kept in self._decided_batches():
            totals += np.bincount(codes, minlength=len(totals))
            for index, pair in zip(start + np.flatnonzero(codes == 0), kept):
                item = int(index), (pair["source"], pair["target"])
                yield _example(item, self.cleaner.languages, len(self.pairs))
        self._record(totals)

    def _record(self, totals: np.ndarray):
        """Puts the counts (`totals`: kept, then each filter's drops) in the metadata; an error
        when no pair is kept."""
        found = {"read": int(totals.sum()), **dict(zip(FILTERS, totals[1:].tolist())),
                 "kept": int(totals[0])}
        if not found["kept"]:
            raise ValueError(f"config.{self.cleaner.key} drops every pair of "
                             f"{self.pairs.fingerprint}: {found}.")
        self.info.metadata.update(found)
        logging.info("cleaned %s: %s", self.pairs.fingerprint, found)

    def _decided_batches(self) -> Iterator[tuple[int, np.ndarray, list[dict[str, str]]]]:
        """(start, each pair's code (0: kept, else CODES of its filter), the kept pairs) in order."""
        if not self.cleaner.settings["dedup"]:
            for start, batch in _batches(self.pairs):
                codes = self.cleaner.codes(batch)
                yield start, codes, [pair for pair, code in zip(batch, codes) if not code]
            return
        with tempfile.TemporaryDirectory(prefix="tfx-clean-", dir=self.scratch_root) as work_dir:
            codes = np.lib.format.open_memmap(os.path.join(work_dir, "codes.npy"), "w+", np.uint8,
                                              (len(self.pairs),))
            duplicates = Duplicates(codes, CODES["dedup"], work_dir)
            for start, batch in _batches(self.pairs):
                codes[start:start + len(batch)] = batch_codes = self.cleaner.codes(batch)
                kept = np.flatnonzero(batch_codes == 0)
                duplicates.add(start + kept, [batch[i] for i in kept])
            duplicates.finish()
            for start in range(0, len(codes), READ_BATCH):
                batch_codes = np.array(codes[start:start + READ_BATCH])
                kept = start + np.flatnonzero(batch_codes == 0)
                yield start, batch_codes, read_pairs(self.pairs, kept)


def _example(item: tuple[int, tuple[str, str]], languages: Sequence[str], total: int) -> tuple[int, dict]:
    """A kept (index, (source, target)) of `total` pairs as TFDS's (key, example): the index
    orders the files (`sources.ordered_key`)."""
    return sources.ordered_key(item[0], total), dict(zip(languages, item[1]))


class MissingBeamError(ImportError):
    """A Beam runner asked for without apache-beam installed."""


def beam_options(flags: Sequence[str]) -> PipelineOptions:
    """Beam's PipelineOptions of the pipeline `flags` (e.g. --runner=DirectRunner); without
    apache-beam installed, an error that names the extra."""
    try:
        from apache_beam.options.pipeline_options import PipelineOptions
    except ImportError as error:
        raise MissingBeamError("preparing a corpus on Apache Beam needs apache-beam; install it "
                               "with pip install 'tfx-mt[beam]'") from error
    return PipelineOptions(list(flags))


class _BatchDecider:
    """A Beam worker's step: the pairs of an index range [start, stop) of a prepared split read
    at once and decided -> (the count of each code, the kept pairs as (index, (source, target))).

    It pickles small (the split's folder, not the split) and opens the split once per worker
    from that folder: the raw text is neither needed there nor hashed again.
    """

    def __init__(self, pairs: sources.PairSource, cleaner: Cleaner):
        self.folder, self.split = pairs.records.dataset_info.data_dir, str(pairs.records.split)
        self.open_args, self.cleaner, self.pairs = pairs.open_args, cleaner, None

    def __call__(self, bounds: tuple[int, int]) -> tuple[list[int], list[tuple]]:
        if self.pairs is None:
            with sources.quiet_tfds():
                builder = tfds.builder_from_directory(self.folder)
                self.pairs = sources.PairSource(builder, self.split, self.open_args)
        start, stop = bounds
        batch = self.pairs.read(range(start, stop))
        codes = self.cleaner.codes(batch)
        kept = [(start + int(i), (batch[i]["source"], batch[i]["target"]))
                for i in np.flatnonzero(codes == 0)]
        return np.bincount(codes, minlength=len(FILTERS) + 1).tolist(), kept


def _sum_counts(rows) -> list[int]:
    total = np.zeros(len(FILTERS) + 1, np.int64)
    for row in rows:
        total += row
    return total.tolist()


def _keyed_by_hash(item: tuple[int, tuple[str, str]]) -> tuple[bytes, tuple]:
    return pair_hash(dict(zip(("source", "target"), item[1]))), item


def _write_counts(totals: list[int], path: str, unique: int | None):
    """Writes `totals` (kept, then each filter's drops) to `path`; with dedup, only `unique` of
    the kept are first copies: the others are dedup's."""
    totals = list(totals)
    if unique is not None:
        totals[CODES["dedup"]] += totals[0] - unique
        totals[0] = unique
    files.write_text(path, json.dumps(totals))


def _beam_cleaned(pairs: sources.PairSource, cleaner: Cleaner, counts_path: str):
    """The Beam PTransform of the kept pairs of `pairs` as TFDS's (index, example): batches of
    READ_BATCH indices spread over the workers and decided there; with dedup, the lowest index of
    each pair_hash stays (combined per key, so a pair repeated a million times is cheap). Writes
    the counts to `counts_path` (`_write_counts`)."""
    import apache_beam as beam

    size = len(pairs)
    bounds = [(start, min(start + READ_BATCH, size)) for start in range(0, size, READ_BATCH)]

    @beam.ptransform_fn
    def cleaned(root):
        decided = (root | "Batches" >> beam.Create(bounds) | "Spread" >> beam.Reshuffle()
                   | "Decide" >> beam.Map(_BatchDecider(pairs, cleaner)))
        totals = (decided | "Codes" >> beam.Map(operator.itemgetter(0))
                  | "SumCodes" >> beam.CombineGlobally(_sum_counts))
        kept, unique = decided | "Kept" >> beam.FlatMap(operator.itemgetter(1)), None
        if cleaner.settings["dedup"]:
            kept = (kept | "ByHash" >> beam.Map(_keyed_by_hash)
                    | "First" >> beam.CombinePerKey(min) | "Firsts" >> beam.Values())
            unique = beam.pvalue.AsSingleton(kept | "Unique" >> beam.combiners.Count.Globally())
        _ = totals | "WriteCounts" >> beam.Map(_write_counts, counts_path, unique)
        return kept | "Examples" >> beam.Map(_example, cleaner.languages, len(pairs))

    return cleaned()


def counts(builder: tfds.core.DatasetBuilder) -> dict[str, int]:
    """A prepared cleaned corpus's counts: read, dropped by each filter (in FILTERS order), kept."""
    return {name: int(builder.info.metadata[name]) for name in COUNTS}


def table(rows: Sequence[tuple[str, Mapping[str, int]]]) -> str:
    """Several corpora's counts as aligned text: read, the filters that dropped any pair, kept and
    its percentage; a total line under two or more corpora."""
    rows = list(rows)
    if len(rows) > 1:
        rows.append(("total", {name: sum(c[name] for _, c in rows) for name in COUNTS}))
    columns = ["read", *(name for name in FILTERS if any(c[name] for _, c in rows)), "kept"]
    lines = [["corpus", *columns, "kept %"]] + [
        [name, *(str(c[column]) for column in columns),
         f"{100 * c['kept'] / c['read']:.1f}" if c["read"] else "-"] for name, c in rows]
    widths = [max(map(len, column)) for column in zip(*lines)]
    return "\n".join("  ".join([line[0].ljust(widths[0])] + [
        cell.rjust(width) for cell, width in zip(line[1:], widths[1:])]) for line in lines)


def is_off(settings: Mapping) -> bool:
    """Whether `settings` (validated) drop nothing that a split does not already: every filter
    off but `empty` (text splits skip empty sides; the pipeline drops them from any split)."""
    return not any(value for name, value in settings.items() if name != "empty")


def open_cleaned(pairs: sources.PairSource, settings: Mapping, key: str, prepare: bool = True,
                 beam_flags: Sequence[str] | None = None) -> sources.PairSource:
    """The pairs of `pairs` that `settings` (config.`key`) keep, prepared on first use in the
    raw split's data dir, on Apache Beam with `beam_flags` (its pipeline flags, --runner among
    them); its `clean_counts` say what each filter dropped."""
    spec, data_dir = pairs.open_args[0], pairs.open_args[4]
    with sources.quiet_tfds():
        builder = CleanedBuilder(pairs=pairs, settings=settings, data_dir=data_dir, key=key)
        config = None if beam_flags is None else tfds.download.DownloadConfig(
            beam_options=beam_options(beam_flags))
        sources.prepare_once(builder, prepare, f"config.{key}: the cleaned copy of {spec!r}", config)
    cleaned = sources.PairSource(builder, sources.TEXT_SPLIT, pairs.open_args,
                                 reopen=(_reopen, (pairs.open_args, dict(settings), key)))
    cleaned.clean_counts = counts(builder)
    return cleaned


def _reopen(open_args: tuple, settings: dict, key: str) -> sources.PairSource:
    """`open_cleaned` of a prepared corpus (grain's worker processes unpickle it so)."""
    return open_cleaned(sources.open_split(*open_args, prepare=False), settings, key, prepare=False)
