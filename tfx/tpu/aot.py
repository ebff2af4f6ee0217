"""Compile the train step, the eval step and translation for a Cloud TPU slice on any host, and
say whether they fit: one JSON line per function.

    python -m tfx.tpu.aot --config configs/wmt_base.py:big --topology v5e:16x16 [--config.KEY=VALUE ...]

libtpu (`pip install "tfx-mt[tpu]"`) describes every Cloud TPU generation, so the real sharded
functions are lowered with abstract arguments (shapes, dtypes and shardings; nothing is
allocated) for the slice's devices and compiled into the TPU executable, with XLA's memory and
cost analysis. One JAX device is one chip, as on the slice (v4 and v5p run their two
TensorCores as one megacore device). A function fits when its memory (arguments, outputs,
temporaries and code) is at most the HBM that XLA states a program may use on a chip, not the
nominal size (`usable_hbm_bytes`; the report's hbm_source says "nominal" where XLA states
none).

Rows are full: the train batch is the trainer's (`train_batch`: `per_device_batch_size` packed
rows of max_source_length / max_target_length tokens per data-parallel chip and the `stop`
column), and with config.distill the step also takes the teacher's parameters, as in train.py;
eval and translation have `per_device_eval_batch_size` rows of model.max_len tokens, the
longest an eval split can have. Model FLOPs count those rows as one sentence pair each
(tfx/flops.py; with a teacher, its forward pass too). The exit status is 0 when everything
fits, 3 when something does not, 1 for a bad argument or config.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence

if __name__ == "__main__":  # compiling for a TPU needs none: skip JAX's probe for one.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import topologies
from jax.sharding import Mesh

from tfx.core import parallel, precision
from tfx.model import decode, flops
from tfx.model.params import abstract_params, placed
from tfx.tpu import hlo
from tfx.train import rundir, steps

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    device_kind: str  # what JAX calls the chip.
    hbm_bytes: int  # nominal; `slice_devices` gives the figure XLA states usable instead.
    bf16_flops: float  # peak, per chip per second.
    hbm_source: str = "nominal"  # "xla": hbm_bytes is what XLA states a program may use.


# Per chip, from Google's Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v4,
# .../v5e, .../v5p, .../v6e).
CHIPS = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12),
    "v5e": Chip("TPU v5 lite", 16 * GiB, 197e12),
    "v5p": Chip("TPU v5", 95 * GiB, 459e12),
    "v6e": Chip("TPU v6 lite", 32 * GiB, 918e12),
}
MEGACORE = ("v4",)  # libtpu's default there is one device per TensorCore; JAX on the slice uses one per chip.


@contextlib.contextmanager
def _stderr_to(path: str):
    """Sends this process's file descriptor 2 (where libtpu logs) to `path` for a while."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "w") as target:
        os.dup2(target.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def slice_devices(topology: str) -> tuple[Chip, list[jax.Device]]:
    """The chip and the devices of a slice named like `v5e:16x16` (generation:chip grid)."""
    generation, _, grid = topology.partition(":")
    if generation not in CHIPS or not grid:
        raise ValueError(f"--topology={topology!r}: expected GENERATION:GRID with a generation among "
                         f"{', '.join(CHIPS)}, e.g. v5e:16x16 (v5e-256) or v4:2x2x1 (v4-8).")
    if importlib.util.find_spec("libtpu") is None:
        raise ValueError("libtpu is not installed, and only it describes TPU slices: "
                         "pip install 'tfx-mt[tpu]'.")
    chip = CHIPS[generation]
    # Compiling uses no TPU, so libtpu's lock on the host's TPU (one process at a time) is moot.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    options = {"chip_config_name": "megacore"} if generation in MEGACORE else {}
    try:
        with _stderr_to(os.devnull):  # libtpu's warnings that this host is no TPU VM.
            devices = topologies.get_topology_desc(topology, "tpu", **options).devices
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"--topology={topology!r}: libtpu refused it: {error}") from None
    if devices[0].device_kind != chip.device_kind:
        raise ValueError(f"--topology={topology!r} gave {devices[0].device_kind!r} devices, not "
                         f"{chip.device_kind!r}: tfx.tpu.aot.CHIPS needs updating for this libtpu.")
    usable = usable_hbm_bytes(devices[0])
    if usable:
        chip = dataclasses.replace(chip, hbm_bytes=usable, hbm_source="xla")
    return chip, list(devices)


def usable_hbm_bytes(device: jax.Device) -> int:
    """The HBM XLA lets one program on `device` use, or 0 if XLA does not say. A compile-only
    device has no `memory_stats()`, so this reads the figure from the error of compiling a
    program larger than any chip ("... exceeds available HBM (15.75G)"), to the 1/100 GiB the
    message gives."""
    mesh = Mesh(np.array([device]), ("chip",))
    huge = jax.ShapeDtypeStruct((2**40,), np.int8, sharding=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))
    try:
        jax.jit(lambda x: x + 1).lower(huge).compile()
    except jax.errors.JaxRuntimeError as error:
        return _size(r"available HBM \(([\d.]+)([KMGT]?)\)", str(error))
    return 0


