import collections
import os

import pytest
from array_record.python import array_record_module
from array_record.python.array_record_data_source import ArrayRecordDataSource
from tensorflow_datasets.core.utils.shard_utils import FileInstruction

from tfx.data import sources

from tfx.data.corpora import open_splits
from tfx.data.sources import open_split, read_lines

DATA = os.path.join(os.path.dirname(__file__), "..", "data")


def text_split(prefix, data_dir, source_lang="en", target_lang="de"):
    return open_split(f"text:{prefix}", "data.train", source_lang, target_lang, str(data_dir))


@pytest.mark.parametrize("corpus, split, count", [
    ("multi30k-en-de", "train", 29_000), ("multi30k-en-de", "valid", 1_014),
    ("multi30k-en-de", "test_2016_flickr", 1_000), ("multi30k-en-de", "test_2018_flickr", 1_071),
    ("wmt14-en-de", "valid", 3_000), ("wmt14-en-de", "test", 3_003), ("wmt17-en-de", "test", 3_004),
])
def test_bundled_corpora_have_their_documented_sizes(corpus, split, count, data_dir):
    source = text_split(os.path.join(DATA, corpus, split), data_dir)
    assert len(source) + source.skipped_empty == count


def test_records_keep_file_order_and_direction_follows_the_languages(data_dir):
    prefix = os.path.join(DATA, "multi30k-en-de", "valid")
    en_de, de_en = text_split(prefix, data_dir), text_split(prefix, data_dir, "de", "en")
    lines = list(read_lines(prefix + ".en"))
    assert [en_de[i]["source"] for i in range(len(en_de))] == lines
    assert [de_en[i]["target"] for i in range(len(de_en))] == lines
    assert en_de.fingerprint != de_en.fingerprint


def test_changed_files_are_prepared_again(tmp_path):
    write(tmp_path / "c.en", b"one\n")
    write(tmp_path / "c.de", b"eins\n")
    assert text_split(tmp_path / "c", tmp_path)[0] == {"source": "one", "target": "eins"}
    write(tmp_path / "c.de", b"uno\n")
    assert text_split(tmp_path / "c", tmp_path)[0] == {"source": "one", "target": "uno"}


def write(path, text: bytes):
    path.write_bytes(text)
    return str(path)


def test_pairs_empty_on_one_side_are_skipped_and_counted(tmp_path):
    write(tmp_path / "c.en", b"one\n\nthree\n  \nfive\n")
    write(tmp_path / "c.de", b"eins\nzwei\n\nvier\nfunf\n")
    source = text_split(tmp_path / "c", tmp_path)
    assert [source[i] for i in range(len(source))] == [
        {"source": "one", "target": "eins"}, {"source": "five", "target": "funf"}]
    assert source.skipped_empty == 3


def test_line_counts_that_differ_name_both_files(tmp_path):
    write(tmp_path / "c.en", b"one\ntwo\n")
    write(tmp_path / "c.de", b"eins\n")
    with pytest.raises(ValueError, match=r"c\.en has 2 lines but .*c\.de has 1"):
        text_split(tmp_path / "c", tmp_path)


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = write(tmp_path / "bad.de", b"gut\nnoch gut\nschlecht \xff hier\n")
    with pytest.raises(ValueError, match=r"bad\.de:3: invalid UTF-8 \(byte 0xff at column 10\)"):
        list(read_lines(path))
    write(tmp_path / "bad.en", b"good\nstill good\nbad here\n")
    with pytest.raises(ValueError, match=r"bad\.de:3: invalid UTF-8"):
        text_split(tmp_path / "bad", tmp_path)


def test_missing_and_empty_corpora_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.en"):
        text_split(tmp_path / "nothing", tmp_path)
    write(tmp_path / "e.en", b"")
    write(tmp_path / "e.de", b"")
    with pytest.raises(ValueError, match="no sentence pairs"):
        text_split(tmp_path / "e", tmp_path)


