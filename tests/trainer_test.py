import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from tfx.core import config as config_lib
from tfx.infer import evaluate
from tfx.train import budget, optim, trainer
from tfx.train.checkpoint import Checkpoints
from tfx.train.experiment import Experiment
from tfx.train.metrics import read_metrics
from tfx.train.plot import plot

from runs import MULTI30K, ROOT, losses, tiny_multi30k, train_py, wait_for_step


def test_killed_and_preempted_runs_resume_to_the_uninterrupted_losses(tmp_path, data_dir):
    """SIGTERM saves and exits; SIGKILL loses the steps since the last checkpoint; the run
    resumed after both gives the uninterrupted run's losses step for step, bitwise."""
    uninterrupted = train_py(tmp_path / "straight", data_dir)
    assert uninterrupted.wait() == 0, uninterrupted.communicate()[1][-3000:]

    workdir = tmp_path / "interrupted"
    run = train_py(workdir, data_dir)
    wait_for_step(workdir, 2, run)
    run.send_signal(signal.SIGTERM)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-3000:]
    preempted_at = Checkpoints(str(workdir)).latest_step()
    assert f"SIGTERM: saved step {preempted_at}" in out and 2 <= preempted_at < 12

    run = train_py(workdir, data_dir)
    wait_for_step(workdir, 9, run)
    run.kill()
    run.wait()
    assert Checkpoints(str(workdir)).latest_step() < 12

    run = train_py(workdir, data_dir)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-3000:]
    assert "resuming from step" in out
    expected, got = losses(tmp_path / "straight"), losses(workdir)
    assert sorted(got) == list(range(1, 13)) and got == expected


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, data_dir):
    config = tiny_multi30k(data_dir, learning_rate=1e30, warmup_steps=1, grad_clip_norm=0.0,
                           checkpoint_every_steps=1, num_train_steps=20)
    with pytest.raises(trainer.NonFiniteLossError, match=r"loss is nan at step (\d+); stopped") as error:
        trainer.train(config, str(tmp_path))
    bad_step = int(error.value.args[0].split("at step ")[1].split(";")[0])
    checkpoints = Checkpoints(str(tmp_path))
    assert checkpoints.latest_step() == bad_step - 1
    experiment = Experiment(config)
    state = checkpoints.restore(bad_step - 1, experiment.state)
    for leaf in trainer.jax.tree.leaves(state.params):
        assert np.isfinite(np.asarray(leaf)).all()


def test_a_diverging_loss_stops_naming_the_step(tmp_path, data_dir):
    config = tiny_multi30k(data_dir, learning_rate=1e6, warmup_steps=1, checkpoint_every_steps=1,
                           num_train_steps=30, schedule="rsqrt")
    with pytest.raises(trainer.NonFiniteLossError, match=r"at step (\d+), above "
                       r"config.divergence_factor=3 x ln\(vocab_size\) = 20.7: the run diverged") as error:
        trainer.train(config, str(tmp_path))
    bad_step = int(error.value.args[0].split("at step ")[1].split(",")[0])
    assert Checkpoints(str(tmp_path)).latest_step() == bad_step - 1


@pytest.mark.parametrize("loss, grad_norm, expected", [
    (2.0, 5.0, None),
    (float("nan"), 5.0, "the training loss is nan at step 7"),
    (2.0, float("inf"), "the gradient norm is inf at step 7 (loss 2)"),
    (25.0, 5.0, "the training loss is 25 at step 7, above config.divergence_factor=3 x "
                "ln(vocab_size) = 20.7: the run diverged"),
])
def test_a_stopped_run_names_what_diverged(loss, grad_norm, expected):
    """The stop rule is the skip rule (`steps.diverged`): a non-finite gradient with a finite loss
    stops too, before its NaN parameters could be saved."""
    config = config_lib.default_config()
    config.model.vocab_size = 1000
    what = trainer.divergence({"loss": np.float32(loss), "grad_norm": np.float32(grad_norm)}, config)
    assert (what and what.format(step=7)) == expected


