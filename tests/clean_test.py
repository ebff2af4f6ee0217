import os
import pickle
import random
import socket
import subprocess
import sys

import pytest
import tensorflow_datasets as tfds

from tfx.core import config as config_lib
from tfx.data import clean, prepare, sources

DEFAULTS = config_lib.default_config().data.clean.to_dict()
OFF = dict(DEFAULTS, empty=False, max_chars=0, max_words=0, max_ratio=0.0, identical=False,
           min_letters=0.0, nonprinting=False, langid=False, dedup=False)  # every filter off.
ZWJ, ZWNJ = "\u200d", "\u200c"
FAMILY = f"\U0001F468{ZWJ}\U0001F469{ZWJ}\U0001F467"  # one emoji, spelled with zero-width joiners.
# An en-de corpus; after each pair, the filters (of SOME below) that drop it.
PAIRS = [
    ("A man is walking.", "Ein Mann geht."),  # 0: none
    # 1: max_chars, max_words, max_ratio
    ("A very long sentence that goes on and on and on forever.", "Ein sehr langer Satz."),
    ("one two three four five six seven", "eins zwei drei vier fünf sechs sieben"),  # 2: max_words
    ("Hi.", "Guten Morgen allerseits."),  # 3: max_ratio
    ("Berlin", "Berlin"),  # 4: identical
    ("12345 678", " 12345 678"),  # 5: identical, min_letters
    ("2019-2020: 45%", "2019-2020: 45 %"),  # 6: min_letters
    ("A cat\u200bsits.", "Eine Katze sitzt."),  # 7: nonprinting (zero-width space)
    ("The dog runs.", "Der Hund\x07 rennt."),  # 8: nonprinting (a control character)
    (f"The family {FAMILY} waves.", f"Die Familie {FAMILY} winkt."),  # 9: none (joiners pass)
    ("Tab\tseparated words.", "Durch\tTab getrennt."),  # 10: none (tabs pass)
    ("A man is walking.", "Ein Mann geht."),  # 11: dedup (a copy of 0)
    ("A man is walking.", "Ein Mann läuft."),  # 12: none (only the source is the same)
    # 13: as 1, and dedup
    ("A very long sentence that goes on and on and on forever.", "Ein sehr langer Satz."),
]
SOME = dict(max_chars=40, max_words=6, max_ratio=2.0, identical=True, min_letters=0.5,
            nonprinting=True, dedup=True)


class ListPairs:
    """A PairSource-like list (no batched reads), for what text files cannot hold."""

    def __init__(self, pairs, fingerprint):
        self.pairs, self.fingerprint, self.languages = pairs, fingerprint, ("en", "de")

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        return dict(zip(("source", "target"), self.pairs[index]))


def write_corpus(prefix, pairs):
    for side, suffix in enumerate(("en", "de")):
        with open(f"{prefix}.{suffix}", "w", encoding="utf-8", newline="\n") as f:
            f.writelines(pair[side] + "\n" for pair in pairs)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """PAIRS prepared as a text split (a PairSource), and its data dir."""
    data_dir = tmp_path_factory.mktemp("clean")
    write_corpus(data_dir / "c", PAIRS)
    return sources.open_split(f"text:{data_dir / 'c'}", "data.train", "en", "de", str(data_dir)), str(data_dir)


def prepared(pairs, data_dir, **settings):
    builder = clean.CleanedBuilder(pairs=pairs, settings=dict(OFF, **settings), data_dir=data_dir)
    builder.download_and_prepare(file_format="array_record")
    return builder


def kept(builder):
    records = builder.as_data_source(sources.TEXT_SPLIT)
    return [(r["en"].decode(), r["de"].decode()) for r in records]


def expected_counts(read, kept, **dropped):
    return {"read": read, **{name: dropped.get(name, 0) for name in clean.FILTERS}, "kept": kept}


@pytest.mark.parametrize("name, dropped", [
    ("max_chars", [1, 13]), ("max_words", [1, 2, 13]), ("max_ratio", [1, 3, 13]),
    ("identical", [4, 5]), ("min_letters", [5, 6]), ("nonprinting", [7, 8]), ("dedup", [11, 13]),
])
def test_each_filter_alone_drops_exactly_its_pairs(corpus, name, dropped):
    builder = prepared(*corpus, **{name: SOME[name]})
    assert kept(builder) == [pair for i, pair in enumerate(PAIRS) if i not in dropped]
    assert clean.counts(builder) == expected_counts(14, 14 - len(dropped), **{name: len(dropped)})


