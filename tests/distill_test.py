import dataclasses
import json
import os
import re

import jax
import numpy as np
import pytest
import sacrebleu

from tfx.compress import distill
from tfx.data.sources import open_split, read_lines
from tfx.infer import trained as trained_lib
from tfx.infer.translate import NonFiniteScoresError, Translator

from interrupted import Killed, count_calls
from runs import ROOT

TEST = os.path.join(ROOT, "data", "multi30k-en-de", "test_2016_flickr")
# Outputs of exactly max_length tokens at most, whatever else is in their batch.
DECODE = dict(strategy="beam", beam_size=3, max_length=8, max_length_offset=50)
CHUNK = 5  # the 13 train pairs make chunks of 5, 5 and 3.


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Prefix of a small text split: 14 Multi30k test pairs, one of them with an empty source
    (the split has 13 pairs); PREFIX-eval is 4 more pairs."""
    directory = tmp_path_factory.mktemp("corpus")
    lines = {lang: list(read_lines(f"{TEST}.{lang}")) for lang in ("en", "de")}
    lines["en"][6] = " "
    for name, (start, stop) in (("train", (0, 14)), ("train-eval", (20, 24))):
        for lang, text in lines.items():
            (directory / f"{name}.{lang}").write_text("".join(t + "\n" for t in text[start:stop]))
    return str(directory / "train")


@pytest.fixture(scope="module")
def teacher(trained, corpus):
    """(Translator, workdir): the session's tiny run (conftest.py) with beam search, whose
    config trains on the small split of `corpus`."""
    config, workdir = trained
    config = config.copy_and_resolve_references()
    config.decode.update(DECODE)
    config.data.update(train=f"text:{corpus}", eval=f"text:{corpus}-eval")
    return Translator(trained_lib.load(config, workdir)), workdir


def pairs(translator: Translator, split: str) -> tuple[list[str], list[str]]:
    """(sources, references) of the teacher config's `split`, as the split reader gives them."""
    data = translator.model.config.data
    source = open_split(data[split], f"data.{split}", data.source_lang, data.target_lang, data.data_dir)
    records = [source[i] for i in range(len(source))]
    return [r["source"] for r in records], [r["target"] for r in records]


def corpus_lines(output: str, split: str) -> tuple[list[str], list[str]]:
    return tuple(list(read_lines(os.path.join(output, f"{split}.{lang}"))) for lang in ("en", "de"))


@pytest.fixture(scope="module")
def distilled(teacher, tmp_path_factory):
    """(output, report) of distilling the train and eval splits in chunks of CHUNK."""
    translator, workdir = teacher
    output = str(tmp_path_factory.mktemp("distilled"))
    return output, distill.distill(translator, workdir, output, ("train", "eval"), chunk_size=CHUNK)


def test_the_corpus_is_the_teachers_translations_in_source_order(teacher, distilled):
    translator, _ = teacher
    output, report = distilled
    for split, size in (("train", 13), ("eval", 4)):
        sources, references = pairs(translator, split)
        assert len(sources) == report["splits"][split]["sentences"] == size
        results, _ = translator.translate(sources)
        assert corpus_lines(output, split) == (sources, [r[0].text for r in results])
        scores = report["splits"][split]["teacher_scores"]
        expected = sacrebleu.corpus_bleu([r[0].text for r in results], [references]).score
        assert scores["bleu"]["score"] == pytest.approx(expected)
    train = report["splits"]["train"]
    assert train["lines"] == 13 and train["skipped_empty"] == 1 and train["truncated"] == 0
    with open(os.path.join(output, distill.REPORT_FILE)) as f:
        assert json.load(f) == report
    assert not os.path.exists(os.path.join(output, distill.CHUNKS))


def test_the_corpus_opens_as_a_text_split(teacher, distilled):
    translator, _ = teacher
    output, _ = distilled
    data = translator.model.config.data
    split = open_split(f"text:{output}/train", "data.train", "en", "de", data.data_dir)
    sources, targets = corpus_lines(output, "train")
    assert [split[i] for i in range(len(split))] == [
        {"source": s, "target": t} for s, t in zip(sources, targets)]


def test_teacher_plus_original_pairs_each_source_with_both_targets(teacher, distilled, tmp_path):
    translator, workdir = teacher
    distill.distill(translator, workdir, str(tmp_path), targets="teacher+original", chunk_size=CHUNK)
    sources, references = pairs(translator, "train")
    english, german = corpus_lines(str(tmp_path), "train")
    assert english == [s for s in sources for _ in range(2)]
    assert german[0::2] == corpus_lines(distilled[0], "train")[1] and german[1::2] == references


