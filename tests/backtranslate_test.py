"""Back-translation of German Multi30k lines by a de->en run: the corpus is the original lines and
the run's translations, a killed run resumes to the same bytes, the noise has its rates and
bounds, and changed settings and bad input are refused."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tfx.core import config as config_lib
from tfx.data import corpora, pipeline
from tfx.data.sources import open_split, read_lines
from tfx.infer import backtranslate as bt
from tfx.infer import trained as trained_lib
from tfx.infer.translate import Translator
from tfx.train import trainer
from tfx.train.metrics import read_metrics

from interrupted import Killed, count_calls
from runs import ROOT, tiny_multi30k

GERMAN = os.path.join(ROOT, "data", "multi30k-en-de", "train.de")
BLANK_AT = (3, 41, 42, 97)  # blank lines put into the monolingual text (at these 0-based lines).
LINES = 100  # of Multi30k's German train text, and the 4 blank ones: 104 lines.
CHUNK = 32  # chunks of 32, 32, 32 and 8 lines.
CHUNKS = 4
# Outputs of exactly max_length tokens at most, whatever else is in their batch.
DECODE = dict(beam_size=3, max_length=8, max_length_offset=50)


@pytest.fixture(scope="module")
def reverse(trained):
    """(config, workdir): a de->en run, cheaply: the session's tiny en->de run (conftest.py;
    one SentencePiece vocabulary for both languages) with its languages swapped, so its
    translations are poor but as deterministic as any run's."""
    config, workdir = trained
    config = config.copy_and_resolve_references()
    config.data.update(source_lang="de", target_lang="en")
    config.decode.update(DECODE)
    return config, workdir


@pytest.fixture(scope="module")
def translators(reverse) -> dict[str, Translator]:
    """The reverse run's Translator for each method (noised decodes as beam does)."""
    config, workdir = reverse
    beam = Translator(trained_lib.load(bt.method_config(config, "beam"), workdir))
    sample = Translator(trained_lib.load(bt.method_config(config, "sample"), workdir))
    return {"beam": beam, "noised": beam, "sample": sample}


@pytest.fixture(scope="module")
def mono(translators, tmp_path_factory) -> tuple[list[str], list[str]]:
    """(the paths of two German files, their lines): the first LINES Multi30k sentences of 17 to
    32 tokens (every batch one padded shape: one compilation per method), with blank lines at
    BLANK_AT, split after line 60."""
    directory = tmp_path_factory.mktemp("mono")
    encode = translators["beam"].model.tokenizer.encode_source
    lines = [line for line in read_lines(GERMAN) if 16 < len(encode(line)) <= 32][:LINES]
    for index in BLANK_AT:
        lines.insert(index, " " if index % 2 else "")
    paths = [str(directory / "part1.de"), str(directory / "part2.de")]
    for path, part in zip(paths, (lines[:60], lines[60:])):
        with open(path, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in part))
    return paths, lines


def run(translators, reverse, mono, output, method="beam", chunk_size=CHUNK) -> dict:
    return bt.backtranslate(translators[method], reverse[1], bt.open_monolingual(mono[0]), str(output),
                            method, chunk_size)


def corpus_lines(output) -> tuple[list[str], list[str]]:
    """(German, English) lines of the corpus in `output`."""
    return tuple(list(read_lines(os.path.join(output, f"train.{lang}"))) for lang in ("de", "en"))


def corpus_bytes(output) -> dict[str, bytes]:
    return {lang: open(os.path.join(output, f"train.{lang}"), "rb").read() for lang in ("de", "en")}


@pytest.fixture(scope="module")
def uninterrupted(translators, reverse, mono, tmp_path_factory) -> dict[str, tuple[str, dict]]:
    """{method: (output, report)} of back-translating `mono` without interruption."""
    done = {}
    for method in ("beam", "sample"):
        output = str(tmp_path_factory.mktemp(method))
        done[method] = output, run(translators, reverse, mono, output, method)
    return done


