"""Downloads and prepares a config's data splits and trains its vocabulary, once.

    python -m tfx.data.prepare --config configs/wmt_base.py [--config.data.data_dir=DIR]

The data dir is on local disk (tfx/data/sources.py). For many hosts (a TPU pod's workers),
prepare it once, copy it to a bucket, and copy it from there to each host's disk. Training
prepares whatever is missing on first use too; this command just does it up front and prints
what it found.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from tfx.data import clean, corpora
from tfx.data import tokenizer as tokenizer_lib


def prepare(config) -> Iterator[str]:
    """Prepares the config's splits and tokenizer; yields what it found, line by line."""
    splits = corpora.open_splits(config)
    for which, split in splits.items():
        yield f"{which}: {split.spec}: {len(split)} pairs ({split.skipped_empty} skipped empty)"
    cleaned = [(corpus.name, corpus.pairs.clean_counts) for corpus in splits["train"].corpora
               if hasattr(corpus.pairs, "clean_counts")]
    if cleaned:
        yield "cleaning (config.data.clean), pairs:"
        yield from clean.table(cleaned).splitlines()
    tokenizer = tokenizer_lib.from_config(config, splits["train"])
    yield f"tokenizer: {tokenizer.description} ({tokenizer.vocab_size} pieces)"
    sample = [splits["train"][i] for i in range(0, len(splits["train"]),
                                                 max(1, len(splits["train"]) // 2000))]
    encoders = {"source": lambda pair: tokenizer.encode_source(pair["source"], pair.get("prefix")),
                "target": lambda pair: tokenizer.encode_target(pair["target"])}
    for side, limit in (("source", config.max_source_length), ("target", config.max_target_length)):
        lengths = np.array([len(encoders[side](pair)) for pair in sample])
        yield (f"train {side} tokens: median {np.median(lengths):.0f}, 99th percentile "
               f"{np.percentile(lengths, 99):.0f}, {np.mean(lengths > limit):.2%} over {limit}")


def main():
    """The command line (absl flags, defined here so that importing tfx.data.prepare defines none)."""
    from tfx.core import cli

    shared = cli.define_flags(config="file")

    def prepare_all():
        for line in prepare(shared.config_file()):
            print(line)

    cli.run("tfx.data.prepare", prepare_all)


if __name__ == "__main__":
    main()
