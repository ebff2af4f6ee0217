import dataclasses
import os
import re
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
from flax import nnx

from tfx.data.sources import read_lines
from tfx.infer import trained as trained_lib
from tfx.infer.translate import NonFiniteScoresError, Translator
from tfx.train import rundir

from runs import MULTI30K, ROOT, TINY, flags_for

TRANSLATE_PY = os.path.join(ROOT, "translate.py")
TEST_EN = os.path.join(ROOT, "data", "multi30k-en-de", "test_2016_flickr.en")
TEST_DE = os.path.join(ROOT, "data", "multi30k-en-de", "test_2016_flickr.de")
# Outputs of exactly max_length tokens at most, whatever else is in their batch.
DECODE = dict(strategy="beam", beam_size=3, max_length=8, max_length_offset=50)


@pytest.fixture(scope="module")
def run(trained):
    """(config, workdir) of the session's tiny run (conftest.py), decoding as DECODE says."""
    config, workdir = trained
    config = config.copy_and_resolve_references()
    config.decode.update(DECODE)
    return config, workdir


@pytest.fixture(scope="module")
def translator(run):
    config, workdir = run
    return Translator(trained_lib.load(config, workdir))


def test_training_keeps_the_tokenizer_that_translation_uses(run, translator):
    config, workdir = run
    kept = os.path.join(workdir, "tokenizer.model")
    with open(kept, "rb") as a, open(translator.model.tokenizer.path, "rb") as b:
        assert a.read() == b.read()


def test_batched_translations_come_back_in_input_order_and_equal_one_by_one(translator):
    lines = list(read_lines(TEST_EN))[:13]
    lines[4] = ""  # an empty line gives an empty line.
    lines[7] = "  "
    results, report = translator.translate(lines)
    alone = [translator.translate([line])[0][0] for line in lines]  # in the fewest rows.
    assert translator.row_buckets[0] < translator.rows == 2 * translator.row_buckets[-2]
    assert [r[0].text for r in results] == [a[0].text for a in alone]
    np.testing.assert_allclose([r[0].score for r in results], [a[0].score for a in alone], rtol=1e-5)
    assert results[4][0].text == results[7][0].text == "" and results[0][0].text
    assert report.sentences == 13 and report.truncated == 0


def test_long_lines_are_truncated_and_counted(translator):
    long_line = " ".join(["horse"] * 200)
    results, report = translator.translate(["A dog.", long_line])
    assert report.truncated == 1 and len(results) == 2


def test_nbest_gives_the_beam_best_first_and_refuses_more(translator):
    lines = list(read_lines(TEST_EN))[:5]
    best, _ = translator.translate(lines)
    nbest, _ = translator.translate(lines, nbest=3)
    for one, three in zip(best, nbest):
        assert len(three) == 3 and three[0] == one[0]
        assert three[0].score >= three[1].score >= three[2].score
    with pytest.raises(ValueError, match=r"at most 3 hypotheses .*beam_size=3"):
        translator.translate(lines, nbest=4)


def test_sampled_nbest_draws_that_many_and_greedy_refuses_more_than_one(run):
    config, workdir = run
    sampling = config.copy_and_resolve_references()
    sampling.decode.update(strategy="sample", temperature=1.5)
    translator = Translator(trained_lib.load(sampling, workdir))
    results, _ = translator.translate(["A dog runs.", "", "Two men talk."], nbest=4)
    assert [len(r) for r in results] == [4, 1, 4]
    assert all(r[i].score >= r[i + 1].score for r in results for i in range(len(r) - 1))
    assert len({h.text for h in results[0]}) > 1
    sampling.decode.strategy = "greedy"
    with pytest.raises(ValueError, match="at most 1 hypothesis per sentence; use --strategy beam or sample"):
        Translator(trained_lib.load(sampling, workdir)).translate(["A dog."], nbest=2)


