"""Checkpoints (orbax): the train state, the data-iterator position and the metrics, per step.

`<workdir>/checkpoints/<step>/` holds `state` (params, optimizer state, step, RNG; each process
writes its own shards) and `data` (the grain iterator state of every data shard, written by the
process that reads it); its orbax metadata holds the eval BLEU and the budget's plan
(`Checkpoints.plan`). Saves are asynchronous and collective; orbax writes into a temporary
directory and renames it once every process has written, so a run killed mid-save leaves the
previous checkpoint as the latest usable one. The latest `config.keep_checkpoints` are kept,
plus the one with the best eval BLEU. The workdir may be local or on Cloud Storage (gs://).

A checkpoint restores onto any mesh and process count: arrays are resharded to the shardings
of the state they are restored into, and the data position continues as long as the number
of data shards and the global batch are the same (`DataPositionError` otherwise).

Reading a checkpoint can go wrong in two ways, told apart by `is_corruption`:
- corruption (`CorruptCheckpointError`): a file is missing or truncated, or metadata does not
  parse. It will never read; a resume falls back to the newest checkpoint before it.
- failure (`CheckpointReadError`, and `ShapeMismatchError`, `DataPositionError`): anything
  else: permissions, the network, memory, another config or orbax version. The checkpoint may
  be fine, so the run stops, naming it and the cause, and moves nothing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from tfx.core import files
from tfx.core.pytree import path_name
from tfx.data.pipeline import TrainBatches
from tfx.train.steps import TrainState

PLAN_KEY = "train_steps"  # the budget's plan in each checkpoint's custom metadata.
# TensorStore's status codes for a file that is missing or shorter than its index says, or
# whose index does not decode; and what its FAILED_PRECONDITION says of a file that does not
# decode (seen with files of a real checkpoint deleted, truncated or overwritten: a deleted
# chunk reads as an empty zstd stream). Other FAILED_PRECONDITIONs (metadata that does not
# match) are failures.
CORRUPTION_STATUSES = ("NOT_FOUND", "OUT_OF_RANGE", "DATA_LOSS")
UNDECODABLE = ("Invalid JSON", "Truncated Zstd-compressed stream", "ZSTD_decompressStream() failed")
# What TensorStore says (as DATA_LOSS) of a file in a format newer than it reads: a version
# error, so a failure whatever its status.
NEWER_FORMAT = ("Maximum supported version", "Unsupported")


class DataPositionError(ValueError):
    """The saved data position does not fit this run's data shards or global batch."""


class ShapeMismatchError(ValueError):
    """A saved array's shape differs from the config's, or the config's array is not saved."""


class CorruptCheckpointError(ValueError):
    """A checkpoint that is listed but will never restore: a file of it is missing or
    truncated, or its metadata does not parse."""


class CheckpointReadError(ValueError):
    """A checkpoint that could not be read for a reason other than corruption (permissions,
    the network, memory, an orbax version): it may be fine, so nothing falls back from it."""


def is_corruption(error: BaseException) -> bool:
    """Whether `error`, raised while reading a checkpoint, or the error it was raised from,
    says that a file is missing (FileNotFoundError, TensorStore NOT_FOUND), truncated
    (OUT_OF_RANGE, DATA_LOSS) or unparseable (a JSON error, `UNDECODABLE`). Anything else,
    recognised or not, is a failure: an OSError but FileNotFoundError (permissions, the
    network), RESOURCE_EXHAUSTED (memory), PERMISSION_DENIED, UNAVAILABLE, a version error."""
    while error is not None:
        if isinstance(error, (FileNotFoundError, json.JSONDecodeError)):
            return True
        if isinstance(error, OSError):  # permissions, the network, a full disk.
            return False
        message = str(error).lstrip()
        status = message.partition(":")[0]
        if any(text in message for text in NEWER_FORMAT):
            return False
        if status in CORRUPTION_STATUSES:
            return True
        if status == "FAILED_PRECONDITION" and any(text in message for text in UNDECODABLE):
            return True
        error = error.__cause__
    return False


def _reason(error: BaseException) -> str:
    """The type and the first line of the message (without TensorStore's spec, at most 500
    characters) of the error `error` was first raised from: orbax wraps TensorStore's."""
    while error.__cause__ is not None:
        error = error.__cause__
    message = (str(error).strip().splitlines() or [""])[0].split(" [tensorstore_spec=")[0][:500]
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def read_position(directory: epath.Path, batches: TrainBatches) -> dict[int, dict]:
    """The saved iterator state of each data shard `batches` reads, from `directory` (a
    checkpoint's `data`). A missing file whose siblings are there, or one that does not parse,
    is corruption (FileNotFoundError, JSONDecodeError); another number of data shards or
    another global batch is a DataPositionError."""
    states = {}
    for index in batches.iterators:
        path = directory / f"shard_{index}-of-{batches.shards}.json"
        if not path.exists():
            saved = {p.name.split("-of-")[1].removesuffix(".json")
                     for p in directory.glob("shard_*-of-*.json")}
            if str(batches.shards) in saved:
                raise FileNotFoundError(f"{path} is missing")
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
    return states


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
        args.batches.set_state(read_position(directory, args.batches))
        return args.batches

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


