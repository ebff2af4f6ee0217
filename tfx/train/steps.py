"""The train state, created directly sharded, and the jit-compiled train/eval/score steps.

The NNX model is split once into a static `graphdef` and a parameter State; the steps are pure
functions of (state, batch) that merge them back inside `jit`, so no per-step Python graph work.
A batch is a dict of [B, L] int32 arrays: `inputs`, `targets` and, for packed rows,
`inputs_segment_ids`, `targets_segment_ids`, `inputs_positions`, `targets_positions`.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from tfx.core import parallel
from tfx.model import params as model_params
from tfx.model import quantize
from tfx.model.transformer import EncoderDecoder
from tfx.train import losses, optim

MODEL_INPUTS = ("inputs_segment_ids", "targets_segment_ids", "inputs_positions", "targets_positions")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState
    rng: jax.Array


def _init_state(config: ml_collections.ConfigDict, params: nnx.State | None = None) -> TrainState:
    tx = optim.make_optimizer(config)
    params_key, dropout_key = jax.random.split(jax.random.PRNGKey(config.seed))
    if params is None:
        params = nnx.state(EncoderDecoder(config.model, nnx.Rngs(params=params_key)), nnx.Param)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=dropout_key)


def abstract_train_state(config: ml_collections.ConfigDict, mesh: Mesh
                         ) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """(graphdef, state shapes and dtypes, state_shardings), without allocating anything.
    Inference needs only the parameters: `tfx.model.params.abstract_params`."""
    graphdef, _, _ = model_params.abstract_params(config, mesh)
    abstract = jax.eval_shape(lambda: _init_state(config))
    return graphdef, abstract, parallel.state_shardings(abstract, mesh, config.logical_axis_rules)


def random_state(config: ml_collections.ConfigDict, shardings: TrainState) -> TrainState:
    """The initial state (step 0, parameters and dropout RNG from config.seed), initialised
    directly on its shards."""
    return jax.jit(lambda: _init_state(config), out_shardings=shardings)()


def create_train_state(config: ml_collections.ConfigDict, mesh: Mesh
                       ) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """(graphdef, state, state_shardings): the state is initialised directly on its shards."""
    graphdef, _, shardings = abstract_train_state(config, mesh)
    return graphdef, random_state(config, shardings), shardings


def fresh_state(config: ml_collections.ConfigDict, params: nnx.State, shardings: TrainState
                ) -> TrainState:
    """The state `create_train_state` makes (step 0, the optimizer initialised, the seed's
    dropout RNG) around `params` instead of random ones; `params`, placed by shardings.params,
    are donated."""
    return jax.jit(lambda p: _init_state(config, p), out_shardings=shardings, donate_argnums=0)(params)


def _model_kwargs(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    unknown = set(batch) - {"inputs", "targets", *MODEL_INPUTS}
    if unknown:
        raise ValueError(f"batch has unknown keys {sorted(unknown)}; expected inputs, targets and "
                         f"optionally {', '.join(MODEL_INPUTS)}.")
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def _target_weights(targets_BxT: jax.Array) -> jax.Array:
    """1 for real target tokens, 0 for padding."""
    return (targets_BxT > 0).astype(jnp.float32)


def metric_sums(graphdef: nnx.GraphDef, params: nnx.State, batch: dict[str, jax.Array],
                config: ml_collections.ConfigDict, rngs: nnx.Rngs | None = None,
                teacher_logits_BxTxV: jax.Array | None = None) -> dict[str, jax.Array]:
    """The teacher-forced `losses.metric_sums` of `batch` under the model (graphdef, params):
    with config's label smoothing, z-loss, quantization and distillation weight; dropout only
    with `rngs`. Its "nll" is the plain cross-entropy, whatever the config's smoothing."""
    model = nnx.merge(graphdef, params)
    with quantize.matmuls(config.quantization):  # int8: QAT under grad, else PTQ.
        logits_BxTxV = model(batch["inputs"], batch["targets"], **_model_kwargs(batch), rngs=rngs)
    return losses.metric_sums(logits_BxTxV, batch["targets"], _target_weights(batch["targets"]),
                              config.label_smoothing, config.z_loss, teacher_logits_BxTxV,
                              config.distill.weight, config.distill.temperature)


def divergence_limit(config: ml_collections.ConfigDict) -> float:
    """The loss above which a step counts as diverged: config.divergence_factor x ln(vocab_size),
    the loss of a uniform prediction, about where training starts (inf when the factor is 0)."""
    if not config.divergence_factor:
        return float("inf")
    return config.divergence_factor * math.log(config.model.vocab_size)


