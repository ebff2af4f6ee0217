import itertools
import types

import jax
import jax.numpy as jnp
import pytest

from tfx.core import precision


@pytest.mark.parametrize("platform, capability, expected", [
    ("tpu", None, "bfloat16"),
    ("gpu", "9.0", "bfloat16"),
    ("cuda", "8.0", "bfloat16"),
    ("gpu", "7.5", "float32"),  # Turing: float16 tensor cores, no bfloat16.
    ("gpu", None, "float32"),
])
def test_auto_chooses_bfloat16_on_accelerators_with_bfloat16_matrix_units(platform, capability, expected):
    dtype, why = precision.choose(platform, capability)
    assert dtype == expected and why


def test_a_cpu_is_left_to_the_measurement():
    assert precision.choose("cpu") is None


def test_cpu_info_is_the_first_processor(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R)\n"
                       "flags\t\t: fpu amx_bf16\n\nprocessor\t: 1\nmodel name\t: other\n")
    assert precision.cpu_info(str(cpuinfo)) == {"processor": "0", "model name": "Intel(R) Xeon(R)",
                                                "flags": "fpu amx_bf16"}
    assert precision.cpu_info(str(tmp_path / "missing")) == {}


@pytest.fixture
def timings(monkeypatch, tmp_path):
    """mlp_step_seconds replaced by set figures, counting its calls; a fresh cache."""
    monkeypatch.setenv("TFX_CACHE_DIR", str(tmp_path))
    figures = {"float32": 1.0, "bfloat16": 1.0}
    calls = []

    def fake():
        calls.extend(figures)
        return dict(figures)
    monkeypatch.setattr(precision, "mlp_step_seconds", fake)
    return figures, calls


@pytest.mark.parametrize("float32_s, bfloat16_s, expected", [
    (0.20, 0.10, "bfloat16"),
    (0.115, 0.10, "bfloat16"),  # just over the margin
    (0.105, 0.10, "float32"),  # faster, but within the margin: float32's precision wins
    (0.10, 0.15, "float32"),
])
def test_the_cpu_measurement_decides_with_a_margin(timings, float32_s, bfloat16_s, expected):
    figures, _ = timings
    figures.update(float32=float32_s, bfloat16=bfloat16_s)
    dtype, why = precision.measure()
    assert dtype == expected and precision.cache_path() in why


def test_the_measurement_is_cached_per_machine(timings, monkeypatch):
    figures, calls = timings
    figures.update(float32=0.3, bfloat16=0.1)
    assert precision.measure()[0] == "bfloat16" and len(calls) == 2
    figures.update(float32=0.1, bfloat16=0.3)  # a second measurement would say float32
    assert precision.measure()[0] == "bfloat16" and len(calls) == 2
    this_machine = precision.machine_key()
    monkeypatch.setattr(precision, "machine_key", lambda: "another CPU")
    assert precision.measure()[0] == "float32" and len(calls) == 4
    assert set(precision._read_cache(precision.cache_path())) == {this_machine, "another CPU"}


def test_a_corrupt_cache_is_measured_again(timings):
    figures, calls = timings
    with open(precision.cache_path(), "w") as f:
        f.write("{not json")
    figures.update(float32=0.3, bfloat16=0.1)
    assert precision.measure()[0] == "bfloat16" and len(calls) == 2
    assert precision.measure()[0] == "bfloat16" and len(calls) == 2


def test_the_measured_block_runs_in_both_dtypes_even_inside_a_trace():
    both = precision.mlp_step_seconds(tokens=64, width=32, runs=2)
    assert set(both) == {"float32", "bfloat16"} and all(0 < s < 60 for s in both.values())
    # 'auto' is often first met while a model is traced under jit: the block must still run
    # (traced, it would "take" a fraction of a millisecond).
    outside = precision.mlp_step_seconds(("float32",), tokens=1024, width=256, runs=3)["float32"]
    inside = []
    jax.jit(lambda x: inside.append(precision.mlp_step_seconds(("float32",), tokens=1024, width=256,
                                                               runs=3)) or x)(1.0)
    assert inside[0]["float32"] > outside / 4


def test_the_dtypes_runs_alternate_so_a_drifting_machine_slows_both_alike(monkeypatch):
    """A machine whose every run takes 2 ms longer than the one before: timed one dtype after
    the other, the second would seem slower; alternated, their medians stay close."""
    order, calls = [], itertools.count()  # the n-th reading of the clock: 0.5 ms * n**2.
    monkeypatch.setattr(precision, "time", types.SimpleNamespace(
        perf_counter=lambda: 0.0005 * next(calls) ** 2))
    real_step = precision._mlp_step

    def recorded_step(compute, tokens, width):
        step = real_step(compute, tokens, width)
        return lambda: order.append(compute.name) or step()
    monkeypatch.setattr(precision, "_mlp_step", recorded_step)
    seconds = precision.mlp_step_seconds(runs=4, tokens=64, width=32)
    assert order == ["float32", "bfloat16", "bfloat16", "float32"] * 2
    assert abs(seconds["float32"] - seconds["bfloat16"]) < 0.1 * seconds["float32"]


def test_auto_resolves_by_this_machine_and_explicit_dtypes_pass_through():
    assert jax.default_backend() == "cpu"
    expected, _ = precision.measure()
    assert precision.resolve("auto") == expected
    assert precision.compute_dtype("auto") == jnp.dtype(expected)
    assert precision.resolve("auto", "tpu") == "bfloat16"
    assert precision.resolve("float32", "tpu") == "float32"
    assert precision.compute_dtype("bfloat16") == jnp.bfloat16


def test_a_multi_process_cpu_run_computes_in_float32_without_measuring(timings, monkeypatch):
    """Hosts could measure differently, and every process must compile the same program."""
    figures, calls = timings
    figures.update(float32=0.3, bfloat16=0.1)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    precision.auto_dtype.cache_clear()
    try:
        dtype, why = precision.auto_dtype("cpu")
        assert dtype == "float32" and "multi-process" in why and calls == []
        assert precision.auto_dtype("tpu")[0] == "bfloat16"
    finally:
        precision.auto_dtype.cache_clear()
