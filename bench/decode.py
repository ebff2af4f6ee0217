"""Translation throughput of beam search: prints one JSON line (its last line).

    python bench/decode.py --config configs/wmt_base.py:base --beam 4 --batch 32 \
        [--source_length 32 --gen_length 31 --dtype float32] [--quantization int8] [--ctranslate2]

Random parameters, random sources of exactly --source_length tokens, and every hypothesis
forced to --gen_length tokens (EOS forbidden), so each run does the same work. It times beam
search with the key/value cache and the same search recomputing the decoder over the prefix at
every step (`full_recompute`), compilation excluded: each search's `seconds` are the median,
min and max of its timed runs after a warm-up run, and its rates and ratios are at the median
(bench/stats.py). `decode_gflops` counts the model FLOPs the cached search needs: the encoder and the cross-attention keys/values once, then for every beam
at every step the decoder's projections, attention over the prefix and the source, and the
vocabulary projection. The peak is a large matmul in the compute dtype (float32 accumulation),
timed in the same run before and after the searches: `peak_gflops` summarises those runs and
`fraction_of_peak` relates the medians.

`--quantization int8` decodes with int8 matmuls (tfx/model/quantize.py) and times the cached search
with float matmuls too, alternating the two run by run; `int8_speedup` is the float search's
seconds over the int8 search's (above 1: int8 is faster); `float_matmuls` has its figures.

`--shortlist FILE` (a lexical shortlist of the model's vocabulary size, `python -m
tfx.compress.shortlist`) times the cached search over each batch's shortlist of --shortlist_size
tokens too, alternating; `shortlist_speedup` is the whole vocabulary's seconds over the
shortlist's (figures under `shortlist`).

`--ctranslate2` also times CTranslate2 on CPU (float32 and int8 computation, one thread per
core, the same batch and beam) on the same model exported by `tfx.export.ctranslate2.ctranslate2_spec`
with a synthetic vocabulary, its hypotheses forced to --gen_length tokens too
(min = max decoding length). CTranslate2 appends EOS to each source itself, so it gets the
first --source_length - 1 tokens of each: the same length. `tfx_over_ctranslate2_*` is tfx's
sentences/s over CTranslate2's (above 1: tfx is faster).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tfx.core import config as config_lib
from tfx.core import host_memory, parallel, precision
from tfx.model import decode
from tfx.model.flops import decode_flops
from tfx.model.transformer import EncoderDecoder, count_params

from peak import cpu_name, matmul_gflops
from stats import interleaved_run_times, run_times, summary


def time_runs(translates: dict, params, inputs, runs: int) -> dict[str, tuple[list[float], np.ndarray]]:
    """Per translate function, the seconds of `runs` calls after one warm-up call (which
    compiles), and its tokens; the functions take turns (bench/stats.py)."""
    timed = interleaved_run_times({name: lambda t=translate: jax.block_until_ready(t(params, inputs))
                                   for name, translate in translates.items()}, runs)
    return {name: (times, np.asarray(tokens)) for name, (times, tokens) in timed.items()}


def figures(seconds: list[float], sentences: int, tokens: int) -> dict:
    """The seconds of the timed runs (median, min, max) and the rates at the median."""
    median = float(np.median(seconds))
    return dict(seconds=summary(seconds), sentences_per_sec=round(sentences / median, 2),
                generated_tokens_per_sec=round(tokens / median, 1))


def ratio(slower: dict, faster: dict) -> float:
    """How many times faster `faster` is than `slower` (medians of their seconds)."""
    return round(slower["seconds"]["median"] / faster["seconds"]["median"], 3)


def measure_ctranslate2(config, params, inputs: np.ndarray, beam: int, gen_length: int, runs: int) -> dict:
    """Seconds, sentences/s and generated tokens/s of CTranslate2 translating `inputs` with the
    model of `config` and `params`, per compute type (see the module doc)."""
    import ctranslate2

    from tfx.export import ctranslate2 as export

    pieces = ["<pad>", "</s>", "<unk>"] + [f"piece{i}" for i in range(3, config.model.vocab_size)]
    spec = export.ctranslate2_spec(config.model, jax.device_get(nnx.to_pure_dict(params)), pieces)
    sources = [[pieces[i] for i in row[:-1]] for row in inputs.tolist()]
    threads = len(os.sched_getaffinity(0))
    result = {"ctranslate2_intra_threads": threads}
    with tempfile.TemporaryDirectory() as scratch:
        path = export.write_ctranslate2(spec, os.path.join(scratch, "model"))
        for compute_type in ("float32", "int8"):
            translator = ctranslate2.Translator(path, device="cpu", compute_type=compute_type,
                                                intra_threads=threads)
            times, outputs = run_times(lambda: translator.translate_batch(
                sources, beam_size=beam, min_decoding_length=gen_length,
                max_decoding_length=gen_length), runs)
            tokens = sum(len(output.hypotheses[0]) for output in outputs)
            if tokens != len(sources) * gen_length:
                raise RuntimeError(f"CTranslate2 generated {tokens} tokens, not {len(sources)} x {gen_length}.")
            result[f"ctranslate2_{compute_type}"] = figures(times, len(sources), tokens)
    return result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/wmt_base.py:base")
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--source_length", "--source-length", type=int, default=32)
    parser.add_argument("--gen_length", "--gen-length", type=int, default=31)
    parser.add_argument("--dtype", default=None, choices=config_lib.DTYPES,
                        help="overrides config.model.dtype (the computation dtype)")
    parser.add_argument("--quantization", default=None, choices=config_lib.QUANTIZATIONS,
                        help="overrides config.quantization; int8 also times float matmuls, alternated")
    parser.add_argument("--shortlist", default="",
                        help="a lexical shortlist: also times the cached search with it, alternated")
    parser.add_argument("--shortlist_size", "--shortlist-size", type=int, default=1024, help="tokens a batch decodes over")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of the cached search")
    parser.add_argument("--full_recompute_runs", "--full-recompute-runs", type=int, default=1,
                        help="timed runs of the search without a cache (0: skip it)")
    parser.add_argument("--ctranslate2", action="store_true",
                        help="also time CTranslate2 (float32 and int8) on the same model and inputs")
    return parser.parse_args()


def time_searches(args: argparse.Namespace, config, graphdef, mesh, shardings, params,
                  inputs: np.ndarray) -> dict[str, dict]:
    """figures() of the cached search ("cached") and, alternated with it, of the same search with
    float matmuls ("float", under int8) and over a shortlist ("shortlist"); and of the search
    without a cache ("full_recompute") after them, unless --full_recompute_runs is 0."""
    def translator(config, full_recompute: bool = False, **shortlist):
        return decode.make_translate(config, graphdef, mesh, shardings, strategy="beam",
                                     beam_size=args.beam, forced_length=args.gen_length,
                                     full_recompute=full_recompute, **shortlist)

    translates = {"cached": translator(config)}
    if config.quantization == "int8":
        float_config = config.copy_and_resolve_references()
        float_config.quantization = "none"
        translates["float"] = translator(float_config)
    if args.shortlist:
        translates["shortlist"] = translator(config, shortlist=args.shortlist,
                                             shortlist_size=args.shortlist_size)
    timed = time_runs(translates, params, inputs, args.runs)
    if args.full_recompute_runs:
        timed.update(time_runs({"full_recompute": translator(config, True)}, params, inputs,
                               args.full_recompute_runs))
    return {name: figures(seconds, args.batch, int((tokens > 0).sum()))
            for name, (seconds, tokens) in timed.items()}


def main():
    args = parse_args()
    host_memory.keep_freed_memory_on_cpu()
    config = config_lib.load(args.config)
    config.model.dtype = precision.resolve(args.dtype or config.model.dtype)
    config.quantization = args.quantization or config.quantization
    mesh = parallel.make_mesh(config.mesh_shape)
    graphdef, params = nnx.split(EncoderDecoder(config.model, nnx.Rngs(params=config.seed)))
    shardings = parallel.state_shardings(params, mesh, config.logical_axis_rules)
    params = jax.device_put(params, shardings)
    rng = np.random.default_rng(0)
    inputs = rng.integers(2, config.model.vocab_size, (args.batch, args.source_length)).astype(np.int32)
    devices = list(mesh.devices.flat)
    dtype = jnp.dtype(config.model.dtype)
    peak = matmul_gflops(devices, dtype)
    searches = time_searches(args, config, graphdef, mesh, shardings, params, inputs)
    cached = searches.pop("cached")
    flops = decode_flops(config.model, args.batch, args.beam, args.source_length, args.gen_length)
    result = dict(
        variant=config.variant or args.config, params=count_params(params), dtype=config.model.dtype,
        quantization=config.quantization, devices=len(devices), platform=devices[0].platform,
        cpu=cpu_name(), beam=args.beam, batch=args.batch, source_length=args.source_length,
        gen_length=args.gen_length, runs=args.runs, **cached,
        decode_gflops=round(flops / cached["seconds"]["median"] / 1e9, 2))
    if "float" in searches:
        result.update(float_matmuls=searches["float"], int8_speedup=ratio(searches["float"], cached))
    if "shortlist" in searches:
        result.update(shortlist_size=args.shortlist_size, shortlist=searches["shortlist"],
                      shortlist_speedup=ratio(cached, searches["shortlist"]))
    if "full_recompute" in searches:
        result.update(full_recompute=searches["full_recompute"],
                      speedup=ratio(searches["full_recompute"], cached))
    if args.ctranslate2:
        result.update(measure_ctranslate2(config, params, inputs, args.beam, args.gen_length, args.runs))
        for compute_type in ("float32", "int8"):
            result[f"tfx_over_ctranslate2_{compute_type}"] = ratio(result[f"ctranslate2_{compute_type}"], cached)
    peak = summary(peak + matmul_gflops(devices, dtype))  # before and after: the machine may be shared.
    result.update(peak_gflops=peak, fraction_of_peak=round(result["decode_gflops"] / peak["median"], 3))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
