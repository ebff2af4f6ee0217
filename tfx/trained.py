"""A trained run, loaded for inference: restored parameters on the config's mesh, and the
run's own SentencePiece model.

    model = trained.load(config, "runs/multi30k", checkpoint="average:5")
    model.params, model.tokenizer, model.mesh, model.graphdef, model.params_shardings

The tokenizer is `config.tokenizer.model_path` if set, else the copy training leaves in the
workdir (`tokenizer.model`), else the vocabulary the config trains on its train split (as
train.py does), so a run directory with its config is all that translation needs.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from tfx import parallel, steps
from tfx.checkpoint import Checkpoints, CorruptCheckpointError
from tfx.data import sources
from tfx.data import tokenizer as tokenizer_lib

TOKENIZER_FILE = "tokenizer.model"


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    config: ml_collections.ConfigDict
    mesh: Mesh
    graphdef: nnx.GraphDef
    params: nnx.State  # placed with params_shardings.
    params_shardings: nnx.State
    tokenizer: tokenizer_lib.Tokenizer
    label: str  # which checkpoint: "step2500", "average5-step2500".


def restore_params(workdir: str, checkpoint: str, state) -> tuple[str, nnx.State]:
    """(label, params) of `checkpoint` ("latest", a step, or "average:N" for the mean of the
    last N) in `workdir`, placed like `state` (arrays, or ShapeDtypeStructs with shardings).

    "latest" is the newest checkpoint that restores (a warning names each one skipped); a
    requested step, or a member of an average, that does not restore is an error naming it."""
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir!r} does not exist.")
    checkpoints = Checkpoints(workdir)
    saved = checkpoints.steps()
    if not saved:
        raise FileNotFoundError(f"no checkpoints in {checkpoints.directory}; train first.")
    kind, _, count = checkpoint.partition(":")
    if checkpoint == "latest":
        step, restored = checkpoints.restore_latest(state)
        if step is None:
            raise CorruptCheckpointError(f"no checkpoint in {checkpoints.directory} restores "
                                         "(see the warnings above).")
        return f"step{step}", restored.params
    if kind == "average" and count.isdigit() and 0 < int(count) <= len(saved):
        steps_, label = saved[-int(count):], f"average{count}-step{saved[-1]}"
    elif checkpoint.isdigit() and int(checkpoint) in saved:
        steps_, label = [int(checkpoint)], f"step{checkpoint}"
    else:
        raise ValueError(f"--checkpoint={checkpoint!r}: use latest, a saved step, or average:N with "
                         f"N <= {len(saved)}; saved steps in {checkpoints.directory}: {saved}.")
    try:
        return label, checkpoints.average(steps_, state).params
    except CorruptCheckpointError as error:
        raise CorruptCheckpointError(f"--checkpoint={checkpoint}: {error}") from error


def tokenizer_for(config: ml_collections.ConfigDict, workdir: str) -> tokenizer_lib.Tokenizer:
    """The run's SentencePiece model (see the module doc), checked against model.vocab_size."""
    copy = os.path.join(workdir, TOKENIZER_FILE)
    if config.tokenizer.model_path:
        tokenizer = tokenizer_lib.Tokenizer(config.tokenizer.model_path)
    elif os.path.isfile(copy):
        tokenizer = tokenizer_lib.Tokenizer(copy)
    else:
        d = config.data
        train = sources.open_split(d.train, "data.train", d.source_lang, d.target_lang, d.data_dir)
        tokenizer = tokenizer_lib.from_config(config, train)
    tokenizer_lib.check_vocab_size(tokenizer, config)
    return tokenizer


def keep_tokenizer(tokenizer: tokenizer_lib.Tokenizer, workdir: str):
    """Copies the tokenizer's model into `workdir` (atomically), for `tokenizer_for`."""
    target = os.path.join(workdir, TOKENIZER_FILE)
    with tempfile.NamedTemporaryFile(dir=workdir, suffix=".tmp", delete=False) as f:
        temporary = f.name
    shutil.copyfile(tokenizer.path, temporary)
    shutil.copymode(tokenizer.path, temporary)
    os.replace(temporary, target)


def load(config: ml_collections.ConfigDict, workdir: str, checkpoint: str = "latest") -> TrainedModel:
    """The run in `workdir` with `checkpoint` restored onto `config.mesh_shape` (nothing else of
    the train state is kept), and its tokenizer."""
    mesh = parallel.make_mesh(config.mesh_shape)
    graphdef, abstract, shardings = steps.abstract_train_state(config, mesh)
    placed = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    label, params = restore_params(workdir, checkpoint, placed)
    return TrainedModel(config, mesh, graphdef, params, shardings.params,
                        tokenizer_for(config, workdir), label)