def test_scores_are_the_log_probabilities_of_the_model_logits(translator):
    """Per pair, alone (padded to 32 tokens): log-softmax of the model's logits at each target
    token, summed in numpy."""
    sources, targets = list(read_lines(TEST_EN))[:10], list(read_lines(TEST_DE))[:10]
    scores, report = translator.score(sources, targets)
    graphdef, tokenizer = translator.model.graphdef, translator.model.tokenizer
    forward = jax.jit(lambda params, inputs, targets: nnx.merge(graphdef, params)(inputs, targets))
    for (total, count), source, target in zip(scores, sources, targets):
        ids = [tokenizer.encode_source(source), tokenizer.encode_target(target)]
        inputs, targets_ = (np.zeros((1, -(-len(i) // 32) * 32), np.int32) for i in ids)
        inputs[0, :len(ids[0])], targets_[0, :len(ids[1])] = ids
        logits = np.asarray(forward(translator.model.params, inputs, targets_), np.float64)[0, :len(ids[1])]
        shifted = logits - logits.max(-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        assert count == len(ids[1])
        np.testing.assert_allclose(total, log_probs[np.arange(count), ids[1]].sum(), rtol=1e-5, atol=1e-4)
    assert report.tokens == sum(count for _, count in scores)
    with pytest.raises(ValueError, match="2 sources but 1 targets"):
        translator.score(["a", "b"], ["c"])


def cli_args(run, *args) -> list[str]:
    config, workdir = run
    flags = flags_for({**{f"model.{k}": v for k, v in TINY.items()}, "per_device_eval_batch_size": 4,
                       "data.data_dir": config.data.data_dir, "max_source_length": 32,
                       "max_target_length": 32})
    return [sys.executable, TRANSLATE_PY, f"--config={MULTI30K}", f"--workdir={workdir}", *flags, *args]


def cli(run, *args, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cli_args(run, *args), input=stdin, capture_output=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))


# translate.py's flags for the `translator` fixture's decoding (DECODE).
DECODE_FLAGS = ("--strategy=beam", "--beam=3", "--max_length=8", "--config.decode.max_length_offset=50")


def test_cli_translates_stdin_into_nbest_lines_and_scores_files(run, translator, tmp_path):
    lines = ["A man is riding a bike.", "", "Two dogs play in the snow."]
    out = tmp_path / "nbest.tsv"
    done = cli(run, "--nbest=2", "--beam=3", "--max-length=8", f"--output={out}",
               stdin="".join(line + "\n" for line in lines).encode())
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert b"translated 3 sentences" in done.stderr and b"0 truncated" in done.stderr
    rows = [line.split("\t") for line in out.read_text(encoding="utf-8").splitlines()]
    expected, _ = translator.translate(lines, nbest=2)
    assert [row[:2] for row in rows] == [["0", "1"], ["0", "2"], ["1", "1"], ["2", "1"], ["2", "2"]]
    assert [row[3] for row in rows] == [h.text for hypotheses in expected for h in hypotheses]

    (tmp_path / "s").write_text("A dog.\nA cat.\n", encoding="utf-8")
    (tmp_path / "t").write_text("Ein Hund.\nEine Katze.\n", encoding="utf-8")
    done = cli(run, "--score", f"--source={tmp_path / 's'}", f"--target={tmp_path / 't'}")
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    scores, _ = translator.score(["A dog.", "A cat."], ["Ein Hund.", "Eine Katze."])
    for line, (total, count) in zip(done.stdout.decode().splitlines(), scores):
        got_total, got_mean, got_count = line.split("\t")
        assert int(got_count) == count
        np.testing.assert_allclose([float(got_total), float(got_mean)], [total, total / count], atol=2e-6)


def test_cli_refuses_a_target_language_the_vocabulary_has_no_token_for(run):
    """The run's joint tokenizer has no OPUS-MT language tokens: --target_lang fails in one line
    naming the key, before the checkpoint is read."""
    done = cli(run, "--target_lang=deu", stdin=b"A dog.\n")
    assert done.returncode == 1 and not done.stdout
    assert done.stderr.decode().splitlines()[-1] == (
        "translate.py: config.data.target_lang_token='>>deu<<' is not a piece of the "
        f"SentencePiece model {os.path.join(run[1], 'tokenizer.model')}; it has no language "
        "tokens (>>xx<<, <2xx>): it is not a multilingual model's.")


def test_cli_names_the_invalid_utf8_line_and_writes_nothing(run, tmp_path):
    source = tmp_path / "in.en"
    source.write_bytes(b"A dog.\nA \xff cat.\n")
    out = tmp_path / "out.de"
    done = cli(run, f"--input={source}", f"--output={out}")
    assert done.returncode == 1
    assert f"{source}:2: invalid UTF-8 (byte 0xff at column 3)".encode() in done.stderr
    assert not out.exists()


def poisoned(model: trained_lib.TrainedModel) -> trained_lib.TrainedModel:
    """`model` with every parameter NaN, as a diverged checkpoint holds them."""
    return dataclasses.replace(model, params=jax.tree.map(lambda x: x * np.nan, model.params))


def test_a_sentence_without_a_finite_hypothesis_is_an_error_naming_its_line(translator):
    nan = Translator(poisoned(translator.model))
    with pytest.raises(NonFiniteScoresError, match=(
            r"^line 3 of the input \('A cat\.'\): all 3 hypotheses scored a non-finite log-probability"
            r" .*the parameters are probably NaN.* earlier --checkpoint")) as error:
        nan.translate(["", "  ", "A cat."], nbest=2)
    assert error.value.index == 2 and isinstance(error.value, ValueError)


@pytest.fixture(scope="module")
def diverged(run, translator, tmp_path_factory):
    """(config, workdir) of a run whose one checkpoint holds NaN parameters."""
    config, _ = run
    workdir = str(tmp_path_factory.mktemp("diverged"))
    model = poisoned(translator.model)
    rundir.write_run(config, model.mesh, jax.device_get(model.params), model.tokenizer, workdir)
    return config, workdir


def test_cli_stops_with_one_line_on_a_diverged_checkpoint(diverged, tmp_path):
    source = tmp_path / "in.en"
    source.write_text("A dog.\n\nTwo men talk.\n", encoding="utf-8")
    out = tmp_path / "out.de"
    done = cli(diverged, f"--input={source}", f"--output={out}", "--beam=2")
    assert done.returncode == 1, done.stderr.decode()[-2000:]
    last = done.stderr.decode().strip().splitlines()[-1]
    assert re.fullmatch(r"translate\.py: line 1 of the input \('A dog\.'\): all 2 hypotheses "
                        r"scored a non-finite log-probability .*", last), last
    assert "Traceback" not in done.stderr.decode() and not out.exists()


def test_cli_prefix_file_forces_each_line_and_must_match_the_input(run, translator, tmp_path):
    lines = ["A man is riding a bike.", "Two dogs play in the snow.", "A woman sings."]
    prefixes = tmp_path / "prefixes.de"
    prefixes.write_text("Ein Mann\n\nEine Frau singt\n", encoding="utf-8")
    done = cli(run, f"--prefix={prefixes}", *DECODE_FLAGS, stdin="".join(line + "\n" for line in lines).encode())
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    expected, _ = translator.translate(lines, prefixes=["Ein Mann", "", "Eine Frau singt"])
    assert done.stdout.decode().splitlines() == [r[0].text for r in expected]
    assert expected[0][0].text.startswith("Ein Mann") and expected[2][0].text.startswith("Eine Frau singt")
    done = cli(run, f"--prefix={prefixes}", stdin=b"One line.\n")
    assert done.returncode == 1 and not done.stdout
    assert done.stderr.decode().splitlines()[-1] == (
        f"translate.py: --prefix {prefixes} has 3 lines but the input has 1; give one prefix per "
        "input line (an empty line: none).")


def test_cli_stream_answers_each_line_before_the_next_arrives(run, translator):
    process = subprocess.Popen(cli_args(run, "--stream", *DECODE_FLAGS), stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=dict(os.environ, JAX_PLATFORMS="cpu"))
    watchdog = threading.Timer(240, process.kill)  # a hang fails the test instead of the suite.
    watchdog.start()
    try:
        answers = []
        for line in [b"A man is riding a bike.", b"Two dogs play in the snow.", b"A \xff woman."]:
            process.stdin.write(line + b"\n")
            process.stdin.flush()
            if b"\xff" not in line:
                answers.append(process.stdout.readline().decode().rstrip("\n"))  # before stdin closes.
        process.stdin.close()
        rest, errors = process.stdout.read(), process.stderr.read()
        process.wait()
    finally:
        watchdog.cancel()
    expected, _ = translator.translate(["A man is riding a bike.", "Two dogs play in the snow."])
    assert answers == [r[0].text for r in expected]
    assert process.returncode == 1 and not rest
    assert errors.decode().splitlines()[-1].startswith("translate.py: <stdin>:3: invalid UTF-8 (byte 0xff")


def test_a_translation_own_start_as_prefix_gives_it_again(converged):
    """On real outputs (the converged tiny model), greedily: forcing the first 0 to 3 words of
    each translation reproduces it, score included."""
    config, workdir = converged
    config = config.copy_and_resolve_references()
    config.decode.strategy = "greedy"
    greedy = Translator(trained_lib.load(config, workdir))
    lines = list(read_lines(TEST_EN))[:16]
    unforced = [r[0] for r in greedy.translate(lines)[0]]
    own_starts = [" ".join(h.text.split()[:i % 4]) for i, h in enumerate(unforced)]
    again = [r[0] for r in greedy.translate(lines, prefixes=own_starts)[0]]
    assert [h.text for h in again] == [h.text for h in unforced]
    np.testing.assert_allclose([h.score for h in again], [h.score for h in unforced], rtol=1e-5)
