import os

import pytest

from tfx.data.sources import ParallelText, read_lines

DATA = os.path.join(os.path.dirname(__file__), "..", "data")


@pytest.mark.parametrize("corpus, split, count", [
    ("multi30k-en-de", "train", 29_000), ("multi30k-en-de", "valid", 1_014),
    ("multi30k-en-de", "test_2016_flickr", 1_000), ("multi30k-en-de", "test_2018_flickr", 1_071),
    ("wmt14-en-de", "valid", 3_000), ("wmt14-en-de", "test", 3_003), ("wmt17-en-de", "test", 3_004),
])
def test_bundled_corpora_have_their_documented_sizes(corpus, split, count):
    source = ParallelText(os.path.join(DATA, corpus, split), "en", "de")
    assert len(source) + source.skipped_empty == count


def test_direction_follows_the_languages():
    en_de = ParallelText(os.path.join(DATA, "multi30k-en-de", "valid"), "en", "de")
    de_en = ParallelText(os.path.join(DATA, "multi30k-en-de", "valid"), "de", "en")
    assert en_de[0]["source"] == de_en[0]["target"]
    assert en_de[0]["source"].startswith("A group of men")


def write(path, text: bytes):
    path.write_bytes(text)
    return str(path)


def test_pairs_empty_on_one_side_are_skipped_and_counted(tmp_path):
    write(tmp_path / "c.en", b"one\n\nthree\n  \nfive\n")
    write(tmp_path / "c.de", b"eins\nzwei\n\nvier\nfunf\n")
    source = ParallelText(str(tmp_path / "c"), "en", "de")
    assert [source[i] for i in range(len(source))] == [
        {"source": "one", "target": "eins"}, {"source": "five", "target": "funf"}]
    assert source.skipped_empty == 3


def test_line_counts_that_differ_name_both_files(tmp_path):
    write(tmp_path / "c.en", b"one\ntwo\n")
    write(tmp_path / "c.de", b"eins\n")
    with pytest.raises(ValueError, match=r"c\.en has 2 lines but .*c\.de has 1"):
        ParallelText(str(tmp_path / "c"), "en", "de")


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = write(tmp_path / "bad.de", b"gut\nnoch gut\nschlecht \xff hier\n")
    with pytest.raises(ValueError, match=r"bad\.de:3: invalid UTF-8 \(byte 0xff at column 10\)"):
        read_lines(path)


def test_missing_and_empty_corpora_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.en"):
        ParallelText(str(tmp_path / "nothing"), "en", "de")
    write(tmp_path / "e.en", b"")
    write(tmp_path / "e.de", b"")
    with pytest.raises(ValueError, match="no sentence pairs"):
        ParallelText(str(tmp_path / "e"), "en", "de")
