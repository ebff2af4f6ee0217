import os

import pytest

from tfx.data import tokenizer as tok
from tfx.data.sources import read_lines

MULTI30K = os.path.join(os.path.dirname(__file__), "..", "data", "multi30k-en-de")


def valid_sentences():
    for lang in ("en", "de"):
        yield from read_lines(os.path.join(MULTI30K, f"valid.{lang}"))


def train_or_load(cache_dir, vocab_size, **settings):
    return tok.train_or_load(valid_sentences, "multi30k-valid", str(cache_dir), vocab_size, **settings)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_or_load(tmp_path_factory.mktemp("spm"), vocab_size=1000)


def test_special_ids_and_eos(trained):
    assert trained.vocab_size == 1000
    ids = trained.encode("A man rides a bike.")
    assert ids[-1] == tok.EOS_ID and tok.PAD_ID not in ids


@pytest.mark.parametrize("split", ["valid", "test_2017_mscoco"])
def test_decode_round_trips_every_line_exactly(trained, split):
    """Including lines with trailing/leading spaces and characters never seen in training."""
    for lang in ("en", "de"):
        with open(os.path.join(MULTI30K, f"{split}.{lang}"), encoding="utf-8") as f:
            for line in f.read().split("\n")[:-1]:
                assert trained.decode(trained.encode(line)) == line
    for text in ("  two  spaces ", "Grüße, 東京 🚲", "tab\there"):
        assert trained.decode(trained.encode(text)) == text


def test_decoded_text_is_one_line(trained):
    """Byte pieces can spell line breaks; a hypothesis must stay one line of its file."""
    ids = trained.encode("two\nlines\r\nand\u2028more")
    assert trained.decode(ids) == "two lines and more"


def test_decode_stops_at_eos_and_ignores_padding(trained):
    ids = trained.encode("A dog runs.")
    assert trained.decode([tok.PAD_ID] + ids + trained.encode("Ignored.") + [0, 0]) == "A dog runs."


def test_second_call_loads_the_cache_and_changes_retrain(tmp_path):
    first = train_or_load(tmp_path, vocab_size=600)
    mtime = os.path.getmtime(first.path)
    again = train_or_load(tmp_path, vocab_size=600)
    assert again.path == first.path and os.path.getmtime(again.path) == mtime
    bpe = train_or_load(tmp_path, vocab_size=600, model_type="bpe")
    assert bpe.path != first.path
    assert sorted(p for p in os.listdir(tmp_path)) == sorted(
        os.path.basename(p) for p in (first.path, bpe.path))


def test_vocab_larger_than_the_corpus_supports_names_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"config.model.vocab_size=100000 .* use at most \d+"):
        train_or_load(tmp_path, vocab_size=100_000)


def test_corrupt_model_file_is_named(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.model.*not a valid SentencePiece model"):
        tok.Tokenizer(str(bad))


def test_missing_model_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.model"):
        tok.Tokenizer(str(tmp_path / "missing.model"))


def test_unknown_model_type_names_the_key(tmp_path):
    with pytest.raises(ValueError, match="config.tokenizer.model_type='word'"):
        train_or_load(tmp_path, vocab_size=500, model_type="word")


def test_sampling_picks_whole_pairs_deterministically():
    pairs = [{"source": f"s{i}", "target": f"t{i}"} for i in range(100)]
    sample = list(tok.sample_sentences(pairs, 20, seed=3))
    assert len(sample) == 20 and sample == list(tok.sample_sentences(pairs, 20, seed=3))
    assert all(t == "t" + s[1:] for s, t in zip(sample[::2], sample[1::2]))
    assert sample != list(tok.sample_sentences(pairs, 20, seed=4))
    assert len(list(tok.sample_sentences(pairs, 0))) == 200


def test_vocab_smaller_than_the_characters_need_names_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"config.model.vocab_size=100 is smaller .* at least \d+"):
        train_or_load(tmp_path, vocab_size=100)
