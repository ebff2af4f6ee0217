import hashlib
import itertools
import io
import json
import os
import pickle

import pytest
import sentencepiece as spm

from tfx.core import config as config_lib
from tfx.data import corpora
from tfx.data import tokenizer as tok
from tfx.data.sources import read_lines
from tfx.train import rundir

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
    ids = trained.encode_source("A man rides a bike.")
    assert ids[-1] == tok.EOS_ID and tok.PAD_ID not in ids
    assert ids == trained.encode_target("A man rides a bike.") == (
        trained.processor.encode("A man rides a bike.") + [tok.EOS_ID])
    assert trained.pieces()[:3] == ["<pad>", "</s>", "<unk>"] and len(trained.pieces()) == 1000


def test_the_joint_tokenizer_is_its_one_file(trained):
    with open(trained.path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert trained.files == {"tokenizer.model": trained.path} and trained.fingerprint == digest


@pytest.mark.parametrize("split", ["valid", "test_2017_mscoco"])
def test_decode_round_trips_every_line_exactly(trained, split):
    """Including lines with trailing/leading spaces and characters never seen in training."""
    for lang in ("en", "de"):
        with open(os.path.join(MULTI30K, f"{split}.{lang}"), encoding="utf-8") as f:
            for line in f.read().split("\n")[:-1]:
                assert trained.decode(trained.encode_target(line)) == line
    for text in ("  two  spaces ", "Grüße, 東京 🚲", "tab\there"):
        assert trained.decode(trained.encode_target(text)) == text


def test_decoded_text_is_one_line(trained):
    """Byte pieces can spell line breaks; a hypothesis must stay one line of its file."""
    ids = trained.encode_target("two\nlines\r\nand\u2028more")
    assert trained.decode(ids) == "two lines and more"


def test_decode_stops_at_eos_and_ignores_padding(trained):
    ids = trained.encode_target("A dog runs.")
    assert trained.decode([tok.PAD_ID] + ids + trained.encode_target("Ignored.") + [0, 0]) == "A dog runs."


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


class Pairs(list):
    """A corpus's pairs as a split reads them."""

    fingerprint, skipped_empty, languages = "pairs", 0, ("en", "de")


def split_of(*sizes, weights=None, prefix=None):
    """A split of corpora of `sizes` pairs whose texts name their corpus: 'c0-s3', 'c0-t3'."""
    weights = weights or [1.0] * len(sizes)
    return corpora.Split("data.train", "a,b", [
        corpora.Corpus(f"c{k}", Pairs({"source": f"c{k}-s{i}", "target": f"c{k}-t{i}"}
                                      for i in range(size)), weight, prefix)
        for k, (size, weight) in enumerate(zip(sizes, weights))])


def test_sampling_picks_whole_pairs_deterministically():
    pairs = split_of(100)
    sample = list(tok.sample_sentences(pairs, 20, seed=3))
    assert len(sample) == 20 and sample == list(tok.sample_sentences(pairs, 20, seed=3))
    assert all(t == s.replace("-s", "-t") for s, t in zip(sample[::2], sample[1::2]))
    assert sample != list(tok.sample_sentences(pairs, 20, seed=4))
    assert len(list(tok.sample_sentences(pairs, 0))) == 200


def test_sampling_follows_the_mix_of_the_corpora():
    """Corpora of 1000 and 100 pairs: by weight 1:1 half the sample each, by temperature 1 (by
    size) 10:1, and a corpus gives at most what it has."""
    pairs = split_of(1000, 100)
    share = lambda sample: sum(s.startswith("c1-") for s in sample[::2]) / (len(sample) // 2)
    assert share(list(tok.sample_sentences(pairs, 200))) == 0.5
    assert share(list(tok.sample_sentences(pairs, 220, temperature=1.0))) == pytest.approx(1 / 11)
    capped = list(tok.sample_sentences(split_of(1000, 100, weights=[1, 9]), 400))  # 20 + 180 pairs
    assert len(capped) == 2 * (20 + 100) and share(capped) == 100 / 120  # of c1 only its 100.


def test_vocab_smaller_than_the_characters_need_names_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"config.model.vocab_size=100 is smaller .* at least \d+"):
        train_or_load(tmp_path, vocab_size=100)


def test_a_joint_model_without_the_language_token_lists_none(trained):
    with pytest.raises(ValueError, match=r"config.data.target_lang_token='>>deu<<' is not a piece of "
                                         r"the SentencePiece model .* no language tokens"):
        tok.Tokenizer(trained.path, ">>deu<<")


def test_a_joint_model_with_the_language_token_puts_it_first(tmp_path):
    """A joint model with OPUS-MT language tokens as user-defined symbols."""
    sentences = list(read_lines(os.path.join(MULTI30K, "valid.en")))[:300]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=str(tmp_path / "joint"), vocab_size=300,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, user_defined_symbols=[">>deu<<", ">>fra<<"],
        minloglevel=2)
    path = str(tmp_path / "joint.model")
    plain, deu = tok.Tokenizer(path), tok.Tokenizer(path, ">>deu<<")
    deu_id = plain.pieces().index(">>deu<<")
    assert deu.encode_source("A dog.") == [deu_id] + plain.encode_source("A dog.")
    assert deu.encode_target("A dog.") == plain.encode_target("A dog.")
    with pytest.raises(ValueError, match=r"'>>xyz<<' .* its language tokens are >>deu<<, >>fra<<\."):
        tok.Tokenizer(path, ">>xyz<<")


