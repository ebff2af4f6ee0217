"""Sentence-pair sources: TFDS datasets prepared as array_record and read without TensorFlow.

A split is named by a spec string (`config.data.train/eval/test`):

- `tfds:NAME[/CONFIG]:SPLIT`, any TFDS translation dataset, e.g. `tfds:wmt14_translate/de-en:train`;
- `text:PATH_PREFIX`, line-aligned files `PATH_PREFIX.<source_lang>` and `PATH_PREFIX.<target_lang>`.

Both go the same way: a TFDS builder prepares array_record files once under `data_dir` (text
through `ParallelTextBuilder`, keyed by a hash of the files, which reads them at each opening),
and `as_data_source()` gives random access, which grain's global shuffle and exact resume need.
Each record is {"source": str, "target": str} in the configured direction.

The text files may be on Cloud Storage (`text:gs://...`); `data_dir` must be on local disk.
array_record writes local files only, and reads a gs:// file with one request per record, which
the input pipeline makes one after another, so a gs:// data dir is refused (`check_data_dir`).
"""
from __future__ import annotations

import bisect
import contextlib
import hashlib
import itertools
import logging
import errno
import os
import types
from collections.abc import Iterator, Sequence
from typing import BinaryIO

import tensorflow_datasets as tfds
import tensorflow_datasets.translate  # noqa: F401  (registers the WMT builders; tfds imports them lazily)
from array_record.python import array_record_module
from etils import epath
from array_record.python.array_record_data_source import ArrayRecordDataSource
from tensorflow_datasets.core import shuffle as tfds_shuffle
from tensorflow_datasets.core.data_sources import base as tfds_data_sources
from tensorflow_datasets.proto import tf_example_pb2

from tfx.core import files

SPEC_FORMS = '"tfds:NAME[/CONFIG]:SPLIT" or "text:PATH_PREFIX"'
TEXT_SPLIT = "lines"  # the one split of a local-text dataset.
WRITER_BUFFER_BYTES = 256 << 20  # records TFDS's writer holds in memory before spilling to disk.
KEY_SPACE = 1 << 128  # TFDS's example keys (tensorflow_datasets/core/shuffle.py).


def default_data_dir(data_dir: str) -> str:
    """`data_dir`, or TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets)."""
    return os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def read_lines(path: str) -> Iterator[str]:
    """The lines of a UTF-8 text file (local or gs://), without newlines; errors name the file
    and line."""
    if not files.path(path).is_file():
        raise FileNotFoundError(f"data file {path!r} does not exist.")
    with files.path(path).open("rb") as f:
        yield from decode_lines(f, path)


def decode_lines(stream: BinaryIO, name: str) -> Iterator[str]:
    """The lines of a binary stream of UTF-8 text, without newlines (only "\n" and "\r\n" end
    a line); invalid UTF-8 is a ValueError naming `name` and the line."""
    for number, line in enumerate(stream, start=1):
        try:
            yield line.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as error:
            raise ValueError(
                f"{name}:{number}: invalid UTF-8 (byte {line[error.start]:#04x} at column "
                f"{error.start + 1}); tfx reads text as UTF-8."
            ) from None