# What one process found reading a step (`Checkpoints.resume`), gathered from all processes.
READ, CORRUPT, FAILED = 0, 1, 2


@dataclasses.dataclass
class _Outcome:
    code: int
    error: BaseException | None = None
    value: Any = None


def _attempt(read: Callable[[], Any]) -> _Outcome:
    """`read()`'s value, or the kind of its error: corruption, or any other failure."""
    try:
        return _Outcome(READ, value=read())
    except CorruptCheckpointError as error:
        return _Outcome(CORRUPT, error)
    except Exception as error:  # a failure, kept to be raised once every process knows.
        return _Outcome(FAILED, error)


def _gather(codes: list[int]) -> np.ndarray:
    """[processes, len(codes)]: every process's `codes` (a collective)."""
    mine = np.asarray(codes, np.int32)
    if jax.process_count() == 1:
        return mine[None]
    return np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)


def _steps_of_process_0(steps: list[int]) -> list[int]:
    """Process 0's `steps` on every process (a collective), so all consider the same ones."""
    if jax.process_count() == 1:
        return steps
    count = int(multihost_utils.broadcast_one_to_all(np.int32(len(steps))))
    padded = np.zeros(count, np.int32)
    if jax.process_index() == 0:
        padded[:] = steps
    return [int(s) for s in multihost_utils.broadcast_one_to_all(padded)]


def _barrier(name: str):
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