def test_a_pair_is_counted_under_the_first_filter_that_drops_it(corpus):
    builder = prepared(*corpus, empty=True, **SOME)
    assert kept(builder) == [PAIRS[0], PAIRS[9], PAIRS[10], PAIRS[12]]
    assert clean.counts(builder) == expected_counts(
        14, 4, max_chars=2, max_words=1, max_ratio=1, identical=2, min_letters=1, nonprinting=2,
        dedup=1)  # 13 is max_chars's, not dedup's: dedup sees only what the others keep.


def test_empty_sides_are_dropped(tmp_path):
    # (A text split skips these itself, so a list stands in for it.)
    pairs = ListPairs([("a", "b"), ("", "x"), ("  ", "y"), ("z", "\t "), ("c", "d")], "empty")
    builder = prepared(pairs, str(tmp_path), empty=True)
    assert kept(builder) == [("a", "b"), ("c", "d")]
    assert clean.counts(builder) == expected_counts(5, 2, empty=3)


def test_ratio_of_an_empty_side():
    cleaner = clean.Cleaner(dict(OFF, max_ratio=3.0), ("en", "de"))
    assert cleaner.drop_reason({"source": "", "target": "a"}) == "max_ratio"
    assert cleaner.drop_reason({"source": "", "target": ""}) is None
    assert cleaner.drop_reason({"source": "abc", "target": "abcdefghi"}) is None
    assert cleaner.drop_reason({"source": "abc", "target": "abcdefghij"}) == "max_ratio"


def test_letters_count_their_combining_marks_and_joiners_are_printing():
    assert clean.letter_share("हिन्दी") == 1.0  # 3 letters, 3 vowel signs and viramas (M*).
    assert clean.letter_share("ab 12") == 0.5 and clean.letter_share(" ") == 0.0
    assert not clean.has_nonprinting(f"می{ZWNJ}روم\t{FAMILY}\u00a0x")  # ZWNJ, tab, ZWJ, no-break space
    for char in ("\u200b", "\u00ad", "\ufeff", "\x00", "\x1b", "\ue000", "\U000E0001", "\U0010FFFF"):
        assert clean.has_nonprinting(f"a{char}b"), repr(char)


def test_dedup_keeps_first_copies_across_buffers_and_buckets(tmp_path, monkeypatch):
    """Against a set over the whole corpus, with buffers and buckets a few records large."""
    monkeypatch.setattr(clean, "READ_BATCH", 5)
    monkeypatch.setattr(clean, "DEDUP_BUFFER", 7)
    monkeypatch.setattr(clean, "DEDUP_BUCKET", 16)
    draw = random.Random(0)
    pairs = [(f"s{draw.randrange(30)}", f"t{draw.randrange(3)}") for _ in range(500)]
    builder = prepared(ListPairs(pairs, "many copies"), str(tmp_path), dedup=True)
    assert kept(builder) == list(dict.fromkeys(pairs))
    assert clean.counts(builder)["dedup"] == 500 - len(set(pairs))
    assert list(tmp_path.glob("tfx-clean-*")) == []  # the scratch files are gone.


def test_a_changed_setting_prepares_a_new_copy_and_equal_settings_reuse_it(corpus):
    pairs, data_dir = corpus
    first = prepared(pairs, data_dir, max_chars=20, max_ratio=2)

    def builder(**settings):
        return clean.CleanedBuilder(pairs=pairs, settings=dict(OFF, **settings), data_dir=data_dir)

    same = builder(max_chars=20, max_ratio=2.0)
    assert same.is_prepared() and same.data_dir == first.data_dir
    assert clean.counts(same) == clean.counts(first)
    assert not builder(max_chars=21, max_ratio=2.0).is_prepared()
    assert not builder(max_chars=20, max_ratio=2.0, empty=True).is_prepared()
    other_languages = sources.open_split(pairs.spec, "data.train", "de", "en", data_dir)
    assert not clean.CleanedBuilder(pairs=other_languages, settings=dict(OFF, max_chars=20, max_ratio=2),
                                    data_dir=data_dir).is_prepared()


