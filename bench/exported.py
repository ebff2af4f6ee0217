"""BLEU and speed of one trained checkpoint in tfx and exported to CTranslate2 (float32 and
int8): prints one JSON line (its last line).

    python bench/exported.py --config configs/multi30k.py --workdir runs/multi30k \
        --checkpoint average:5 [--split test] [--beam 4] [--runs 3] [--dtype float32] [--length_penalty A] \
        [--cache_window N] [--ct2_length_penalty 1.0] [--shortlist runs/multi30k/shortlist.npz [--shortlist_size 1024]]

All engines translate the same sentences (config.data[split]) with the same beam and batch size
(per_device_eval_batch_size x the data-parallel devices; both sort by length). tfx decodes as
config.decode says (GNMT length penalty); CTranslate2 with its own length penalty,
score / length ** --ct2_length_penalty, and at most model.max_len tokens. Each engine runs the
whole set once to warm up (tfx compiles its shapes then), then the engines take turns, each
timed once per round for --runs rounds, so a shared machine's drifting load hits them alike:
`seconds` is their median, min and max, and the rates are at the median (bench/stats.py).
CTranslate2 gets intra_threads = the CPU cores. BLEU is sacreBLEU on the detokenized output;
`tfx_speed_ratio` is tfx's sentences/s over the export's (at the medians). `--ct2_rules` also
times tfx decoding by CTranslate2's rules (`tfx_ct2_rules`: a sentence stops once beam_size
hypotheses have finished, outputs stop at model.max_len tokens, no cap per sentence), with its
ratio `tfx_ct2_rules_speed_ratio`. With --shortlist (a
lexical shortlist, `python -m tfx.compress.shortlist`) tfx decodes over each batch's shortlist
and CTranslate2 over the export's vocabulary map of it (`use_vmap`).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import tempfile

import ctranslate2
import jax
import ml_collections
import numpy as np

from tfx.core import config as config_lib
from tfx.core import host_memory
from tfx.data import sources
from tfx.export.ctranslate2 import export_ctranslate2
from tfx.infer import evaluate, trained
from tfx.infer.translate import Translator

from peak import cpu_name
from stats import interleaved_run_times, summary


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/multi30k.py")
    parser.add_argument("--workdir", default="runs/multi30k")
    parser.add_argument("--checkpoint", default="average:5")
    parser.add_argument("--split", default="test", choices=("eval", "test"))
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--length_penalty", "--length-penalty", type=float, default=None,
                        help="tfx's GNMT alpha (default: config.decode.length_penalty)")
    parser.add_argument("--ct2_length_penalty", "--ct2-length-penalty", type=float, default=1.0)
    parser.add_argument("--shortlist", default="", help="a lexical shortlist for both engines")
    parser.add_argument("--shortlist_size", "--shortlist-size", type=int, default=None,
                        help="tfx's tokens per batch (default: config.decode.shortlist_size)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of the whole set per engine")
    parser.add_argument("--dtype", default="float32", choices=config_lib.DTYPES,
                        help="tfx's compute dtype (model.dtype; float32 compares with CTranslate2 float32)")
    parser.add_argument("--cache_window", "--cache-window", type=int, default=None,
                        help="tfx's decode.cache_window (0: attention over the whole cache)")
    parser.add_argument("--ct2_rules", "--ct2-rules", action="store_true",
                        help="also time tfx with CTranslate2's stop and length limit (tfx_ct2_rules)")
    return parser.parse_args()


def load_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
    config = config_lib.load(args.config)
    config.decode.update(strategy="beam", beam_size=args.beam)
    config.model.dtype = args.dtype
    if args.length_penalty is not None:
        config.decode.length_penalty = args.length_penalty
    config.decode.shortlist = args.shortlist
    if args.cache_window is not None:
        config.decode.cache_window = args.cache_window
    if args.shortlist_size:
        config.decode.shortlist_size = args.shortlist_size
    return config_lib.validate(config)


def ct2_rules(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` decoding with CTranslate2's stop and length limit: a sentence ends once beam_size
    hypotheses have finished (its rule with a length penalty), and outputs end at model.max_len
    tokens for the whole batch, with no cap per sentence."""
    config = config.copy_and_resolve_references()
    config.decode.update(beam_stop="fairseq", max_len_a=0.0, max_len_b=0,
                         max_length_offset=config.model.max_len, max_length=config.model.max_len)
    return config