@pytest.mark.parametrize("spec, message", [
    ("tfds:no_such_dataset:train", "config.data.train: TFDS has no dataset 'no_such_dataset'"),
    ("tfds:wmt14_translate/xx-en:train", "config.data.train: .*xx-en"),
    ("tfds:wmt14_translate/fr-en:train", r"languages \('en', 'fr'\), not \['de'\]"),
    ("tfds:mnist:train", "'mnist' is not a translation dataset"),
    ("wmt14", "config.data.train='wmt14' is not a split spec"),
    ("tfds:wmt14_translate/de-en", "is not a split spec"),
    ("tfds:wmt14_translate/de-en:train", "is not prepared .* tfx.data.prepare"),
])
def test_tfds_names_and_language_pairs_are_checked_without_downloading(spec, message, tmp_path):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        open_split(spec, "data.train", "en", "de", str(tmp_path), prepare=False)


def test_a_config_without_a_train_split_is_refused(tiny_config):
    with pytest.raises(ValueError, match="config.data.train is empty"):
        open_splits(tiny_config())


def test_records_are_read_one_by_one_across_files_and_their_skips(tmp_path):
    """Two array_record files, the second read from its third record on (a sliced split's
    file instructions): record i of the split is the file's, singly and in a batch."""
    files, written = [], []
    for number, count in enumerate((5, 7)):
        path = str(tmp_path / f"part-{number}.array_record")
        writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
        records = [f"file {number} record {i}".encode() for i in range(count)]
        for record in records:
            writer.write(record)
        writer.close()
        files.append(path)
        written.append(records)
    instructions = [FileInstruction(filename=files[0], skip=0, take=5, examples_in_shard=5),
                    FileInstruction(filename=files[1], skip=2, take=5, examples_in_shard=7)]
    records = sources.SerializedRecords(ArrayRecordDataSource(instructions), instructions)
    expected = written[0] + written[1][2:]
    assert [records[i] for i in range(10)] == expected
    assert records.read([9, 0, 6]) == [expected[9], expected[0], expected[6]]
    with pytest.raises(IndexError):
        records[10]


def test_a_pair_read_alone_or_in_a_batch_is_what_tfds_decodes(tmp_path):
    write(tmp_path / "c.en", "a b\nc\nd é f\n".encode())
    write(tmp_path / "c.de", "A B\nC\nD É F\n".encode())
    split = text_split(tmp_path / "c", tmp_path)
    decoded = [{side: split.records[i][lang].decode() for side, lang in (("source", "en"), ("target", "de"))}
               for i in range(len(split))]
    assert [split[i] for i in range(len(split))] == decoded == split.read([0, 1, 2])


def test_a_corpus_past_the_writers_memory_buffer_spills_to_disk_without_tensorflow(tmp_path, monkeypatch):
    # TFDS spills a split bigger than its buffer (1 GB) through tf.io.gfile; TensorFlow is not
    # installed, so without tfx's stand-in the spill fails. A 1 KB buffer forces it here.
    from tensorflow_datasets.core import shuffle
    monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 1 << 10)
    english = [f"sentence number {i}" for i in range(300)]
    write(tmp_path / "c.en", "\n".join(english).encode() + b"\n")
    write(tmp_path / "c.de", "\n".join(f"Satz Nummer {i}" for i in range(300)).encode() + b"\n")
    with pytest.raises(ImportError, match="tensorflow"), sources.quiet_tfds():
        sources.ParallelTextBuilder(
            source_path=str(tmp_path / "c.en"), target_path=str(tmp_path / "c.de"), languages=("en", "de"),
            data_dir=str(tmp_path / "plain"), file_format="array_record").download_and_prepare(file_format="array_record")
    lazy_tensorflow = shuffle.tf
    source = text_split(tmp_path / "c", tmp_path / "data")
    assert [source[i]["source"] for i in range(len(source))] == english
    assert source[299]["target"] == "Satz Nummer 299"
    assert shuffle.tf is lazy_tensorflow and shuffle.MAX_MEM_BUFFER_SIZE == 1 << 10  # restored


def test_ordered_keys_keep_the_order_and_spread_over_the_writers_buckets():
    from tensorflow_datasets.core import shuffle
    total = 123_457
    keys = [sources.ordered_key(i, total) for i in range(total)]
    buckets = [shuffle.get_bucket_number(key, shuffle.BUCKETS_NUMBER) for key in keys]
    assert keys == sorted(set(keys)) and keys[-1] < 2**128
    assert buckets == sorted(buckets) and max(collections.Counter(buckets).values()) <= total // 1000 + 1