def _size(pattern: str, message: str) -> int:
    """Bytes of the size `pattern` (groups: a number and a K/M/G/T unit) finds in an XLA
    message, e.g. 15.75G; 0 if absent."""
    match = re.search(pattern, message)
    if not match:
        return 0
    return int(float(match.group(1)) * 1024 ** " KMGT".index(match.group(2) or " "))


@dataclasses.dataclass
class Program:
    """A function to compile, its abstract arguments and the useful work of one call."""
    name: str
    jitted: Callable  # a jax.jit-wrapped function.
    args: tuple
    rows: int  # of the global batch.
    model_flops: float
    tokens: int  # target tokens of a call (translation: the longest outputs of its sentences).
    first_step_flops: float = 0.0  # translation: encoder and one decoding step (see compile_report).


def _batch(mesh: Mesh, config: ml_collections.ConfigDict, rows: int, lengths: dict[str, int]) -> dict:
    sharding = parallel.batch_sharding(mesh, config.logical_axis_rules)
    return {name: jax.ShapeDtypeStruct((rows, length), np.int32, sharding=sharding)
            for name, length in lengths.items()}


def train_batch(config: ml_collections.ConfigDict, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The global train batch the trainer gives the step (`trainer._Loop.run`): full rows of
    the pipeline's columns (`pipeline.train_iterator`; packed rows add segment ids and
    positions) and `stop`, each row's preemption flag [B, 1]."""
    rows = config.per_device_batch_size * parallel.data_parallel_size(mesh, config.logical_axis_rules)
    lengths = {"inputs": config.max_source_length, "targets": config.max_target_length}
    if config.data.pack:
        lengths.update({f"{side}_{what}": lengths[side]
                        for side in ("inputs", "targets") for what in ("segment_ids", "positions")})
    return _batch(mesh, config, rows, {**lengths, "stop": 1})


def abstract_teacher(config: ml_collections.ConfigDict, mesh: Mesh
                     ) -> tuple[ml_collections.ConfigDict, nnx.GraphDef, nnx.State, nnx.State] | None:
    """(config, graphdef, abstract parameters, shardings) of config.distill's teacher, placed as
    `rundir.load_teacher` places it, computing as on the mesh's platform; None without one.
    Its workdir need not exist here."""
    if not config.distill.teacher_config:
        return None
    teacher_config = rundir.teacher_config(config)
    teacher_config.model.dtype = precision.resolve(teacher_config.model.dtype,
                                                   mesh.devices.flat[0].platform)
    return (teacher_config, *abstract_params(teacher_config, mesh))


def _train_program(config: ml_collections.ConfigDict, mesh: Mesh, graphdef: nnx.GraphDef,
                   state: steps.TrainState, shardings: steps.TrainState) -> Program:
    """The train step as the trainer builds and calls it: (state, batch[, teacher params])."""
    batch = train_batch(config, mesh)
    rows, source, target = batch["targets"].shape[0], config.max_source_length, config.max_target_length
    model_flops = flops.train_flops(config.model, [(source, target)] * rows)
    distill = abstract_teacher(config, mesh)
    if distill is None:
        step, args = steps.make_train_step(config, graphdef, mesh, shardings), ()
    else:
        teacher_config, teacher_graphdef, teacher_params, teacher_shardings = distill
        step = steps.make_train_step(config, graphdef, mesh, shardings,
                                     (teacher_graphdef, teacher_shardings))
        args = (teacher_params,)
        model_flops += flops.forward_flops(teacher_config.model, [(source, target)] * rows)
    return Program("train_step", step, (state, batch, *args), rows, model_flops, rows * target)


def programs(config: ml_collections.ConfigDict, mesh: Mesh) -> list[Program]:
    """The train step, the eval step and translation, as the trainer and eval.py build them."""
    graphdef, abstract, shardings = steps.abstract_train_state(config, mesh)
    state = placed(abstract, shardings)
    data_parallel = parallel.data_parallel_size(mesh, config.logical_axis_rules)
    m = config.model
    eval_rows = config.per_device_eval_batch_size * data_parallel
    options = decode.Options.from_config(config)
    beams = options.beam_size if options.strategy == "beam" else 1
    output_len = m.max_len  # decoding's buffer for sources of max_len tokens (decode._output_length).
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return [
        _train_program(config, mesh, graphdef, state, shardings),
        Program("eval_step", steps.make_eval_step(config, graphdef, mesh, shardings.params),
                (state.params, _batch(mesh, config, eval_rows, {"inputs": m.max_len, "targets": m.max_len})),
                eval_rows,
                flops.forward_flops(m, [(m.max_len, m.max_len)] * eval_rows), eval_rows * m.max_len),
        Program("translate", decode.jit_translate(config, graphdef, mesh),
                (state.params, _batch(mesh, config, eval_rows, {"inputs": m.max_len})["inputs"],
                 jax.ShapeDtypeStruct((2,), np.uint32, sharding=replicated)), eval_rows,
                flops.decode_flops(m, eval_rows, beams, m.max_len, output_len), eval_rows * output_len,
                flops.decode_flops(m, eval_rows, beams, m.max_len, 1)),
    ]


