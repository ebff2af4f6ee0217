"""Train-step throughput and MFU: prints one JSON line (its last line).

    python bench/train.py --config configs/wmt_base.py:base [--mesh data:-1] [--steps 10] [--dtype bfloat16]
        [--remat none|full|dots] [--scan_layers] [--without_stop]

Batches are synthetic sentence pairs of realistic, varied lengths packed into rows of
max_source_length/max_target_length, so the figures reflect the real step. Model FLOPs
(`tfx/model/flops.py`) count only non-padding tokens: 6 x the weights each source/target token
meets, plus the attention score/value products within each pair (causal half for decoder
self-attention). Like train.py's, each batch carries the preemption `stop` column that all
processes agree on inside the step; `--without_stop` leaves it out, to measure what it costs.
The peak is a large matmul in the model's compute dtype (float32 accumulation) timed in the
same run on the same devices, before and after the steps; `fraction_of_f32_peak` also relates
the achieved rate to the float32 peak. `step_time_s` and the peaks are the median, min and max
of their timed runs after warm-up; the rates and ratios are at the medians (bench/stats.py).
"""
from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from tfx.core import host_memory, parallel
from tfx.model.flops import train_flops
from tfx.model.transformer import count_params
from tfx.train import steps

import options
from peak import matmul_gflops
from stats import summary


def packed_rows(rng, rows: int, source_len: int, target_len: int, vocab: int, tries: int = 8):
    """Packs random pairs into rows, like a first-fit packer looking `tries` pairs ahead.

    Source lengths are uniform in [10%, 25%] of the row, targets 0.8-1.25 times the source.
    Returns the batch and the (source_len, target_len) of every packed pair.
    """
    names = ("inputs", "targets")
    batch = {f"{n}{s}": np.zeros((rows, L), np.int32) for n, L in zip(names, (source_len, target_len))
             for s in ("", "_segment_ids", "_positions")}
    pairs = []
    for r in range(rows):
        used_s = used_t = misses = 0
        segment = 1
        while misses < tries:
            s = int(rng.integers(source_len // 10, source_len // 4 + 1))
            t = max(1, int(s * rng.uniform(0.8, 1.25)))
            if used_s + s > source_len or used_t + t > target_len:
                misses += 1
                continue
            for name, start, length in (("inputs", used_s, s), ("targets", used_t, t)):
                batch[name][r, start:start + length] = rng.integers(3, vocab, length)
                batch[f"{name}_segment_ids"][r, start:start + length] = segment
                batch[f"{name}_positions"][r, start:start + length] = np.arange(length)
            used_s, used_t, segment = used_s + s, used_t + t, segment + 1
            pairs.append((s, t))
    return batch, pairs


def synthetic_batches(config, mesh, count: int, stop_column: bool) -> tuple[list, list, list]:
    """`count` packed batches placed on the mesh, with each one's model FLOPs and target tokens;
    with `stop_column`, the zero preemption column train.py feeds."""
    global_batch = config.per_device_batch_size * parallel.data_parallel_size(
        mesh, config.logical_axis_rules)
    rng = np.random.default_rng(0)
    data = [packed_rows(rng, global_batch, config.max_source_length, config.max_target_length,
                        config.model.vocab_size) for _ in range(count)]
    if stop_column:
        for batch, _ in data:
            batch["stop"] = np.zeros((global_batch, 1), np.int32)
    batches = [parallel.shard_batch(b, mesh, config.logical_axis_rules) for b, _ in data]
    flops = [train_flops(config.model, pairs) for _, pairs in data]
    target_tokens = [sum(t for _, t in pairs) for _, pairs in data]
    return batches, flops, target_tokens


def peaks(devices, dtype) -> tuple[list[float], list[float]]:
    """matmul_gflops of the compute dtype and of float32 (measured once when they coincide)."""
    peak = matmul_gflops(devices, dtype)
    return peak, (peak if dtype == jnp.float32 else matmul_gflops(devices))


def main():
    parser = options.parser(__doc__)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--batches", type=int, default=4, help="distinct synthetic batches cycled")
    parser.add_argument("--without_stop", "--without-stop", action="store_true",
                        help="leave out the preemption stop column that train.py feeds")
    args = parser.parse_args()
    host_memory.keep_freed_memory_on_cpu()
    config = options.load_config(args)
    mesh = parallel.make_mesh(config.mesh_shape)
    batches, flops, target_tokens = synthetic_batches(config, mesh, args.batches, not args.without_stop)
    graphdef, state, shardings = steps.create_train_state(config, mesh)
    train_step = steps.make_train_step(config, graphdef, mesh, shardings)
    for i in range(2):
        state, metrics = train_step(state, batches[i % len(batches)])
    jax.block_until_ready(metrics)

    # The machine may be shared: the peak's runs before and after the steps are pooled, and
    # every figure is a median, so a noisy moment cannot flatter the ratio.
    devices = list(mesh.devices.flat)
    peak, f32_peak = peaks(devices, jnp.dtype(config.model.dtype))
    step_times = []
    for i in range(args.steps):
        start = time.perf_counter()
        state, metrics = train_step(state, batches[i % len(batches)])
        jax.block_until_ready(metrics)
        step_times.append(time.perf_counter() - start)
    peak_after, f32_peak_after = peaks(devices, jnp.dtype(config.model.dtype))
    peak, f32_peak = summary(peak + peak_after), summary(f32_peak + f32_peak_after)

    step_time = float(np.median(step_times))
    # The work per step, averaged over the batches the timed steps cycled through.
    flops_per_step = float(np.mean([flops[i % len(batches)] for i in range(args.steps)]))
    tokens_per_step = float(np.mean([target_tokens[i % len(batches)] for i in range(args.steps)]))
    achieved = flops_per_step / step_time / 1e9
    global_batch = batches[0]["targets"].shape[0]
    print(json.dumps(dict(
        variant=config.variant or args.config, params=count_params(state.params),
        mesh=dict(mesh.shape), devices=jax.device_count(), platform=jax.devices()[0].platform,
        global_batch=global_batch, source_length=config.max_source_length,
        target_length=config.max_target_length, dtype=config.model.dtype,
        remat=config.model.remat, scan_layers=config.model.scan_layers, steps=args.steps,
        stop_column=not args.without_stop, step_time_s=summary(step_times),
        target_tokens_per_sec=round(tokens_per_step / step_time, 1),
        non_padding_fraction=round(tokens_per_step / (global_batch * config.max_target_length), 3),
        model_flops_per_step=flops_per_step, achieved_gflops=round(achieved, 2),
        peak_gflops=peak, mfu=round(achieved / peak["median"], 3),
        f32_peak_gflops=f32_peak, fraction_of_f32_peak=round(achieved / f32_peak["median"], 3),
        final_loss=round(float(metrics["loss"]), 4),
    )))


if __name__ == "__main__":
    main()