def diverged(loss, grad_norm, config: ml_collections.ConfigDict):
    """Whether a step's loss or gradient is non-finite or its loss is past divergence_limit."""
    return ~jnp.isfinite(loss) | ~jnp.isfinite(grad_norm) | (loss > divergence_limit(config))


def _keep_unless(good, new, old):
    """`new` where `good`, else `old`; except optimizer step counts, which always advance, so
    the learning rate applied next stays the schedule's value at the train state's step."""
    def choose(path, new_leaf, old_leaf):
        if str(getattr(path[-1], "name", "")) == "count":
            return new_leaf
        return jnp.where(good, new_leaf, old_leaf)
    return jax.tree_util.tree_map_with_path(choose, new, old)


def _grads_and_sums(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                    teacher_graphdef: nnx.GraphDef | None, params: nnx.State,
                    batch: dict[str, jax.Array], key: jax.Array, tokens: jax.Array,
                    teacher_params: nnx.State | None):
    """(gradients, metric sums) of `batch`'s summed token loss divided by `tokens`, the whole
    batch's target-token count. With `teacher_graphdef`, the teacher's logits (no dropout, float
    matmuls), computed outside the differentiated function so frozen, are the distillation
    targets."""
    teacher_logits_BxTxV = None
    if teacher_graphdef is not None:
        teacher_model = nnx.merge(teacher_graphdef, teacher_params)
        teacher_logits_BxTxV = teacher_model(batch["inputs"], batch["targets"], **_model_kwargs(batch))

    def loss_fn(p):
        sums = metric_sums(graphdef, p, batch, config, nnx.Rngs(dropout=key), teacher_logits_BxTxV)
        return sums["loss"] / tokens, sums
    return jax.grad(loss_fn, has_aux=True)(params)


def _accumulated(grads_and_sums: Callable, params: nnx.State, batch: dict[str, jax.Array],
                 key: jax.Array, accum: int, *args):
    """grads_and_sums(params, microbatch, key_i, *args) added over `accum` microbatches of
    `batch` (a scan), each with its own dropout key; the plain call when `accum` is 1."""
    if accum == 1:
        return grads_and_sums(params, batch, key, *args)
    # Row r goes to microbatch r % accum, so each microbatch stays evenly sharded.
    micro = jax.tree.map(
        lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1), batch)

    def add(carry, xs):
        i, micro_batch = xs
        micro_batch = jax.tree.map(lambda x: parallel.constrain(x, ("batch", "length")), micro_batch)
        result = grads_and_sums(params, micro_batch, jax.random.fold_in(key, i), *args)
        return jax.tree.map(jnp.add, carry, result), None

    zeros = jax.eval_shape(grads_and_sums, params, jax.tree.map(lambda x: x[0], micro), key, *args)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
    (grads, sums), _ = jax.lax.scan(add, zeros, (jnp.arange(accum), micro))
    return grads, sums


def _check_rows(rows: int, config: ml_collections.ConfigDict, data_parallel: int):
    if rows % (config.grad_accum_steps * data_parallel):
        raise ValueError(
            f"a global batch of {rows} rows cannot be split into config.grad_accum_steps="
            f"{config.grad_accum_steps} microbatches that each divide over the {data_parallel}-way "
            f"data axes of config.mesh_shape={config.mesh_shape!r}."
        )


