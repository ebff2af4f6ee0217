"""One model for en->de and de->en (configs/multi30k.py:multilingual): the language token on the
source chooses the output language, and eval.py scores each direction on its own."""
import os
import subprocess
import sys

from tfx.data.corpora import language_token
from tfx.data.sources import read_lines
from tfx.infer import evaluate, trained
from tfx.infer.translate import Translator

from runs import MULTILINGUAL_SENTENCES as SENTENCES
from runs import MULTILINGUAL_TEST as TEST
from runs import ROOT


def test_the_vocabulary_holds_each_language_token_whole(multilingual):
    config, workdir = multilingual
    tokenizer = trained.tokenizer_for(config, workdir)
    assert tokenizer.piece_id("<2de>") is not None and tokenizer.piece_id("<2en>") is not None
    assert tokenizer.encode_source("A man.", ["<2en>"])[0] == tokenizer.piece_id("<2en>")


def test_the_language_token_chooses_the_output_language(multilingual):
    """The same sources asked for German or for English give different outputs, more of which
    start like sentences of the language asked for: with a first word that starts only sentences
    of that language in test2016 ("Ein", "Zwei" against "A", "Two"). Translations (English asked
    for German, German for English) nearly all do. Copies were never trained, so of them the test
    asks only that the token moves their first words towards its language."""
    config, workdir = multilingual
    sentences = {lang: list(read_lines(f"{TEST}.{lang}")) for lang in ("en", "de")}
    first_words = {lang: {line.split()[0] for line in lines} for lang, lines in sentences.items()}
    only = {"en": first_words["en"] - first_words["de"], "de": first_words["de"] - first_words["en"]}
    outputs, starts = {}, {}
    for asked in ("de", "en"):
        asked_config = config.copy_and_resolve_references()
        asked_config.data.target_lang_token = language_token(asked, config.data.target_lang_token)
        translator = Translator(trained.load(asked_config, workdir))
        for source in ("en", "de"):
            texts = [h[0].text for h in translator.translate(sentences[source][:SENTENCES])[0]]
            outputs[source, asked] = texts
            starts[source, asked] = {lang: sum(t.split()[:1] != [] and t.split()[0] in only[lang]
                                               for t in texts) for lang in ("en", "de")}
    for source in ("en", "de"):
        translated = other(source)
        assert starts[source, translated][translated] >= 0.9 * SENTENCES, starts
        for asked in ("en", "de"):
            assert starts[source, asked][asked] > 1.5 * starts[source, other(asked)][asked], starts
        differ = sum(a != b for a, b in zip(outputs[source, "de"], outputs[source, "en"]))
        assert differ >= 0.9 * SENTENCES


def other(lang: str) -> str:
    return {"en": "de", "de": "en"}[lang]


def test_eval_py_scores_each_language_pair_on_its_own(multilingual):
    config, workdir = multilingual
    command = [sys.executable, os.path.join(ROOT, "eval.py"), f"--workdir={workdir}",
               "--config.per_device_eval_batch_size=8"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "test corpus test-en-de (en-de)" in out.stdout and "test corpus test-de-en (de-en)" in out.stdout
    results = evaluate.evaluate_checkpoint(config, workdir, "test")["corpora"]
    for name, reference in (("test-en-de", "de"), ("test-de-en", "en")):
        assert results[name]["languages"] == name[5:]
        hypotheses = list(read_lines(results[name]["hypotheses"]))
        assert len(hypotheses) == SENTENCES
        assert list(read_lines(results[name]["references"])) == list(read_lines(f"{TEST}.{reference}"))[:SENTENCES]
        assert set(results[name]["scores"]) == {"bleu", "chrf"}
