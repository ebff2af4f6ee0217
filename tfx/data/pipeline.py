"""The input pipeline (grain): tokenize, drop or truncate long pairs, shuffle, pack or pad, batch,
and give each process only its own rows of the global batch.

Train batches never end: each epoch is a fresh shuffle of each data shard, seeded by
config.seed. The grain iterators' `get_state()` / `set_state()` is saved with checkpoints, so a
restore continues with exactly the batch that would have come next, also on another number of
processes when config.data.shards is fixed.

Eval and test batches are finite; every example is seen exactly once. Rows past the end of
the split are empty (all padding, `index` -1), so nothing is dropped and an empty row adds
nothing to a loss. The `index` of each row says which example it holds. `eval_batches` (loss,
periodic BLEU) keep the split's order and pad every batch alike; `decode_batches` (eval.py) sort
the sources by length and pad each batch only to a `bucket` of its own longest.

Batches are dicts of numpy arrays [rows, length] with the keys the train step reads: `inputs`,
`targets` and, when packed, `*_segment_ids` (0 = padding) and `*_positions`. `to_global`
assembles the processes' rows into one jax.Array sharded over the mesh's data axes.
"""
from __future__ import annotations

import dataclasses
import functools
import logging

import grain
import jax
import ml_collections
import numpy as np
from absl import flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tfx.core import parallel
from tfx.data.augment import Augment
from tfx.data.corpora import Split, mixing_weights
from tfx.data.tokenizer import EOS_ID, BaseTokenizer

LENGTH_MULTIPLE = 8  # eval rows are padded to a multiple of this (fewer distinct shapes).
SHORTEST_BUCKET = 16  # decoding batches are padded to a power of two, at least this.
# Read and tokenize on the calling thread. grain's default (16 threads, 500 elements ahead) is
# meant for remote disks; here the reads are local and the work holds the GIL, so its threads
# only add overhead, taken from the cores XLA computes on (config.data.worker_count moves the
# work to other processes instead).
IN_PROCESS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


@dataclasses.dataclass(frozen=True)
class Shard:
    """This process's part of every global batch: rows [index * rows, (index + 1) * rows)."""

    index: int
    count: int
    rows: int


def process_shard(sharding: NamedSharding, global_rows: int) -> Shard:
    """The contiguous block of batch rows that this process's devices hold under `sharding`."""
    row_slices = {s[0].indices(global_rows)[:2]
                  for s in sharding.addressable_devices_indices_map((global_rows,)).values()}
    start, stop = min(a for a, _ in row_slices), max(b for _, b in row_slices)
    if sum(b - a for a, b in row_slices) != stop - start:
        raise ValueError(f"this process's devices hold batch rows {sorted(row_slices)}, which "
                         "are not one contiguous block; order the mesh devices by process.")
    rows = stop - start
    return Shard(index=start // rows, count=global_rows // rows, rows=rows)


def batch_layout(config: ml_collections.ConfigDict, mesh: Mesh, per_device_rows: int
                 ) -> tuple[NamedSharding, Shard]:
    """The sharding of batches on `mesh` by config.logical_axis_rules, and this process's rows
    (`process_shard`) of a global batch of `per_device_rows` per data-parallel device."""
    rules = config.logical_axis_rules
    sharding = parallel.batch_sharding(mesh, rules)
    return sharding, process_shard(sharding, per_device_rows * parallel.data_parallel_size(mesh, rules))


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding, shard: Shard
              ) -> dict[str, jax.Array]:
    """One global jax.Array per key from each process's rows (see `process_shard`); rows are
    split over the data axes of `sharding` whatever the array's rank."""
    rows_sharding = NamedSharding(sharding.mesh, PartitionSpec(sharding.spec[0]))
    return {name: jax.make_array_from_process_local_data(
                rows_sharding, rows, (shard.rows * shard.count,) + rows.shape[1:])
            for name, rows in batch.items()}


