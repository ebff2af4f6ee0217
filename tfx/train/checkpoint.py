"""Checkpoints (orbax): the train state, the data-iterator position and the metrics, per step.

`<workdir>/checkpoints/<step>/` holds `state` (params, optimizer state, step, RNG; each process
writes its own shards) and `data` (the grain iterator state of every data shard, written by the
process that reads it). Saves are asynchronous and collective; orbax writes into a temporary
directory and renames it once every process has written, so a run killed mid-save leaves the
previous checkpoint as the latest usable one. The latest `config.keep_checkpoints` are kept,
plus the one with the best eval BLEU.

A checkpoint restores onto any mesh and process count: arrays are resharded to the shardings
of the state they are restored into, and the data position continues as long as the number
of data shards and the global batch are the same (`DataPositionError` otherwise).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from tfx.core.pytree import path_name
from tfx.data.pipeline import TrainBatches
from tfx.train.steps import TrainState


class DataPositionError(ValueError):
    """The saved data position does not fit this run's data shards or global batch."""


class ShapeMismatchError(ValueError):
    """A saved array's shape differs from the config's, or the config's array is not saved."""


class CorruptCheckpointError(ValueError):
    """A checkpoint that is listed but does not restore (truncated or missing files)."""


class DataPositionHandler(ocp.CheckpointHandler):
    """The position of `TrainBatches`: `shard_<i>-of-<n>.json` per data shard, each with the
    global batch rows it was saved with. A process reads the files of the shards it reads
    now, whichever process wrote them."""

    def save(self, directory, args: DataPositionSave):
        batches = args.batches
        for index, state in batches.get_state().items():
            record = {"global_rows": batches.global_rows, "state": state}
            (directory / f"shard_{index}-of-{batches.shards}.json").write_text(json.dumps(record))

    def restore(self, directory, args: DataPositionRestore) -> TrainBatches:
        batches = args.batches
        states = {}
        for index in batches.iterators:
            path = directory / f"shard_{index}-of-{batches.shards}.json"
            if not path.exists():
                saved = {p.name.split("-of-")[1].removesuffix(".json")
                         for p in directory.glob("shard_*-of-*.json")}
                raise DataPositionError(
                    f"{directory} holds the data position of {' or '.join(sorted(saved)) or 'no'} "
                    f"data shards, but this run reads {batches.shards} (config.data.shards, "
                    "0 = one per process). Set config.data.shards to the saved number, or "
                    "config.data.reset_position=True to restore the model and start the data "
                    "afresh.")
            record = json.loads(path.read_text())
            if record["global_rows"] != batches.global_rows:
                raise DataPositionError(
                    f"{path} was saved with a global batch of {record['global_rows']} rows, but "
                    f"this run's is {batches.global_rows} (config.per_device_batch_size x the "
                    "data-parallel devices), so the saved data position does not apply. Keep "
                    "the global batch, or set config.data.reset_position=True to restore the "
                    "model and start the data afresh.")
            states[index] = record["state"]
        batches.set_state(states)
        return batches

    def metadata(self, directory):
        return None


@ocp.args.register_with_handler(DataPositionHandler, for_save=True)
@dataclasses.dataclass
class DataPositionSave(ocp.args.CheckpointArgs):
    batches: TrainBatches


