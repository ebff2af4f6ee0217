import collections
import pickle
import string

import jax
import numpy as np
import pytest

from tfx.core import config as config_lib
from tfx.core.parallel import make_mesh
from tfx.data import augment, corpora, pipeline, prepare, tokenized
from tfx.train.experiment import Experiment
from tfx.data import tokenizer as tok

WORDS = "red green blue small big old dog cat man woman runs sits looks at the a".split()
SIZES = {"big": 300, "mid": 120, "small": 40}


def write_corpus(root, name: str, size: int):
    """Pairs whose sides say their corpus and number: 'big 7 red dog' / 'BIG 7 red dog'."""
    rng = np.random.default_rng(size)
    lines = [f"{name} {i} " + " ".join(rng.choice(WORDS, size=1 + i % 6)) for i in range(size)]
    (root / f"{name}.en").write_text("".join(line + "\n" for line in lines))
    (root / f"{name}.de").write_text("".join(line.upper() + "\n" for line in lines))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    for name, size in SIZES.items():
        write_corpus(root, name, size)
    return root


@pytest.fixture(scope="module")
def tokenizer(root):
    sentences = lambda: (line for name in SIZES for lang in ("en", "de")
                         for line in (root / f"{name}.{lang}").read_text().splitlines())
    return tok.train_or_load(sentences, "corpora", str(root / "spm"), vocab_size=350,
                             symbols=["<2de>", "<2en>", "<BT>"])


@pytest.fixture
def mixed(root, tiny_config):
    """A config mixing the three corpora by weights 5:3:2, the small one tagged <BT>."""

    def make(**overrides):
        config = tiny_config(model={"max_len": 64}, max_source_length=48, max_target_length=48,
                             seed=3, **overrides)
        config.data.data_dir = str(root / "tfds")
        config.data.target_lang_token = "<2{lang}>"
        config.data.corpora = {
            "big": dict(spec=f"text:{root}/big", weight=5.0),
            "mid": dict(spec=f"text:{root}/mid", weight=3.0),
            "small": dict(spec=f"text:{root}/small", weight=2.0, tag="<BT>")}
        config.data.train = "big,mid,small"
        return config_lib.validate(config)

    return make


def test_the_mix_gives_each_corpus_its_weights_share(mixed, tokenizer):
    config = mixed()
    split = corpora.open_split(config, "train")
    records = pipeline.mixed_shard(config, split, tokenizer, index=0, shards=1)
    targets = [tokenizer.decode(records[i]["targets"]) for i in range(10_000)]  # 'BIG 7 RED DOG'
    counts = collections.Counter(target.split()[0].lower() for target in targets)
    assert {name: counts[name] / 10_000 for name in SIZES} == pytest.approx(
        {"big": 0.5, "mid": 0.3, "small": 0.2}, abs=0.01)
    # Each corpus is read whole, in a fresh order every epoch.
    bigs = [target for target in targets if target.startswith("BIG ")]
    assert sorted(bigs[:300]) == sorted(bigs[300:600]) and bigs[:300] != bigs[300:600]
    assert len(set(bigs[:300])) == 300


def test_temperature_shares_follow_size_to_the_power_one_over_t(mixed):
    split = corpora.open_split(mixed(), "train")
    sizes = np.array([300 * 5.0, 120 * 3.0, 40 * 2.0])
    for temperature in (1.0, 5.0):
        expected = sizes ** (1 / temperature) / (sizes ** (1 / temperature)).sum()
        np.testing.assert_allclose(corpora.mixing_weights(split.corpora, temperature), expected)
    np.testing.assert_allclose(corpora.mixing_weights(split.corpora, 0.0), [0.5, 0.3, 0.2])


def test_named_corpora_start_their_sources_with_the_language_token_then_the_tag(mixed, tokenizer):
    split = corpora.open_split(mixed(), "train")
    first = {}
    for i in range(len(split)):
        first.setdefault(split[i]["source"].split()[0], pipeline.Tokenize(tokenizer).map(split[i])["inputs"][:3])
    de, bt = tokenizer.piece_id("<2de>"), tokenizer.piece_id("<BT>")
    assert first["big"][0] == de and first["big"][1] != bt
    assert list(first["small"][:2]) == [de, bt]
    # A plain split keeps the tokenizer's own prefix (config.data.target_lang_token: '<2de>').
    plain = tok.Tokenizer(tokenizer.path, corpora.source_token(mixed()))
    assert plain.encode_source("big 1 red")[0] == de


