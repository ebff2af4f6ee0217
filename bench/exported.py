"""BLEU and speed of one trained checkpoint in tfx and exported to CTranslate2 (float32 and
int8): prints one JSON line (its last line).

    python bench/exported.py --config configs/multi30k.py --workdir runs/multi30k \
        --checkpoint average:5 [--split test] [--beam 4] [--length-penalty A] [--ct2-length-penalty 1.0] \
        [--shortlist runs/multi30k/shortlist.npz [--shortlist-size 1024]]

All engines translate the same sentences (config.data[split]) with the same beam and batch size
(per_device_eval_batch_size x the data-parallel devices; both sort by length). tfx decodes as
config.decode says (GNMT length penalty); CTranslate2 with its own length penalty,
score / length ** --ct2-length-penalty, and at most model.max_len tokens. Each engine runs the
whole set once to warm up (tfx compiles its shapes then), and the second run is timed.
CTranslate2 gets intra_threads = the CPU cores. BLEU is sacreBLEU on the detokenized output;
`tfx_speed_ratio` is tfx's sentences/s over the export's. With --shortlist (a lexical shortlist,
`python -m tfx.model.shortlist`) tfx decodes over each batch's shortlist and CTranslate2 over the
export's vocabulary map of it (`use_vmap`).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import ctranslate2
import jax

from tfx.core import config as config_lib
from tfx.core import host_memory
from tfx.data import sources
from tfx.export.ctranslate2 import export_ctranslate2
from tfx.infer import evaluate, trained
from tfx.infer.translate import Translator

from peak import cpu_name


def timed(translate, sentences):
    """(hypotheses, generated tokens, seconds) of the second of two runs."""
    translate(sentences)
    start = time.perf_counter()
    hypotheses, tokens = translate(sentences)
    return hypotheses, tokens, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/multi30k.py")
    parser.add_argument("--workdir", default="runs/multi30k")
    parser.add_argument("--checkpoint", default="average:5")
    parser.add_argument("--split", default="test", choices=("eval", "test"))
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--length-penalty", type=float, default=None,
                        help="tfx's GNMT alpha (default: config.decode.length_penalty)")
    parser.add_argument("--ct2-length-penalty", type=float, default=1.0)
    parser.add_argument("--shortlist", default="", help="a lexical shortlist for both engines")
    parser.add_argument("--shortlist-size", type=int, default=None,
                        help="tfx's tokens per batch (default: config.decode.shortlist_size)")
    args = parser.parse_args()
    host_memory.keep_freed_memory_on_cpu()

    config = config_lib.load(args.config)
    config.decode.update(strategy="beam", beam_size=args.beam)
    if args.length_penalty is not None:
        config.decode.length_penalty = args.length_penalty
    config.decode.shortlist = args.shortlist
    if args.shortlist_size:
        config.decode.shortlist_size = args.shortlist_size
    config = config_lib.validate(config)
    model = trained.load(config, args.workdir, args.checkpoint)
    d = config.data
    split = sources.open_split(d[args.split], f"data.{args.split}", d.source_lang, d.target_lang,
                               d.data_dir)
    pairs = [split[i] for i in range(len(split))]
    sentences, references = [p["source"] for p in pairs], [p["target"] for p in pairs]
    translator = Translator(model)
    processor = model.tokenizer.processor
    results = {}

    def tfx_translate(lines):
        results, report = translator.translate(lines)
        return [h[0].text for h in results], report.tokens

    engines = {"tfx": tfx_translate}
    with tempfile.TemporaryDirectory() as scratch:
        for quantization in ("float32", "int8"):
            directory = export_ctranslate2(model, os.path.join(scratch, quantization), quantization)
            engine = ctranslate2.Translator(directory, device="cpu", compute_type=quantization,
                                            intra_threads=os.cpu_count() or 1)

            def ct2_translate(lines, engine=engine):
                outputs = engine.translate_batch(
                    [processor.encode(line, out_type=str) for line in lines], beam_size=args.beam,
                    max_batch_size=translator.rows, length_penalty=args.ct2_length_penalty,
                    max_decoding_length=config.model.max_len, use_vmap=bool(args.shortlist))
                return ([processor.decode(o.hypotheses[0]) for o in outputs],
                        sum(len(o.hypotheses[0]) + 1 for o in outputs))  # EOS included, as tfx.

            engines[f"ctranslate2_{quantization}"] = ct2_translate
        for name, translate in engines.items():
            hypotheses, tokens, seconds = timed(translate, sentences)
            bleu = evaluate.score(hypotheses, [references], ("bleu",))["bleu"]
            results[name] = dict(bleu=round(bleu["score"], 2), seconds=round(seconds, 2),
                                 sentences_per_sec=round(len(sentences) / seconds, 1),
                                 tokens_per_sec=round(tokens / seconds, 1))
    for name in engines:
        if name != "tfx":
            results[name]["tfx_speed_ratio"] = round(results[name]["seconds"] / results["tfx"]["seconds"], 3)
    print(json.dumps(dict(config=args.config, workdir=args.workdir, checkpoint=model.label,
                          split=d[args.split], sentences=len(sentences), beam=args.beam,
                          batch=translator.rows, tfx_length_penalty=config.decode.length_penalty,
                          ct2_length_penalty=args.ct2_length_penalty, shortlist=args.shortlist,
                          shortlist_size=config.decode.shortlist_size if args.shortlist else None,
                          cpu=cpu_name(),
                          devices=jax.device_count(), signature=bleu["signature"], **results)))


if __name__ == "__main__":
    main()
