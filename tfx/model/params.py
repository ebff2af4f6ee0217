"""The model's parameters as shapes, dtypes and shardings: where restored parameters go.

Inference restores a checkpoint's parameters into `abstract_params`' tree; nothing is allocated
before the restore, and no optimizer state or pruning mask is built (that is the train state's,
`tfx.train.steps.abstract_train_state`).
"""
from __future__ import annotations

from typing import Any

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh

from tfx.core import parallel
from tfx.model.transformer import EncoderDecoder


def placed(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of the (abstract) tree `abstract`, each with its leaf of `shardings`:
    a restore target, or the arguments of an ahead-of-time compilation."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def abstract_params(config: ml_collections.ConfigDict, mesh: Mesh
                    ) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, the parameters as ShapeDtypeStructs placed on `mesh`, their shardings) of the
    model config.model describes, placed by config.logical_axis_rules; nothing is allocated."""
    model = nnx.eval_shape(lambda: EncoderDecoder(config.model, nnx.Rngs(0)))
    abstract = nnx.state(model, nnx.Param)
    shardings = parallel.state_shardings(abstract, mesh, config.logical_axis_rules)
    return nnx.graphdef(model), placed(abstract, shardings), shardings