@ocp.args.register_with_handler(DataPositionHandler, for_restore=True)
@dataclasses.dataclass
class DataPositionRestore(ocp.args.CheckpointArgs):
    batches: TrainBatches


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
                                               read_only=config is None,
                                               cleanup_tmp_directories=config is not None)
        handlers = {"state": ocp.StandardCheckpointHandler(),
                    "data": DataPositionHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, batches: TrainBatches | None = None,
             metrics: dict[str, float] | None = None):
        """Starts an asynchronous save at `state.step`; returns once the state is copied.
        Without the train batches (an averaged checkpoint) the run cannot resume from it."""
        items = dict(state=ocp.args.StandardSave(state))
        if batches is not None:
            items["data"] = DataPositionSave(batches)
        self.manager.save(int(state.step), args=ocp.args.Composite(**items), metrics=metrics,
                          force=True)

    def restore(self, step: int, state: TrainState, batches: TrainBatches | None = None
                ) -> TrainState:
        """The state saved at `step`, placed like `state` (its shapes and shardings, on any
        mesh); the train batches, if given, continue from where that step left them."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        items = dict(state=ocp.args.StandardRestore(abstract))
        if batches is not None:
            if not os.path.isdir(os.path.join(self.directory, str(step), "data")):
                workdir = os.path.dirname(self.directory)
                raise DataPositionError(
                    f"{self.directory}/{step} has no data position: a tool wrote it (tfx.compress.average, "
                    "tfx.compress.lowrank, tfx.compress.heads), not training, so nothing resumes from it. Start a "
                    f"new run from it with config.init_from={workdir!r} and another workdir.")
            items["data"] = DataPositionRestore(batches)
        with self._restoring(step):
            self._check_shapes(step, abstract)
            return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def restore_params(self, step: int, params: nnx.State) -> nnx.State:
        """Only the parameters saved at `step`, placed like `params`. Nothing else of the saved
        state is read, so its optimizer state may have any structure (another optimizer,
        pruning masks); saved parameters that `params` lacks are left out."""
        abstract = {"params": jax.tree.map(ocp.utils.to_shape_dtype_struct, params)}
        args = ocp.args.PyTreeRestore(abstract, ocp.checkpoint_utils.construct_restore_args(abstract),
                                      partial_restore=True)
        with self._restoring(step), ocp.PyTreeCheckpointer() as checkpointer:
            self._check_shapes(step, abstract)
            return checkpointer.restore(os.path.join(self.directory, str(step), "state"),
                                        args=args)["params"]

    @contextlib.contextmanager
    def _restoring(self, step: int):
        """Turns any error of reading `step`, but for a mismatch with the config, into a
        CorruptCheckpointError naming it."""
        try:
            yield
        except (ShapeMismatchError, DataPositionError):
            raise
        except Exception as error:  # orbax and TensorStore raise many kinds; all mean unreadable.
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            raise CorruptCheckpointError(
                f"{self.directory}/{step} does not restore ({type(error).__name__}: {reason})") from error

    def restore_latest(self, state: TrainState, batches: TrainBatches | None = None,
                       move_aside: bool = False) -> tuple[int | None, TrainState]:
        """(step, state) of the newest checkpoint that restores, or (None, `state`) if none does.
        Each one skipped gets a warning line; with `move_aside` it is moved into
        `<workdir>/corrupt_checkpoints/` (kept for inspection, no longer listed)."""
        step, restored = self.newest(lambda step: self.restore(step, state, batches), move_aside)
        return step, state if step is None else restored

    def newest(self, restore: Callable[[int], Any], move_aside: bool = False
               ) -> tuple[int | None, Any]:
        """(step, restore(step)) of the newest checkpoint that `restore` reads, or (None, None);
        each one skipped (CorruptCheckpointError) gets a warning line and, with `move_aside`,
        is moved into `<workdir>/corrupt_checkpoints/`."""
        for step in reversed(self.steps()):
            try:
                return step, restore(step)
            except CorruptCheckpointError as error:
                where = self._move_aside(step) if move_aside else None
                logging.warning("skipping checkpoint step %d: %s%s", step, error,
                                f"; moved to {where}" if where else "")
        return None, None

    def _move_aside(self, step: int) -> str:
        target = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints",
                              f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.rename(os.path.join(self.directory, str(step)), target)
        self.manager.reload()
        return target

    def _check_shapes(self, step: int, abstract):
        """Names the first array of `abstract` (a train state, or a part of its tree) that is
        not saved or whose saved shape differs from the config's."""
        saved = {path_name(path): leaf.shape for path, leaf in
                 jax.tree_util.tree_leaves_with_path(self.manager.item_metadata(step)["state"])}
        if not saved:
            raise ValueError("its metadata lists no arrays")  # unreadable (see _restoring).
        for path, leaf in jax.tree_util.tree_leaves_with_path(abstract):
            name = path_name(path)
            if name not in saved:
                raise ShapeMismatchError(
                    f"{self.directory}/{step}: {name} is not in the checkpoint; was it trained "
                    "with another config?")
            if saved[name] != leaf.shape:
                raise ShapeMismatchError(
                    f"{self.directory}/{step}: {name} has shape {saved[name]} in the checkpoint but "
                    f"{leaf.shape} in the config; was it trained with another config?")

    def average(self, steps: list[int], state: TrainState) -> TrainState:
        """`state` of the last of `steps` with its parameters replaced by `average_params`."""
        return self.restore(steps[-1], state).replace(params=self.average_params(steps, state.params))

    def average_params(self, steps: list[int], params: nnx.State) -> nnx.State:
        """The mean of the parameters saved at `steps` (checkpoint averaging, as in Vaswani et
        al.), placed like `params`; only parameters are read (see `restore_params`)."""
        total = None
        for step in steps:
            restored = self.restore_params(step, params)
            total = restored if total is None else jax.tree.map(jnp.add, total, restored)
        return jax.tree.map(lambda x: x / len(steps), total)

    def wait(self):
        """Blocks until the asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self):
        # orbax (0.12) removes a previous run's unfinished temporary directories on a thread that
        # only a save awaits: a run that fails before its first save would close under it.
        unfinished_cleanup = getattr(self.manager, "_cleanup_tmp_directory_future", None)
        if unfinished_cleanup is not None:
            unfinished_cleanup.result()
        self.manager.close()