def _advice(program: str, config: ml_collections.ConfigDict, mesh: Mesh, state_bytes: int,
            temp_bytes: int) -> list[str]:
    """What to change when `program` does not fit, the larger part of its memory first."""
    if program != "train_step":
        return [f"config.per_device_eval_batch_size={max(1, config.per_device_eval_batch_size // 2)}",
                f"config.decode.beam_size={max(1, config.decode.beam_size // 2)} (translation)"]
    data, fsdp = mesh.shape["data"], mesh.shape["fsdp"]
    state = ([f"config.mesh_shape=data:{data // 2},fsdp:{fsdp * 2},tensor:{mesh.shape['tensor']} "
              "(parameters and optimizer state sharded twice as far)"] if data > 1 else [])
    activations = [f"config.grad_accum_steps={2 * config.grad_accum_steps} (same global batch, "
                   "half the activations)"]
    if config.model.remat == "none":
        activations.append("config.model.remat=full with config.model.scan_layers=True")
    activations.append(f"config.per_device_batch_size={max(1, config.per_device_batch_size // 2)}")
    return state + activations if state_bytes > temp_bytes else activations + state


def _exhausted_bytes(message: str) -> int:
    """The bytes a RESOURCE_EXHAUSTED compile error says the program needs (0 if unsaid), e.g.
    "... memory required for HLO temporaries (102.23G) exceeds available HBM (15.75G)"."""
    return _size(r"required for [^(]*\(([\d.]+)([KMGT]?)\)", message)


def compile_report(program: Program, config: ml_collections.ConfigDict, mesh: Mesh, chip: Chip,
                   topology: str) -> dict:
    """Lowers and compiles `program` for the slice; its JSON report (docs/tpu.md)."""
    chips = mesh.size
    report = dict(function=program.name, topology=topology, chips=chips,
                  chip=mesh.devices.flat[0].device_kind, mesh=dict(mesh.shape),
                  variant=config.variant, dtype=config.model.dtype, rows=program.rows)
    start = time.perf_counter()
    try:
        compiled = program.jitted.lower(*program.args).compile()
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        needed = _exhausted_bytes(str(error))
        report.update(compile_s=round(time.perf_counter() - start, 1), fits=False,
                      total_bytes=needed, hbm_bytes=chip.hbm_bytes, hbm_source=chip.hbm_source,
                      headroom_bytes=chip.hbm_bytes - needed if needed else None,
                      error=str(error).splitlines()[0][:500],
                      change=_advice(program.name, config, mesh, state_bytes=0, temp_bytes=needed))
        return report
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
             + memory.temp_size_in_bytes + memory.generated_code_size_in_bytes)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    roofline_s = program.model_flops / (chip.bf16_flops * chips)
    counts, sizes = hlo.collectives(compiled.as_text())
    fits = total <= chip.hbm_bytes
    report.update(
        compile_s=round(compile_s, 1),
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        code_bytes=int(memory.generated_code_size_in_bytes),
        total_bytes=int(total), hbm_bytes=chip.hbm_bytes, hbm_source=chip.hbm_source, fits=fits,
        headroom_bytes=int(chip.hbm_bytes - total),
        xla_flops=float(cost.get("flops", 0.0)) * chips, model_flops=program.model_flops,
        roofline_step_s=roofline_s, roofline_tokens_per_s_per_chip=program.tokens / roofline_s / chips,
        collectives=counts, collective_bytes=sizes)
    if program.first_step_flops:  # XLA's cost analysis counts a loop's body once.
        report["model_flops_first_step"] = program.first_step_flops
    if not fits:
        report["change"] = _advice(program.name, config, mesh, int(memory.argument_size_in_bytes),
                                   int(memory.temp_size_in_bytes))
    return report


def run(config: ml_collections.ConfigDict, topology: str, functions: Sequence[str] | None = None
        ) -> list[dict]:
    """Reports of compiling `functions` (default: all) for `topology` with `config`
    (model.dtype 'auto' computes as on a TPU: bfloat16)."""
    chip, devices = slice_devices(topology)
    config = config.copy_and_resolve_references()
    config.model.dtype = precision.resolve(config.model.dtype, "tpu")
    mesh = parallel.make_mesh(config.mesh_shape, devices)
    return [compile_report(p, config, mesh, chip, topology) for p in programs(config, mesh)
            if functions is None or p.name in functions]


def main():
    """The command line (absl flags, defined here so that importing tfx.tpu.aot defines none)."""
    from absl import flags

    from tfx.core import cli

    shared = cli.define_flags(config="file")
    topology = flags.DEFINE_string("topology", None, "TPU slice, GENERATION:GRID, e.g. v5e:16x16.")
    functions = flags.DEFINE_list("functions", None, "Any of train_step, eval_step, translate "
                                  "(default: all).")
    flags.mark_flag_as_required("topology")

    def compile_all():
        reports = run(shared.config_file(), topology.value, functions.value)
        for report in reports:
            print(json.dumps(report), flush=True)
        if not all(report["fits"] for report in reports):
            sys.exit(3)

    cli.run("tfx.tpu.aot", compile_all)


if __name__ == "__main__":
    main()
