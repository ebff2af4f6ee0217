"""`model.dtype='auto'`: bfloat16 where the backend multiplies bfloat16 faster, float32 elsewhere.

TPUs and NVIDIA GPUs from Ampere on (compute capability 8.0) multiply bfloat16 at several times
their float32 rate. On a CPU it depends on the chip and on XLA's kernels for it, so flags do
not decide: the first `auto` on a machine times a small Transformer MLP block (forward and
backward, float32 parameters cast to the compute dtype, as the model does) in both dtypes,
their runs interleaved, and picks bfloat16 only if it is at least `MARGIN` times as fast. The
choice is cached per machine (CPU model, core count, jax and jaxlib versions, XLA_FLAGS) in
`cache_path()`, so every run and every process of a host choose alike. A multi-process CPU run
computes in float32: its hosts could measure differently, and all must compile the same
program (accelerators decide the same everywhere, by platform).
"""
from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from tfx.core import files

AUTO = "auto"
CPUINFO = "/proc/cpuinfo"
MARGIN = 1.1  # bfloat16 must be this much faster: ties go to float32's precision.
CACHE_FILE = "dtype_auto.json"


def cpu_info(path: str = CPUINFO) -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ('model name', 'flags', ...); empty where
    there is none."""
    info: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def choose(platform: str, compute_capability: str | None = None) -> tuple[str, str] | None:
    """(dtype, why) for an accelerator platform as jax names it ('tpu', 'gpu'), with the GPU's
    compute capability ('8.0'); None for a CPU, which `measure` decides."""
    if platform == "tpu":
        return "bfloat16", "TPU matrix units"
    if platform in ("gpu", "cuda", "rocm"):
        if compute_capability is None:
            return "float32", "GPU of unknown compute capability"
        major = int(compute_capability.split(".")[0])
        if major >= 8:
            return "bfloat16", f"GPU of compute capability {compute_capability} (bfloat16 tensor cores)"
        return "float32", f"GPU of compute capability {compute_capability} (no bfloat16 tensor cores)"
    if platform == "cpu":
        return None
    return "float32", f"platform {platform!r}"


@jax.custom_vjp
def _projection(x, w_f32):
    """x @ w in x's dtype with float32 accumulation, as the model's projections compute."""
    return jnp.dot(x, w_f32.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


def _projection_forward(x, w_f32):
    return _projection(x, w_f32), (x, w_f32.astype(x.dtype))


def _projection_backward(saved, grad_out):
    x, w = saved
    grad_out = grad_out.astype(x.dtype)
    grad_x = jnp.dot(grad_out, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
    return grad_x, jnp.dot(x.T, grad_out, preferred_element_type=jnp.float32)


_projection.defvjp(_projection_forward, _projection_backward)


def mlp_step_seconds(dtypes: Sequence[str] = ("float32", "bfloat16"), tokens: int = 2048,
                     width: int = 256, runs: int = 9) -> dict[str, float]:
    """Median seconds of one forward and backward pass through a width x 4*width MLP block on
    `tokens` tokens, computing in each of `dtypes` from float32 parameters, on the first device.
    The dtypes' runs alternate (in turn, the order reversed every other round), so a machine
    whose speed drifts while it measures (a neighbour's load, the clock) slows each alike."""
    with jax.ensure_compile_time_eval():  # real timings even when 'auto' is first met in a trace
        steps = {dtype: _mlp_step(jnp.dtype(dtype), tokens, width) for dtype in dtypes}
        times: dict[str, list[float]] = {dtype: [] for dtype in dtypes}
        for run in range(runs):
            for dtype in (dtypes if run % 2 == 0 else dtypes[::-1]):
                start = time.perf_counter()
                jax.block_until_ready(steps[dtype]())
                times[dtype].append(time.perf_counter() - start)
        return {dtype: float(np.median(seconds)) for dtype, seconds in times.items()}


def _mlp_step(compute: jnp.dtype, tokens: int, width: int) -> Callable[[], object]:
    """The block's compiled gradient step on fixed inputs, run once (compiled) already."""
    def loss(params, x):
        hidden = jax.nn.relu(_projection(x.astype(compute), params[0]))
        return jnp.sum(_projection(hidden, params[1]).astype(jnp.float32) ** 2)

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    params = (jax.random.normal(keys[0], (width, 4 * width)) / width**0.5,
              jax.random.normal(keys[1], (4 * width, width)) / (2 * width))
    x = jax.random.normal(keys[2], (tokens, width))
    step = jax.jit(jax.grad(loss))
    jax.block_until_ready(step(params, x))
    return lambda: step(params, x)


def cache_path() -> str:
    """Where measured choices are kept: $TFX_CACHE_DIR, else $XDG_CACHE_HOME/tfx or ~/.cache/tfx."""
    root = os.environ.get("TFX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tfx")
    return os.path.join(root, CACHE_FILE)


def machine_key() -> str:
    """This machine as far as XLA's CPU speed goes: CPU model, cores, jax and jaxlib versions,
    and XLA_FLAGS (which can change the kernels)."""
    import jaxlib
    name = cpu_info().get("model name", "unknown CPU")
    return (f"{name} | {os.cpu_count()} cores | jax {jax.__version__} | jaxlib {jaxlib.__version__}"
            f" | XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}")


def _read_cache(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _write_cache(path: str, entries: dict) -> None:
    """Atomically; a cache that cannot be written only costs a measurement next time."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        files.write_text(path, json.dumps(entries, indent=1, sort_keys=True))
    except OSError as error:
        logging.warning("could not cache the dtype choice in %s: %s", path, error)


def measure() -> tuple[str, str]:
    """(dtype, why) on this CPU: cached, or timed now and cached."""
    path, key = cache_path(), machine_key()
    entries = _read_cache(path)
    entry = entries.get(key)
    if not (isinstance(entry, dict) and {"float32_s", "bfloat16_s"} <= entry.keys()):
        entry = {f"{dtype}_s": seconds for dtype, seconds in mlp_step_seconds().items()}
        entries[key] = entry
        _write_cache(path, entries)
    speedup = entry["float32_s"] / entry["bfloat16_s"]
    dtype = "bfloat16" if speedup >= MARGIN else "float32"
    why = (f"measured on this CPU, an MLP block's train step is {speedup:.2f}x as fast in bfloat16 "
           f"({entry['bfloat16_s'] * 1e3:.1f} ms against {entry['float32_s'] * 1e3:.1f} ms; "
           f"bfloat16 needs {MARGIN}x; cached in {path})")
    return dtype, why


@functools.cache
def auto_dtype(platform: str | None = None) -> tuple[str, str]:
    """(dtype, why) that 'auto' means on `platform` (default: this process's JAX backend)."""
    platform = platform or jax.default_backend()
    capability = None
    if platform != "cpu" and platform == jax.default_backend():
        capability = getattr(jax.devices()[0], "compute_capability", None)
    chosen = choose(platform, capability)
    if chosen is None and jax.process_count() > 1:
        chosen = "float32", "a multi-process CPU run (hosts could measure differently)"
    dtype, why = chosen or measure()
    logging.info("config.model.dtype='auto' computes in %s: %s", dtype, why)
    return dtype, why


def resolve(dtype: str, platform: str | None = None) -> str:
    """`dtype` with 'auto' replaced by its choice on `platform`."""
    return auto_dtype(platform)[0] if dtype == AUTO else dtype


def compute_dtype(dtype: str) -> jnp.dtype:
    """The jnp dtype of `config.model.dtype` ('auto' resolved on this process's backend)."""
    return jnp.dtype(resolve(dtype))