def test_the_corpus_is_the_originals_and_their_translations(translators, reverse, mono, uninterrupted):
    output, report = uninterrupted["beam"]
    german = [line for line in mono[1] if line.strip()]
    results, _ = translators["beam"].translate(german)
    assert corpus_lines(output) == (german, [r[0].text for r in results])
    assert report["sentences"] == report["lines"] == LINES and report["skipped_empty"] == len(BLANK_AT)
    assert report["files"] == [os.path.join(output, "train.de"), os.path.join(output, "train.en")]
    with open(os.path.join(output, bt.REPORT_FILE)) as f:
        assert json.load(f) == report
    assert not os.path.exists(os.path.join(output, bt.CHUNKS))
    # What a forward (en->de) config reads as text:OUTPUT/train: synthetic English, original German.
    split = open_split(f"text:{output}/train", "data.train", "en", "de", reverse[0].data.data_dir)
    assert [split[i]["target"] for i in range(len(split))] == german


def test_sampling_draws_other_translations_than_beam_search(uninterrupted):
    beam, sample = (corpus_lines(uninterrupted[method][0]) for method in ("beam", "sample"))
    assert sample[0] == beam[0] and sample[1] != beam[1]
    assert uninterrupted["sample"][1]["decode"]["strategy"] == "sample"


@pytest.mark.parametrize("method", ["beam", "sample"])
def test_an_interrupted_run_resumes_to_the_same_bytes(translators, reverse, mono, uninterrupted,
                                                      method, tmp_path, monkeypatch):
    count_calls(monkeypatch, translators[method], crash_at=3)
    with pytest.raises(Killed):
        run(translators, reverse, mono, tmp_path, method)
    chunks = tmp_path / bt.CHUNKS
    assert sorted(os.listdir(chunks)) == ["train-000000.json", "train-000001.json"]
    (chunks / "train-000002.json.tmp").write_text('{"sources": ["half a ch')  # a kill while saving.
    calls = count_calls(monkeypatch, translators[method])
    report = run(translators, reverse, mono, tmp_path, method)
    assert len(calls) == CHUNKS - 2
    assert corpus_bytes(tmp_path) == corpus_bytes(uninterrupted[method][0])
    assert report["sentences"] == LINES and not chunks.exists()


def test_identical_chunks_draw_different_samples(translators, reverse, mono, tmp_path):
    """Translator seeds each call's batches alike; back-translation folds each chunk's first
    line into the key, so the same lines sampled in another chunk come out otherwise."""
    lines = [line for line in mono[1] if line.strip()][:CHUNK]
    (tmp_path / "twice.de").write_text("".join(line + "\n" for line in lines * 2))
    bt.backtranslate(translators["sample"], reverse[1], bt.open_monolingual([str(tmp_path / "twice.de")]),
                     str(tmp_path / "out"), "sample", CHUNK)
    german, english = corpus_lines(tmp_path / "out")
    assert german == lines * 2 and english[:CHUNK] != english[CHUNK:]


def test_noised_is_the_beam_translation_with_each_lines_noise(translators, reverse, mono, uninterrupted,
                                                              tmp_path):
    report = run(translators, reverse, mono, tmp_path, "noised")
    german, english = corpus_lines(uninterrupted["beam"][0])
    indices = [i for i, line in enumerate(mono[1]) if line.strip()]
    noised = [bt.noise(text, bt.noise_rng(reverse[0].seed, i)) for text, i in zip(english, indices)]
    assert corpus_lines(tmp_path) == (german, noised) and noised != english
    assert report["method"] == "noised" and report["sentences"] == LINES


def noised_words(sentences: int, words: int, **rates) -> tuple[list[list[str]], list[list[str]]]:
    """(inputs, outputs) of `noise` on `sentences` sentences of `words` distinct words each."""
    inputs = [[f"w{i}.{j}" for j in range(words)] for i in range(sentences)]
    return inputs, [bt.noise(" ".join(words), bt.noise_rng(7, i), **rates).split()
                    for i, words in enumerate(inputs)]


def test_noise_deletes_and_blanks_words_at_their_rates():
    """1000 sentences of 20 words: a rate's count is binomial; 0.01 is over 4 standard deviations."""
    inputs, outputs = noised_words(1000, 20)
    total, out = sum(map(len, inputs)), sum(map(len, outputs))
    blanks = sum(word == bt.FILLER for words in outputs for word in words)
    assert abs((total - out) / total - 0.1) < 0.01
    assert abs(blanks / out - 0.1) < 0.01
    for words, noised in zip(inputs, outputs):
        assert set(noised) - {bt.FILLER} <= set(words)


