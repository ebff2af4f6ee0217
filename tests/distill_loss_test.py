"""Word-level distillation: the loss against numpy, its gradient, the sharded train step with a
teacher, the teacher's vocabulary checks, and a tiny run distilling from the `trained` run."""
import os
import shutil

import jax
import numpy as np
import pytest

from tfx.core import parallel
from tfx.data import tokenizer as tokenizer_lib
from tfx.train import losses, steps, trainer
from tfx.train.metrics import read_metrics
from tfx.train.rundir import TOKENIZER_FILE, load_teacher

from runs import tiny_multi30k

metric_sums = jax.jit(losses.metric_sums, static_argnums=(3, 4, 6, 7))

TEACHER_CONFIG = '''import sys
sys.path.insert(0, {tests!r})
from runs import tiny_multi30k


def get_config():
    config = tiny_multi30k({data_dir!r})
    config.model.update({model!r})
    return config
'''


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def random_logits(seed, shape=(2, 3, 5)):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * 3


def test_distillation_loss_matches_numpy():
    """loss = sum_tokens w (0.7 x label-smoothed CE + 0.3 x T^2 x KL(p_teacher || p_student))
    at T = 2, each term written out in float64."""
    student, teacher = random_logits(0), random_logits(1)
    targets = np.array([[1, 4, 0], [2, 2, 3]], np.int32)
    weights = np.array([[1, 1, 0], [1, 1, 1]], np.float32)
    temperature, weight, smoothing = 2.0, 0.3, 0.1
    s, t = student.astype(np.float64), teacher.astype(np.float64)
    log_p, log_q = log_softmax(t / temperature), log_softmax(s / temperature)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    smoothed = np.full(s.shape, smoothing / (5 - 1))
    np.put_along_axis(smoothed, targets[..., None], 1 - smoothing, -1)
    ce = -(smoothed * log_softmax(s)).sum(-1) + (smoothed * np.log(smoothed)).sum(-1)
    expected_loss = (((1 - weight) * ce + weight * temperature**2 * kl) * weights).sum()

    sums = metric_sums(student, targets, weights, smoothing, 0.0, teacher, weight, temperature)
    np.testing.assert_allclose(sums["loss"], expected_loss, rtol=1e-5)
    np.testing.assert_allclose(sums["distill"], (kl * weights).sum(), rtol=1e-5)
    np.testing.assert_allclose(losses.summarize(sums)["distill_kl"], (kl * weights).sum() / 5,
                               rtol=1e-5)
    np.testing.assert_allclose(losses.distill_kl(student, student, temperature), 0.0, atol=1e-6)


def test_full_distillation_at_temperature_one_is_cross_entropy_against_the_teacher():
    """weight=1, T=1: d loss / d student logits = w (softmax(student) - p_teacher), the gradient of
    cross-entropy against the teacher's probabilities; label smoothing and z-loss drop out."""
    student, teacher = random_logits(2), random_logits(3)
    targets = np.array([[1, 4, 0], [2, 2, 3]], np.int32)
    weights = np.array([[1, 0, 1], [1, 1, 1]], np.float32)
    grad = jax.grad(lambda s: losses.metric_sums(s, targets, weights, 0.1, 1e-3, teacher, 1.0,
                                                 1.0)["loss"])(student)
    q, p = np.exp(log_softmax(student.astype(np.float64))), np.exp(log_softmax(teacher.astype(np.float64)))
    np.testing.assert_allclose(grad, (q - p) * weights[..., None], atol=1e-6)


def train_with_teacher(config, teacher_config, state, teacher_params, batches, mesh):
    """The student's parameters and metrics after a train step per batch from `state` (on the
    host), with the teacher's parameters, on `mesh`."""
    graphdef, _, shardings = steps.abstract_train_state(config, mesh)
    teacher_graphdef, _, teacher_shardings = steps.abstract_train_state(teacher_config, mesh)
    train_step = steps.make_train_step(config, graphdef, mesh, shardings,
                                       (teacher_graphdef, teacher_shardings.params))
    state = jax.device_put(state, shardings)
    teacher_params = jax.device_put(teacher_params, teacher_shardings.params)
    history = []
    for batch in batches:
        state, metrics = train_step(state, parallel.shard_batch(batch, mesh, config.logical_axis_rules),
                                    teacher_params)
        history.append(jax.device_get(metrics))
    return jax.device_get(state.params), history


