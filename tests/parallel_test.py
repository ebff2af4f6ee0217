import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tfx.core import config as config_lib
from tfx.core import parallel
from tfx.train import steps

RULES = config_lib.DEFAULT_LOGICAL_AXIS_RULES


@pytest.mark.parametrize("shape, expected", [
    ("data:-1,fsdp:1,tensor:1", (8, 1, 1)),
    ("data:2,fsdp:2,tensor:2", (2, 2, 2)),
    ("fsdp:-1", (1, 8, 1)),
    ("tensor:2,data:-1", (4, 1, 2)),
])
def test_mesh_shape_parses_and_fills_wildcard(shape, expected):
    mesh = parallel.make_mesh(shape)
    assert tuple(mesh.shape.values()) == expected
    assert mesh.axis_names == ("data", "fsdp", "tensor")


@pytest.mark.parametrize("shape, message", [
    ("data:16", "needs 16 devices, but there are 8"),
    ("data:3,fsdp:-1", "multiple of 3 devices"),
    ("data:-1,fsdp:-1", "-1 once"),
    ("batch:8", "axis:size"),
    ("data:two", "axis:size"),
])
def test_mesh_shape_that_does_not_fit_is_refused(shape, message):
    with pytest.raises(ValueError, match=message) as error:
        parallel.make_mesh(shape)
    assert "config.mesh_shape" in str(error.value)


def test_logical_rules_map_params_and_activations():
    mesh = parallel.make_mesh("data:2,fsdp:2,tensor:2")
    assert parallel.logical_to_spec(("embed", "mlp"), (64, 128), RULES, mesh) == P("fsdp", "tensor")
    assert parallel.logical_to_spec(("vocab", "embed"), (100, 64), RULES, mesh) == P("tensor", "fsdp")
    # Activations: batch takes data and fsdp, so embed finds fsdp taken and stays whole.
    assert parallel.logical_to_spec(("batch", "length", "embed"), (8, 5, 64), RULES, mesh) == \
        P(("data", "fsdp"), None, None)
    # A dimension the mesh axis does not divide is replicated rather than unevenly split.
    assert parallel.logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 1, 8), RULES, mesh) == \
        P("fsdp", None, None)


def test_axes_of_size_one_are_left_out():
    mesh = parallel.make_mesh("data:-1,fsdp:1,tensor:1")
    assert parallel.logical_to_spec(("embed", "mlp"), (64, 128), RULES, mesh) == P(None, None)
    assert parallel.data_parallel_size(mesh, RULES) == 8


def test_shard_batch_splits_rows_and_refuses_uneven_batches():
    mesh = parallel.make_mesh("data:2,fsdp:2,tensor:2")
    batch = {"inputs": np.arange(24, dtype=np.int32).reshape(8, 3)}
    sharded = parallel.shard_batch(batch, mesh, RULES)["inputs"]
    assert sharded.sharding.spec == P(("data", "fsdp"), None)
    assert {s.data.shape for s in sharded.addressable_shards} == {(2, 3)}
    np.testing.assert_array_equal(np.asarray(sharded), batch["inputs"])
    with pytest.raises(ValueError, match="multiple of 4"):
        parallel.shard_batch({"inputs": np.zeros((6, 3), np.int32)}, mesh, RULES)


def test_constrain_is_identity_outside_a_mesh_context():
    x = jax.numpy.ones((4, 3))
    assert parallel.constrain(x, ("batch", "length")) is x


@pytest.mark.parametrize("mesh_shape, factor", [("fsdp:8,data:1", 8), ("data:2,fsdp:2,tensor:2", 4)])
def test_fsdp_cuts_per_device_state_bytes_by_about_its_factor(tiny_config, mesh_shape, factor):
    config = tiny_config(model=dict(vocab_size=64, emb_dim=64, num_heads=8, num_kv_heads=8, mlp_dim=128))
    _, abstract, shardings = steps.abstract_train_state(config, parallel.make_mesh("data:8"))
    replicated = parallel.per_device_bytes(abstract.params, shardings.params)
    _, abstract, shardings = steps.abstract_train_state(config, parallel.make_mesh(mesh_shape))
    sharded = parallel.per_device_bytes((abstract.params, abstract.opt_state),
                                        (shardings.params, shardings.opt_state))
    assert replicated == 4 * sum(x.size for x in jax.tree.leaves(abstract.params))
    # Adam keeps two moments: 3x the parameters, split `factor` ways except the small
    # norm scales and biases that stay whole.
    assert 3 * replicated / factor <= sharded < 1.15 * 3 * replicated / factor
