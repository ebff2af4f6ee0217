"""What a run needs, built once from the config: mesh, splits, tokenizer, the state's shapes
and shardings and the batch shardings: what training (and its periodic BLEU) works with."""
from __future__ import annotations

import functools

import ml_collections
import numpy as np

from tfx.core import distributed, parallel
from tfx.data import corpora, pipeline, tokenized
from tfx.data import tokenizer as tokenizer_lib
from tfx.model.params import placed
from tfx.train import steps


class Experiment:
    """Mesh, splits, tokenizer, the state's shapes and shardings (`abstract_state`), the
    initial sharded state when asked for (`state`) and the train/eval batch layouts."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config
        self.mesh = parallel.make_mesh(config.mesh_shape)
        with distributed.process_0_first("tfx: data and tokenizer ready"):
            self.splits = corpora.open_splits(config)
            self.tokenizer = tokenizer_lib.from_config(config, self.splits["train"])
            if config.data.pretokenize:
                self.splits["train"] = tokenized.tokenized_split(self.splits["train"], self.tokenizer)
        tokenizer_lib.check_vocab_size(self.tokenizer, config)
        self.sharding, self.train_shard = pipeline.batch_layout(config, self.mesh,
                                                                config.per_device_batch_size)
        _, self.eval_shard = pipeline.batch_layout(config, self.mesh, config.per_device_eval_batch_size)
        pipeline.data_shards(config, self.train_shard)  # refuses bad data.shards before compiling.
        self.graphdef, abstract, self.shardings = steps.abstract_train_state(config, self.mesh)
        self.abstract_state = placed(abstract, self.shardings)  # what a checkpoint restores into.

    @functools.cached_property
    def state(self) -> steps.TrainState:
        """The random initial state, made on first use only: a resumed run never holds it
        beside the restored one."""
        return steps.random_state(self.config, self.shardings)

    def eval_batches(self, split: str) -> list[dict[str, np.ndarray]]:
        return pipeline.eval_batches(self.config, self.splits[split], self.tokenizer, self.eval_shard)

    def decode_batches(self, split: str) -> list[dict[str, np.ndarray]]:
        return pipeline.decode_batches(self.config, self.splits[split], self.tokenizer, self.eval_shard)

    def first_batches(self, batches: list, examples: int) -> list:
        """The leading `batches` that hold the first `examples` examples (all if 0)."""
        if not examples:
            return batches
        return batches[: -(-examples // (self.eval_shard.rows * self.eval_shard.count))]

    def references(self, split: str, batches) -> list[str]:
        source = self.splits[split]
        count = min(len(source), len(batches) * self.eval_shard.rows * self.eval_shard.count)
        return [source[i]["target"] for i in range(count)]
