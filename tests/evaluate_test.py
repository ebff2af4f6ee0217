import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tfx.compress.average import average_last
from tfx.data import pipeline
from tfx.data.sources import read_lines
from tfx.infer import evaluate
from tfx.model import decode
from tfx.train import trainer
from tfx.train.checkpoint import Checkpoints, DataPositionError
from tfx.train.experiment import Experiment
from tfx.train.rundir import restore_params

from runs import ROOT

EVAL_PY = os.path.join(ROOT, "eval.py")


def test_averaged_checkpoint_is_the_mean_of_its_parts(trained):
    config, workdir = trained
    experiment = Experiment(config)
    checkpoints = Checkpoints(workdir)
    assert checkpoints.steps() == [2, 4, 6]
    parts = [checkpoints.restore(step, experiment.state).params for step in (4, 6)]
    label, averaged = restore_params(workdir, "average:2", experiment.state.params)
    assert label == "average2-step6"
    jax.tree.map(lambda a, b, mean: np.testing.assert_allclose(mean, (a + b) / 2, rtol=1e-6),
                 *parts, averaged)
    label, latest = restore_params(workdir, "latest", experiment.state.params)
    assert label == "step6"
    jax.tree.map(np.testing.assert_array_equal, latest, parts[1])


def test_average_command_writes_a_checkpoint_eval_can_read(trained, tmp_path):
    config, workdir = trained
    experiment = Experiment(config)
    assert average_last(config, workdir, 2, str(tmp_path)) == 6
    _, written = restore_params(str(tmp_path), "latest", experiment.state.params)
    _, on_the_fly = restore_params(workdir, "average:2", experiment.state.params)
    jax.tree.map(np.testing.assert_array_equal, written, on_the_fly)
    with pytest.raises(ValueError, match=r"--last=4, but .* has 3 checkpoints"):
        average_last(config, workdir, 4, str(tmp_path / "other"))
    # Training does not resume from it (no data position), nor moves it aside as corrupt.
    with pytest.raises(DataPositionError, match=r"has no data position.*config.init_from="):
        trainer.train(config, str(tmp_path))
    assert Checkpoints(str(tmp_path)).steps() == [6]


def test_eval_bleu_equals_the_sacrebleu_command_on_the_written_files(trained):
    config, workdir = trained
    results = evaluate.evaluate_checkpoint(config, workdir, "eval", "average:3", ("bleu", "chrf", "ter"))
    with open(results["hypotheses"], encoding="utf-8") as f:
        assert len(f.read().split("\n")) - 1 == 1014  # every valid sentence, in order
    command = [sys.executable, "-m", "sacrebleu", results["references"], "-i", results["hypotheses"],
               "-m", "bleu", "chrf", "ter", "-b", "-w", "4"]
    figures = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    expected = [results["scores"][m]["score"] for m in ("bleu", "chrf", "ter")]
    np.testing.assert_allclose(figures, expected, atol=1e-4)
    assert os.path.exists(os.path.join(workdir, "eval-average3-step6.json"))

    score_mode = subprocess.run([sys.executable, EVAL_PY, f"--hyp={results['hypotheses']}",
                                 f"--ref={results['references']}", "--metrics=bleu,chrf,ter"],
                                capture_output=True, text=True, check=True).stdout
    for metric in ("bleu", "chrf", "ter"):
        assert f'"{metric}": {round(results["scores"][metric]["score"], 2)}' in score_mode


def test_length_sorted_decoding_gives_the_translations_of_split_order(converged, tmp_path):
    config, workdir = converged
    config = config.copy_and_resolve_references()
    # The first 256 validation pairs, 8 batches. Every batch caps outputs at 24 tokens (the cap
    # is otherwise the batch's longest source + the offset), so the batching alone differs.
    for lang in ("en", "de"):
        lines = list(read_lines(os.path.join(ROOT, "data", "multi30k-en-de", f"valid.{lang}")))
        (tmp_path / f"valid.{lang}").write_text("".join(f"{line}\n" for line in lines[:256]))
    config.data.eval = f"text:{tmp_path}/valid"
    config.decode.update(max_length_offset=config.model.max_len, max_length=24)
    decoder = evaluate.SplitDecoder(config, workdir, "eval")
    by_length, speed = decoder()
    assert speed["sentences_per_sec"] > 0 and len(by_length) == 256
    model = decoder.model
    translate = decode.make_translate(config, model.graphdef, model.mesh, model.params_shardings)
    in_split_order = pipeline.eval_batches(config, decoder.source, model.tokenizer, decoder.shard)
    in_order, _ = evaluate.translate_batches(translate, decoder.params, in_split_order,
                                             decoder.sharding, decoder.shard, model.tokenizer)
    assert by_length == in_order


def test_multi_reference_scores_use_every_stream():
    hypotheses = ["the cat sat on the mat", "a dog runs"]
    one = evaluate.score(hypotheses, [["the cat is on the mat", "a dog runs"]])
    two = evaluate.score(hypotheses, [["the cat is on the mat", "a dog runs"],
                                      ["the cat sat on the mat", "the dog is running"]])
    assert two["bleu"]["score"] > one["bleu"]["score"] and "nrefs:2" in two["bleu"]["signature"]


@pytest.mark.parametrize("checkpoint, message", [
    ("5", r"saved steps in .*: \[2, 4, 6\]"), ("average:9", "average:N with N <= 3"),
])
def test_unknown_checkpoints_are_named(trained, checkpoint, message):
    config, workdir = trained
    with pytest.raises(ValueError, match=message):
        restore_params(workdir, checkpoint, Experiment(config).state.params)


def test_missing_workdir_and_mismatched_config_are_named(trained, tmp_path):
    config, workdir = trained
    with pytest.raises(FileNotFoundError, match="workdir .*nowhere.* does not exist"):
        restore_params(str(tmp_path / "nowhere"), "latest", Experiment(config).state.params)
    with pytest.raises(FileNotFoundError, match="no checkpoints in"):
        restore_params(str(tmp_path), "latest", Experiment(config).state.params)
    wider = config.copy_and_resolve_references()
    wider.model.mlp_dim = 128
    with pytest.raises(ValueError, match=r"params/.*/wi/value has shape \(32, 64\) in the checkpoint "
                                         r"but \(32, 128\) in the config"):
        restore_params(workdir, "latest", Experiment(wider).state.params)


def test_score_mode_refuses_files_of_different_lengths(tmp_path):
    (tmp_path / "hyp").write_text("a\nb\n")
    (tmp_path / "ref").write_text("a\n")
    run = subprocess.run([sys.executable, EVAL_PY, f"--hyp={tmp_path / 'hyp'}",
                          f"--ref={tmp_path / 'ref'}"], capture_output=True, text=True)
    assert run.returncode != 0 and "has 2 lines but" in run.stderr and "has 1" in run.stderr
    assert "Traceback" not in run.stderr


def test_score_mode_refuses_empty_files_in_one_line(tmp_path):
    (tmp_path / "hyp").write_text("")
    (tmp_path / "ref").write_text("")
    run = subprocess.run([sys.executable, EVAL_PY, f"--hyp={tmp_path / 'hyp'}",
                          f"--ref={tmp_path / 'ref'}"], capture_output=True, text=True)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == f"eval.py: {tmp_path / 'hyp'} is empty: there is nothing to score."
    with pytest.raises(ValueError, match="no hypotheses"):
        evaluate.score([], [[]])