def test_a_resumed_mixed_and_augmented_iterator_continues_exactly(mixed, tokenizer):
    config = mixed()
    config.data.augment.update(uppercase=0.2, typos=0.3)
    split = corpora.open_split(config, "train")
    shard = pipeline.Shard(0, 1, 4)
    iterator, _ = pipeline.train_iterator(config, split, tokenizer, shard)
    for _ in range(7):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(5)]
    restored, _ = pipeline.train_iterator(config, split, tokenizer, shard)
    restored.set_state(state)
    for want, got in zip(expected, (next(restored) for _ in range(5))):
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])


def test_a_data_and_tensor_mesh_reads_the_global_batches_of_one_device(mixed, tokenizer):
    """Global batches of 8 rows: 4 data-parallel devices x 2 rows (tensor 2) or one device x 8."""
    batches = []
    for mesh_shape, rows in (("data:4,fsdp:1,tensor:2", 2), ("data:1,fsdp:1,tensor:1", 8)):
        config = mixed(mesh_shape=mesh_shape, per_device_batch_size=rows)
        config.data.shards = 1
        devices = jax.devices()[:8 if rows == 2 else 1]
        mesh = make_mesh(mesh_shape, devices)
        sharding, shard = pipeline.batch_layout(config, mesh, rows)
        iterator, _ = pipeline.train_iterator(config, corpora.open_split(config, "train"), tokenizer, shard)
        batches.append([jax.device_get(pipeline.to_global(next(iterator), sharding, shard))
                        for _ in range(3)])
    for sharded, single in zip(*batches):
        for key in single:
            np.testing.assert_array_equal(sharded[key], single[key])


def test_corpora_survive_the_runs_config_json(mixed):
    config = mixed()
    again = config_lib.from_json(config.to_json(), "config.json")
    assert again.data.corpora.to_dict() == config.data.corpora.to_dict()
    assert config_lib.corpus(again, "small").clean.empty is True
    assert config_lib.corpus(again, "small").tag == "<BT>"


@pytest.mark.parametrize("change, message", [
    (dict(train="big,nope"), r"config.data.train='big,nope' names the corpus 'nope', which config.data.corpora does not have"),
    (dict(train="big,big"), r"config.data.train='big,big' names a corpus twice"),
    (dict(corpora={"big": dict(spec="text:x", wieght=2.0)}), r"config.data.corpora.big.wieght is not a corpus key"),
    (dict(corpora={"big": dict(spec="x")}), r"config.data.corpora.big.spec='x' must be a split spec"),
    (dict(corpora={"big": dict(spec="text:x", weight=0)}), r"config.data.corpora.big.weight=0 must be a positive number"),
    (dict(corpora={"big": dict(spec="text:x", clean=dict(max_ratoi=2))}), r"config.data.corpora.big.clean.max_ratoi is not a key of config.data.clean"),
])
def test_corpus_settings_are_checked_naming_the_key(mixed, change, message):
    config = mixed()
    for key, value in change.items():
        if key == "corpora":
            config.data.corpora = value
            config.data.train = "big"
        else:
            config.data[key] = value
    with pytest.raises(ValueError, match=message):
        config_lib.validate(config)


def test_augmentation_changes_its_share_of_pairs_the_same_way_every_time():
    pairs = [{"source": f"a man {i} sits at the table", "target": f"ein mann {i} sitzt"} for i in range(2000)]
    modifier = augment.Augment(uppercase=0.1, titlecase=0.2, typos=0.3)
    out = [modifier.random_map(dict(p), np.random.default_rng(i)) for i, p in enumerate(pairs)]
    assert out == [modifier.random_map(dict(p), np.random.default_rng(i)) for i, p in enumerate(pairs)]
    upper = sum(o["target"] == p["target"].upper() for o, p in zip(out, pairs)) / len(pairs)
    title = sum(o["target"] == augment.title_case(p["target"]) for o, p in zip(out, pairs)) / len(pairs)
    typo = sum(o["source"].lower() != p["source"].lower() and o["source"] != augment.title_case(p["source"])
               for o, p in zip(out, pairs)) / len(pairs)
    assert upper == pytest.approx(0.1, abs=0.02) and title == pytest.approx(0.9 * 0.2, abs=0.02)
    assert typo == pytest.approx(0.3, abs=0.03)