def test_sharded_accumulated_distillation_equals_one_device(tiny_config, make_batch):
    """mesh data:2,fsdp:2,tensor:2 with two microbatches (teacher logits per microbatch), the
    skip rule and the stop column gives one device's one-batch losses, KL, gradient norms and
    parameters."""
    model = dict(vocab_size=64, emb_dim=32, num_heads=8, num_kv_heads=8, mlp_dim=64)
    distill = dict(teacher_config="teacher.py", teacher_workdir="teacher", weight=0.4, temperature=2.0)
    config = tiny_config(model=model, nonfinite_loss="skip")
    config.distill.update(distill)
    accumulated = tiny_config(model=model, nonfinite_loss="skip", grad_accum_steps=2)
    accumulated.distill.update(distill)
    teacher = tiny_config(model=dict(model, emb_dim=16, mlp_dim=32, num_decoder_layers=1), seed=7)
    one_device = parallel.make_mesh("data:1", jax.devices()[:1])
    state = jax.device_get(steps.create_train_state(config, one_device)[1])
    teacher_params = jax.device_get(steps.create_train_state(teacher, one_device)[1].params)
    batches = [dict(make_batch(seed, 16, 9, 11, 64), stop=np.zeros((16, 1), np.int32))
               for seed in range(2)]
    ref_params, ref_history = train_with_teacher(config, teacher, state, teacher_params, batches,
                                                 one_device)
    params, history = train_with_teacher(accumulated, teacher, state, teacher_params, batches,
                                         parallel.make_mesh("data:2,fsdp:2,tensor:2"))
    for ref, got in zip(ref_history, history):
        assert got["distill_kl"] > 0.01 and got["skipped"] == 0 and got["stop"] == 0
        for key in ("loss", "distill_kl", "nll"):
            np.testing.assert_allclose(got[key], ref[key], rtol=1e-5)
        np.testing.assert_allclose(got["grad_norm"], ref["grad_norm"], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 params, ref_params)


def test_a_train_step_needs_the_teacher_exactly_when_one_is_configured(tiny_config):
    config = tiny_config()
    config.distill.update(teacher_config="teacher.py", teacher_workdir="teacher")
    mesh = parallel.make_mesh("data:8")
    graphdef, _, shardings = steps.abstract_train_state(config, mesh)
    with pytest.raises(ValueError, match="config.distill.teacher_config='teacher.py'"):
        steps.make_train_step(config, graphdef, mesh, shardings)


def write_teacher(tmp_path, data_dir, **model):
    path = tmp_path / "teacher.py"
    path.write_text(TEACHER_CONFIG.format(tests=os.path.dirname(os.path.abspath(__file__)),
                                          data_dir=data_dir, model=model))
    return str(path)


@pytest.mark.parametrize("case, message", [
    ("vocab", r"config.distill.teacher_config='.*teacher.py' has model.vocab_size=1200, the "
              r"student config.model.vocab_size=1000"),
    ("tokenizer", r"config.distill.teacher_workdir='.*': its tokenizer.model differs from the "
                  r"student's SentencePiece model"),
    ("no tokenizer", r"config.distill.teacher_workdir='.*': its tokenizer.model is missing"),
    ("checkpoint", r"config.distill.teacher_workdir='.*': config.distill.teacher_checkpoint='5': "
                   r"use latest, a saved step"),
])
def test_a_teacher_of_another_vocabulary_is_refused_naming_the_key(trained, tmp_path, data_dir,
                                                                   case, message):
    config, workdir = trained
    teacher_workdir = tmp_path / "teacher"
    shutil.copytree(workdir, teacher_workdir)
    if case == "tokenizer":
        with open(teacher_workdir / TOKENIZER_FILE, "ab") as f:
            f.write(b"\0")
    elif case == "no tokenizer":
        os.remove(teacher_workdir / TOKENIZER_FILE)
    student = tiny_multi30k(data_dir)
    student.distill.update(
        teacher_config=write_teacher(tmp_path, data_dir, **({"vocab_size": 1200} if case == "vocab" else {})),
        teacher_workdir=str(teacher_workdir), teacher_checkpoint="5" if case == "checkpoint" else "latest")
    tokenizer = tokenizer_lib.Tokenizer(os.path.join(workdir, TOKENIZER_FILE))
    with pytest.raises(ValueError, match=message):
        load_teacher(student, parallel.make_mesh("data:8"), tokenizer)


def test_a_tiny_student_distils_from_the_trained_run(trained, tmp_path, data_dir, capsys):
    """Three steps of a narrower student with weight 1 and T = 2: every logged train loss is
    T^2 x the logged distill_kl."""
    _, workdir = trained
    student = tiny_multi30k(data_dir, num_train_steps=3, checkpoint_every_steps=3)
    student.model.mlp_dim = 32
    student.distill.update(teacher_config=write_teacher(tmp_path, data_dir), teacher_workdir=workdir,
                           weight=1.0, temperature=2.0)
    trainer.train(student, str(tmp_path / "student"))
    assert f"distilling from {workdir} step6" in capsys.readouterr().out
    records = [r for r in read_metrics(str(tmp_path / "student")) if r["split"] == "train"]
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        assert 0 < record["distill_kl"] < 10
        np.testing.assert_allclose(record["loss"], 4 * record["distill_kl"], rtol=1e-5)