# --- The mapped tokenizer: two SentencePiece models and a vocabulary file ----------------------

LANGUAGES = [">>deu<<", ">>fra<<"]


def small_sentencepiece(lang: str) -> spm.SentencePieceProcessor:
    """A SentencePiece model of 200 pieces on 400 training lines, with SentencePiece's own ids
    (unk 0, bos 1, eos 2), as an imported model's are."""
    model = io.BytesIO()
    lines = list(read_lines(os.path.join(MULTI30K, f"train.{lang}")))[:400]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=200,
                                   model_type="unigram", minloglevel=2)
    return spm.SentencePieceProcessor(model_proto=model.getvalue())


@pytest.fixture(scope="module")
def mapped_files(tmp_path_factory):
    """(source.spm, target.spm, vocabulary.json paths, the vocabulary as written). The pieces:
    tfx's three, the language tokens, then both models' pieces sorted (ids unlike either
    model's); the target model's last 20 pieces (its rarest, single letters) are left out of
    the vocabulary, every 4th source piece is in it but not among the source ids."""
    directory = tmp_path_factory.mktemp("mapped")
    source, target = small_sentencepiece("en"), small_sentencepiece("de")
    normal = lambda sp: [sp.id_to_piece(i) for i in range(sp.vocab_size())
                         if not (sp.is_control(i) or sp.is_unknown(i))]
    source_pieces, target_pieces = normal(source), normal(target)
    target_kept = target_pieces[:-20]
    pieces = ["<pad>", "</s>", "<unk>", *LANGUAGES, *sorted(set(source_pieces) | set(target_kept))]
    source_ids = [0, 1, 2, 3, 4] + [pieces.index(p) for i, p in enumerate(source_pieces) if i % 4]
    target_ids = [0, 1, 2] + [pieces.index(p) for p in target_kept]
    vocabulary = {"pieces": pieces, "source_ids": source_ids, "target_ids": target_ids}
    paths = tuple(str(directory / name) for name in ("source.spm", "target.spm", "vocabulary.json"))
    for path, sp in zip(paths, (source, target)):
        with open(path, "wb") as f:
            f.write(sp.serialized_model_proto())
    with open(paths[2], "w", encoding="utf-8") as f:
        json.dump(vocabulary, f, ensure_ascii=False)
    return (*paths, vocabulary)


def expected_ids(vocabulary, side: str, model_path: str, text: str) -> list[int]:
    """The ids of `text` by hand: the model's pieces, each its position in the vocabulary's
    pieces if that is among the side's ids, else 2; then EOS."""
    sp = spm.SentencePieceProcessor(model_file=model_path)
    allowed = {vocabulary["pieces"][i]: i for i in vocabulary[f"{side}_ids"]}
    return [allowed.get(piece, 2) for piece in sp.encode(text, out_type=str)] + [1]