def test_skipped_steps_keep_the_parameters_and_the_applied_learning_rate_in_step(tmp_path, data_dir):
    config = tiny_multi30k(data_dir, learning_rate=1e6, warmup_steps=1, num_train_steps=12,
                           schedule="rsqrt", nonfinite_loss="skip")
    trainer.train(config, str(tmp_path))
    records = [r for r in read_metrics(str(tmp_path)) if r["split"] == "train"]
    assert sum(r["skipped_steps"] for r in records) > 0
    state = Checkpoints(str(tmp_path)).restore(12, Experiment(config).state)
    counts = [leaf for path, leaf in trainer.jax.tree_util.tree_leaves_with_path(state.opt_state)
              if "count" in trainer.jax.tree_util.keystr(path)]
    assert counts and all(int(count) == int(state.step) == 12 for count in counts)


def test_a_save_cut_short_leaves_the_previous_checkpoint_usable(tmp_path, data_dir):
    config = tiny_multi30k(data_dir, num_train_steps=4)
    trainer.train(config, str(tmp_path))
    # What a run killed while writing step 8 leaves behind: orbax's temporary directory.
    partial = tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp" / "state"
    partial.mkdir(parents=True)
    (partial / "garbage").write_bytes(b"\x00" * 100)
    assert Checkpoints(str(tmp_path)).latest_step() == 4
    trainer.train(tiny_multi30k(data_dir, num_train_steps=8), str(tmp_path))
    assert Checkpoints(str(tmp_path)).steps() == [4, 8]
    assert sorted(losses(tmp_path)) == list(range(1, 9))


def test_train_minutes_plans_the_steps_from_timed_ones_and_a_resume_keeps_the_plan(tmp_path, data_dir):
    config = tiny_multi30k(data_dir, train_minutes=0.02, schedule="cosine", warmup_steps=30,
                           checkpoint_every_steps=1000)
    trainer.train(config, str(tmp_path / "a"))
    with open(tmp_path / "a" / budget.PLAN_FILE) as f:
        plan = json.load(f)
    timed_end = 30  # the end of the warmup, more than TIMED_STEPS after the first step.
    assert (plan["planned_at_step"], plan["timed_steps"]) == (timed_end, timed_end - 1)
    assert plan["step_time_s"] > 0
    assert plan["num_train_steps"] == max(timed_end, round(0.02 * 60 / plan["step_time_s"]))

    def check_schedule(workdir, num_train_steps):
        rates = {r["step"]: r["learning_rate"] for r in read_metrics(str(workdir)) if r["split"] == "train"}
        assert sorted(rates) == list(range(1, num_train_steps + 1))
        schedule = optim.learning_rate_schedule(budget.with_steps(config, num_train_steps))
        for step, rate in rates.items():  # the steps before the plan are in the warmup.
            assert rate == pytest.approx(float(schedule(step - 1)), rel=1e-5, abs=1e-9)

    check_schedule(tmp_path / "a", plan["num_train_steps"])
    # A run resuming in a workdir with a plan for this budget follows it without timing again.
    (tmp_path / "b").mkdir()
    with open(tmp_path / "b" / budget.PLAN_FILE, "w") as f:
        json.dump({**plan, "num_train_steps": 25}, f)
    trainer.train(config, str(tmp_path / "b"))
    check_schedule(tmp_path / "b", 25)


