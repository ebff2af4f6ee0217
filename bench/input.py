"""Input-pipeline throughput alone: prints one JSON line (its last line).

    python bench/input.py --config configs/multi30k.py [--batches 200 --rounds 5] \
        [--train_config configs/wmt_base.py:base]

Reads the config's train split through the real pipeline (tokenize, length policy, shuffle,
pack or pad, batch) at the global batch size of this machine's devices and times `--batches`
batches after the first, in `--rounds` equal rounds: the rates are the median, min and max of
the rounds' (bench/stats.py). With --train_config (default :base; "" skips it), it also runs
bench/train.py on the same machine, right after, and reports the ratio of what the pipeline
delivers to what that train step consumes (median target tokens per second).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np

from tfx.core import config as config_lib
from tfx.core import parallel
from tfx.data import corpora, pipeline
from tfx.data import tokenizer as tokenizer_lib

from stats import summary


def train_step_consumption(train_config: str) -> dict:
    """bench/train.py's JSON line for `train_config`, run in a fresh process."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
    output = subprocess.run([sys.executable, script, "--config", train_config, "--steps", "5"],
                            check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def time_rounds(batches, pack: bool, rounds: int, per_round: int) -> dict:
    """examples/s and target tokens/s of each of `rounds` rounds of `per_round` batches, and
    the fraction of target positions that are not padding."""
    examples_per_sec, tokens_per_sec = [], []
    target_tokens = positions = 0
    for _ in range(rounds):
        examples = tokens = 0
        start = time.perf_counter()
        for _ in range(per_round):
            batch = next(batches)
            if pack:
                examples += int(batch["targets_segment_ids"].max(axis=1).sum())
            else:
                examples += int((batch["targets"][:, 0] > 0).sum())
            tokens += int(np.count_nonzero(batch["targets"]))
            positions += batch["targets"].size
        elapsed = time.perf_counter() - start
        examples_per_sec.append(examples / elapsed)
        tokens_per_sec.append(tokens / elapsed)
        target_tokens += tokens
    return dict(examples_per_sec=summary(examples_per_sec),
                target_tokens_per_sec=summary(tokens_per_sec),
                non_padding_fraction=round(target_tokens / positions, 4))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/multi30k.py")
    parser.add_argument("--batches", type=int, default=200,
                        help="timed batches (after the first), in --rounds equal rounds")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds; rates are per round")
    parser.add_argument("--train_config", "--train-config", default="configs/wmt_base.py:base",
                        help='bench/train.py config to compare with; "" skips it')
    args = parser.parse_args()

    config = config_lib.load(args.config)
    start = time.perf_counter()
    train = corpora.open_splits(config)["train"]
    tokenizer = tokenizer_lib.from_config(config, train)
    mesh = parallel.make_mesh(config.mesh_shape)
    _, shard = pipeline.batch_layout(config, mesh, config.per_device_batch_size)
    batches, counts = pipeline.train_iterator(config, train, tokenizer, shard)
    next(batches)
    startup_s = time.perf_counter() - start
    per_round = max(1, args.batches // args.rounds)
    result = dict(
        config=args.config, split=config.data.train, pack=config.data.pack,
        worker_count=config.data.worker_count, process_rows=shard.rows,
        row_length=config.max_target_length, batches=per_round * args.rounds, rounds=args.rounds,
        startup_s=round(startup_s, 2),
        **time_rounds(batches, config.data.pack, args.rounds, per_round),
        length_policy=counts.report(), devices=jax.device_count(),
    )
    if args.train_config:
        consumed = train_step_consumption(args.train_config)
        result.update(train_config=args.train_config,
                      train_target_tokens_per_sec=consumed["target_tokens_per_sec"],
                      input_over_train=round(result["target_tokens_per_sec"]["median"]
                                             / consumed["target_tokens_per_sec"], 1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
