"""Test set-up: 8 fake CPU devices and loud shape errors, before JAX starts."""
import atexit
import fcntl
import os
import shutil
import tempfile

# The tests' steps are tiny, so compiling dominates: LLVM's cheapest optimisation level and
# XLA:CPU's older fusion path (half the compile time of the default fusion emitters) shorten
# the compile-bound tests (run-to-run comparisons share the flags).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    " --xla_cpu_use_fusion_emitters=false"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache for the session, inherited by the train.py subprocesses: the many
# identical tiny train/eval steps (reference runs, resumed runs) compile once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="tfx-test-jit-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# model.dtype='auto' measures this machine once (tfx/core/precision.py); under the tests' XLA
# flags, into the session's own cache rather than the user's.
if "TFX_CACHE_DIR" not in os.environ:
    os.environ["TFX_CACHE_DIR"] = tempfile.mkdtemp(prefix="tfx-test-cache-")
    atexit.register(shutil.rmtree, os.environ["TFX_CACHE_DIR"], ignore_errors=True)

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_sessionstart(session):
    if jax.device_count() != 8:
        raise RuntimeError(f"tests need 8 fake CPU devices, got {jax.device_count()}")


import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tfx.core import config as config_lib  # noqa: E402
from tfx.train import trainer  # noqa: E402

from runs import PLAIN_DECODE, tiny_multi30k, tiny_multilingual  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A TFDS data dir shared by the tests that prepare the bundled Multi30k."""
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture
def tiny_config():
    """Factory for a validated tiny config: tiny_config(model={...}, key=value, ...)."""

    def make(model=None, **overrides):
        config = config_lib.default_config()
        config.model.update(dict(vocab_size=50, emb_dim=32, num_heads=4, num_kv_heads=2,
                                 mlp_dim=64, num_encoder_layers=2, num_decoder_layers=2,
                                 max_len=32, dropout_rate=0.0, dtype="float32"))
        config.model.update(model or {})
        config.update(dict(warmup_steps=10, learning_rate=1e-2, per_device_batch_size=2,
                           max_source_length=16, max_target_length=16))
        config.decode.update(PLAIN_DECODE)
        config.update(overrides)
        return config_lib.validate(config)

    return make


def random_batch(seed: int, batch: int, source_len: int, target_len: int, vocab: int) -> dict:
    """Unpacked batch with random lengths (at least 1 token), right-padded with 0."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, length in (("inputs", source_len), ("targets", target_len)):
        tokens = rng.integers(2, vocab, (batch, length)).astype(np.int32)
        lengths = rng.integers(1, length + 1, (batch,))
        tokens[np.arange(length)[None, :] >= lengths[:, None]] = 0
        out[name] = tokens
    return out


@pytest.fixture
def make_batch():
    return random_batch


@pytest.fixture(scope="session")
def trained(data_dir, tmp_path_factory):
    """(config, workdir) of a tiny Multi30k run with checkpoints at steps 2, 4 and 6, decoding
    greedily (evaluate_test and translate_test read it; neither changes its checkpoints)."""
    workdir = str(tmp_path_factory.mktemp("run"))
    config = tiny_multi30k(data_dir, num_train_steps=6, checkpoint_every_steps=2, keep_checkpoints=3,
                           learning_rate=3e-3)
    config.decode.update(strategy="greedy", max_length_offset=4)
    trainer.train(config, workdir)
    return config, workdir


def trained_once(tmp_path_factory, name: str, config) -> tuple[object, str]:
    """(config, workdir) of `config` trained once in the whole test session: the first
    pytest-xdist worker to ask trains it, the others wait for it (a file lock) and read it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the workers' common base directory.
    workdir, done = root / name, root / f"{name}.trained"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            trainer.train(config, str(workdir))
            done.touch()
    return config, str(workdir)


@pytest.fixture(scope="session")
def converged(data_dir, tmp_path_factory):
    """(config, workdir) of the tiny model trained until its greedy translations mostly end by
    themselves (400 steps), for tests that need real outputs (export parity, bfloat16 loss)."""
    # No label smoothing: it would give token 0 the probability the CTranslate2 export renormalises away.
    config = tiny_multi30k(data_dir, num_train_steps=400, checkpoint_every_steps=400, log_every_steps=400,
                           keep_checkpoints=1, schedule="cosine", learning_rate=1e-2, warmup_steps=40,
                           label_smoothing=0.0)
    config.model.dropout_rate = 0.0
    return trained_once(tmp_path_factory, "converged", config)


@pytest.fixture(scope="session")
def multilingual(data_dir, tmp_path_factory):
    """(config, workdir): the tiny model trained en->de and de->en in one (runs.tiny_multilingual,
    300 steps, about 30 s here), for the multilingual and serving tests."""
    config = tiny_multilingual(data_dir, tmp_path_factory.mktemp("test2016"))
    return trained_once(tmp_path_factory, "multilingual", config)


@pytest.fixture(scope="session")
def serving(converged):
    """serve.py on loopback serving the converged run (tests/servers.py) with a 20 ms batching
    window and 32 sentences per request, for the server, page and load tests; stopped with
    SIGTERM at the end of the session, which it must exit 0 on."""
    from servers import Server

    _, workdir = converged
    with Server([f"--workdir={workdir}", "--max_wait_ms=20", "--max_sentences=32"]) as server:
        yield server
        assert server.stop() == 0


@pytest.fixture(scope="session")
def gcs_bucket():
    """gs://tfx-test on a Cloud Storage API server on loopback (tests/gcs_emulator.py), with this
    process's and its subprocesses' clients pointed at it. Tests use prefixes of their own."""
    import gcs_emulator

    with gcs_emulator.running() as bucket:
        yield bucket
