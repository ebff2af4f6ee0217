"""Translation throughput of beam search: prints one JSON line (its last line).

    python bench/decode.py --config configs/wmt_base.py:base --beam 4 --batch 32 \
        [--source-length 32 --gen-length 31 --dtype float32]

Random parameters, random sources of exactly --source-length tokens, and every hypothesis
forced to --gen-length tokens (EOS forbidden), so each run does the same work. It times beam
search with the key/value cache and the same search recomputing the decoder over the prefix at
every step (`full_recompute`), compilation excluded. `decode_gflops` counts the model FLOPs the
cached search needs: the encoder and the cross-attention keys/values once, then for every beam
at every step the decoder's projections, attention over the prefix and the source, and the
vocabulary projection. The peak is a large matmul in the compute dtype (float32 accumulation),
measured in the same run before and after, the best kept.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from peak import measure_peak_gflops

from tfx import config as config_lib
from tfx import parallel
from tfx.flops import decode_flops
from tfx.model import decode
from tfx.model.transformer import EncoderDecoder, count_params


def time_runs(translate, params, inputs, runs: int) -> tuple[float, np.ndarray]:
    """Median seconds of `runs` calls after one warm-up call (which compiles), and the tokens."""
    jax.block_until_ready(translate(params, inputs))
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        tokens = jax.block_until_ready(translate(params, inputs))
        times.append(time.perf_counter() - start)
    return float(np.median(times)), np.asarray(tokens)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/wmt_base.py:base")
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--source-length", type=int, default=32)
    parser.add_argument("--gen-length", type=int, default=31)
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                        help="overrides config.model.dtype (the computation dtype)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of the cached search")
    parser.add_argument("--full-recompute-runs", type=int, default=1,
                        help="timed runs of the search without a cache (0: skip it)")
    args = parser.parse_args()

    config = config_lib.load(args.config)
    if args.dtype:
        config.model.dtype = args.dtype
    mesh = parallel.make_mesh(config.mesh_shape)
    graphdef, params = nnx.split(EncoderDecoder(config.model, nnx.Rngs(params=config.seed)))
    shardings = parallel.state_shardings(params, mesh, config.logical_axis_rules)
    params = jax.device_put(params, shardings)
    rng = np.random.default_rng(0)
    inputs = rng.integers(2, config.model.vocab_size, (args.batch, args.source_length)).astype(np.int32)

    def measure(full_recompute: bool, runs: int) -> dict:
        translate = decode.make_translate(config, graphdef, mesh, shardings, strategy="beam",
                                          beam_size=args.beam, forced_length=args.gen_length,
                                          full_recompute=full_recompute)
        seconds, tokens = time_runs(translate, params, inputs, runs)
        return dict(seconds=round(seconds, 3), sentences_per_sec=round(args.batch / seconds, 2),
                    generated_tokens_per_sec=round(int((tokens > 0).sum()) / seconds, 1))

    devices = list(mesh.devices.flat)
    dtype = jnp.dtype(config.model.dtype)
    peak = measure_peak_gflops(devices, dtype)
    cached = measure(False, args.runs)
    flops = decode_flops(config.model, args.batch, args.beam, args.source_length, args.gen_length)
    result = dict(
        variant=config.variant or args.config, params=count_params(params), dtype=config.model.dtype,
        devices=len(devices), platform=devices[0].platform, beam=args.beam, batch=args.batch,
        source_length=args.source_length, gen_length=args.gen_length, **cached,
        decode_gflops=round(flops / cached["seconds"] / 1e9, 2))
    if args.full_recompute_runs:
        full = measure(True, args.full_recompute_runs)
        result.update({f"full_recompute_{name}": value for name, value in full.items()})
        result["speedup"] = round(full["seconds"] / cached["seconds"], 2)
    peak = max(peak, measure_peak_gflops(devices, dtype))  # the machine may be shared.
    result.update(peak_gflops=round(peak, 2), fraction_of_peak=round(result["decode_gflops"] / peak, 3))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
