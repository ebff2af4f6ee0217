"""A run directory as training leaves it, read back: the parameters of its checkpoints (one,
the latest that restores, or an average), its tokenizer's files, and another run's
parameters (config.init_from, the distillation teacher)."""
from __future__ import annotations

import contextlib
import dataclasses

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from tfx.core import config as config_lib
from tfx.core import files
from tfx.data import tokenizer as tokenizer_lib
from tfx.model import params as model_params
from tfx.train import steps
from tfx.train.checkpoint import Checkpoints, CorruptCheckpointError

TOKENIZER_FILE = tokenizer_lib.JOINT_FILE  # a joint tokenizer's copy; see keep_tokenizer.


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    config: ml_collections.ConfigDict
    mesh: Mesh
    graphdef: nnx.GraphDef
    params: nnx.State  # placed with params_shardings.
    params_shardings: nnx.State
    tokenizer: tokenizer_lib.BaseTokenizer
    label: str  # which checkpoint: "step2500", "average5-step2500".


def restore_params(workdir: str, checkpoint: str, like: nnx.State, key: str = "--checkpoint"
                   ) -> tuple[str, nnx.State]:
    """(label, params) of `checkpoint` ("latest", a step, or "average:N" for the mean of the
    last N) in `workdir`, placed like the parameters `like` (arrays, or ShapeDtypeStructs with
    shardings as `tfx.model.params.abstract_params` gives them). Only parameters are read
    (`Checkpoints.restore_params`). `key` is the flag or config key that chose `checkpoint`,
    for the errors.

    "latest" is the newest checkpoint that restores (a warning names each one skipped); a
    requested step, or a member of an average, that does not restore is an error naming it."""
    if not files.path(workdir).is_dir():
        raise FileNotFoundError(f"workdir {workdir!r} does not exist.")
    checkpoints = Checkpoints(workdir)
    saved = checkpoints.steps()
    if not saved:
        raise FileNotFoundError(f"no checkpoints in {checkpoints.directory}; train first.")
    kind, _, count = checkpoint.partition(":")
    if checkpoint == "latest":
        step, params = checkpoints.newest(lambda step: checkpoints.restore_params(step, like))
        if step is None:
            raise CorruptCheckpointError(f"no checkpoint in {checkpoints.directory} restores "
                                         "(see the warnings above).")
        return f"step{step}", params
    if kind == "average" and count.isdigit() and 0 < int(count) <= len(saved):
        steps_, label = saved[-int(count):], f"average{count}-step{saved[-1]}"
    elif checkpoint.isdigit() and int(checkpoint) in saved:
        steps_, label = [int(checkpoint)], f"step{checkpoint}"
    else:
        raise ValueError(f"{key}={checkpoint!r}: use latest, a saved step, or average:N with "
                         f"N <= {len(saved)}; saved steps in {checkpoints.directory}: {saved}.")
    try:
        return label, checkpoints.average_params(steps_, like)
    except CorruptCheckpointError as error:
        raise CorruptCheckpointError(f"{key}={checkpoint}: {error}") from error


@contextlib.contextmanager
def _naming(key: str, value: str):
    """Prefixes the errors of reading another run with `config.<key>=<value>: `."""
    try:
        yield
    except (ValueError, FileNotFoundError) as error:
        raise type(error)(f"config.{key}={value!r}: {error}") from error


def init_params(config: ml_collections.ConfigDict, state) -> tuple[str, nnx.State]:
    """(label, params) of config.init_checkpoint of the run in config.init_from, placed like
    `state.params` (this run's mesh and shardings); errors name the keys."""
    with _naming("init_from", config.init_from):
        return restore_params(config.init_from, config.init_checkpoint, state.params,
                              "config.init_checkpoint")


def keep_tokenizer(tokenizer: tokenizer_lib.BaseTokenizer, workdir: str):
    """Copies the tokenizer's files into `workdir` (each atomically) under their names there
    (`tokenizer.files`), for `tfx.infer.trained`."""
    for name, path in tokenizer.files.items():
        files.copy_file(path, files.join(workdir, name))


