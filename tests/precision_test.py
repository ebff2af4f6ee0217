import jax
import jax.numpy as jnp
import pytest

from tfx.core import precision

SAPPHIRE_RAPIDS = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"})
ZEN4 = frozenset({"avx2", "avx512f", "avx512_bf16"})
ZEN2 = frozenset({"avx2", "fma"})


@pytest.mark.parametrize("platform, capability, flags, expected", [
    ("tpu", None, frozenset(), "bfloat16"),
    ("gpu", "9.0", frozenset(), "bfloat16"),
    ("cuda", "8.0", frozenset(), "bfloat16"),
    ("gpu", "7.5", frozenset(), "float32"),  # Turing: float16 tensor cores, no bfloat16.
    ("gpu", None, frozenset(), "float32"),
    ("cpu", None, SAPPHIRE_RAPIDS, "bfloat16"),
    ("cpu", None, ZEN4, "float32"),  # AVX512-BF16 without AMX.
    ("cpu", None, ZEN2, "float32"),
    ("cpu", None, frozenset(), "float32"),  # no /proc/cpuinfo (macOS).
])
def test_auto_chooses_bfloat16_only_with_bfloat16_matrix_units(platform, capability, flags, expected):
    dtype, why = precision.choose(platform, capability, flags)
    assert dtype == expected and why


def test_cpu_flags_are_read_from_the_first_flags_line(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Intel(R) Xeon(R)\n"
                       "flags\t\t: fpu avx512_bf16 amx_bf16 amx_tile\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert precision.cpu_flags(str(cpuinfo)) == {"fpu", "avx512_bf16", "amx_bf16", "amx_tile"}
    assert precision.cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_auto_resolves_by_this_machine_and_explicit_dtypes_pass_through():
    assert jax.default_backend() == "cpu"
    expected, _ = precision.choose("cpu", None, precision.cpu_flags())
    assert precision.resolve("auto") == expected
    assert precision.compute_dtype("auto") == jnp.dtype(expected)
    assert precision.resolve("auto", "tpu") == "bfloat16"
    assert precision.resolve("float32", "tpu") == "float32"
    assert precision.compute_dtype("bfloat16") == jnp.bfloat16
