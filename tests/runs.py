"""The tests' tiny runs on the bundled Multi30k: their config in-process, or train.py in subprocesses."""
import os
import socket
import subprocess
import sys
import time

import numpy as np

from tfx.core import config as config_lib
from tfx.data.sources import read_lines
from tfx.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MULTI30K = os.path.join(ROOT, "configs", "multi30k.py")
TINY = dict(vocab_size=1000, emb_dim=32, mlp_dim=64, num_heads=2, num_kv_heads=2,
            num_encoder_layers=1, num_decoder_layers=1, dtype="float32")
# Decoding without attention windows and batch halving, each of which multiplies what a search
# compiles: decode_test proves that neither changes a hypothesis, and turns them on itself.
PLAIN_DECODE = dict(batch_halvings=0, cache_window=0)
PLAIN_DECODE_KEYS = {f"decode.{k}": v for k, v in PLAIN_DECODE.items()}  # as --config.KEY flags.
TINY_FLAGS = dict(**{f"model.{k}": v for k, v in TINY.items()}, **PLAIN_DECODE_KEYS,
                  per_device_batch_size=2,
                  per_device_eval_batch_size=4, num_train_steps=12, train_minutes=0.0, log_every_steps=1,
                  checkpoint_every_steps=4, eval_every_steps=0, warmup_steps=4,
                  max_source_length=32, max_target_length=32, **{"decode.beam_size": 4})


def tiny_multi30k(data_dir: str, **overrides) -> config_lib.ml_collections.ConfigDict:
    """configs/multi30k.py with the tiny model and batch, and `overrides`, validated."""
    config = config_lib.load(MULTI30K)
    config.model.update(TINY)
    config.data.data_dir = data_dir
    config.update(dict(per_device_batch_size=2, per_device_eval_batch_size=4, num_train_steps=8,
                       train_minutes=0.0, log_every_steps=1, checkpoint_every_steps=4,
                       eval_every_steps=0, warmup_steps=4, max_source_length=32, max_target_length=32))
    config.decode.update(beam_size=4, **PLAIN_DECODE)  # beam 4: the library's default, as cheap.
    config.update(overrides)
    return config_lib.validate(config)


MULTILINGUAL_TEST = os.path.join(ROOT, "data", "multi30k-en-de", "test_2016_flickr")
MULTILINGUAL_SENTENCES = 64


def tiny_multilingual(data_dir: str, test_dir) -> config_lib.ml_collections.ConfigDict:
    """configs/multi30k.py:multilingual (en->de and de->en) with the tiny model, 300 steps of
    greedy-decoding training, its test corpora the first MULTILINGUAL_SENTENCES test2016 pairs
    (written to `test_dir`)."""
    for lang in ("en", "de"):
        lines = list(read_lines(f"{MULTILINGUAL_TEST}.{lang}"))[:MULTILINGUAL_SENTENCES]
        (test_dir / f"test.{lang}").write_text("".join(line + "\n" for line in lines))
    config = config_lib.load(f"{MULTI30K}:multilingual")
    config.model.update(TINY)
    config.model.dropout_rate = 0.0
    for direction in ("en-de", "de-en"):
        config.data.corpora[f"test-{direction}"].spec = f"text:{test_dir}/test"
    config.data.data_dir = data_dir
    config.update(dict(per_device_batch_size=4, per_device_eval_batch_size=8, num_train_steps=300,
                       train_minutes=0.0, warmup_steps=30, learning_rate=1e-2, log_every_steps=300,
                       checkpoint_every_steps=300, eval_every_steps=0, max_source_length=32,
                       max_target_length=32, label_smoothing=0.0))
    config.decode.update(strategy="greedy", max_length_offset=10, **PLAIN_DECODE)
    return config_lib.validate(config)


def validation_batch(tokenizer, count: int = 64) -> dict[str, np.ndarray]:
    """The first `count` pairs of the bundled Multi30k validation split, tokenized and
    right-padded with 0 into one unpacked batch."""
    valid = os.path.join(ROOT, "data", "multi30k-en-de", "valid")
    pairs = list(zip(read_lines(f"{valid}.en"), read_lines(f"{valid}.de")))[:count]
    batch = {}
    for side, (key, encode) in enumerate((("inputs", tokenizer.encode_source),
                                          ("targets", tokenizer.encode_target))):
        ids = [encode(pair[side]) for pair in pairs]
        batch[key] = np.zeros((len(ids), max(map(len, ids))), np.int32)
        for row, tokens in enumerate(ids):
            batch[key][row, :len(tokens)] = tokens
    return batch


def flags_for(config_overrides: dict) -> list[str]:
    return [f"--config.{key}={value}" for key, value in config_overrides.items()]


def train_py(workdir, data_dir, devices: int = 8, **overrides) -> subprocess.Popen:
    """train.py on `devices` fake CPU devices with the tiny flags and `overrides` (and the
    session's other XLA flags and compilation cache, see conftest.py)."""
    flags = flags_for({**TINY_FLAGS, "data.data_dir": data_dir, **overrides})
    xla_flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count=")]
    xla_flags.append(f"--xla_force_host_platform_device_count={devices}")
    env = dict(os.environ, XLA_FLAGS=" ".join(xla_flags), JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), f"--config={MULTI30K}",
                             f"--workdir={workdir}", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def train_py_processes(workdir, data_dir, processes: int, devices: int, **overrides
                       ) -> list[subprocess.Popen]:
    """`processes` train.py processes of `devices` devices each, connected on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [train_py(workdir, data_dir, devices, **overrides,
                     **{"distributed.coordinator_address": f"127.0.0.1:{port}",
                        "distributed.num_processes": processes, "distributed.process_id": i})
            for i in range(processes)]


def finish(run: subprocess.Popen, timeout: float = 300) -> tuple[str, str]:
    """Waits for `run`; returns (stdout, stderr) and asserts it succeeded."""
    out, err = run.communicate(timeout=timeout)
    assert run.returncode == 0, err[-3000:]
    return out, err


def wait_for_step(workdir, step: int, process: subprocess.Popen, timeout: float = 300):
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        if os.path.exists(path) and any(r["step"] >= step for r in read_metrics(str(workdir))):
            return
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


def losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(str(workdir)) if r["split"] == "train"}