@dataclasses.dataclass
class LengthCounts:
    """What the length policy did to the pairs this process has read so far."""

    read: int = 0
    dropped_too_long: int = 0
    truncated: int = 0
    dropped_empty: int = 0

    def report(self) -> str:
        return (f"{self.read} pairs read, {self.dropped_too_long} dropped as too long, "
                f"{self.truncated} truncated, {self.dropped_empty} dropped as empty")


class LengthPolicy:
    """Keeps pairs within max lengths: drops or truncates (keeping EOS) the longer ones."""

    def __init__(self, max_source_length: int, max_target_length: int, too_long: str):
        self.max_lengths = {"inputs": max_source_length, "targets": max_target_length}
        self.too_long = too_long
        self.counts = LengthCounts()

    def __call__(self, pair: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        self.counts.read += 1
        if min(len(pair["inputs"]), len(pair["targets"])) <= 1:  # only EOS: an empty side.
            self.counts.dropped_empty += 1
            return None
        if all(len(pair[k]) <= limit for k, limit in self.max_lengths.items()):
            return pair
        if self.too_long == "drop":
            self.counts.dropped_too_long += 1
            return None
        self.counts.truncated += 1
        return {k: truncate(tokens, self.max_lengths[k]) for k, tokens in pair.items()}


def truncate(tokens: np.ndarray, length: int) -> np.ndarray:
    """At most `length` tokens, still ending with EOS."""
    if len(tokens) <= length:
        return tokens
    return np.append(tokens[: length - 1], np.int32(EOS_ID))


class Tokenize(grain.transforms.Map):
    """{"source", "target"} text -> {"inputs", "targets"} int32 ids ending with EOS, each by
    its side of the tokenizer; a record's "prefix" pieces (tfx/data/corpora.py) start its
    source instead of the tokenizer's own prefix."""

    def __init__(self, tokenizer: BaseTokenizer):
        self.tokenizer = tokenizer

    def map(self, pair: dict) -> dict[str, np.ndarray]:
        source = self.tokenizer.encode_source(pair["source"], pair.get("prefix"))
        return {"inputs": np.asarray(source, np.int32),
                "targets": np.asarray(self.tokenizer.encode_target(pair["target"]), np.int32)}


def pad_to(tokens: np.ndarray, length: int) -> np.ndarray:
    return np.pad(tokens, (0, length - len(tokens)))


class TrainBatches:
    """This process's endless train batches: the batches of the data shards it reads, side by
    side, and their position (`get_state`/`set_state`: one grain iterator state per shard)."""

    def __init__(self, iterators: dict[int, grain.DatasetIterator], shards: int, global_rows: int):
        self.iterators = iterators
        self.shards = shards  # data shards of the whole run (config.data.shards).
        self.global_rows = global_rows

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(iterator) for iterator in self.iterators.values()]
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    def get_state(self) -> dict[int, dict]:
        return {index: iterator.get_state() for index, iterator in self.iterators.items()}

    def set_state(self, states: dict[int, dict]):
        for index, iterator in self.iterators.items():
            iterator.set_state(states[index])

    def close(self):
        """Stops the grain worker processes, if any."""
        for iterator in self.iterators.values():
            iterator.close()


def data_shards(config: ml_collections.ConfigDict, shard: Shard) -> tuple[int, range]:
    """How many data shards the run has (config.data.shards, or one per process), and those
    whose rows `shard` holds."""
    shards = config.data.shards or shard.count
    global_rows = shard.rows * shard.count
    if shards % shard.count or global_rows % shards:
        raise ValueError(
            f"config.data.shards={config.data.shards} must be a multiple of the number of "
            f"processes that feed the batch ({shard.count}) and divide the global batch of "
            f"{global_rows} rows.")
    per_process = shards // shard.count
    return shards, range(shard.index * per_process, (shard.index + 1) * per_process)