def test_noise_moves_no_word_three_places():
    inputs, outputs = noised_words(500, 20, delete=0.0, blank=0.0)
    moves = [position - int(word.split(".")[1]) for words in outputs for position, word in enumerate(words)]
    assert max(map(abs, moves)) == 2  # i + U(0, 3): words 3 or more apart never cross.
    assert np.mean(np.array(moves) != 0) > 0.3
    inputs, outputs = noised_words(500, 20)  # with deletions and blanks: the same pairwise rule.
    for noised in outputs:
        order = [int(word.split(".")[1]) for word in noised if word != bt.FILLER]
        assert all(b > a for i, a in enumerate(order) for b in order[i + 1:] if abs(b - a) >= 3)


def test_noise_is_a_function_of_the_seed_and_the_line():
    text = " ".join(f"w{j}" for j in range(30))
    once = bt.noise(text, bt.noise_rng(0, 5))
    assert bt.noise(text, bt.noise_rng(0, 5)) == once
    assert len({once, bt.noise(text, bt.noise_rng(0, 6)), bt.noise(text, bt.noise_rng(1, 5))}) == 3
    assert bt.noise("  ", bt.noise_rng(0, 0)) == ""
    assert bt.noise("alone", bt.noise_rng(0, 0), delete=1.0, blank=0.0) == "alone"  # one is kept.


def test_sample_means_unrestricted_sampling_unless_a_key_is_given(reverse):
    config = reverse[0].copy_and_resolve_references()
    config.decode.update(top_k=10, temperature=0.7)
    sample = bt.method_config(config, "sample")
    assert (sample.decode.strategy, sample.decode.top_k, sample.decode.temperature) == ("sample", 0, 1.0)
    restricted = bt.method_config(config, "sample", given={"decode.top_k": 10})
    assert (restricted.decode.top_k, restricted.decode.temperature) == (10, 1.0)
    noised = bt.method_config(sample, "noised")
    assert noised.decode.strategy == "beam" and noised.decode.beam_size == DECODE["beam_size"]
    assert config.decode.strategy == "greedy" and config.decode.top_k == 10  # (a copy)


def test_a_rerun_with_other_settings_is_refused(translators, reverse, mono, uninterrupted, tmp_path):
    output, _ = uninterrupted["beam"]
    with open(os.path.join(output, bt.STATE_FILE)) as f:
        state = f.read()
    settings = json.loads(state)["settings"]
    assert settings["--method"] == "beam" and settings["config.decode.beam_size"] == DECODE["beam_size"]
    with pytest.raises(ValueError, match=r"^--method: .* made with 'beam', this run has 'noised'"):
        run(translators, reverse, mono, output, "noised")
    with pytest.raises(ValueError, match=r"^--chunk_size: .* made with 32, this run has 40"):
        run(translators, reverse, mono, output, chunk_size=40)
    config = bt.method_config(reverse[0], "beam")
    config.decode.beam_size = 4
    wider = {"beam": Translator(trained_lib.load(config, reverse[1]))}
    with pytest.raises(ValueError, match=r"^config.decode.beam_size: .* made with 3, this run has 4"):
        run(wider, reverse, mono, output)
    changed = (str(tmp_path / "part1.de"), mono[0][1])
    (tmp_path / "part1.de").write_text("".join(line + "\n" for line in mono[1][:59]))
    with pytest.raises(ValueError, match=r"^--input \(sha256\): .* made with \['[0-9a-f]{16}', "):
        run(translators, reverse, (changed, mono[1]), output)
    with open(os.path.join(output, bt.STATE_FILE)) as f:
        assert f.read() == state
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("not a back-translation")
    with pytest.raises(ValueError, match=r"^--output=.* is not empty and has no state.json of a back-tr"):
        run(translators, reverse, mono, tmp_path / "out")