def test_an_interrupted_run_resumes_to_the_same_bytes(teacher, distilled, tmp_path, monkeypatch):
    translator, workdir = teacher
    output, report = distilled
    resumed = str(tmp_path)
    count_calls(monkeypatch, translator, crash_at=2)
    with pytest.raises(Killed):
        distill.distill(translator, workdir, resumed, ("train", "eval"), chunk_size=CHUNK)
    chunks = os.path.join(resumed, distill.CHUNKS)
    assert os.listdir(chunks) == ["train-000000.json"] and not os.path.exists(f"{resumed}/train.en")
    with open(os.path.join(chunks, "train-000001.json.tmp"), "w") as f:
        f.write('{"sources": ["half a ch')  # as a kill while saving leaves it.

    calls = count_calls(monkeypatch, translator)
    again = distill.distill(translator, workdir, resumed, ("train", "eval"), chunk_size=CHUNK)
    assert len(calls) == 3  # train's chunks 1 and 2, then eval's one.
    for name in ("train.en", "train.de", "eval.en", "eval.de"):
        with open(os.path.join(output, name), "rb") as a, open(os.path.join(resumed, name), "rb") as b:
            assert a.read() == b.read(), name
    assert not os.path.exists(chunks)
    for split, r in report["splits"].items():
        for key in ("sentences", "lines", "skipped_empty", "teacher_scores"):
            assert again["splits"][split][key] == r[key]

    calls = count_calls(monkeypatch, translator)  # a finished run has nothing left to do.
    distill.distill(translator, workdir, resumed, ("train", "eval"), chunk_size=CHUNK)
    assert not calls


def test_best_chrf_keeps_the_hypothesis_closest_to_the_reference(teacher, tmp_path):
    translator, workdir = teacher
    report = distill.distill(translator, workdir, str(tmp_path), targets="best-chrf", chunk_size=CHUNK)
    sources, references = pairs(translator, "train")
    nbest, _ = translator.translate(sources, nbest=DECODE["beam_size"])
    expected = [hypotheses[int(np.argmax([sacrebleu.sentence_chrf(h.text, [reference]).score
                                          for h in hypotheses]))].text
                for hypotheses, reference in zip(nbest, references)]
    assert corpus_lines(str(tmp_path), "train") == (sources, expected)
    assert expected != [hypotheses[0].text for hypotheses in nbest]  # the choice matters here.
    scores = report["splits"]["train"]
    assert scores["selected_scores"]["chrf"]["score"] > scores["teacher_scores"]["chrf"]["score"]


def test_a_rerun_with_other_settings_is_refused(teacher, distilled, tmp_path):
    translator, workdir = teacher
    output, _ = distilled
    splits = ("train", "eval")
    with open(os.path.join(output, distill.STATE_FILE)) as f:
        state = f.read()
    with pytest.raises(ValueError, match=r"^--targets: .* with 'teacher', this run has 'best-chrf'"):
        distill.distill(translator, workdir, output, splits, "best-chrf", chunk_size=CHUNK)
    with pytest.raises(ValueError, match=r"^--chunk_size: .* made with 5, this run has 4"):
        distill.distill(translator, workdir, output, splits, chunk_size=4)
    config = translator.model.config.copy_and_resolve_references()
    older = Translator(trained_lib.load(config, workdir, "4"))
    with pytest.raises(ValueError, match=r"^--checkpoint: .* made with 'step6', this run has 'step4'"):
        distill.distill(older, workdir, output, splits, chunk_size=CHUNK)
    config.decode.beam_size = 4
    wider = Translator(trained_lib.load(config, workdir))
    with pytest.raises(ValueError, match=r"^config.decode.beam_size: .* made with 3, this run has 4"):
        distill.distill(wider, workdir, output, splits, chunk_size=CHUNK)
    with open(os.path.join(output, distill.STATE_FILE)) as f:
        assert f.read() == state
    (tmp_path / "notes.txt").write_text("not a distillation")
    with pytest.raises(ValueError, match=r"^--output=.* is not empty and has no state.json"):
        distill.distill(translator, workdir, str(tmp_path), chunk_size=CHUNK)


@pytest.mark.parametrize("overrides, arguments, message", [
    ({}, dict(splits=("test",)), r"--splits=test: name each of train, eval"),
    ({}, dict(targets="best"), r"--targets='best': use one of"),
    ({}, dict(chunk_size=0), r"--chunk_size=0 must be positive"),
    ({"decode.strategy": "greedy"}, dict(targets="best-chrf"),
     r"config.decode.strategy='greedy'; use beam"),
    ({"data.eval": ""}, dict(splits=("train", "eval")), r"config.data.eval is empty"),
])
def test_bad_arguments_are_refused_naming_the_flag(teacher, overrides, arguments, message):
    config = teacher[0].model.config.copy_and_resolve_references()
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    arguments = dict(dict(splits=("train",), targets="teacher", chunk_size=CHUNK), **arguments)
    with pytest.raises(ValueError, match=message):
        distill.check_arguments(config, **arguments)


def test_a_pair_without_a_finite_hypothesis_is_an_error_naming_it(teacher, tmp_path):
    """NaN parameters: the first pair of the first chunk (one batch) has no finite hypothesis."""
    translator, workdir = teacher
    model = translator.model
    nan = Translator(dataclasses.replace(model, params=jax.tree.map(lambda x: x * np.nan, model.params)))
    first = pairs(translator, "train")[0][0]
    for targets in ("teacher", "best-chrf"):
        with pytest.raises(NonFiniteScoresError, match=(
                r"^config.data.train pair 0 \(counted from 0; source '([^']*)'\): all 3 hypotheses "
                r"scored a non-finite log-probability .*NaN.* earlier --checkpoint\.$")) as error:
            distill.distill(nan, workdir, str(tmp_path / targets), targets=targets, chunk_size=CHUNK)
        assert error.value.index == 0
        assert first.startswith(re.search(r"source '([^']*?)(\.\.\.)?'", str(error.value))[1])