def ordered_key(index: int, total: int) -> int:
    """TFDS's key for example `index` of `total` of a builder that keeps its order
    (disable_shuffling): keys sort as the indices and spread over TFDS's 128-bit key space.

    TFDS's writer spills what does not fit its buffer into 1,000 buckets that divide that space,
    and reads each back into memory to sort it; keys 0..total-1 would all fall in the first, a
    whole corpus in memory at once. Spread, a bucket holds about total / 1,000 examples."""
    return index * (KEY_SPACE // max(total, 1))


def _count_lines(path: str) -> int:
    with files.path(path).open("rb") as f:
        return sum(1 for _ in f)


def _file_digest(paths: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with files.path(path).open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


class ParallelTextBuilder(tfds.core.GeneratorBasedBuilder):
    """TFDS builder over two line-aligned files (local or gs://); one split, in file order.

    Pairs with an empty (or whitespace-only) side are skipped; their count is kept in the
    dataset's metadata as `skipped_empty`.
    """

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, source_path: str, target_path: str, languages: tuple[str, str], **kwargs):
        for path in (source_path, target_path):
            if not files.path(path).is_file():
                raise FileNotFoundError(f"data file {path!r} does not exist.")
        self.paths, self.languages = (source_path, target_path), languages
        name = f"{languages[0]}-{languages[1]}-{_file_digest(self.paths)}"
        super().__init__(config=tfds.core.BuilderConfig(name=name), **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.Translation(languages=self.languages),
            disable_shuffling=True, metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        return {TEXT_SPLIT: self._generate_examples()}

    def _generate_examples(self):
        source_path, target_path = self.paths
        sources, targets = read_lines(source_path), read_lines(target_path)
        count = kept = 0
        lines = _count_lines(source_path) + 1  # (a key per line; more lines are an error below.)
        for count, (source, target) in enumerate(itertools.zip_longest(sources, targets), start=1):
            if source is None or target is None:
                raise ValueError(
                    f"{source_path} has {_count_lines(source_path)} lines but {target_path} has "
                    f"{_count_lines(target_path)}; the two sides of a parallel corpus must be "
                    "line-aligned.")
            if source.strip() and target.strip():
                kept += 1
                yield ordered_key(count, lines), dict(zip(self.languages, (source, target)))
        if not kept:
            raise ValueError(f"{source_path} / {target_path}: no sentence pairs with text on "
                             f"both sides ({count} lines read).")
        self.info.metadata["skipped_empty"] = count - kept
        if count > kept:
            logging.warning("%s / %s: skipped %d pairs with an empty side.", source_path,
                            target_path, count - kept)


class PairSource:
    """Random access over a prepared split: `len(source)`, `source[i]` -> source/target text,
    `source.read(indices)` many at once. `reopen` (a function and its arguments) opens it again
    without preparing: grain's worker processes unpickle it so."""

    def __init__(self, builder: tfds.core.DatasetBuilder, split: str, open_args: tuple,
                 reopen: tuple | None = None):
        self.records = builder.as_data_source(split=split)
        raw = getattr(self.records, "data_source", None)  # (another under tfds.testing.mock_data)
        self.raw = SerializedRecords(raw, tfds_data_sources.file_instructions(builder.info, split)) if (
            isinstance(raw, ArrayRecordDataSource)) else None
        self.open_args = open_args  # (spec, key, source_lang, target_lang, data_dir)
        self.reopen = reopen or (open_split, open_args + (False,))
        self.spec = open_args[0]
        self.languages = open_args[2:4]
        # What identifies the content: the tokenizer cache key builds on it.
        self.fingerprint = f"{builder.name}/{builder.builder_config.name}:{builder.version}:{split}"
        self.skipped_empty = int(builder.info.metadata.get("skipped_empty", 0)) if (
            builder.info.metadata) else 0

    def __len__(self) -> int:
        return len(self.records)

    def __reduce__(self):  # grain's worker processes reopen the prepared split.
        return self.reopen

    def __getitem__(self, index: int) -> dict[str, str]:
        if self.raw:
            return self._pair(self.raw[index])
        record = self.records[index]
        return {"source": _text(record[self.languages[0]]), "target": _text(record[self.languages[1]])}

    def read(self, indices: Sequence[int]) -> list[dict[str, str]]:
        """`self[i]` for each of `indices`, their records read as one batch."""
        indices = [int(i) for i in indices]
        if not self.raw:
            return [self[i] for i in indices]
        return [self._pair(serialized) for serialized in self.raw.read(indices)]

    def _pair(self, serialized: bytes) -> dict[str, str]:
        """A record's tf.Example proto parsed here: far faster than TFDS's decoding."""
        feature = tf_example_pb2.Example.FromString(serialized).features.feature
        return {"source": feature[self.languages[0]].bytes_list.value[0].decode(),
                "target": feature[self.languages[1]].bytes_list.value[0].decode()}


class SerializedRecords:
    """A prepared split's serialized records. One is read with array_record's range read: its
    list read, which TFDS and grain use for one record too, costs milliseconds a call (a few
    hundred records a second); many at once with that list read, which reads them in parallel."""

    def __init__(self, data_source, instructions: Sequence):
        self.data_source = data_source  # what reads many: array_record's ArrayRecordDataSource.
        self.instructions = instructions  # per file: filename, records to skip, to take.
        self.ends = list(itertools.accumulate(instruction.take for instruction in self.instructions))
        self.readers = {}

    def __getitem__(self, index: int) -> bytes:
        shard = bisect.bisect_right(self.ends, index)
        if index < 0 or shard == len(self.ends):
            raise IndexError(f"record {index} of {self.ends[-1] if self.ends else 0}")
        if shard not in self.readers:
            self.readers[shard] = array_record_module.ArrayRecordReader(
                os.fspath(self.instructions[shard].filename), "readahead_buffer_size:0")
        position = self.instructions[shard].skip + index - (self.ends[shard - 1] if shard else 0)
        return self.readers[shard].read(position, position + 1)[0]

    def read(self, indices: list[int]) -> list[bytes]:
        return self.data_source.__getitems__(indices) if indices else []


def _text(value: bytes | str) -> str:
    """A Text feature: bytes from array_record files (str from tfds.testing.mock_data)."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _tfds_builder(name: str, key: str, data_dir: str, languages: tuple[str, str]):
    try:
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"config.{key}: TFDS has no dataset {name.split('/')[0]!r}; translation datasets "
            "include wmt14_translate, wmt15..19_translate and ted_hrlr_translate (see "
            "https://www.tensorflow.org/datasets/catalog)."
        ) from None
    except ValueError as error:  # an unknown config of a known dataset.
        raise ValueError(f"config.{key}: {error}") from None
    available = getattr(builder.info.features, "languages", None)
    if available is None:
        raise ValueError(f"config.{key}: TFDS dataset {name!r} is not a translation dataset.")
    missing = [lang for lang in languages if lang not in available]
    if missing:
        configs = ", ".join(c.name for c in builder.BUILDER_CONFIGS) or "none"
        raise ValueError(
            f"config.{key}: TFDS dataset {name!r} has languages {tuple(available)}, not "
            f"{missing} (config.data.source_lang/target_lang); its configs are: {configs}.")
    return builder


@contextlib.contextmanager
def quiet_tfds():
    """Hides TFDS's warnings about custom configs and not-yet-prepared folders (expected here)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def open_split(spec: str, key: str, source_lang: str, target_lang: str, data_dir: str,
               prepare: bool = True) -> PairSource:
    """Opens the split `spec` (named by config `key` in errors), preparing it on first use."""
    with quiet_tfds():
        return _open_split(spec, key, source_lang, target_lang, data_dir, prepare)


def prepare_once(builder: tfds.core.DatasetBuilder, prepare: bool, what: str,
                 download_config: tfds.download.DownloadConfig | None = None):
    """Prepares `builder`'s array_record files unless they are there; with `prepare` False, an
    error saying that `what` is not prepared and how to prepare it."""
    if builder.is_prepared():
        return
    if not prepare:
        raise FileNotFoundError(f"{what} is not prepared in {builder.data_dir}; run "
                                "`python -m tfx.data.prepare --config ...` first.")
    tfds.disable_progress_bar()
    with spill_without_tensorflow():
        builder.download_and_prepare(file_format="array_record", download_config=download_config)


class _NeverRaised(Exception):
    """Stands for TensorFlow's ResourceExhaustedError, which plain file writes do not raise."""


def _open_bucket(path: str, mode: str):
    """Opens one of TFDS's 1,000 spill buckets, raising the open-files limit as TFDS does."""
    try:
        return epath.Path(path).open(mode)
    except OSError as error:
        if error.errno != errno.EMFILE:
            raise
        tfds_shuffle._increase_open_files_limit()  # TFDS's own remedy
        return epath.Path(path).open(mode)


@contextlib.contextmanager
def spill_without_tensorflow():
    """Lets TFDS's writer spill past its in-memory buffer without TensorFlow, and bounds it.

    The writer's shuffler keeps a split's examples in memory up to `MAX_MEM_BUFFER_SIZE` (1 GB
    of records, about 3 GB of Python objects), then writes them to bucket files through
    `tf.io.gfile`, which fails when TensorFlow is absent (a corpus of ~10 million pairs).
    Within this block its files go through etils epath instead, and the buffer is at most
    WRITER_BUFFER_BYTES; TFDS is restored after it."""
    gfile = types.SimpleNamespace(GFile=_open_bucket, exists=lambda path: epath.Path(path).exists(),
                                  remove=lambda path: epath.Path(path).unlink())
    files_api = types.SimpleNamespace(io=types.SimpleNamespace(gfile=gfile),
                                      errors=types.SimpleNamespace(ResourceExhaustedError=_NeverRaised))
    saved = tfds_shuffle.tf, tfds_shuffle.MAX_MEM_BUFFER_SIZE
    tfds_shuffle.tf = files_api
    tfds_shuffle.MAX_MEM_BUFFER_SIZE = min(saved[1], WRITER_BUFFER_BYTES)
    try:
        yield
    finally:
        tfds_shuffle.tf, tfds_shuffle.MAX_MEM_BUFFER_SIZE = saved


def check_data_dir(data_dir: str):
    """Refuses a data dir that is not on local disk (see the module doc), saying what to do."""
    data_dir = default_data_dir(data_dir)
    if not files.is_local(data_dir):
        raise ValueError(
            f"config.data.data_dir={data_dir!r} (or $TFDS_DATA_DIR) is not on local disk: tfx "
            "prepares and reads data on local disk only (array_record writes local files, and "
            "reads gs:// one request per record); set it to a local directory DIR, and to use "
            f"data prepared there, first copy it: gcloud storage cp -r {data_dir.rstrip('/')}/* DIR")


def _open_split(spec, key, source_lang, target_lang, data_dir, prepare) -> PairSource:
    kind, _, rest = spec.partition(":")
    check_data_dir(data_dir)
    data_dir = default_data_dir(data_dir)
    languages = (source_lang, target_lang)
    if kind == "text" and rest:
        builder = ParallelTextBuilder(
            source_path=f"{rest}.{source_lang}", target_path=f"{rest}.{target_lang}",
            languages=languages, data_dir=data_dir, file_format="array_record")
        split = TEXT_SPLIT
    elif kind == "tfds" and rest.count(":") == 1:
        name, split = rest.split(":")
        builder = _tfds_builder(name, key, data_dir, languages)
    else:
        raise ValueError(f"config.{key}={spec!r} is not a split spec; expected {SPEC_FORMS}.")
    prepare_once(builder, prepare, f"config.{key}={spec!r}")
    if builder.info.splits and split.split("[")[0] not in builder.info.splits:  # (empty: unknown)
        raise ValueError(f"config.{key}={spec!r}: no split {split!r}; the dataset has "
                         f"{sorted(builder.info.splits)}.")
    return PairSource(builder, split, (spec, key, source_lang, target_lang, data_dir))
