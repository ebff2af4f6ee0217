"""Device mesh, logical-axis rules, and the shardings they give to parameters and batches.

Every parameter and main activation names its axes logically ("batch", "embed", "heads", ...).
One rules table (`config.logical_axis_rules`) maps each logical name to mesh axes
(`data`, `fsdp`, `tensor`); the first mesh axis that is still free in that array and divides
its dimension wins, otherwise the dimension is replicated.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tfx.core.config import MESH_AXES

Rules = Sequence[tuple[str, Any]]
LogicalAxes = tuple[str | None, ...]


def parse_mesh_shape(mesh_shape: str, num_devices: int) -> dict[str, int]:
    """Parses "data:-1,fsdp:2,tensor:1" into sizes; -1 takes the devices left over."""
    sizes: dict[str, int] = {}
    for item in mesh_shape.split(","):
        name, _, size = item.strip().partition(":")
        if name not in MESH_AXES or name in sizes or not size.lstrip("-").isdigit():
            raise ValueError(
                f"config.mesh_shape={mesh_shape!r}: expected comma-separated 'axis:size' with "
                f"each of {', '.join(MESH_AXES)} at most once, e.g. 'data:-1,fsdp:1,tensor:1'."
            )
        sizes[name] = int(size)
    for name in MESH_AXES:
        sizes.setdefault(name, 1)
    wildcards = [n for n, s in sizes.items() if s == -1]
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if len(wildcards) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
        raise ValueError(f"config.mesh_shape={mesh_shape!r}: sizes must be positive, or -1 once.")
    if wildcards:
        if num_devices % fixed:
            raise ValueError(
                f"config.mesh_shape={mesh_shape!r}: the fixed axes need a multiple of {fixed} "
                f"devices, but there are {num_devices}."
            )
        sizes[wildcards[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(
            f"config.mesh_shape={mesh_shape!r} needs {fixed} devices, but there are "
            f"{num_devices}. Use -1 on one axis to take whatever is available."
        )
    return {name: sizes[name] for name in MESH_AXES}


def make_mesh(mesh_shape: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_shape(mesh_shape, len(devices))
    return jax.make_mesh(
        tuple(sizes.values()),
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


def logical_to_spec(
    logical_axes: LogicalAxes, shape: Sequence[int] | None, rules: Rules, mesh: Mesh
) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec for an array of `shape` on `mesh`.

    With `shape` None, divisibility is not checked (the caller guarantees it, as for batches).
    """
    used: set[str] = set()
    spec = []
    dims = [0] * len(logical_axes) if shape is None else shape
    for name, dim in zip(logical_axes, dims, strict=True):
        chosen = None
        for rule_name, mesh_axes in rules:
            if rule_name != name or mesh_axes is None:
                continue
            axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
            axes = tuple(a for a in axes if mesh.shape[a] > 1 and a not in used)
            if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0:
                chosen = axes
                break
        if chosen:
            used.update(chosen)
            spec.append(chosen[0] if len(chosen) == 1 else chosen)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def state_shardings(tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a (possibly abstract) tree of parameters or optimizer state.

    A Variable whose rank matches its `logical_axes` metadata (parameters, Adam moments)
    follows them; anything else (step counts, Adafactor's factored statistics) is replicated.
    """
    replicated = NamedSharding(mesh, PartitionSpec())

    def sharding(leaf):
        if isinstance(leaf, nnx.Variable):
            axes = leaf.get_metadata().get("logical_axes")
            if axes is not None and len(axes) == leaf.ndim:
                return leaf.replace(NamedSharding(mesh, logical_to_spec(axes, leaf.shape, rules, mesh)))
            return leaf.replace(replicated)
        return replicated

    return jax.tree.map(sharding, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding of [batch, length] arrays: batch over the data axes, length whole."""
    return NamedSharding(mesh, logical_to_spec(("batch", "length"), None, rules, mesh))


def data_parallel_size(mesh: Mesh, rules: Rules) -> int:
    """How many ways the batch dimension is split on this mesh under these rules."""
    axes = batch_sharding(mesh, rules).spec[0] or ()
    return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "tfx_activation_sharding", default=None
)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules):
    """Within this context (while tracing a step), `constrain` pins activation shardings."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def target_platform() -> str:
    """The platform the step being traced is compiled for: that of the active mesh's devices
    (a TPU when compiling ahead of time on a CPU host, see tfx/aot.py), else JAX's default."""
    active = _ACTIVE.get()
    return jax.default_backend() if active is None else active[0].devices.flat[0].platform


def active_data_parallel_size() -> int:
    """`data_parallel_size` of the mesh and rules of the step being traced (1 outside one)."""
    active = _ACTIVE.get()
    return 1 if active is None else data_parallel_size(*active)


def constrain(x: jax.Array, logical_axes: LogicalAxes) -> jax.Array:
    """Constrains an activation to the sharding its logical axes map to (no-op outside a mesh)."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(logical_axes, x.shape, rules, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh, rules: Rules) -> dict[str, jax.Array]:
    """Places a whole (single-process) batch of [batch, length] arrays on the mesh."""
    size = data_parallel_size(mesh, rules)
    for name, array in batch.items():
        if array.shape[0] % size:
            raise ValueError(
                f"batch['{name}'] has {array.shape[0]} rows, which the mesh's data axes cannot "
                f"split evenly ({size} ways); make the global batch size a multiple of {size}."
            )
    return jax.device_put(batch, batch_sharding(mesh, rules))


def per_device_bytes(abstract_tree: Any, shardings: Any) -> int:
    """Bytes of the largest per-device shard set of `abstract_tree` placed by `shardings`."""
    totals = {}
    for leaf, sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
        itemsize = np.dtype(leaf.dtype).itemsize
        for device, index in sharding.devices_indices_map(leaf.shape).items():
            shape = [len(range(*s.indices(n))) for s, n in zip(index, leaf.shape)]
            totals[device] = totals.get(device, 0) + int(np.prod(shape)) * itemsize
    return max(totals.values())
