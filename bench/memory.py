"""Per-device memory of the train state and the compiled train step: prints one JSON line.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/memory.py \\
        --config configs/wmt_base.py:base --mesh data:2,fsdp:2,tensor:2 [--remat full] [--scan_layers]

Parameter and optimizer bytes are the largest per-device shard under the config's logical-axis
rules on that mesh; the step's temporary bytes come from XLA's memory analysis of the compiled
train step (nothing is allocated or run), and compile_s is the time to lower and compile it
(one measurement: a second compilation would be served from JAX's caches).
"""
from __future__ import annotations

import json
import time

import jax
import numpy as np

from tfx.core import parallel
from tfx.train import steps

import options


def main():
    args = options.parser(__doc__).parse_args()
    config = options.load_config(args)
    mesh = parallel.make_mesh(config.mesh_shape)
    graphdef, abstract, shardings = steps.abstract_train_state(config, mesh)
    train_step = steps.make_train_step(config, graphdef, mesh, shardings)
    rows = config.per_device_batch_size * parallel.data_parallel_size(mesh, config.logical_axis_rules)
    batch_sharding = parallel.batch_sharding(mesh, config.logical_axis_rules)
    batch = {k: jax.ShapeDtypeStruct((rows, length), np.int32, sharding=batch_sharding)
             for k, length in (("inputs", config.max_source_length),
                               ("targets", config.max_target_length))}
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    start = time.perf_counter()
    memory = train_step.lower(state, batch).compile().memory_analysis()
    compile_s = time.perf_counter() - start
    print(json.dumps(dict(
        variant=config.variant, mesh=dict(mesh.shape), devices=mesh.size, global_batch_rows=rows,
        remat=config.model.remat, scan_layers=config.model.scan_layers,
        param_bytes_per_device=parallel.per_device_bytes(abstract.params, shardings.params),
        optimizer_bytes_per_device=parallel.per_device_bytes(abstract.opt_state, shardings.opt_state),
        step_temp_bytes_per_device=int(memory.temp_size_in_bytes),
        step_argument_bytes_per_device=int(memory.argument_size_in_bytes),
        compile_s=round(compile_s, 1),
    )))


if __name__ == "__main__":
    main()
