"""What the command-line tools share: the flags --config, --workdir and --checkpoint, a trained
run's config, one-line errors, and JAX kept off a TPU backend the host does not have.

A tool defines its flags inside its main(), so that importing its module defines none, and runs
its command through `run`:

    def main():
        shared = cli.define_flags(workdir="The run whose parameters are counted.", checkpoint=True)
        last = flags.DEFINE_integer("last", 5, "How many checkpoints.")

        def command():
            config = shared.run_config()  # the run's config.json, --config overrides checked.
            ...

        cli.run("tfx.compress.sparsity", command)

Multi-word flags are spelled with underscores (`--top_k`), as absl and ml_collections spell
theirs; `alias` keeps an older hyphenated spelling working.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import pkgutil
import runpy
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import entry_points

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from tfx.core import config as config_lib
from tfx.core import files

# What a user can act on: one line.
ERRORS = (ValueError, FileNotFoundError, FileExistsError, files.MissingBackendError)


@dataclasses.dataclass(frozen=True)
class SharedFlags:
    """The shared flags a tool defined (`define_flags`); None where it defined none."""
    config: flags.FlagHolder | None = None
    workdir: flags.FlagHolder | None = None
    checkpoint: flags.FlagHolder | None = None

    def config_file(self) -> ml_collections.ConfigDict:
        """--config FILE[:variant] with its --config.KEY=VALUE overrides, validated."""
        return config_lib.validate(self._given())

    def run_config(self) -> ml_collections.ConfigDict:
        """The config of the run --workdir names: its config.json, or --config FILE instead,
        with the --config.KEY=VALUE overrides on top; validated. A model or tokenizer key that
        differs from the run's is refused (`config.for_inference`)."""
        workdir = self.workdir.value
        if not files.path(workdir).is_dir():
            raise FileNotFoundError(f"workdir {workdir!r} does not exist.")
        source = os.path.join(workdir, config_lib.RUN_CONFIG_FILE)
        run = config_lib.load_run(workdir) if files.path(source).is_file() else None
        flag = flags.FLAGS[self.config.name]
        return config_lib.for_inference(run, source, self._given() if flag.present else None,
                                        config_flags.get_override_values(flag))

    def given_config_args(self, leaving_out: Sequence[str] = ()) -> list[str]:
        """`--config FILE` and the `--config.KEY=VALUE` overrides as given (but the keys in
        `leaving_out`), to repeat in a command the tool prints; [] without --config FILE."""
        flag = flags.FLAGS[self.config.name]
        if not flag.present:
            return []
        return ["--config", config_flags.get_config_filename(flag),
                *(f"--config.{key}={shlex.quote(str(value))}"
                  for key, value in config_flags.get_override_values(flag).items()
                  if key not in leaving_out)]

    def train_command(self, init_from: str, changed: Mapping[str, object]) -> str:
        """The train.py command that fine-tunes `init_from`, a run a tool wrote from this one
        whose model keys `changed` differ: with --config FILE and its overrides as given, else
        with a placeholder for the config this run was trained with."""
        given = self.given_config_args(leaving_out=tuple(changed))
        model = [f"--config.{key}={shlex.quote(str(value))}" for key, value in changed.items()]
        command = " ".join(["python train.py", *(given or ["--config", "FILE[:variant]"]), *model,
                            f"--config.init_from={init_from}", f"--workdir {init_from}-ft"])
        if given:
            return command
        return f"{command}  (FILE: the config {self.workdir.value} was trained with, and its overrides)"

    def _given(self) -> ml_collections.ConfigDict:
        config = self.config.value
        try:
            config.lock()  # a config file that failed to load raises here, naming the file.
        except OSError as error:
            reason = str(error).strip().splitlines()[-1].strip()
            raise FileNotFoundError(f"--config={flags.FLAGS[self.config.name].config_filename}: "
                                    f"{reason}") from None
        return config


