"""A training corpus tokenized once and stored as token ids (config.data.pretokenize), as seqio
and MaxText's grain pipelines store theirs: training then reads ids instead of running
SentencePiece on every pair of every epoch, which costs the input pipeline most of its time.

`TokenizedBuilder` writes the ids of a `PairSource` (with its corpus's source prefix) as
array_record files, in order, keyed by a hash of the pairs, the prefix and the tokenizer: a new
vocabulary or corpus prepares a new copy. `TokenSource` reads them back: `len`, `source[i]` ->
{"inputs", "targets"} int32 ids ending with EOS, as `pipeline.Tokenize` gives them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.data_sources import base as tfds_data_sources
from tensorflow_datasets.proto import tf_example_pb2

from tfx.data import corpora, sources
from tfx.data.tokenizer import BaseTokenizer

BATCH = 10_000  # pairs read and tokenized at once.
SPLIT = "ids"
SIDES = ("inputs", "targets")


class TokenizedBuilder(tfds.core.GeneratorBasedBuilder):
    """TFDS builder of the token ids of `pairs` (a PairSource), each side's ids stored as the
    bytes of an int32 array."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, pairs: sources.PairSource, prefix: Sequence[str] | None,
                 tokenizer: BaseTokenizer, data_dir: str, **kwargs):
        self.pairs, self.prefix, self.tokenizer = pairs, prefix, tokenizer
        identity = dict(pairs=pairs.fingerprint, prefix=list(prefix) if prefix is not None else None,
                        source_prefix=tokenizer.source_prefix, tokenizer=tokenizer.fingerprint)
        name = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        super().__init__(config=tfds.core.BuilderConfig(name=name), data_dir=data_dir,
                         file_format="array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        bytes_feature = lambda: tfds.features.Tensor(shape=(), dtype=np.object_)
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict({side: bytes_feature() for side in SIDES}),
            disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {SPLIT: self._generate_examples()}

    def _generate_examples(self):
        for start in range(0, len(self.pairs), BATCH):
            batch = self.pairs.read(range(start, min(start + BATCH, len(self.pairs))))
            inputs = self.tokenizer.encode_sources([pair["source"] for pair in batch], self.prefix)
            targets = self.tokenizer.encode_targets([pair["target"] for pair in batch])
            for offset, ids in enumerate(zip(inputs, targets)):
                yield sources.ordered_key(start + offset, len(self.pairs)), {
                    side: np.asarray(side_ids, np.int32).tobytes() for side, side_ids in zip(SIDES, ids)}


class TokenSource:
    """Random access to a prepared `TokenizedBuilder`'s ids; `reopen` as for a PairSource."""

    def __init__(self, builder: TokenizedBuilder, reopen: tuple):
        records = builder.as_data_source(split=SPLIT)
        self.records = sources.SerializedRecords(
            records.data_source, tfds_data_sources.file_instructions(builder.info, SPLIT))
        self.length, self.reopen = len(records), reopen

    def __len__(self) -> int:
        return self.length

    def __reduce__(self):
        return self.reopen

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        feature = tf_example_pb2.Example.FromString(self.records[index]).features.feature
        return {side: np.frombuffer(feature[side].bytes_list.value[0], np.int32) for side in SIDES}


def open_tokenized(pairs: sources.PairSource, prefix: Sequence[str] | None, tokenizer: BaseTokenizer,
                   prepare: bool = True) -> TokenSource:
    """The ids of `pairs` by `tokenizer`, prepared on first use in the pairs' data dir."""
    with sources.quiet_tfds():
        builder = TokenizedBuilder(pairs=pairs, prefix=prefix, tokenizer=tokenizer,
                                   data_dir=pairs.open_args[4])
        sources.prepare_once(builder, prepare, f"the token ids of {pairs.spec!r}")
    return TokenSource(builder, (_reopen, (pairs, prefix, tokenizer)))


def _reopen(pairs: sources.PairSource, prefix, tokenizer: BaseTokenizer) -> TokenSource:
    return open_tokenized(pairs, prefix, tokenizer, prepare=False)


def tokenized_split(split: corpora.Split, tokenizer: BaseTokenizer, prepare: bool = True
                    ) -> corpora.Split:
    """`split` with each corpus's ids stored (prepared on first use) beside its pairs."""
    return corpora.Split(split.key, split.spec, [
        dataclasses.replace(corpus, tokens=open_tokenized(corpus.pairs, corpus.prefix, tokenizer, prepare))
        for corpus in split.corpora])