SENTENCES = ["A man in an orange hat starring at something.", "Zwei Hunde spielen im Schnee.",
             "Qwyjibo xylophone!"]


def test_mapped_ids_are_the_vocabularys_with_unknown_outside_each_side(mapped_files):
    source, target, path, vocabulary = mapped_files
    mapped = tok.MappedTokenizer(source, target, path)
    assert mapped.vocab_size == len(vocabulary["pieces"]) and mapped.pieces() == vocabulary["pieces"]
    for text in SENTENCES:
        assert mapped.encode_source(text) == expected_ids(vocabulary, "source", source, text)
        assert mapped.encode_target(text) == expected_ids(vocabulary, "target", target, text)
    ids = mapped.encode_source(SENTENCES[0]) + mapped.encode_target(SENTENCES[1])
    assert tok.UNK_ID in ids and ids.count(tok.EOS_ID) == 2 and tok.PAD_ID not in ids


def test_a_piece_outside_its_sides_ids_is_unknown(mapped_files):
    """Of lines whose pieces some side's ids leave out: those pieces, and only those, are 2."""
    source, target, path, vocabulary = mapped_files
    mapped = tok.MappedTokenizer(source, target, path)
    for side, lang, model, encode in (("source", "en", source, mapped.encode_source),
                                      ("target", "de", target, mapped.encode_target)):
        sp = spm.SentencePieceProcessor(model_file=model)
        allowed = {vocabulary["pieces"][i] for i in vocabulary[f"{side}_ids"]}
        lines = list(read_lines(os.path.join(MULTI30K, f"valid.{lang}")))[:50]
        pieces = [sp.encode(line, out_type=str) for line in lines]
        assert sum(not set(p) <= allowed for p in pieces) >= 10
        for line, line_pieces in zip(lines, pieces):
            ids = encode(line)
            assert [i == tok.UNK_ID for i in ids[:-1]] == [p not in allowed for p in line_pieces]


def test_mapped_decode_round_trips_a_sentence_of_vocabulary_pieces(mapped_files):
    source, target, path, vocabulary = mapped_files
    mapped, sp = tok.MappedTokenizer(source, target, path), spm.SentencePieceProcessor(model_file=target)
    allowed = {vocabulary["pieces"][i] for i in vocabulary["target_ids"]}
    covered = [line for line in read_lines(os.path.join(MULTI30K, "valid.de"))
               if set(sp.encode(line, out_type=str)) <= allowed and sp.decode(sp.encode(line)) == line]
    assert len(covered) >= 3
    for line in covered[:20]:
        ids = mapped.encode_target(line)
        assert tok.UNK_ID not in ids and mapped.decode([tok.PAD_ID] + ids + [5, 6]) == line


def test_the_language_token_comes_first_from_the_config_or_the_text(mapped_files, tmp_path):
    source, target, path, vocabulary = mapped_files
    deu = vocabulary["pieces"].index(">>deu<<")
    plain = expected_ids(vocabulary, "source", source, "A dog runs.")
    config = config_lib.default_config()
    config.tokenizer.update(source_model_path=source, target_model_path=target, vocabulary_path=path)
    config.data.target_lang_token = ">>deu<<"
    from_config = tok.named(config_lib.validate(config))
    assert from_config.encode_source("A dog runs.") == [deu] + plain
    assert from_config.encode_target("Ein Hund.") == expected_ids(vocabulary, "target", target, "Ein Hund.")
    mapped = tok.MappedTokenizer(source, target, path)
    assert mapped.encode_source(">>deu<< A dog runs.") == [deu] + plain
    for text in (">>xyz<< A dog runs.", ">>deu<<A dog runs."):  # not a piece; no space after it.
        assert mapped.encode_source(text) == expected_ids(vocabulary, "source", source, text)
    with pytest.raises(ValueError) as error:
        tok.MappedTokenizer(source, target, path, ">>xyz<<")
    assert str(error.value) == (
        f"config.data.target_lang_token='>>xyz<<' is not a piece of the vocabulary {path} "
        f"(SentencePiece models {source} and {target}); its language tokens are >>deu<<, >>fra<<.")


