"""Compiling for Cloud TPU slices on this CPU host (libtpu's topologies): the real train step,
eval step and translation, their memory against the chip's HBM, their FLOPs against the model's,
and the collectives that their meshes imply."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tfx.core import config as config_lib
from tfx.core import parallel
from tfx.model import layers
from tfx.model.transformer import count_params
from tfx.tpu import aot
from tfx.train import steps, trainer

from runs import tiny_multi30k

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WMT = os.path.join(ROOT, "configs", "wmt_base.py")
FUNCTIONS = ("train_step", "eval_step", "translate")


def tiny(**overrides):
    config = config_lib.load(f"{WMT}:tiny")  # model.dtype 'auto': bfloat16 on a TPU.
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config_lib.validate(config)


@pytest.fixture(scope="module")
def v5e_reports():
    """:tiny on a v5e-4 slice, data and tensor parallel. Its beam search halves the batch once
    and attends to the whole cache, which compiles far less than the defaults' three halvings
    and windows (v4_reports' greedy search has the windows)."""
    config = tiny(mesh_shape="data:2,fsdp:1,tensor:2",
                  **{"decode.batch_halvings": 1, "decode.cache_window": 0})
    return {r["function"]: r for r in aot.run(config, "v5e:2x2")}


@pytest.fixture(scope="module")
def v4_reports():
    """:tiny on a v4-16 slice (8 chips), data, fsdp and tensor parallel, translating greedily
    (v5e_reports has the beam search)."""
    config = tiny(mesh_shape="data:2,fsdp:2,tensor:2", **{"decode.strategy": "greedy"})
    return {r["function"]: r for r in aot.run(config, "v4:2x2x2")}


@pytest.mark.parametrize("slice_reports", ["v5e_reports", "v4_reports"])
def test_every_function_compiles_and_fits_the_chip(slice_reports, request):
    reports = request.getfixturevalue(slice_reports)
    assert tuple(reports) == FUNCTIONS
    for report in reports.values():
        memory = (report["argument_bytes"] + report["output_bytes"] - report["alias_bytes"]
                  + report["temp_bytes"] + report["code_bytes"])
        assert report["total_bytes"] == memory > 0
        assert report["fits"] and report["total_bytes"] < report["hbm_bytes"]
        assert report["headroom_bytes"] == report["hbm_bytes"] - report["total_bytes"]
    assert {r["dtype"] for r in reports.values()} == {"bfloat16"}
    chip = "TPU v5 lite" if slice_reports == "v5e_reports" else "TPU v4"
    assert {r["chip"] for r in reports.values()} == {chip}


@pytest.mark.parametrize("slice_reports", ["v5e_reports", "v4_reports"])
def test_xla_flops_are_close_to_the_model_flops(slice_reports, request):
    reports = request.getfixturevalue(slice_reports)
    # XLA counts more than the model's products: the whole causal attention matrix rather
    # than its lower half, softmax, norms, activations and the optimizer; and work a mesh axis
    # repeats (xla_flops are one chip's times the chips). It counts a loop's body once, so
    # translation (a loop over output positions) compares with the encoder and one step.
    for name in ("train_step", "eval_step"):
        ratio = reports[name]["xla_flops"] / reports[name]["model_flops"]
        assert 0.95 < ratio < 1.25, (name, ratio)
    translate = reports["translate"]
    ratio = translate["xla_flops"] / translate["model_flops_first_step"]
    assert 0.95 < ratio < 1.25, ratio


def test_the_roofline_is_the_model_flops_at_the_slices_peak(v5e_reports):
    report = v5e_reports["train_step"]
    config = tiny(mesh_shape="data:2,fsdp:1,tensor:2")
    peak = 4 * 197e12  # 4 v5e chips
    assert report["roofline_step_s"] == pytest.approx(report["model_flops"] / peak)
    tokens = 2 * config.per_device_batch_size * config.max_target_length  # 2-way data parallel
    assert report["roofline_tokens_per_s_per_chip"] == pytest.approx(
        tokens / report["roofline_step_s"] / 4)


def test_fsdp_reduce_scatters_gradients_and_gathers_parameters(v5e_reports, v4_reports):
    # Without fsdp the state is replicated over `data`: gradients are all-reduced.
    assert v5e_reports["train_step"]["collectives"]["reduce-scatter"] == 0
    assert v5e_reports["train_step"]["collectives"]["all-gather"] == 0
    fsdp = v4_reports["train_step"]
    assert fsdp["collectives"]["reduce-scatter"] > 0 and fsdp["collectives"]["all-gather"] > 0
    # Each fsdp shard receives its part of every gradient: at least the float32 gradients of
    # the parameters the fsdp axis splits (all but the norms', split 2 ways by tensor).
    params = count_params(aot.steps.abstract_train_state(
        tiny(mesh_shape="data:2,fsdp:2,tensor:2"),
        parallel.make_mesh("data:2,fsdp:2,tensor:2", aot.slice_devices("v4:2x2x2")[1]))[1].params)
    assert fsdp["collective_bytes"]["reduce-scatter"] > 0.9 * 4 * params / 2


def test_parameters_and_optimizer_state_are_split_by_fsdp_and_tensor(v5e_reports, v4_reports):
    # Arguments of the train step: parameters and two Adam moments, float32, plus the batch.
    replicated = v5e_reports["train_step"]["argument_bytes"] * 2  # tensor split them 2 ways.
    assert v4_reports["train_step"]["argument_bytes"] == pytest.approx(replicated / 4, rel=0.1)


def test_a_configuration_that_does_not_fit_is_reported_with_what_to_change():
    config = tiny(mesh_shape="data:-1,fsdp:1,tensor:1", per_device_batch_size=8192)
    (report,) = aot.run(config, "v5e:2x2", ["train_step"])
    assert report["fits"] is False
    assert report["total_bytes"] > report["hbm_bytes"] == aot.slice_devices("v5e:2x2")[0].hbm_bytes
    assert report["hbm_source"] == "xla"
    assert any("grad_accum_steps=2" in change for change in report["change"])


@pytest.mark.parametrize("topology", ["v4:2x2x1", "v5e:2x2", "v5p:2x2x1", "v6e:2x2"])
def test_the_hbm_compared_with_is_what_xla_lets_a_program_use(topology):
    """A program whose arguments and outputs come to the reported HBM less 64 MiB compiles for
    one chip; 64 MiB more does not (the nominal sizes of CHIPS fail this)."""
    chip, devices = aot.slice_devices(topology)
    assert chip.hbm_source == "xla"
    mesh = jax.sharding.Mesh(np.array(devices[:1]), ("chip",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    for margin, fits in ((-64 * 2**20, True), (64 * 2**20, False)):
        half = jax.ShapeDtypeStruct(((chip.hbm_bytes + margin) // 2,), np.int8, sharding=replicated)
        lowered = jax.jit(lambda x: x + 1).lower(half)  # an argument and an output of `half` bytes.
        if fits:
            lowered.compile()
        else:
            with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED"):
                lowered.compile()


def test_without_a_figure_from_xla_the_nominal_hbm_is_used_and_said(monkeypatch):
    monkeypatch.setattr(aot, "usable_hbm_bytes", lambda device: 0)
    chip, _ = aot.slice_devices("v5e:2x2")
    assert (chip.hbm_bytes, chip.hbm_source) == (16 * 2**30, "nominal")


def test_steps_traced_for_a_tpu_mesh_on_this_cpu_host_leave_out_the_cpu_fusion_barrier():
    x, y = np.ones((4, 8), np.float32), np.ones((4, 9), np.float32)  # two traces, not one cached
    tpu_mesh = parallel.make_mesh("data:-1", aot.slice_devices("v5e:2x2")[1])
    rules = config_lib.default_config().logical_axis_rules
    with parallel.activation_sharding(tpu_mesh, rules):
        assert parallel.target_platform() == "tpu"
        assert "cond" not in str(jax.make_jaxpr(layers.fusion_barrier)(x))
    assert parallel.target_platform() == "cpu"
    assert "cond" in str(jax.make_jaxpr(layers.fusion_barrier)(y))


def test_megacore_chips_are_one_device_each():
    for topology, chips in (("v4:2x2x1", 4), ("v5p:2x2x1", 4), ("v5e:2x4", 8), ("v6e:4x4", 16)):
        assert len(aot.slice_devices(topology)[1]) == chips, topology


@pytest.mark.parametrize("topology, message", [
    ("v9:2x2", "generation among v4, v5e, v5p, v6e"),
    ("v5e", "expected GENERATION:GRID"),
    ("v5e:3x3", "libtpu refused it"),
])
def test_an_unknown_topology_is_a_clear_error(topology, message):
    with pytest.raises(ValueError, match=message):
        aot.slice_devices(topology)


TEACHER_CONFIG = """import sys
sys.path.insert(0, {tests!r})
from runs import tiny_multi30k


def get_config():
    return tiny_multi30k({data_dir!r})
"""


class FirstCall(Exception):
    """Raised by the trainer's train step instead of running, with the arguments it was given."""


def test_the_train_step_compiled_is_the_one_train_py_runs(trained, data_dir, tmp_path, monkeypatch):
    """A student distilling from the session's run: the arguments of the trainer's first call of
    its train step (state, batch with `stop`, teacher parameters) have the tree, shapes, dtypes
    and shardings that aot compiles the step with."""
    _, teacher_workdir = trained
    teacher_config = tmp_path / "teacher.py"
    teacher_config.write_text(TEACHER_CONFIG.format(tests=os.path.dirname(os.path.abspath(__file__)),
                                                    data_dir=data_dir))
    config = tiny_multi30k(data_dir, num_train_steps=1)
    config.model.mlp_dim = 32
    config.distill.update(teacher_config=str(teacher_config), teacher_workdir=teacher_workdir)
    make_train_step = steps.make_train_step

    def spied(*args, **kwargs):
        make_train_step(*args, **kwargs)

        def train_step(*step_args):
            raise FirstCall(step_args)
        return train_step

    monkeypatch.setattr(steps, "make_train_step", spied)
    with pytest.raises(FirstCall) as first:
        trainer.train(config, str(tmp_path / "student"))
    monkeypatch.undo()
    (program,) = [p for p in aot.programs(config, parallel.make_mesh(config.mesh_shape))
                  if p.name == "train_step"]
    real = first.value.args[0]
    assert len(program.args) == len(real) == 3  # state, batch, the teacher's parameters.
    assert jax.tree.structure(program.args) == jax.tree.structure(real)
    for compiled, given in zip(jax.tree.leaves(program.args), jax.tree.leaves(real)):
        assert (compiled.shape, compiled.dtype) == (given.shape, given.dtype)
        assert compiled.sharding.is_equivalent_to(given.sharding, given.ndim)


def run_cli(*flags):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device is enough to compile for a TPU.
    return subprocess.run([sys.executable, "-m", "tfx.tpu.aot", f"--config={WMT}:tiny", *flags],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def test_the_command_prints_a_json_line_per_function_and_exits_3_when_one_does_not_fit():
    run = run_cli("--topology=v5e:2x2", "--functions=train_step",
                  "--config.per_device_batch_size=8192")
    assert run.returncode == 3, run.stderr[-2000:]
    (line,) = run.stdout.splitlines()
    report = json.loads(line)
    assert (report["function"], report["topology"], report["fits"]) == ("train_step", "v5e:2x2", False)
    assert "Traceback" not in run.stderr


def test_the_command_names_the_known_generations_for_an_unknown_topology():
    run = run_cli("--topology=v9:8x8")
    assert run.returncode == 1
    assert "tfx.tpu.aot: --topology='v9:8x8'" in run.stderr and "v5e" in run.stderr
    assert "Traceback" not in run.stderr and run.stdout == ""



def test_the_tpu_slice_presets_of_wmt_base_are_meshes_of_their_slices():
    spec = importlib.util.spec_from_file_location("wmt_base", WMT)
    wmt_base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wmt_base)
    for name, preset in wmt_base.SLICES.items():
        chips = len(aot.slice_devices(preset["topology"])[1])
        for variant in ("base", "big"):
            config = config_lib.load(f"{WMT}:{variant},{name}")
            assert config.model.dtype == "auto"
            assert (config.mesh_shape, config.per_device_batch_size) == (
                "data:-1,fsdp:1,tensor:1", preset[variant])
            assert math.prod(parallel.parse_mesh_shape(config.mesh_shape, chips).values()) == chips
    with pytest.raises(ValueError, match="v5e-256"):
        config_lib.load(f"{WMT}:big,v5e-512")
