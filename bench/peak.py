"""The matmul peak that benchmarks relate their FLOP rates to, measured in the same run, and
the name of the CPU they ran on."""
from __future__ import annotations

import os
import platform
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec


def measure_peak_gflops(devices, dtype=jnp.float32, n: int = 2048, repeats: int = 10) -> float:
    """Matmul GFLOP/s of `devices` together (one n x n x n product per device) with `dtype`
    operands and float32 accumulation, as the model's projections compute."""
    mesh = jax.make_mesh((len(devices),), ("d",), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, PartitionSpec("d"))
    a = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (len(devices), n, n), dtype), sharding)
    b = jax.device_put(jax.random.normal(jax.random.PRNGKey(1), (len(devices), n, n), dtype), sharding)
    matmul = jax.jit(lambda x, y: jnp.einsum("bij,bjk->bik", x, y, preferred_element_type=jnp.float32),
                     out_shardings=sharding)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * len(devices) / best / 1e9


def cpu_name() -> str:
    """The CPU model and its bfloat16 matrix extensions, from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info = f.read()
    except OSError:
        return platform.processor()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), platform.processor())
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines()
                      if line.startswith("flags")), []))
    extensions = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({os.cpu_count()} cores; {' '.join(extensions)})"