def train_iterator(config: ml_collections.ConfigDict, split: Split, tokenizer: BaseTokenizer,
                   shard: Shard) -> tuple[TrainBatches, LengthCounts]:
    """This process's endless train batches of `shard.rows` rows, and the length-policy counts.

    The split is cut into data shards (`config.data.shards`, default one per process); data
    shard i shuffles the examples [i::shards] of each corpus, every epoch anew, mixes the
    corpora by `mixing_weights` (grain's deterministic mix: exact shares), and fills rows
    [i * r, (i + 1) * r) of each global batch (r = global rows / shards). A process reads only
    the shards whose rows its devices hold. With a fixed number of shards the global batches
    do not depend on how many processes share them.
    """
    shards, owned = data_shards(config, shard)
    global_rows = shard.rows * shard.count
    rows = global_rows // shards
    lengths = {"inputs": config.max_source_length, "targets": config.max_target_length}
    policy = LengthPolicy(config.max_source_length, config.max_target_length, config.data.too_long)
    iterators = {}
    for index in owned:
        dataset = mixed_shard(config, split, tokenizer, index, shards).to_iter_dataset(IN_PROCESS)
        if config.data.worker_count:
            if not flags.FLAGS.is_parsed():
                raise ValueError(
                    f"config.data.worker_count={config.data.worker_count} starts grain worker "
                    "processes, which read absl flags, but this program has not parsed them: "
                    "parse them first (absl.app.run, or absl.flags.FLAGS(sys.argv[:1])) or set "
                    "config.data.worker_count=0.")
            dataset = dataset.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=config.data.worker_count))
        dataset = dataset.map(policy).filter(lambda pair: pair is not None)
        packed = pack_or_pad(dataset, lengths, config.data.pack, 2 * rows, config.seed)
        iterators[index] = iter(packed.batch(rows, drop_remainder=True))
    return TrainBatches(iterators, shards, global_rows), policy.counts


def mixed_shard(config: ml_collections.ConfigDict, split: Split, tokenizer: BaseTokenizer,
                index: int, shards: int) -> grain.MapDataset:
    """Data shard `index` of `shards`, tokenized: each corpus's pairs [index::shards] (its
    stored ids with config.data.pretokenize), shuffled anew every epoch (corpus k by seed
    config.seed + k * shards + index), augmented (config.data.augment), mixed by their weights."""
    parts = []
    for k, corpus in enumerate(split.corpora):
        if len(corpus.pairs) < shards:
            raise ValueError(f"config.{split.key}: corpus {corpus.name!r} has {len(corpus.pairs)} "
                             f"pairs, fewer than the {shards} data shards that each read a part.")
        seed = config.seed + k * shards + index
        part = grain.MapDataset.source(corpus.pairs if corpus.tokens is None else corpus.tokens)
        part = part[index::shards].shuffle(seed=seed).repeat(None)
        if corpus.tokens is None:
            if corpus.prefix is not None:
                part = part.map(functools.partial(_with_prefix, prefix=corpus.prefix))
            if any(config.data.augment.values()):
                part = part.random_map(Augment(**config.data.augment), seed=seed)
            part = part.map(Tokenize(tokenizer))
        parts.append(part)
    if len(parts) == 1:
        return parts[0]
    return grain.MapDataset.mix(parts, list(mixing_weights(split.corpora, config.data.temperature)))


def _with_prefix(pair: dict, prefix: tuple[str, ...]) -> dict:
    return {**pair, "prefix": prefix}


def pack_or_pad(pairs: grain.IterDataset, lengths: dict[str, int], pack: bool, num_bins: int,
                seed: int) -> grain.IterDataset:
    """Rows of `lengths`: several pairs per row (first fit over `num_bins` open rows, with
    segment ids and positions), or one pair per row padded with 0."""
    if pack:
        return grain.experimental.FirstFitPackIterDataset(
            pairs, length_struct=lengths, num_packing_bins=num_bins, seed=seed)
    return pairs.map(lambda pair: {k: pad_to(v, lengths[k]) for k, v in pair.items()})


