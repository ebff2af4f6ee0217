import collections
import itertools

import grain
import jax
import numpy as np
import pytest
from absl import flags

from tfx.core.parallel import batch_sharding, make_mesh
from tfx.data import corpora, pipeline
from tfx.data import tokenizer as tok
from tfx.data.sources import open_split

NUM_PAIRS = 60
WORDS = "red green blue small big old young dog cat man woman child runs sits looks at the a".split()


def sentence(i: int, lang: str) -> str:
    rng = np.random.default_rng(i)
    words = rng.choice(WORDS, size=1 + i % 9)
    return f"{lang} {i} " + " ".join(words)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A numbered corpus (pair i mentions i on both sides), its source and a tokenizer."""
    root = tmp_path_factory.mktemp("corpus")
    for lang in ("en", "de"):
        (root / f"c.{lang}").write_text("".join(sentence(i, lang) + "\n" for i in range(NUM_PAIRS)))
    pairs = open_split(f"text:{root}/c", "data.train", "en", "de", str(root / "tfds"))
    source = corpora.Split("data.train", pairs.spec, [corpora.Corpus("train", pairs)])
    tokenizer = tok.train_or_load(
        lambda: (sentence(i, lang) for i in range(NUM_PAIRS) for lang in ("en", "de")),
        "numbered", str(root / "spm"), vocab_size=300)
    return source, tokenizer


@pytest.fixture
def config(tiny_config):
    return tiny_config(model={"max_len": 64}, max_source_length=48, max_target_length=48, seed=5)


def pair_key(inputs, targets) -> tuple:
    return tuple(int(t) for t in inputs), tuple(int(t) for t in targets)


def unpack(row: dict[str, np.ndarray]) -> list[tuple]:
    """The pairs in a packed row, checking that positions restart at 0 in every segment."""
    pairs = []
    for segment in range(1, int(row["inputs_segment_ids"].max()) + 1):
        parts = {}
        for side in ("inputs", "targets"):
            where = row[f"{side}_segment_ids"] == segment
            np.testing.assert_array_equal(row[f"{side}_positions"][where], np.arange(where.sum()))
            parts[side] = row[side][where]
        pairs.append(pair_key(parts["inputs"], parts["targets"]))
    return pairs


def tokenized(corpus) -> list[tuple]:
    source, tokenizer = corpus
    return [pair_key(tokenizer.encode_source(source[i]["source"]),
                     tokenizer.encode_target(source[i]["target"])) for i in range(len(source))]


class SidedTokenizer:
    """Source ids start with 10, target ids with 20: which side encoded what shows."""

    def encode_source(self, text, prefix=None):
        return [10, len(text), tok.EOS_ID]

    def encode_target(self, text):
        return [20, len(text), tok.EOS_ID]


def test_sources_and_targets_are_encoded_by_their_side(corpus, config):
    source, _ = corpus
    batch = pipeline.eval_batches(config, source, SidedTokenizer(), pipeline.Shard(0, 1, 4))[0]
    lengths = [(len(source[i]["source"]), len(source[i]["target"])) for i in range(4)]
    np.testing.assert_array_equal(batch["inputs"][:, :3], [[10, s, tok.EOS_ID] for s, _ in lengths])
    np.testing.assert_array_equal(batch["targets"][:, :3], [[20, t, tok.EOS_ID] for _, t in lengths])
    assert not batch["inputs"][:, 3:].any() and not batch["targets"][:, 3:].any()


def test_unpacking_gives_back_every_pair_exactly_once(corpus):
    pairs = tokenized(corpus)
    dataset = grain.MapDataset.source(
        [{"inputs": np.array(a, np.int32), "targets": np.array(b, np.int32)} for a, b in pairs])
    rows = list(pipeline.pack_or_pad(dataset.to_iter_dataset(), {"inputs": 48, "targets": 48},
                                     pack=True, num_bins=4, seed=0))
    assert len(rows) < len(pairs) / 2  # really packed
    assert collections.Counter(p for row in rows for p in unpack(row)) == collections.Counter(pairs)


def first_rows(iterator, count: int) -> list[dict]:
    rows = []
    while len(rows) < count:
        batch = next(iterator)
        rows += [{k: v[r] for k, v in batch.items()} for r in range(len(batch["inputs"]))]
    return rows[:count]


def padded_pair(row) -> tuple:
    return pair_key(row["inputs"][row["inputs"] > 0], row["targets"][row["targets"] > 0])


def test_two_processes_split_an_epoch_between_them_exactly(corpus, config):
    config.data.pack = False
    source, tokenizer = corpus
    epochs = {}
    for index in range(2):
        iterator, _ = pipeline.train_iterator(config, source, tokenizer, pipeline.Shard(index, 2, 3))
        rows = first_rows(iterator, 2 * (NUM_PAIRS // 2))
        epochs[index] = [padded_pair(r) for r in rows[: NUM_PAIRS // 2]]
        second = [padded_pair(r) for r in rows[NUM_PAIRS // 2:]]
        assert sorted(second) == sorted(epochs[index]) and second != epochs[index]  # reshuffled
    assert not set(epochs[0]) & set(epochs[1])
    assert sorted(epochs[0] + epochs[1]) == sorted(tokenized(corpus))


@pytest.mark.parametrize("pack", [True, False])
def test_fixed_data_shards_give_the_same_global_batches_on_any_process_count(corpus, config, pack):
    config.data.pack = pack
    config.data.shards = 4
    source, tokenizer = corpus

    def global_batches(processes: int) -> list[dict]:
        iterators = [pipeline.train_iterator(config, source, tokenizer,
                                             pipeline.Shard(i, processes, 8 // processes))[0]
                     for i in range(processes)]
        return [{k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
                for parts in ([next(it) for it in iterators] for _ in range(10))]

    one, two, four = global_batches(1), global_batches(2), global_batches(4)
    for a, b, c in zip(one, two, four):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
            np.testing.assert_array_equal(a[key], c[key])


def test_data_shards_must_fit_the_processes_and_the_batch(corpus, config):
    source, tokenizer = corpus
    config.data.shards = 3
    with pytest.raises(ValueError, match=r"config.data.shards=3 .* processes that feed the batch \(2\)"):
        pipeline.train_iterator(config, source, tokenizer, pipeline.Shard(0, 2, 3))
    config.data.shards = 4
    with pytest.raises(ValueError, match=r"divide the global batch of 6 rows"):
        pipeline.train_iterator(config, source, tokenizer, pipeline.Shard(0, 2, 3))


def test_shuffle_follows_the_seed(corpus, config):
    config.data.pack = False
    source, tokenizer = corpus
    orders = []
    for seed in (5, 5, 6):
        config.seed = seed
        iterator, _ = pipeline.train_iterator(config, source, tokenizer, pipeline.Shard(0, 1, 4))
        orders.append([padded_pair(r) for r in first_rows(iterator, 12)])
    assert orders[0] == orders[1] != orders[2]


@pytest.mark.parametrize("pack", [True, False])
def test_restored_iterator_continues_with_the_next_batch(corpus, config, pack):
    config.data.pack = pack
    source, tokenizer = corpus
    iterator, _ = pipeline.train_iterator(config, source, tokenizer, pipeline.Shard(0, 1, 4))
    for _ in range(7):  # past the end of the first epoch
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(20)]
    restored, _ = pipeline.train_iterator(config, source, tokenizer, pipeline.Shard(0, 1, 4))
    restored.set_state(state)
    for want, got in zip(expected, (next(restored) for _ in range(20))):
        assert want.keys() == got.keys()
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])


def test_packed_train_rows_hold_whole_corpus_pairs(corpus, config):
    source, tokenizer = corpus
    iterator, counts = pipeline.train_iterator(config, source, tokenizer, pipeline.Shard(0, 1, 4))
    batch = next(iterator)
    assert batch["inputs"].shape == batch["targets_positions"].shape == (4, 48)
    assert batch["inputs"].dtype == np.int32
    corpus_pairs = set(tokenized(corpus))
    found = [p for r in range(4) for p in unpack({k: v[r] for k, v in batch.items()})]
    assert len(found) > 4 and set(found) <= corpus_pairs
    assert counts.read >= len(found) and counts.dropped_too_long + counts.truncated == 0


def test_long_pairs_are_dropped_or_truncated_and_counted():
    eos = tok.EOS_ID
    pairs = [{"inputs": np.array([5, 6, 7, eos], np.int32), "targets": np.array([5, eos], np.int32)},
             {"inputs": np.array([5, eos], np.int32), "targets": np.array([8, 9, eos], np.int32)},
             {"inputs": np.array([eos], np.int32), "targets": np.array([8, eos], np.int32)}]
    drop = pipeline.LengthPolicy(3, 3, "drop")
    assert [drop(p) is None for p in pairs] == [True, False, True]
    assert (drop.counts.read, drop.counts.dropped_too_long, drop.counts.dropped_empty) == (3, 1, 1)
    cut = pipeline.LengthPolicy(3, 3, "truncate")
    np.testing.assert_array_equal(cut(pairs[0])["inputs"], [5, 6, eos])
    assert cut.counts.truncated == 1 and "1 truncated" in cut.counts.report()


def test_eval_batches_see_every_example_once_in_order(corpus, config):
    source, tokenizer = corpus
    per_process = [pipeline.eval_batches(config, source, tokenizer, pipeline.Shard(i, 2, 7))
                   for i in range(2)]
    assert len(per_process[0]) == len(per_process[1]) == -(-NUM_PAIRS // 14)  # 5 batches of 14
    indices = []
    for batch in itertools.chain(*zip(*per_process)):
        assert batch["inputs"].shape[1] % pipeline.LENGTH_MULTIPLE == 0
        for row, index in enumerate(batch["index"]):
            if index < 0:
                assert not batch["inputs"][row].any() and not batch["targets"][row].any()
                continue
            indices.append(int(index))
            pair = source[int(index)]
            assert tokenizer.decode(batch["inputs"][row]) == pair["source"]
            assert tokenizer.decode(batch["targets"][row]) == pair["target"]
    assert indices == list(range(NUM_PAIRS))


def test_decode_batches_see_every_source_once_longest_first_in_buckets(corpus, config):
    source, tokenizer = corpus
    per_process = [pipeline.decode_batches(config, source, tokenizer, pipeline.Shard(i, 2, 7))
                   for i in range(2)]
    assert len(per_process[0]) == len(per_process[1]) == -(-NUM_PAIRS // 14)
    indices, lengths = [], []
    for batches in zip(*per_process):
        assert len({batch["inputs"].shape for batch in batches}) == 1  # one global shape
        global_lengths = []
        for batch in batches:
            for row, index in enumerate(batch["index"]):
                if index < 0:
                    assert not batch["inputs"][row].any()
                    continue
                indices.append(int(index))
                assert tokenizer.decode(batch["inputs"][row]) == source[int(index)]["source"]
                global_lengths.append(int(np.count_nonzero(batch["inputs"][row])))
        assert batches[0]["inputs"].shape[1] == pipeline.bucket(max(global_lengths), config.model.max_len)
        lengths += global_lengths
    assert sorted(indices) == list(range(NUM_PAIRS))
    assert lengths == sorted(lengths, reverse=True)


def test_buckets_are_powers_of_two_within_max_len():
    assert [pipeline.bucket(n, 128) for n in (1, 16, 17, 64, 65, 128)] == [16, 16, 32, 64, 128, 128]
    assert pipeline.bucket(100, 100) == 100


def test_process_shard_and_global_arrays_on_one_process():
    mesh = make_mesh("data:2,fsdp:2,tensor:2")
    sharding = batch_sharding(mesh, (("batch", ("data", "fsdp")),))
    shard = pipeline.process_shard(sharding, 8)
    assert shard == pipeline.Shard(index=0, count=1, rows=8)
    batch = {"inputs": np.arange(8 * 3, dtype=np.int32).reshape(8, 3)}
    array = pipeline.to_global(batch, sharding, shard)["inputs"]
    assert array.sharding.is_equivalent_to(sharding, 2) and len(array.addressable_shards) == 8
    np.testing.assert_array_equal(jax.device_get(array), batch["inputs"])


def test_worker_processes_give_the_same_batches(corpus, config):
    source, tokenizer = corpus
    config.data.worker_count = 1
    assert not flags.FLAGS.is_parsed()  # the library leaves absl's flags alone, and says so:
    with pytest.raises(ValueError, match=r"config.data.worker_count=1 .* \(absl.app.run"):
        pipeline.train_iterator(config, source, tokenizer, pipeline.Shard(0, 1, 4))
    flags.FLAGS(["pytest"])  # what a launcher does.
    batches = []
    try:
        for workers in (0, 1):
            config.data.worker_count = workers
            iterator, _ = pipeline.train_iterator(config, source, tokenizer, pipeline.Shard(0, 1, 4))
            batches.append([next(iterator) for _ in range(6)])
    finally:
        flags.FLAGS.unparse_flags()
    for in_process, from_worker in zip(*batches):
        for key in in_process:
            np.testing.assert_array_equal(in_process[key], from_worker[key])