def define_flags(workdir: str | None = None, checkpoint: bool = False, config: str | None = "run",
                 workdir_required: bool = True) -> SharedFlags:
    """Defines --workdir (with the help `workdir`) and --checkpoint if asked, and --config:
    with `config` "file" (train.py, prepare, aot) a config file it requires; with "run" (the
    tools that read a trained run) a config file that defaults to the run's config.json, the
    --config.KEY=VALUE overrides applying to either (`SharedFlags.run_config`); None: none."""
    config_flag = None
    if config == "file":
        config_flag = config_flags.DEFINE_config_file("config", None, "Config file[:variant].",
                                                      lock_config=True)
        flags.mark_flag_as_required("config")
    elif config == "run":
        # The schema's defaults give the overrides their types until the run's config is read.
        config_flag = config_flags.DEFINE_config_file(
            "config", config_lib.__file__, "Config file[:variant]. Only what may change at "
            "inference may differ from the run's: not model.* or tokenizer.*.", lock_config=True)
        flags.FLAGS["config"].default_as_str = "the run's config.json"
    elif config is not None:
        raise ValueError(f"config={config!r}: use 'run', 'file' or None.")
    workdir_flag = checkpoint_flag = None
    if workdir is not None:
        workdir_flag = flags.DEFINE_string("workdir", None, workdir)
        if workdir_required:
            flags.mark_flag_as_required("workdir")
    if checkpoint:
        checkpoint_flag = flags.DEFINE_string("checkpoint", "latest", "latest, a step, or average:N.")
    for holder in (config_flag, workdir_flag, checkpoint_flag):
        if holder is not None:  # listed by --help with the tool's own flags (its key flags).
            flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[holder.name])
    return SharedFlags(config_flag, workdir_flag, checkpoint_flag)


def alias(old: str, new: str):
    """Keeps the older spelling `--old` of the flag `--new` working."""
    flags.DEFINE_alias(old, new)


def run(tool: str, command: Callable, errors: tuple[type[BaseException], ...] = (),
        verbosity: int = logging.WARNING, arguments: bool = False):
    """Parses the command line and runs `command()` (`command(arguments)` with the positional
    arguments if `arguments`, else they are refused). An error a user can act on (`ERRORS`,
    and `errors`) exits with one line, `<tool>: <message>`. Before the command starts JAX,
    `skip_absent_tpu` keeps JAX off a TPU backend the host does not have."""

    # --help lists the flags of the module `command` comes from, when a stand-in runs it.
    for flag in flags.FLAGS.flags_by_module_dict().get(command.__module__, []):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)

    def main(argv):
        if len(argv) > 1 and not arguments:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        logging.set_verbosity(verbosity)  # orbax and TFDS log every step of their work at INFO.
        skip_absent_tpu()
        try:
            command(argv[1:]) if arguments else command()
        except (*ERRORS, *errors) as error:
            sys.exit(f"{tool}: {error}")

    app.run(main)


def has_tpu() -> bool:
    """Whether this host has TPU chips (their device files: /dev/accel*, or /dev/vfio on newer
    generations)."""
    return bool(glob.glob("/dev/accel*")) or os.path.exists("/dev/vfio")


def skip_absent_tpu():
    """Leaves the TPU backend out of the backends JAX starts on a host with libtpu installed
    (the `tpu` extra) but no TPU, where libtpu prints a trace ("could not determine TPU
    accelerator type") to stderr. A launcher's explicit opt-in, called before JAX starts its
    backends; JAX_PLATFORMS, when the user set it, is left as it is."""
    if os.environ.get("JAX_PLATFORMS") or has_tpu() or importlib.util.find_spec("libtpu") is None:
        return
    jax = sys.modules.get("jax")  # once imported, JAX reads its config, not the environment.
    if jax is not None and jax.config.jax_platforms:
        return
    platforms = ",".join([*_gpu_platforms(), "cpu"])
    os.environ["JAX_PLATFORMS"] = platforms  # for JAX if not yet imported, and child processes.
    if jax is not None:
        jax.config.update("jax_platforms", platforms)


def _gpu_platforms() -> list[str]:
    """The GPU platforms whose JAX plugin is installed and whose devices this host has ("cuda",
    "rocm"); JAX skips "cuda" itself when no NVIDIA device is visible."""
    names = {entry.name for entry in entry_points(group="jax_plugins")}
    spec = importlib.util.find_spec("jax_plugins")
    if spec is not None and spec.submodule_search_locations:
        names |= {module.name for module in pkgutil.iter_modules(spec.submodule_search_locations)}
    platforms = []
    if any("cuda" in name for name in names):
        platforms.append("cuda")
    if any("rocm" in name for name in names) and os.path.exists("/dev/kfd"):
        platforms.append("rocm")
    return platforms


def moved(name: str, old: str, new: str):
    """Runs module `new` as `python -m` would when the module `name` (a stand-in left at the old
    path `old`) is run as the main program, saying where the command went; does nothing on import."""
    if name == "__main__":
        print(f"python -m {old} is now python -m {new}", file=sys.stderr)
        runpy.run_module(new, run_name="__main__", alter_sys=True)