def eval_length(lengths: list[int], max_len: int, what: str) -> int:
    """Row length for an eval split: its longest example rounded up, at most model.max_len."""
    _warn_if_truncated(lengths, max_len, what)
    return min(-(-max(lengths) // LENGTH_MULTIPLE) * LENGTH_MULTIPLE, max_len)


def _warn_if_truncated(lengths: list[int], max_len: int, what: str):
    if max(lengths) > max_len:
        logging.warning("%d %s longer than config.model.max_len=%d are truncated.",
                        sum(n > max_len for n in lengths), what, max_len)


def bucket(length: int, max_len: int) -> int:
    """The padded length of a decoding batch whose longest sequence has `length` tokens."""
    return min(max(SHORTEST_BUCKET, 1 << (length - 1).bit_length()), max_len)


def longest_first(lengths: list[int], batch: int) -> list[np.ndarray]:
    """Indices sorted by length (longest first, stable), cut into batches of `batch`."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i:i + batch] for i in range(0, len(order), batch)]


def eval_batches(config: ml_collections.ConfigDict, source: Split, tokenizer: BaseTokenizer,
                 shard: Shard) -> list[dict[str, np.ndarray]]:
    """This process's rows of every eval batch over `source`, in order (see module doc).

    Rows are padded to the split's longest source and target (not packed), so the same
    batches serve eval loss and decoding; `index` is the example's position in `source`.
    """
    pairs = grain.MapDataset.source(source).map(Tokenize(tokenizer)).to_iter_dataset(IN_PROCESS)
    examples = list(pairs)
    max_len = config.model.max_len
    lengths = {k: eval_length([len(e[k]) for e in examples], max_len, f"{source.spec} {k}")
               for k in ("inputs", "targets")}
    global_rows = shard.rows * shard.count
    batches = []
    for start in range(0, len(examples), global_rows):
        first = start + shard.index * shard.rows
        index = np.arange(first, first + shard.rows)
        batch = {k: np.zeros((shard.rows, length), np.int32) for k, length in lengths.items()}
        for row, i in enumerate(index):
            if i < len(examples):
                for k, length in lengths.items():
                    batch[k][row] = pad_to(truncate(examples[i][k], length), length)
        batch["index"] = np.where(index < len(examples), index, -1).astype(np.int32)
        batches.append(batch)
    return batches


def decode_batches(config: ml_collections.ConfigDict, source: Split, tokenizer: BaseTokenizer,
                   shard: Shard) -> list[dict[str, np.ndarray]]:
    """This process's rows of batches that decode every source of `source` once: sorted by
    length (longest first), each global batch's `inputs` padded to the `bucket` of its longest
    (at most model.max_len, truncating), so a short sentence is not padded to the split's longest
    and only a few shapes compile; `index` is the example's position in `source` (-1: empty)."""
    pairs = grain.MapDataset.source(source).map(Tokenize(tokenizer)).to_iter_dataset(IN_PROCESS)
    inputs = [pair["inputs"] for pair in pairs]
    max_len = config.model.max_len
    lengths = [len(tokens) for tokens in inputs]
    _warn_if_truncated(lengths, max_len, f"{source.spec} inputs")
    batches = []
    for chosen in longest_first(lengths, shard.rows * shard.count):
        length = bucket(lengths[chosen[0]], max_len)
        mine = chosen[shard.index * shard.rows:(shard.index + 1) * shard.rows]
        batch = {"inputs": np.zeros((shard.rows, length), np.int32),
                 "index": np.full((shard.rows,), -1, np.int32)}
        for row, i in enumerate(mine):
            batch["inputs"][row] = pad_to(truncate(inputs[i], length), length)
            batch["index"][row] = i
        batches.append(batch)
    return batches
