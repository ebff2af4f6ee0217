"""Checkpoints (orbax): the train state, the data-iterator position and the metrics, per step.

`<workdir>/checkpoints/<step>/` holds `state` (params, optimizer state, step, RNG; each process
writes its own shards) and `data` (the grain iterator state of every process). Saves are
asynchronous; orbax writes into a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoint as the latest usable one. The latest
`config.keep_checkpoints` are kept, plus the one with the best eval BLEU.
"""
from __future__ import annotations

import os

import grain
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from tfx.steps import TrainState


class Checkpoints:
    """The checkpoints of one workdir."""

    def __init__(self, workdir: str, config: ml_collections.ConfigDict | None = None):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        keep = config.keep_checkpoints if config is not None else None
        policy = ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(n=keep),
            ocp.checkpoint_managers.BestN(get_metric_fn=lambda metrics: metrics["bleu"], n=1,
                                          keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=config is not None,
                                               read_only=config is None, cleanup_tmp_directories=True)
        handlers = {"state": ocp.StandardCheckpointHandler(),
                    "data": grain.checkpoint.CheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, data_iterator=None, metrics: dict[str, float] | None = None):
        """Starts an asynchronous save at `state.step`; returns once the state is copied.
        Without a data iterator (an averaged checkpoint) the run cannot resume from it."""
        items = dict(state=ocp.args.StandardSave(state))
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(int(state.step), args=ocp.args.Composite(**items), metrics=metrics,
                          force=True)

    def restore(self, step: int, state: TrainState, data_iterator=None) -> TrainState:
        """The state saved at `step`, placed like `state` (its shapes and shardings); the data
        iterator, if given, continues from where that step left it."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        self._check_shapes(step, abstract)
        items = dict(state=ocp.args.StandardRestore(abstract))
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def _check_shapes(self, step: int, abstract: TrainState):
        """Names the first array whose saved shape differs from the config's."""
        saved = {_path_name(path): leaf.shape for path, leaf in
                 jax.tree_util.tree_leaves_with_path(self.manager.item_metadata(step)["state"])}
        for path, leaf in jax.tree_util.tree_leaves_with_path(abstract):
            name = _path_name(path)
            if saved.get(name, leaf.shape) != leaf.shape:
                raise ValueError(
                    f"{self.directory}/{step}: {name} has shape {saved[name]} in the checkpoint but "
                    f"{leaf.shape} in the config; was it trained with another config?")

    def average(self, steps: list[int], state: TrainState) -> TrainState:
        """`state` of the last of `steps` with its parameters replaced by their mean over
        `steps` (checkpoint averaging, as in Vaswani et al.)."""
        total = None
        for step in steps:
            restored = self.restore(step, state)
            total = restored.params if total is None else jax.tree.map(jnp.add, total, restored.params)
        mean = jax.tree.map(lambda x: x / len(steps), total)
        return restored.replace(params=mean)

    def wait(self):
        """Blocks until the asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def _path_name(path) -> str:
    parts = (getattr(key, "key", getattr(key, "idx", getattr(key, "name", key))) for key in path)
    return "/".join(str(part) for part in parts)