def test_a_run_directory_keeps_the_mapped_files_and_reads_them_back(mapped_files, tmp_path):
    source, target, path, _ = mapped_files
    config = config_lib.default_config()
    config.tokenizer.update(source_model_path=source, target_model_path=target, vocabulary_path=path)
    assert tok.from_directory(config, str(tmp_path)) is None
    mapped = tok.named(config)
    rundir.keep_tokenizer(mapped, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["source.spm", "target.spm", "vocabulary.json"]
    copy = tok.from_directory(config, str(tmp_path))
    assert copy.files == {name: str(tmp_path / name) for name in mapped.files}
    digest = hashlib.sha256()
    for name in ("source.spm", "target.spm", "vocabulary.json"):
        digest.update((tmp_path / name).read_bytes())
    assert copy.fingerprint == mapped.fingerprint == digest.hexdigest()
    again = pickle.loads(pickle.dumps(copy))  # as grain's worker processes get it.
    assert again.encode_source(SENTENCES[0]) == mapped.encode_source(SENTENCES[0])


def write_vocabulary(tmp_path, text: str) -> str:
    path = tmp_path / "vocabulary.json"
    path.write_text(text, encoding="utf-8")
    return str(path)


GOOD = {"pieces": ["<pad>", "</s>", "<unk>", "▁a"], "source_ids": [0, 1, 2, 3], "target_ids": [3]}


@pytest.mark.parametrize("text, message", [
    ("{not json", "not UTF-8 JSON"),
    (json.dumps([1, 2]), "not a JSON object with the keys pieces, source_ids, target_ids"),
    (json.dumps({"pieces": GOOD["pieces"], "source_ids": [3]}), "the key 'target_ids' is missing"),
    (json.dumps({**GOOD, "pieces": ["<unk>", "<s>", "</s>", "▁a"]}),
     r"the first three pieces are \['<unk>', '<s>', '</s>'\]; tfx needs \['<pad>', '</s>', '<unk>'\]"),
    (json.dumps({**GOOD, "pieces": GOOD["pieces"] + ["▁a"]}), "the piece '▁a' has two ids, 3 and 4"),
    (json.dumps({**GOOD, "target_ids": [3, 4]}), "'target_ids' holds the id 4, out of range for 4 pieces"),
    (json.dumps({**GOOD, "source_ids": [-1]}), "'source_ids' holds the id -1, out of range"),
    (json.dumps({**GOOD, "pieces": ["<pad>", "</s>", "<unk>", 7]}), "'pieces' must be a list of strings"),
])
def test_a_malformed_vocabulary_file_is_one_line_naming_it(mapped_files, tmp_path, text, message):
    source, target, _, _ = mapped_files
    path = write_vocabulary(tmp_path, text)
    with pytest.raises(ValueError, match=f"^vocabulary file {path}: {message}") as error:
        tok.MappedTokenizer(source, target, path)
    assert "\n" not in str(error.value)
    tok.MappedTokenizer(source, target, write_vocabulary(tmp_path, json.dumps(GOOD)))


@pytest.mark.parametrize("keys, message", [
    (dict(vocabulary_path="v.json", source_model_path="s.spm"),
     "config.tokenizer.vocabulary_path is set, .* needs config.tokenizer.source_model_path and "
     "config.tokenizer.target_model_path"),
    (dict(vocabulary_path="v.json", source_model_path="s.spm", target_model_path="t.spm",
          model_path="m.model"), "config.tokenizer.model_path .* and config.tokenizer.vocabulary_path"),
    (dict(source_model_path="s.spm"), "without config.tokenizer.vocabulary_path"),
])
def test_the_config_names_one_tokenizer_kind(keys, message):
    config = config_lib.default_config()
    config.tokenizer.update(keys)
    with pytest.raises(ValueError, match=message):
        config_lib.validate(config)


def test_a_batch_encodes_as_each_sentence_alone(trained):
    texts = list(itertools.islice(valid_sentences(), 50)) + ["", "  two  spaces "]
    assert trained.encode_sources(texts) == [trained.encode_source(t) for t in texts]
    assert trained.encode_targets(texts) == [trained.encode_target(t) for t in texts]
    prefix = [trained.pieces()[5]]
    assert trained.encode_sources(texts, prefix) == [trained.encode_source(t, prefix) for t in texts]