class Checkpoints:
    """The checkpoints of one workdir (local or gs://)."""

    def __init__(self, workdir: str, config: ml_collections.ConfigDict | None = None):
        self.workdir = files.join(workdir)
        self.directory = files.join(workdir, "checkpoints")
        self.plan: dict | None = None  # the budget's plan (tfx.train.budget), saved with each step.
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
                          force=True, custom_metadata={PLAN_KEY: self.plan} if self.plan else None)

    def saved_plan(self, step: int) -> dict | None:
        """The budget's plan saved with checkpoint `step`, or None (none was, or the step's
        orbax metadata does not parse)."""
        return (self.manager.metadata(step).custom_metadata or {}).get(PLAN_KEY)

    def check(self, step: int, state: TrainState, batches: TrainBatches | None = None):
        """What tells cheaply, without reading arrays, whether `step` restores into `state`
        (arrays, or ShapeDtypeStructs with shardings) and `batches`: the state's metadata
        parses and lists `state`'s arrays with their shapes, and the data-position files of
        the shards `batches` reads are there and parse. Raises what `restore` would."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        with self._restoring(step):
            self._check_shapes(step, abstract)
            if batches is not None:
                read_position(self._data_directory(step), batches)

    def restore(self, step: int, state: TrainState, batches: TrainBatches | None = None
                ) -> TrainState:
        """The state saved at `step`, placed like `state` (arrays, or ShapeDtypeStructs with
        shardings: its shapes and shardings, on any mesh); the train batches, if given,
        continue from where that step left them. Corruption raises CorruptCheckpointError,
        any other error of reading CheckpointReadError (see `is_corruption`).

        Each process reads only its own shards: no collective, so one process's error cannot
        leave another waiting in one (`resume` agrees on the outcome)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        with self._restoring(step):
            self._check_shapes(step, abstract)
            position = None if batches is None else read_position(self._data_directory(step), batches)
            with contextlib.closing(ocp.StandardCheckpointHandler()) as handler:
                restored = handler.restore(self._step_directory(step) / "state",
                                           args=ocp.args.StandardRestore(abstract))
        if batches is not None:
            batches.set_state(position)
        return restored

    def restore_params(self, step: int, params: nnx.State) -> nnx.State:
        """Only the parameters saved at `step`, placed like `params`. Nothing else of the saved
        state is read, so its optimizer state may have any structure (another optimizer,
        pruning masks); saved parameters that `params` lacks are left out."""
        abstract = {"params": jax.tree.map(ocp.utils.to_shape_dtype_struct, params)}
        args = ocp.args.PyTreeRestore(abstract, ocp.checkpoint_utils.construct_restore_args(abstract),
                                      partial_restore=True)
        with self._restoring(step):
            self._check_shapes(step, abstract)
            with contextlib.closing(ocp.PyTreeCheckpointHandler()) as handler:
                return handler.restore(self._step_directory(step) / "state", args=args)["params"]

    def resume(self, state: TrainState, batches: TrainBatches | None = None
               ) -> tuple[int | None, TrainState | None]:
        """(step, state) of the newest checkpoint that every process restores, placed like
        `state` (ShapeDtypeStructs with shardings suffice; nothing of `state` is kept), with
        `batches` continuing from its data position; (None, None) if there are no checkpoints.

        Each process checks which of process 0's steps it can read (`check`); the processes
        agree (a collective) on the newest that all can read and restore it; if that restore
        meets corruption on any process, they agree on the next. Corrupt steps get a warning
        line each. A failure on any process (not corruption, see `is_corruption`) stops every
        process and moves nothing; so does finding no step that restores
        (CorruptCheckpointError saying how to start afresh). Only once a step is restored
        everywhere, after a barrier, does process 0 move the corrupt steps newer than it into
        `<workdir>/corrupt_checkpoints/` (kept for inspection, no longer listed)."""
        steps = _steps_of_process_0(self.steps())
        if not steps:
            return None, None
        checked = [_attempt(lambda step=step: self.check(step, state, batches)) for step in steps]
        codes = _gather([outcome.code for outcome in checked])
        corrupt: dict[int, str] = {}
        for i in reversed(range(len(steps))):
            step, outcome, agreed = steps[i], checked[i], codes[:, i]
            if (agreed == READ).all():
                outcome = _attempt(lambda step=step: self.restore(step, state, batches))
                agreed = _gather([outcome.code])[:, 0]
            if (agreed == READ).all():
                self._move_aside(corrupt)
                return step, outcome.value
            if (agreed == FAILED).any():
                if outcome.code == FAILED:
                    raise outcome.error
                failed = ", ".join(str(p) for p in np.flatnonzero(agreed == FAILED))
                raise CheckpointReadError(
                    f"{self.directory}/{step} could not be read by process {failed} (its log "
                    "says why). That is not corruption, so nothing was moved.")
            corrupt[step] = str(outcome.error) if outcome.code == CORRUPT else (
                f"{self.directory}/{step} does not restore on process "
                f"{', '.join(str(p) for p in np.flatnonzero(agreed == CORRUPT))}")
            logging.warning("skipping checkpoint step %d: %s", step, corrupt[step])
            del outcome  # a state restored here but not everywhere: freed before the next.
        raise CorruptCheckpointError(
            f"no checkpoint in {self.directory} restores ("
            + "; ".join(f"step {step}: {why}" for step, why in corrupt.items())
            + f"); nothing was moved. To start afresh on purpose, move {self.directory} away "
            "or use another workdir.")

    def newest(self, restore: Callable[[int], Any]) -> tuple[int | None, Any]:
        """(step, restore(step)) of the newest checkpoint that `restore` reads, or (None, None);
        each corrupt one skipped gets a warning line. Any other error stops it (for the
        tools; training resumes with `resume`)."""
        for step in reversed(self.steps()):
            try:
                return step, restore(step)
            except CorruptCheckpointError as error:
                logging.warning("skipping checkpoint step %d: %s", step, error)
        return None, None

    @contextlib.contextmanager
    def _restoring(self, step: int):
        """Turns an error of reading `step` into a CorruptCheckpointError or a
        CheckpointReadError naming it (`is_corruption`); a mismatch with the config stays."""
        try:
            yield
        except (ShapeMismatchError, DataPositionError, CorruptCheckpointError, CheckpointReadError):
            raise
        except Exception as error:  # orbax and TensorStore raise many kinds (see is_corruption).
            where = f"{self.directory}/{step}"
            if is_corruption(error):
                raise CorruptCheckpointError(f"{where} does not restore ({_reason(error)})") from error
            raise CheckpointReadError(
                f"{where} could not be read ({_reason(error)}). That is not corruption, so nothing "
                "was moved: fix the cause (permissions, the network, memory, the orbax version) "
                "and run again.") from error

    def _move_aside(self, corrupt: dict[int, str]):
        """Moves the `corrupt` steps into <workdir>/corrupt_checkpoints/ (process 0, between
        barriers, so that no process still reads them and all list the same steps after)."""
        if not corrupt:
            return
        _barrier("tfx: checkpoint agreed")
        if jax.process_index() == 0:
            for step in corrupt:
                target = files.join(self.workdir, "corrupt_checkpoints",
                                    f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
                files.path(target).parent.mkdir(parents=True, exist_ok=True)
                files.move_tree(self._step_directory(step), target)
                logging.warning("moved checkpoint step %d to %s", step, target)
        _barrier("tfx: corrupt checkpoints moved")
        self.manager.reload()

    def _step_directory(self, step: int) -> epath.Path:
        return files.path(self.directory) / str(step)

    def _data_directory(self, step: int) -> epath.Path:
        directory = self._step_directory(step) / "data"
        if not directory.is_dir():
            raise DataPositionError(
                f"{self.directory}/{step} has no data position: a tool wrote it (tfx.compress.average, "
                "tfx.compress.lowrank, tfx.compress.heads), not training, so nothing resumes from it. "
                f"Start a new run from it with config.init_from={self.workdir!r} and another workdir.")
        return directory

    def _check_shapes(self, step: int, abstract):
        """Names the first array of `abstract` (a train state, or a part of its tree) that is
        not saved or whose saved shape differs from the config's."""
        with contextlib.closing(ocp.StandardCheckpointHandler()) as handler:
            metadata = handler.metadata(self._step_directory(step) / "state")
        saved = {path_name(path): leaf.shape for path, leaf in
                 jax.tree_util.tree_leaves_with_path(metadata)}
        if not saved:
            raise FileNotFoundError("its metadata lists no arrays")  # corruption.
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
