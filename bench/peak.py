"""The matmul peak that benchmarks relate their FLOP rates to, measured in the same run."""
from __future__ import annotations

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