def test_bad_input_is_an_error_naming_the_file_and_line(mono, tmp_path):
    missing = str(tmp_path / "missing.de")
    with pytest.raises(FileNotFoundError, match=rf"^--input={missing} does not exist\.$"):
        bt.open_monolingual([mono[0][0], missing])
    (tmp_path / "bad.de").write_bytes("Ein Hund.\nZwei Hunde.\nDrei H\xfcnde.\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"bad\.de:3: invalid UTF-8 \(byte 0xfc at column 7\)"):
        bt.open_monolingual([str(tmp_path / "bad.de")])
    (tmp_path / "blank.de").write_text("\n \n")
    with pytest.raises(ValueError, match=r"blank\.de: no text to translate \(only blank lines\)"):
        bt.open_monolingual([str(tmp_path / "blank.de")])
    text = bt.open_monolingual(mono[0])
    assert len(text) == LINES + len(BLANK_AT) and text.where(60) == f"{mono[0][1]}:1"
    assert text.where(59) == f"{mono[0][0]}:60"


@pytest.mark.parametrize("method, chunk_size, given, message", [
    ("greedy", CHUNK, {}, r"^--method='greedy': use one of beam, sample, noised\.$"),
    ("beam", 0, {}, r"^--chunk_size=0 must be positive\.$"),
    ("beam", CHUNK, {"decode.strategy": "sample"},
     r"^--config.decode.strategy=sample: --method=beam decodes with beam; leave it out\.$"),
])
def test_bad_arguments_are_refused_naming_the_flag(reverse, method, chunk_size, given, message):
    config = reverse[0].copy_and_resolve_references()
    if given:
        config.decode.strategy = "sample"
    with pytest.raises(ValueError, match=message):
        bt.check_arguments(bt.method_config(config, method, given), method, chunk_size)


def test_the_command_line_writes_the_same_corpus(reverse, mono, uninterrupted, tmp_path):
    _, workdir = reverse
    overrides = {"data.source_lang": "de", "data.target_lang": "en",
                 **{f"decode.{key}": value for key, value in DECODE.items()}}
    done = subprocess.run(
        [sys.executable, "-m", "tfx.infer.backtranslate", f"--workdir={workdir}",
         *(f"--input={path}" for path in mono[0]), f"--output={tmp_path}", f"--chunk_size={CHUNK}",
         *(f"--config.{key}={value}" for key, value in overrides.items())],
        capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert corpus_bytes(tmp_path) == corpus_bytes(uninterrupted["beam"][0])
    assert f"{LINES} sentences" in done.stdout and f"{len(BLANK_AT)} blank lines skipped" in done.stdout


def test_a_forward_run_trains_on_the_tagged_mix_of_its_data_and_the_back_translation(
        translators, reverse, mono, data_dir, tmp_path):
    """The recipe of docs/data.md in small: back-translate German text with the reverse run,
    then train en->de on Multi30k mixed 2:1 with it, its sources tagged <BT>."""
    run(translators, reverse, mono, tmp_path / "bt")
    config = tiny_multi30k(data_dir, num_train_steps=6, checkpoint_every_steps=6)
    config.data.corpora = {"multi30k": dict(spec=config.data.train, weight=2.0),
                           "bt": dict(spec=f"text:{tmp_path}/bt/train", weight=1.0, tag="<BT>")}
    config.data.train = "multi30k,bt"
    config = config_lib.validate(config)
    trainer.train(config, str(tmp_path / "forward"))
    tokenizer = trained_lib.tokenizer_for(config, str(tmp_path / "forward"))
    bt_id = tokenizer.piece_id("<BT>")
    assert bt_id is not None
    mix = pipeline.mixed_shard(config, corpora.open_split(config, "train"), tokenizer, index=0, shards=1)
    tagged = [mix[i]["inputs"][0] == bt_id for i in range(300)]
    assert sum(tagged) == 100
    german = set(read_lines(os.path.join(tmp_path, "bt", "train.de")))
    assert all((tokenizer.decode(mix[i]["targets"]) in german) == tagged[i] for i in range(300))
    losses = [row["loss"] for row in read_metrics(str(tmp_path / "forward")) if "loss" in row]
    assert len(losses) == 6 and np.isfinite(losses).all()