def test_title_case_and_typos_known_answers():
    assert augment.title_case("a man's dog  runs") == "A Man's Dog  Runs"
    text = string.ascii_lowercase * 2  # 52 characters: two typos, each changing the length by at most 1.
    changed = [augment.typos(text, np.random.default_rng(seed)) for seed in range(50)]
    assert all(abs(len(c) - len(text)) <= 2 for c in changed)
    assert sum(c != text for c in changed) >= 48  # (a replacement may draw the same letter)
    assert augment.typos("123 456", np.random.default_rng(0)) == "123 456"  # no letters.


def test_training_corpora_are_cleaned_by_their_filters_and_eval_sets_never(mixed):
    """Every 'small' line is made twice ('small 0 ...' twice: dedup drops 40 of 80), and its
    own max_words=3 drops the longer ones; the eval split reads the same files uncleaned."""
    config = mixed()
    small = config.data.corpora.small.spec.removeprefix("text:")
    for lang in ("en", "de"):
        lines = open(f"{small}.{lang}").read().splitlines()
        with open(f"{small}-twice.{lang}", "w") as f:
            f.write("".join(line + "\n" for line in lines + lines))
    config.data.corpora.small.spec = f"text:{small}-twice"
    config.data.corpora.small.clean = {"max_words": 4}
    config.data.clean.dedup = True
    config.data.eval = "small"
    config.model.vocab_size = 350  # (prepare trains the vocabulary)
    config = config_lib.validate(config)
    split = corpora.open_split(config, "train")
    kept = [split.corpora[2].pairs[i]["source"] for i in range(len(split.corpora[2].pairs))]
    expected = [line for line in open(f"{small}.en").read().splitlines() if len(line.split()) <= 4]
    assert kept == expected
    assert split.corpora[2].pairs.clean_counts == {
        "read": 80, "empty": 0, "max_chars": 0, "max_words": 2 * (40 - len(expected)), "max_ratio": 0,
        "identical": 0, "min_letters": 0, "nonprinting": 0, "langid": 0, "dedup": len(expected),
        "kept": len(expected)}
    assert len(split.corpora[0].pairs) == SIZES["big"]  # (no copies there)
    assert len(corpora.open_split(config, "eval")) == 80
    reopened = pickle.loads(pickle.dumps(split.corpora[2].pairs))  # as grain's workers get it.
    assert [reopened[i] for i in range(len(reopened))] == [split.corpora[2].pairs[i] for i in range(len(kept))]
    lines = list(prepare.prepare(config))
    assert any(line.split()[:2] == ["small", "80"] and line.split()[-2:] == [str(len(expected)), f"{100 * len(expected) / 80:.1f}"]
               for line in lines), lines


def test_default_filters_leave_a_corpus_as_it_is(mixed):
    split = corpora.open_split(mixed(), "train")
    assert not any(hasattr(corpus.pairs, "clean_counts") for corpus in split.corpora)


def test_stored_token_ids_give_the_batches_that_tokenizing_as_read_gives(mixed, tokenizer):
    """config.data.pretokenize: each corpus's ids (language token and tag first) are stored once;
    the mixed, packed batches are those of the text, bitwise, and a worker reopens them."""
    config = mixed()
    split = corpora.open_split(config, "train")
    stored = tokenized.tokenized_split(split, tokenizer)
    assert [len(c.tokens) for c in stored.corpora] == [len(c.pairs) for c in split.corpora]
    again = pickle.loads(pickle.dumps(stored.corpora[2].tokens))
    np.testing.assert_array_equal(again[5]["inputs"], pipeline.Tokenize(tokenizer).map(split.corpora[2].pairs[5] | {"prefix": ("<2de>", "<BT>")})["inputs"])
    shard = pipeline.Shard(0, 1, 4)
    from_text, _ = pipeline.train_iterator(config, split, tokenizer, shard)
    from_ids, _ = pipeline.train_iterator(config, stored, tokenizer, shard)
    for _ in range(6):
        text_batch, ids_batch = next(from_text), next(from_ids)
        for key in text_batch:
            np.testing.assert_array_equal(text_batch[key], ids_batch[key])


def test_training_reads_the_stored_ids_when_asked(mixed):
    config = mixed()
    config.data.pretokenize = True
    config.model.vocab_size = 350
    experiment = Experiment(config_lib.validate(config))
    assert all(corpus.tokens is not None for corpus in experiment.splits["train"].corpora)
    config.data.augment.uppercase = 0.1
    with pytest.raises(ValueError, match="config.data.pretokenize stores token ids, but config.data.augment"):
        config_lib.validate(config)
