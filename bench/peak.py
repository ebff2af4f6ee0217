"""The matmul peak that benchmarks relate their FLOP rates to, measured in the same run, and
the name of the CPU they ran on. Alone it prints one JSON line (its last line):

    python bench/peak.py [--dtype bfloat16] [--runs 10]

`peak_gflops` is the median, min and max GFLOP/s of --runs timed matmuls after a warm-up, on
all local devices together.
"""
from __future__ import annotations

import argparse
import json
import os
import platform

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from tfx.core import precision

from stats import run_times, summary


def matmul_gflops(devices, dtype=jnp.float32, n: int = 2048, repeats: int = 10) -> list[float]:
    """Matmul GFLOP/s of `devices` together (one n x n x n product per device) with `dtype`
    operands and float32 accumulation, as the model's projections compute: one figure per timed
    run after a warm-up (benchmarks take the median of the runs before and after their own, with
    `stats.summary`, as their peak)."""
    mesh = jax.make_mesh((len(devices),), ("d",), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, PartitionSpec("d"))
    a = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (len(devices), n, n), dtype), sharding)
    b = jax.device_put(jax.random.normal(jax.random.PRNGKey(1), (len(devices), n, n), dtype), sharding)
    matmul = jax.jit(lambda x, y: jnp.einsum("bij,bjk->bik", x, y, preferred_element_type=jnp.float32),
                     out_shardings=sharding)
    times, _ = run_times(lambda: matmul(a, b).block_until_ready(), repeats)
    return [2 * n**3 * len(devices) / seconds / 1e9 for seconds in times]


def cpu_name() -> str:
    """The CPU model and its bfloat16 matrix extensions, from /proc/cpuinfo."""
    info = precision.cpu_info()
    if not info:
        return platform.processor()
    name = info.get("model name") or platform.processor()
    flags = set(info.get("flags", "").split())
    extensions = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({os.cpu_count()} cores; {' '.join(extensions)})"


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="the operands' dtype (float32 accumulation)")
    parser.add_argument("--n", type=int, default=2048, help="the matmul's size, n x n x n per device")
    parser.add_argument("--runs", type=int, default=10, help="timed matmuls after a warm-up")
    args = parser.parse_args()
    devices = jax.local_devices()
    rates = matmul_gflops(devices, jnp.dtype(args.dtype), args.n, args.runs)
    print(json.dumps(dict(cpu=cpu_name(), platform=devices[0].platform, devices=len(devices),
                          dtype=args.dtype, n=args.n, runs=args.runs,
                          peak_gflops=summary(rates))))


if __name__ == "__main__":
    main()
