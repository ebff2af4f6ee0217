"""`model.dtype='auto'`: bfloat16 where the backend multiplies bfloat16 fast, float32 elsewhere.

TPUs and NVIDIA GPUs from Ampere on (compute capability 8.0) multiply bfloat16 at several times
their float32 rate. On CPUs XLA gets that rate only from AMX tiles (the `amx_bf16` flag, Intel
Xeon from Sapphire Rapids on): with AVX512-BF16 alone (AMD Zen 4) its bfloat16 matmuls run no
faster than float32 and the converts around them make a train step slower (docs/model.md,
"Precision"), so such CPUs get float32.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from absl import logging

AUTO = "auto"
CPUINFO = "/proc/cpuinfo"


def cpu_flags(path: str = CPUINFO) -> frozenset[str]:
    """The CPU feature flags Linux reports (empty where there is no /proc/cpuinfo)."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def choose(platform: str, compute_capability: str | None = None,
           flags: frozenset[str] = frozenset()) -> tuple[str, str]:
    """(dtype, why) for a backend: `platform` as jax names it ('cpu', 'gpu', 'tpu'), the GPU's
    compute capability ('8.0'), the CPU's flags."""
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
        if "amx_bf16" in flags:
            return "bfloat16", "CPU with AMX-BF16 matrix units"
        if "avx512_bf16" in flags:
            return "float32", "CPU with AVX512-BF16 but no AMX: XLA's bfloat16 matmuls are no faster there"
        return "float32", "CPU without bfloat16 matrix units"
    return "float32", f"platform {platform!r}"


@functools.cache
def auto_dtype(platform: str | None = None) -> tuple[str, str]:
    """(dtype, why) that 'auto' means on `platform` (default: this process's JAX backend)."""
    platform = platform or jax.default_backend()
    capability = None
    if platform != "cpu" and platform == jax.default_backend():
        capability = getattr(jax.devices()[0], "compute_capability", None)
    dtype, why = choose(platform, capability, cpu_flags() if platform == "cpu" else frozenset())
    logging.info("config.model.dtype='auto' computes in %s: %s", dtype, why)
    return dtype, why


def resolve(dtype: str, platform: str | None = None) -> str:
    """`dtype` with 'auto' replaced by its choice on `platform`."""
    return auto_dtype(platform)[0] if dtype == AUTO else dtype


def compute_dtype(dtype: str) -> jnp.dtype:
    """The jnp dtype of `config.model.dtype` ('auto' resolved on this process's backend)."""
    return jnp.dtype(resolve(dtype))
