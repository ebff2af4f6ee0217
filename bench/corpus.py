"""A large corpus prepared, cleaned, tokenized, read and learned from: prints one JSON line (its
last line).

    python bench/corpus.py --pairs 10000000 --dir /tmp/corpus [--stages prepare,clean,...]

The corpus (made once in --dir) is Multi30k's training pairs over and over, each line with its
number appended, so that every pair is unique. Each stage runs in a process of its own and
reports its seconds, pairs per second and peak RSS (resident memory):
- prepare: the text files into array_record (the split every other stage reads);
- clean: every filter of config.data.clean but langid, dedup included; clean_langid: langid too;
- tokenize: config.data.pretokenize's ids of the training corpus (SentencePiece on every core);
- input_text, input_ids: the train pipeline on one core (shuffle, tokenize or read ids, pack,
  batch) for --batches batches in --rounds rounds: target tokens/s, median, min and max of the
  rounds (bench/stats.py);
- shortlist: python -m tfx.compress.shortlist's learning from the stored ids (streamed).
The vocabulary is configs/multi30k.py's (8,000 pieces), trained on a 1M-sentence sample.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

STAGES = ("prepare", "clean", "clean_langid", "tokenize", "input_text", "input_ids", "shortlist")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILTERS = dict(max_chars=1000, max_words=200, max_ratio=3.0, identical=True, min_letters=0.5,
               nonprinting=True, dedup=True)


def make_corpus(prefix: str, pairs: int):
    """PREFIX.en and PREFIX.de: Multi30k's training pairs, line i with ' i' appended."""
    if all(os.path.exists(f"{prefix}.{lang}") for lang in ("en", "de")):
        return
    lines = {lang: open(os.path.join(ROOT, "data", "multi30k-en-de", f"train.{lang}"),
                        encoding="utf-8").read().splitlines() for lang in ("en", "de")}
    for lang, text in lines.items():
        with open(f"{prefix}.{lang}.tmp", "w", encoding="utf-8") as f:
            for i in range(pairs):
                f.write(f"{text[i % len(text)]} {i}\n")
        os.replace(f"{prefix}.{lang}.tmp", f"{prefix}.{lang}")


def config_for(directory: str, clean: dict | None = None, pretokenize: bool = False):
    from tfx.core import config as config_lib

    config = config_lib.load(os.path.join(ROOT, "configs", "multi30k.py"))
    config.data.update(train=f"text:{directory}/corpus", data_dir=os.path.join(directory, "tfds"),
                       pretokenize=pretokenize)
    config.data.clean.update(clean or {})
    config.tokenizer.input_sentence_size = 1_000_000
    return config_lib.validate(config)


def run_stage(stage: str, directory: str, batches: int, rounds: int) -> dict:
    """One stage in this process (see the module doc)."""
    from tfx.data import corpora

    start = time.perf_counter()
    if stage == "prepare":
        split = corpora.open_split(config_for(directory), "train")
    elif stage.startswith("clean"):
        clean = dict(FILTERS, langid=stage == "clean_langid")
        split = corpora.open_split(config_for(directory, clean), "train")
    elif stage == "tokenize" or stage == "shortlist":
        return tokenized_stage(stage, directory, start)
    else:
        return input_stage(stage, directory, batches, rounds)
    seconds = time.perf_counter() - start
    pairs = sum(len(c.pairs) for c in split.corpora)
    counts = getattr(split.corpora[0].pairs, "clean_counts", None)
    read = counts["read"] if counts else pairs
    return dict(seconds=round(seconds, 1), pairs_read=read, pairs_kept=pairs,
                pairs_per_sec=round(read / seconds), clean_counts=counts)


def tokenized_stage(stage: str, directory: str, start: float) -> dict:
    from tfx.compress import shortlist
    from tfx.data import corpora, tokenized
    from tfx.data import tokenizer as tokenizer_lib

    config = config_for(directory, pretokenize=True)
    split = corpora.open_split(config, "train")
    tokenizer = tokenizer_lib.from_config(config, split)
    source = tokenized.tokenized_split(split, tokenizer).corpora[0].tokens
    if stage == "tokenize":
        seconds = time.perf_counter() - start
        return dict(seconds=round(seconds, 1), pairs=len(source), pairs_per_sec=round(len(source) / seconds))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=directory) as scratch:  # as the command line does.
        store = shortlist.TokenStore.write(scratch, ((r["inputs"][:-1], r["targets"][:-1])
                                                     for r in map(source.__getitem__, range(len(source)))))
        shortlist.learn(store.pairs, config.model.vocab_size)
    return dict(seconds=round(time.perf_counter() - start, 1), pairs=len(source))


def input_stage(stage: str, directory: str, batches: int, rounds: int) -> dict:
    """The train pipeline's throughput on one core (this process pinned to it)."""
    from tfx.core import parallel
    from tfx.data import corpora, pipeline, tokenized
    from tfx.data import tokenizer as tokenizer_lib

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from input import time_rounds

    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    config = config_for(directory, pretokenize=stage == "input_ids")
    split = corpora.open_split(config, "train")
    tokenizer = tokenizer_lib.from_config(config, split)
    if config.data.pretokenize:
        split = tokenized.tokenized_split(split, tokenizer)
    _, shard = pipeline.batch_layout(config, parallel.make_mesh(config.mesh_shape),
                                     config.per_device_batch_size)
    iterator, _ = pipeline.train_iterator(config, split, tokenizer, shard)
    next(iterator)
    return time_rounds(iterator, config.data.pack, rounds, max(1, batches // rounds))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=10_000_000)
    parser.add_argument("--dir", default="/tmp/tfx-corpus")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--batches", type=int, default=200, help="input stages: timed batches")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # (a stage's own process)
    args = parser.parse_args()
    if args.stage:
        result = run_stage(args.stage, args.dir, args.batches, args.rounds)
        result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        print(json.dumps(result))
        return
    os.makedirs(args.dir, exist_ok=True)
    make_corpus(os.path.join(args.dir, "corpus"), args.pairs)
    results = {"pairs": args.pairs}
    for stage in args.stages.split(","):
        command = [sys.executable, __file__, "--stage", stage, "--dir", args.dir,
                   "--batches", str(args.batches), "--rounds", str(args.rounds)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[stage] = json.loads(output.strip().splitlines()[-1])
    print(json.dumps(results))


if __name__ == "__main__":
    main()