def test_a_resume_past_the_warmup_without_train_steps_json_keeps_the_original_plan(
        tmp_path, data_dir, monkeypatch, capsys):
    """The plan saved with the checkpoint gives the learning rates of the original plan. Without
    it too, the run plans on a copy of its state before its first step, never on the
    placeholder horizon, and leaves the data position as it was: with the step time fixed (as if
    timed alike), its learning rates and losses are those of the uninterrupted run."""
    planned = budget.plan
    monkeypatch.setattr(budget, "plan", lambda config, workdir, step_time_s, *args, **kwargs:
                        planned(config, workdir, 0.02 * 60 / 40, *args, **kwargs))  # 40 steps.
    config = tiny_multi30k(data_dir, train_minutes=0.02, schedule="cosine", warmup_steps=4,
                           checkpoint_every_steps=10)
    straight = tmp_path / "straight"
    trainer.train(config, str(straight))
    with open(straight / budget.PLAN_FILE) as f:
        plan = json.load(f)
    assert (plan["num_train_steps"], plan["planned_at_step"]) == (40, 21)

    def records(workdir):  # every train record, a resumed run's after the first's.
        with open(workdir / "metrics.jsonl") as f:
            return [(r["step"], r["learning_rate"], r["loss"]) for r in map(json.loads, f)
                    if r["split"] == "train"]
    expected = records(straight)[30:]
    for lost in ("train_steps.json", "and the plan in the checkpoint"):
        workdir = tmp_path / lost
        shutil.copytree(straight, workdir)
        shutil.rmtree(workdir / "checkpoints" / "40")
        os.remove(workdir / budget.PLAN_FILE)
        if lost != "train_steps.json":
            metadata_file = workdir / "checkpoints" / "30" / "_CHECKPOINT_METADATA"
            metadata = json.loads(metadata_file.read_text())
            assert metadata["custom_metadata"]["train_steps"] == plan
            metadata_file.write_text(json.dumps({**metadata, "custom_metadata": {}}))
        capsys.readouterr()
        trainer.train(config, str(workdir))
        out = capsys.readouterr().out
        assert records(workdir)[40:] == expected, lost
        with open(workdir / budget.PLAN_FILE) as f:
            again = json.load(f)
        if lost == "train_steps.json":
            assert again == plan and "keeping the recorded plan" in out
        else:
            assert again["timed_on_a_copy"] and again["planned_at_step"] == 30
            assert f"timed over {budget.TIMED_STEPS} steps on a copy of step 30's state" in out


def test_off_a_terminal_progress_is_a_plain_line_per_log_step(tmp_path, data_dir, capsys):
    trainer.train(tiny_multi30k(data_dir, num_train_steps=4, log_every_steps=2), str(tmp_path))
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 2/4", "step 4/4"]
    assert lines[-1].endswith("s/step, ETA 0:00:00") and "target tokens/s" in lines[-1]
    assert "\r" not in err and "step/s" not in err


def test_eval_reports_loss_and_bleu(tmp_path, data_dir):
    config = tiny_multi30k(data_dir, num_train_steps=2, eval_every_steps=2, eval_bleu_examples=8)
    config.decode.strategy = "greedy"
    config.decode.max_length_offset = 4
    metrics = trainer.train(config, str(tmp_path), evaluate.periodic_bleu)
    assert {"loss", "accuracy", "perplexity", "bleu", "sentences_per_sec"} <= set(metrics)
    assert metrics["bleu"] >= 0 and np.isfinite(metrics["loss"])
    records = [r for r in read_metrics(str(tmp_path)) if r["split"] == "eval"]
    assert [r["step"] for r in records] == [2] and records[0]["bleu"] == metrics["bleu"]
    with open(plot(str(tmp_path)), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("flag, message", [
    ("--config.no_such_key=1", "no_such_key"),
    ("--config.seed=abc", "seed"),
    ("--config.mesh_shape=data:16", "mesh_shape"),
    ("--config.grad_accum_steps=3", "config.grad_accum_steps=3"),
    ("--config.data.train=text:/nowhere/corpus", "/nowhere/corpus.en"),
    ("--config.data.shards=3", "config.data.shards=3 must be a multiple"),
])
def test_bad_configs_are_refused_naming_the_key_or_file(tmp_path, data_dir, flag, message):
    run = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), f"--config={MULTI30K}",
                          f"--workdir={tmp_path}", f"--config.data.data_dir={data_dir}", flag],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and message in run.stderr, run.stderr[-2000:]
    # Past flag parsing (absl's own errors): one line, no traceback, no orbax complaint from a
    # checkpoint manager left open.
    if "no_such_key" not in flag and "seed" not in flag:
        assert "Traceback" not in run.stderr and "cannot schedule new futures" not in run.stderr
    assert not (tmp_path / "LOCK").exists()