@pytest.mark.parametrize("change, message", [
    (dict(max_ratio=0.5), r"config.data.corpora.europarl.clean.max_ratio=0.5 must be 0 \(off\) or above 1\."),
    (dict(max_ratio=1), r"max_ratio=1 must be 0 \(off\) or above 1\."),
    (dict(max_ratio=-2.0), r"max_ratio=-2.0 must be"),
    (dict(max_chars=-1), r"clean.max_chars=-1 must be a whole number: 0 \(no limit\) or above\."),
    (dict(max_words=2.5), r"clean.max_words=2.5 must be a whole number"),
    (dict(min_letters=1.5), r"clean.min_letters=1.5 must be between 0 \(off\) and 1\."),
    (dict(min_letters=-0.1), r"clean.min_letters=-0.1 must be between"),
    (dict(dedup="yes"), r"clean.dedup='yes' must be True or False\."),
    (dict(max_length=5), r"config.data.corpora.europarl.clean has no key 'max_length'; its keys are: empty, "),
])
def test_bad_settings_name_their_config_key(change, message):
    with pytest.raises(ValueError, match=message):
        clean.Cleaner(dict(DEFAULTS, **change), ("en", "de"), "data.corpora.europarl.clean")


def test_missing_settings_are_named():
    settings = dict(DEFAULTS)
    del settings["identical"]
    with pytest.raises(ValueError, match="config.data.clean lacks the key 'identical'"):
        clean.Cleaner(settings, ("en", "de"))


def test_langid_keeps_sentences_in_their_language(tmp_path, monkeypatch):
    write_corpus(tmp_path / "c", [
        ("The weather is very nice today and we are going to the park.",
         "Das Wetter ist heute sehr schön und wir gehen in den Park."),
        ("Le chat dort sur le canapé pendant que nous mangeons.",
         "Die Katze schläft auf dem Sofa, während wir essen."),
        ("My brother works in a large hospital in the city.",
         "My brother works in a large hospital in the city."),
        ("The children are playing football in the garden behind the house.",
         "Die Kinder spielen im Garten hinter dem Haus Fußball."),
    ])
    pairs = sources.open_split(f"text:{tmp_path / 'c'}", "data.train", "en", "de", str(tmp_path))

    def offline(*args):
        raise AssertionError("langid went to the network")

    clean._language_identifier.cache_clear()  # (the model loads here, with the network cut.)
    monkeypatch.setattr(socket.socket, "connect", offline)
    builder = prepared(pairs, str(tmp_path), langid=True)
    assert [source for source, _ in kept(builder)] == [
        "The weather is very nice today and we are going to the park.",
        "The children are playing football in the garden behind the house."]
    assert clean.counts(builder) == expected_counts(4, 2, langid=2)


def test_langid_refuses_a_language_it_does_not_know():
    with pytest.raises(ValueError, match=r"config.data.clean.langid=True, .* code 'xx'"):
        clean.Cleaner(dict(DEFAULTS, langid=True), ("en", "xx"))


def test_a_cleaner_pickles_and_decides_the_same():
    cleaner = clean.Cleaner(dict(DEFAULTS, identical=True, max_words=3), ("en", "de"), "data.c")
    copy = pickle.loads(pickle.dumps(cleaner))
    assert (copy.settings, copy.languages, copy.key) == (cleaner.settings, ("en", "de"), "data.c")
    for i, (source, target) in enumerate(PAIRS):
        pair = {"source": source, "target": target}
        assert copy.drop_reason(pair) == cleaner.drop_reason(pair), i


def test_batched_reads_equal_reads_one_by_one(corpus, monkeypatch):
    pairs, _ = corpus
    assert clean.read_pairs(pairs, range(3, 9)) == [pairs[i] for i in range(3, 9)]
    monkeypatch.setattr(clean, "READ_BATCH", 4)  # batches that end inside the corpus
    assert [pair for _, batch in clean._batches(pairs) for pair in batch] == [
        pairs[i] for i in range(len(pairs))]


def test_table_lines_up_corpora_and_leaves_out_filters_that_dropped_nothing():
    a = expected_counts(1000, 900, empty=40, dedup=60)
    b = expected_counts(20, 20)
    assert clean.table([("europarl", a), ("news", b)]) == "\n".join([
        "corpus    read  empty  dedup  kept  kept %",
        "europarl  1000     40     60   900    90.0",
        "news        20      0      0    20   100.0",
        "total     1020     40     60   920    90.2",
    ])
    assert clean.table([("news", b)]) == "corpus  read  kept  kept %\nnews      20    20   100.0"


def test_the_prepared_corpus_is_a_translation_dataset(corpus):
    builder = prepared(*corpus, max_chars=40)
    assert isinstance(builder.info.features, tfds.features.Translation)
    assert builder.info.features.languages == ["de", "en"]