def tfx_engine(translator: Translator):
    """A function of source lines -> (translations, generated tokens with EOS) in tfx."""
    def translate(lines):
        results, report = translator.translate(lines)
        return [h[0].text for h in results], report.tokens
    return translate


def ctranslate2_engine(model: trained.TrainedModel, directory: str, quantization: str,
                       args: argparse.Namespace, rows: int):
    """A function of source lines -> (translations, generated tokens with EOS) that CTranslate2
    runs on `model` exported to `directory` with `quantization` weights."""
    directory = export_ctranslate2(model, directory, quantization)
    engine = ctranslate2.Translator(directory, device="cpu", compute_type=quantization,
                                    intra_threads=os.cpu_count() or 1)
    tokenizer, pieces = model.tokenizer, model.tokenizer.pieces()
    ids = {piece: i for i, piece in enumerate(pieces)}

    def translate(lines):
        # tfx's tokenizer both ways (either kind, with its source prefix); the export adds EOS.
        sources = [[pieces[i] for i in tokenizer.encode_source(line)[:-1]] for line in lines]
        outputs = engine.translate_batch(
            sources, beam_size=args.beam, max_batch_size=rows, length_penalty=args.ct2_length_penalty,
            max_decoding_length=model.config.model.max_len, use_vmap=bool(args.shortlist))
        return ([tokenizer.decode([ids[p] for p in o.hypotheses[0]]) for o in outputs],
                sum(len(o.hypotheses[0]) + 1 for o in outputs))  # EOS included, as tfx.
    return translate


def measure(engines: dict, sentences: list[str], references: list[str], runs: int
            ) -> tuple[dict, str]:
    """Per engine: BLEU of its output, the seconds of its timed runs of the whole set (median,
    min, max) and its rates at the median, with `tfx_speed_ratio` for the exports; and the
    sacreBLEU signature."""
    results, signature = {}, ""
    timed = interleaved_run_times(
        {name: functools.partial(translate, sentences) for name, translate in engines.items()}, runs)
    for name, (times, (hypotheses, tokens)) in timed.items():
        bleu = evaluate.score(hypotheses, [references], ("bleu",))["bleu"]
        median = float(np.median(times))
        signature = bleu["signature"]
        results[name] = dict(bleu=round(bleu["score"], 2), seconds=summary(times),
                             sentences_per_sec=round(len(sentences) / median, 1),
                             tokens_per_sec=round(tokens / median, 1))
    for name in engines:
        if name.startswith("ctranslate2"):
            for tfx in (n for n in engines if n.startswith("tfx")):
                results[name][f"{tfx}_speed_ratio"] = round(
                    results[name]["seconds"]["median"] / results[tfx]["seconds"]["median"], 3)
    return results, signature


def main():
    args = parse_args()
    host_memory.keep_freed_memory_on_cpu()
    config = load_config(args)
    model = trained.load(config, args.workdir, args.checkpoint)
    d = config.data
    split = sources.open_split(d[args.split], f"data.{args.split}", d.source_lang, d.target_lang,
                               d.data_dir)
    pairs = [split[i] for i in range(len(split))]
    sentences, references = [p["source"] for p in pairs], [p["target"] for p in pairs]
    translator = Translator(model)
    engines = {"tfx": tfx_engine(translator)}
    if args.ct2_rules:
        engines["tfx_ct2_rules"] = tfx_engine(Translator(dataclasses.replace(
            model, config=ct2_rules(config))))
    with tempfile.TemporaryDirectory() as scratch:
        for quantization in ("float32", "int8"):
            engines[f"ctranslate2_{quantization}"] = ctranslate2_engine(
                model, os.path.join(scratch, quantization), quantization, args, translator.rows)
        results, signature = measure(engines, sentences, references, args.runs)
    print(json.dumps(dict(config=args.config, workdir=args.workdir, checkpoint=model.label,
                          split=d[args.split], sentences=len(sentences), beam=args.beam,
                          batch=translator.rows, tfx_length_penalty=config.decode.length_penalty,
                          ct2_length_penalty=args.ct2_length_penalty, shortlist=args.shortlist,
                          shortlist_size=config.decode.shortlist_size if args.shortlist else None,
                          cache_window=config.decode.cache_window, runs=args.runs, cpu=cpu_name(),
                          devices=jax.device_count(),
                          signature=signature, **results)))


if __name__ == "__main__":
    main()