def check_new_run(output: str):
    """Refuses, before a tool's work, an `output` for `write_run` that already holds checkpoints."""
    if files.path(output).joinpath("checkpoints").is_dir() and Checkpoints(output).steps():
        raise FileExistsError(f"--output={output} already holds checkpoints; choose a new directory.")


def write_run(config: ml_collections.ConfigDict, mesh: Mesh, params: nnx.State,
              tokenizer: tokenizer_lib.BaseTokenizer, workdir: str):
    """Writes the run directory of a tool's model (tfx.compress.heads, tfx.compress.lowrank):
    `params` (host arrays, laid out as config.model's) as its one checkpoint, at step 0 with a
    fresh optimizer state so that it reads like training's (eval.py, config.init_from,
    tfx.compress.average), its config.json and `tokenizer`'s files."""
    _, _, shardings = steps.abstract_train_state(config, mesh)
    state = steps.fresh_state(config, jax.device_put(params, shardings.params), shardings)
    checkpoints = Checkpoints(workdir, config)
    checkpoints.save(state)
    checkpoints.wait()
    checkpoints.close()
    if jax.process_index() == 0:
        config_lib.save_run(config, workdir)
        keep_tokenizer(tokenizer, workdir)


def _check_teacher_tokenizer(teacher_workdir: str, tokenizer: tokenizer_lib.BaseTokenizer):
    """Refuses a teacher run whose tokenizer copies are missing or differ from `tokenizer`'s."""
    copies = {name: files.join(teacher_workdir, name) for name in tokenizer.files}
    missing = [name for name, path in copies.items() if not files.path(path).is_file()]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        found = f"{' and '.join(missing)} {verb} missing, so cannot be checked against"
    elif tokenizer_lib.fingerprint(copies) != tokenizer.fingerprint:
        found = f"{', '.join(copies)} {'differs' if len(copies) == 1 else 'differ'} from"
    else:
        return
    raise ValueError(
        f"config.distill.teacher_workdir={teacher_workdir!r}: its {found} the student's "
        f"{tokenizer.description}; distillation needs one vocabulary (set the student's "
        "config.tokenizer keys to the teacher's files).")


def teacher_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """config.distill.teacher_config loaded, with the student's vocabulary size checked and the
    student's logical axis rules, by which the teacher is placed on the student's mesh."""
    distill = config.distill
    with _naming("distill.teacher_config", distill.teacher_config):
        teacher = config_lib.load(distill.teacher_config)
    if teacher.model.vocab_size != config.model.vocab_size:
        raise ValueError(
            f"config.distill.teacher_config={distill.teacher_config!r} has model.vocab_size="
            f"{teacher.model.vocab_size}, the student config.model.vocab_size="
            f"{config.model.vocab_size}: distillation needs one vocabulary.")
    teacher.logical_axis_rules = config.logical_axis_rules
    return teacher


def load_teacher(config: ml_collections.ConfigDict, mesh: Mesh,
                 tokenizer: tokenizer_lib.BaseTokenizer) -> TrainedModel:
    """config.distill's teacher (`teacher_config`, its workdir's teacher_checkpoint) placed on
    the student's `mesh` by the student's logical axis rules.

    Distillation compares the two models' predictions token by token, so the teacher must have
    the student's vocabulary: the same model.vocab_size, and copies of the student's
    tokenizer's files in its workdir (tokenizer.model, or source.spm, target.spm and
    vocabulary.json) with their bytes (`fingerprint`)."""
    distill = config.distill
    teacher = teacher_config(config)
    _check_teacher_tokenizer(distill.teacher_workdir, tokenizer)
    graphdef, abstract, shardings = model_params.abstract_params(teacher, mesh)
    with _naming("distill.teacher_workdir", distill.teacher_workdir):
        label, params = restore_params(distill.teacher_workdir, distill.teacher_checkpoint,
                                       abstract, "config.distill.teacher_checkpoint")
    return TrainedModel(teacher, mesh, graphdef, params, shardings, tokenizer, label)