DIRECT = ["--runner=DirectRunner"]
# Two worker processes: each opens the split itself (clean._BatchDecider).
PROCESSES = [*DIRECT, "--direct_num_workers=2", "--direct_running_mode=multi_processing"]


@pytest.mark.parametrize("dedup, flags", [(True, PROCESSES), (False, DIRECT)])
def test_beam_keeps_the_pairs_and_counts_of_one_process(tmp_path, monkeypatch, dedup, flags):
    monkeypatch.setattr(clean, "READ_BATCH", 4)  # a pair's copies fall in other batches (bundles)
    write_corpus(tmp_path / "c", PAIRS * 3)
    pairs = sources.open_split(f"text:{tmp_path / 'c'}", "data.train", "en", "de", str(tmp_path))
    settings = dict(OFF, empty=True, **dict(SOME, dedup=dedup))
    single = prepared(pairs, str(tmp_path / "single"), **settings)
    beam = clean.CleanedBuilder(pairs=pairs, settings=settings, data_dir=str(tmp_path / "beam"))
    on_beam = tfds.download.DownloadConfig(beam_options=clean.beam_options(flags),
                                           num_shards=3)  # (the order across files too)
    beam.download_and_prepare(file_format="array_record", download_config=on_beam)
    assert kept(beam) == kept(single) == (
        [PAIRS[i] for i in (0, 9, 10, 12)] if dedup else [PAIRS[i] for i in (0, 9, 10, 11, 12)] * 3)
    assert clean.counts(beam) == clean.counts(single) == expected_counts(
        42, 4 if dedup else 15, max_chars=6, max_words=3, max_ratio=3, identical=6, min_letters=3,
        nonprinting=6, dedup=11 if dedup else 0)
    assert len(beam.info.splits[sources.TEXT_SPLIT].shard_lengths) > 1
    assert not os.path.exists(os.path.join(beam.data_dir, clean.COUNTS_FILE))


def test_prepare_prints_the_same_on_beam(tmp_path):
    """python -m tfx.data.prepare --beam_runner=DirectRunner against the library in this process."""
    write_corpus(tmp_path / "c", PAIRS * 3)
    config_file = tmp_path / "config.py"
    config_file.write_text(
        "from tfx.core import config\n\n\ndef get_config():\n    c = config.default_config()\n"
        f"    c.data.train = 'text:{tmp_path / 'c'}'\n    c.data.clean.update({SOME!r})\n"
        "    c.model.vocab_size = 300\n    return c\n")
    config = config_lib.load(str(config_file))
    config.data.data_dir = str(tmp_path / "single")
    single = list(prepare.prepare(config))

    def run(runner, data_dir):
        return subprocess.run([sys.executable, "-m", "tfx.data.prepare", f"--config={config_file}",
                               f"--beam_runner={runner}", f"--config.data.data_dir={data_dir}"],
                              capture_output=True, text=True, timeout=300)

    done = run("DirectRunner", tmp_path / "beam")
    assert done.returncode == 0, done.stderr
    printed = done.stdout.replace(str(tmp_path / "beam"), str(tmp_path / "single")).splitlines()
    assert [line for line in printed if not line.startswith(("Downloading ", "Dataset "))] == single
    assert "cleaning (config.data.clean), pairs:" in single
    wrong = run("NoSuchRunner", tmp_path / "other")  # (the flag reaches Beam; one line)
    assert wrong.stderr.splitlines()[-1].startswith(
        "tfx.data.prepare: Unexpected pipeline runner: NoSuchRunner."), wrong.stderr


def test_a_beam_runner_without_beam_names_the_extra():
    """Without apache-beam, tfx's data modules import, and a runner asked for names the extra."""
    code = ("import sys; sys.modules['apache_beam'] = None\n"
            "from tfx.data import clean, corpora, prepare\n"
            "try:\n    prepare.beam_flags('DirectRunner', '')\n"
            "except clean.MissingBeamError as error:\n    print(error)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'tfx-mt[beam]'" in done.stdout
    assert prepare.beam_flags("DataflowRunner", "--project=p, --experiments=a,b") == [
        "--runner=DataflowRunner", "--project=p", "--experiments=a,b"]
    with pytest.raises(ValueError, match="each --NAME=VALUE"):
        prepare.beam_flags("DataflowRunner", "project=p")
