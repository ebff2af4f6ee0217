"""The resumable corpus machinery without a model: chunks made by a stand-in for translation."""
import json
import os

import pytest

from tfx.infer import corpus

SETTINGS = {"--workdir": "/runs/x", "--method": "beam", "config.decode.beam_size": 4}


def upper_chunk(records: list[str], first: int) -> dict:
    """A chunk as translated_chunk starts it, the 'translation' of a line its upper case."""
    kept = [r for r in records if r.strip()]
    return {"sources": kept, "translations": [r.upper() for r in kept], "first": first,
            "skipped_empty": len(records) - len(kept), "truncated": 0, "tokens": 3 * len(kept),
            "seconds": 0.5}


def chunked(lines: list[str], size: int, read: list[int]):
    """`lines`, `size` at a time, each chunk a generator that records the lines it reads."""
    def chunk(start):
        for i in range(start, min(start + size, len(lines))):
            read.append(i)
            yield lines[i]
    return (chunk(start) for start in range(0, len(lines), size))


def pairs(chunk: dict):
    return zip(chunk["sources"], chunk["translations"])


LINES = ["one", "two", " ", "three\rand", "four", "five", "six"]


def test_a_rerun_reads_and_makes_only_the_chunks_not_saved(tmp_path):
    output, made, read = str(tmp_path), [], []

    def make(records, first):
        made.append(first)
        if len(made) == 3:
            raise KeyboardInterrupt  # killed while translating the third chunk.
        return upper_chunk(records, first)

    corpus_files = [str(tmp_path / "c.a"), str(tmp_path / "c.b")]
    with pytest.raises(KeyboardInterrupt):
        corpus.write(output, "c", corpus_files, chunked(LINES, 3, read), make, pairs, 3)
    assert made == [0, 3, 6] and not os.path.exists(corpus_files[0])
    made.clear()
    read.clear()
    report = corpus.write(output, "c", corpus_files, chunked(LINES, 3, read), make, pairs, 3)
    assert made == [6] and read == [6]  # the saved chunks' records are not read.
    with open(corpus_files[0]) as a, open(corpus_files[1]) as b:
        assert a.read() == "one\ntwo\nthree and\nfour\nfive\nsix\n"
        assert b.read() == "ONE\nTWO\nTHREE AND\nFOUR\nFIVE\nSIX\n"
    assert [json.load(open(p))["first"] for p in sorted((tmp_path / "chunks").iterdir())] == [0, 3, 6]
    assert report == {"files": corpus_files, "sentences": 6, "lines": 6, "skipped_empty": 1,
                      "truncated": 0, "empty_translations": 0, "seconds": 1.5,
                      "sentences_per_sec": 4.0, "tokens_per_sec": 12.0}
    corpus.remove_chunks(output, "c")
    assert not (tmp_path / "chunks").exists()


def test_a_state_refuses_other_settings_and_cleans_what_a_kill_left(tmp_path):
    output = str(tmp_path / "out")
    state = corpus.open_state(output, SETTINGS, "a test corpus")
    assert state == {"settings": SETTINGS, "done": {}}
    (tmp_path / "out" / "chunks").mkdir()
    for leftover in ("state.json.1a2b.tmp", "chunks/c-000001.json.3c4d.tmp"):
        (tmp_path / "out" / leftover).write_text("half")
    assert corpus.open_state(output, SETTINGS, "a test corpus") == state
    assert sorted(os.listdir(output)) == ["chunks", "state.json"] and not os.listdir(f"{output}/chunks")
    with pytest.raises(ValueError, match=r"^config.decode.beam_size: .* made with 4, this run has 5; rerun"):
        corpus.open_state(output, {**SETTINGS, "config.decode.beam_size": 5}, "a test corpus")
    with pytest.raises(ValueError, match=r"^--targets: .* made without --targets, so not as a distillation"):
        corpus.open_state(output, {**SETTINGS, "--targets": "teacher"}, "a distillation")
    added = corpus.open_state(output, {**SETTINGS, "config.data.eval (content)": "x"}, "a test corpus")
    assert added["settings"]["config.data.eval (content)"] == "x"  # a split added later.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"^--output=.*other is not empty and has no state.json of a test"):
        corpus.open_state(str(tmp_path / "other"), SETTINGS, "a test corpus")