def _updated(state: TrainState, grads: nnx.State, sums: dict[str, jax.Array], stop_Bx1,
             tx: optax.GradientTransformation, schedule: Callable,
             config: ml_collections.ConfigDict) -> tuple[TrainState, dict[str, jax.Array]]:
    """The state after the optimizer applies `grads`, and the step's metrics: with
    config.nonfinite_loss='skip', a diverged step keeps the parameters and moments."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = losses.summarize(sums)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["learning_rate"] = schedule(state.step)
    if stop_Bx1 is not None:  # any process's flag, the same on all of them.
        metrics["stop"] = jnp.max(stop_Bx1)
    if config.nonfinite_loss == "skip":
        good = ~diverged(metrics["loss"], metrics["grad_norm"], config)
        params, opt_state = _keep_unless(good, (params, opt_state), (state.params, state.opt_state))
        metrics["skipped"] = 1 - good.astype(jnp.int32)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def make_train_step(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, mesh: Mesh,
                    state_shardings: TrainState,
                    teacher: tuple[nnx.GraphDef, nnx.State] | None = None) -> Callable:
    """jit-compiled `train_step(state, batch) -> (state, metrics)`, state buffers donated.

    With `teacher`, the (graphdef, params shardings) of config.distill's teacher (see
    `rundir.load_teacher`), it is `train_step(state, batch, teacher_params)` (not donated): the
    teacher's forward pass on each (micro)batch (no dropout, float matmuls), outside the
    differentiated function so frozen, gives the distillation targets of `losses.metric_sums`.

    A batch may carry `stop`, [B, 1] int32: each process sets its rows to 1 once it has a
    preemption signal (process 0 to 2 once it lost the workdir lock), and metrics["stop"] is
    their maximum, the same on every process, so all of them decide at the same step to save
    and exit (1) or to exit without saving (2; see trainer.Preemption).

    Gradients are of the summed token loss divided by the batch's target-token count (known
    from the batch before any microbatch runs), added over `grad_accum_steps` microbatches, so
    accumulation equals one big batch. Dividing the loss, not the gradients, scales the
    backward pass's first cotangent instead of every gradient afterwards (a pass over all
    parameters saved).
    """
    tx = optim.make_optimizer(config)
    schedule = optim.learning_rate_schedule(config)
    rules = config.logical_axis_rules
    data_parallel = parallel.data_parallel_size(mesh, rules)
    if (teacher is None) == bool(config.distill.teacher_config):
        raise ValueError(f"config.distill.teacher_config={config.distill.teacher_config!r}: the "
                         "train step needs the teacher exactly when this key is set.")
    grads_and_sums = functools.partial(_grads_and_sums, config, graphdef,
                                       None if teacher is None else teacher[0])

    def train_step(state: TrainState, batch: dict[str, jax.Array], teacher_params=None):
        batch = dict(batch)
        stop_Bx1 = batch.pop("stop", None)  # each process's rows carry its preemption flag.
        with parallel.activation_sharding(mesh, rules):
            key = jax.random.fold_in(state.rng, state.step)
            _check_rows(batch["targets"].shape[0], config, data_parallel)
            tokens = jnp.maximum(jnp.sum(_target_weights(batch["targets"])), 1.0)
            grads, sums = _accumulated(grads_and_sums, state.params, batch, key,
                                       config.grad_accum_steps, tokens, teacher_params)
            return _updated(state, grads, sums, stop_Bx1, tx, schedule, config)

    batch_sharding = parallel.batch_sharding(mesh, rules)
    in_shardings = (state_shardings, batch_sharding) + (() if teacher is None else (teacher[1],))
    return jax.jit(train_step, in_shardings=in_shardings, out_shardings=(state_shardings, None),
                   donate_argnums=0)


def make_eval_step(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, mesh: Mesh,
                   params_shardings: nnx.State) -> Callable:
    """jit-compiled `eval_step(params, batch) -> metric sums` (no dropout), to add over batches."""
    rules = config.logical_axis_rules

    def eval_step(params, batch):
        with parallel.activation_sharding(mesh, rules):
            return metric_sums(graphdef, params, batch, config, rngs=None)

    batch_sharding = parallel.batch_sharding(mesh, rules)
    return jax.jit(eval_step, in_shardings=(params_shardings, batch_sharding))


def make_score_step(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, mesh: Mesh,
                    params_shardings: nnx.State) -> Callable:
    """jit-compiled `score_step(params, batch) -> (log_prob_B, tokens_B)`, sharded like eval.

    Per row (one sentence pair, unpacked): the sum of its target tokens' log-probabilities
    under the model (teacher forcing; no label smoothing, no dropout; EOS included) and how
    many tokens there are, so the mean is their ratio. Padding rows give (0, 0).
    """
    rules = config.logical_axis_rules

    def score_step(params, batch):
        with parallel.activation_sharding(mesh, rules), quantize.matmuls(config.quantization):
            model = nnx.merge(graphdef, params)
            logits_BxTxV = model(batch["inputs"], batch["targets"], **_model_kwargs(batch))
            _, nll_BxT = losses.token_losses(logits_BxTxV, batch["targets"], 0.0, 0.0)
            weights_BxT = _target_weights(batch["targets"])
            return -jnp.sum(nll_BxT * weights_BxT, axis=1), jnp.sum(weights_BxT, axis=1)

    batch_sharding = parallel.batch_sharding(mesh, rules)
    rows_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(batch_sharding.spec[0]))
    return jax.jit(score_step, in_shardings=(params_shardings, batch_sharding),
                   out_shardings=(rows_sharding, rows_sharding))

