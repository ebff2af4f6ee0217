"""Downloads and prepares a config's data splits and trains its vocabulary, once.

    python -m tfx.data.prepare --config configs/wmt_base.py [--config.data.data_dir=DIR]
        [--beam_runner DirectRunner|DataflowRunner|SparkRunner|FlinkRunner [--beam_options ...]]

The data dir is on local disk (tfx/data/sources.py). For many hosts (a TPU pod's workers),
prepare it once, copy it to a bucket, and copy it from there to each host's disk. Training
prepares whatever is missing on first use too; this command just does it up front and prints
what it found. With --beam_runner, the training corpora's cleaning (tfx/data/clean.py) runs on
Apache Beam (the `beam` extra); the raw splits are still prepared in this process.
"""
from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import numpy as np

from tfx.data import clean, corpora, tokenized
from tfx.data import tokenizer as tokenizer_lib


def prepare(config, beam_flags: Sequence[str] | None = None) -> Iterator[str]:
    """Prepares the config's splits and tokenizer; yields what it found, line by line. With
    `beam_flags` (Beam's pipeline flags, --runner among them) the cleaning runs on Beam."""
    splits = corpora.open_splits(config, beam_flags=beam_flags)
    for which, split in splits.items():
        yield f"{which}: {split.spec}: {len(split)} pairs ({split.skipped_empty} skipped empty)"
    cleaned = [(corpus.name, corpus.pairs.clean_counts) for corpus in splits["train"].corpora
               if hasattr(corpus.pairs, "clean_counts")]
    if cleaned:
        yield "cleaning (config.data.clean), pairs:"
        yield from clean.table(cleaned).splitlines()
    tokenizer = tokenizer_lib.from_config(config, splits["train"])
    yield f"tokenizer: {tokenizer.description} ({tokenizer.vocab_size} pieces)"
    if config.data.pretokenize:
        stored = tokenized.tokenized_split(splits["train"], tokenizer)
        yield f"train token ids stored (config.data.pretokenize): {sum(len(c.tokens) for c in stored.corpora)} pairs"
    sample = [splits["train"][i] for i in range(0, len(splits["train"]),
                                                 max(1, len(splits["train"]) // 2000))]
    encoders = {"source": lambda pair: tokenizer.encode_source(pair["source"], pair.get("prefix")),
                "target": lambda pair: tokenizer.encode_target(pair["target"])}
    for side, limit in (("source", config.max_source_length), ("target", config.max_target_length)):
        lengths = np.array([len(encoders[side](pair)) for pair in sample])
        yield (f"train {side} tokens: median {np.median(lengths):.0f}, 99th percentile "
               f"{np.percentile(lengths, 99):.0f}, {np.mean(lengths > limit):.2%} over {limit}")


def beam_flags(runner: str | None, options: str) -> list[str] | None:
    """Beam's pipeline flags of --beam_runner and --beam_options (None: no Beam); an error that
    names the extra when apache-beam is not installed."""
    if not runner:
        if options:
            raise ValueError("--beam_options needs --beam_runner.")
        return None
    items = [item.strip() for item in re.split(r",(?=\s*--)", options) if item.strip()]
    wrong = [item for item in items if not item.startswith("--")]
    if wrong:
        raise ValueError(f"--beam_options={options!r}: expected Beam's pipeline flags separated "
                         "by commas, each --NAME=VALUE (e.g. --project=P,--region=R), not "
                         f"{wrong[0]!r}.")
    flags = [f"--runner={runner}", *items]
    clean.beam_options(flags)  # (apache-beam installed? Said before anything is prepared.)
    return flags


def main():
    """The command line (absl flags, defined here so that importing tfx.data.prepare defines none)."""
    from absl import flags

    from tfx.core import cli

    shared = cli.define_flags(config="file")
    runner = flags.DEFINE_string(
        "beam_runner", None, "Clean the training corpora on Apache Beam (pip install "
        "'tfx-mt[beam]') with this runner: DirectRunner (this machine), DataflowRunner, "
        "SparkRunner, FlinkRunner. Its workers read and write the data dir at the same path.")
    options = flags.DEFINE_string(
        "beam_options", "", "Beam's pipeline flags for --beam_runner, separated by commas, e.g. "
        "--direct_num_workers=0,--direct_running_mode=multi_processing or "
        "--project=P,--region=R,--temp_location=gs://B/tmp.")

    def prepare_all():
        for line in prepare(shared.config_file(), beam_flags(runner.value, options.value)):
            print(line)

    cli.run("tfx.data.prepare", prepare_all, errors=(clean.MissingBeamError,))


if __name__ == "__main__":
    main()
