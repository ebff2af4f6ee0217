"""The training loop: data, sharded state, progress, eval, checkpoints, preemption, metrics.

The host never waits for the device to log: step N's metrics are read after step N+1 has been
dispatched. Only at a checkpoint does it wait for the last step, so that a non-finite loss is
caught before it could be saved. Restarting with the same workdir resumes from the latest
checkpoint (state, RNG and data position), so the losses equal an uninterrupted run's.
"""
from __future__ import annotations

import contextlib
import datetime
import math
import signal
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from flax import nnx

from tfx.core import config as config_lib
from tfx.core import files, precision
from tfx.data import pipeline
from tfx.train import budget, lock, losses, rundir, steps
from tfx.train.checkpoint import Checkpoints
from tfx.train.experiment import Experiment
from tfx.train.metrics import METRICS_FILE, MetricWriter, read_metrics

# Builds the periodic BLEU from the experiment and the eval batches it decodes: a function of
# the parameters that returns {"bleu": ..., and any speed figures} (tfx.infer.evaluate.periodic_bleu).
MakeBleu = Callable[[ml_collections.ConfigDict, Experiment, list], Callable[[nnx.State], dict]]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite, or diverged (config.nonfinite_loss='stop')."""


class Preemption:
    """Turns SIGTERM/SIGINT into a flag, and a lost workdir lock (process 0's `held_lock`) into
    another. A signal may reach the processes of a run at different steps, but the save is
    collective, so a flag is not acted on directly: each process feeds it into its rows of the
    next batch (`stop_rows`), the train step reduces it over all processes (their maximum), and
    every process reads the result at the same step (see steps.make_train_step): SAVE saves and
    exits; LOCK_LOST exits without saving, as the workdir is no longer the run's."""
    SAVE, LOCK_LOST = 1, 2

    def __init__(self):
        self.signal = None
        self.held_lock: lock.WorkdirLock | None = None
        self.lock_lost: str | None = None  # why, once process 0's lock is lost.
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def stop_rows(self, rows: int, verify_lock: bool = False) -> np.ndarray:
        """This process's rows of the `stop` column. With `verify_lock`, the lock is read rather
        than trusted to the heartbeat (before a step that saves)."""
        if self.held_lock is not None and self.lock_lost is None:
            try:
                self.held_lock.check(verify=verify_lock)
            except lock.LockLostError as error:
                self.lock_lost = str(error)
        flag = self.LOCK_LOST if self.lock_lost else self.SAVE if self.signal else 0
        return np.full((rows, 1), flag, np.int32)

    def restore(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def _eval_loss(eval_step, params, batches, experiment: Experiment) -> dict[str, float]:
    totals = None
    for batch in batches:
        arrays = pipeline.to_global({k: v for k, v in batch.items() if k != "index"},
                                    experiment.sharding, experiment.eval_shard)
        sums = eval_step(params, arrays)
        totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    summary = jax.device_get(losses.summarize(totals))
    return {name: float(value) for name, value in summary.items() if name != "weight"}


def previous_wall_time(workdir: str) -> float:
    """Seconds the runs before this one spent (from their metrics), so a resumed run's
    wall-clock axis continues theirs."""
    if not (files.path(workdir) / METRICS_FILE).exists():
        return 0.0
    return max((r.get("wall_time_s", 0.0) for r in read_metrics(workdir)), default=0.0)


def log_line(step: int, num_train_steps: int, summary: dict[str, float]) -> str:
    """The plain progress line written instead of the progress bar when not on a terminal."""
    planned = num_train_steps != budget.UNPLANNED_STEPS
    eta = (datetime.timedelta(seconds=round((num_train_steps - step) * summary["step_time_s"]))
           if planned else "after the plan")
    return (f"step {step}/{num_train_steps if planned else '?'}: loss {summary['loss']:.4f}, "
            f"{summary['target_tokens_per_sec']:.0f} target tokens/s, "
            f"{summary['step_time_s']:.3f} s/step, ETA {eta}")


def divergence(metrics: dict, config: ml_collections.ConfigDict) -> str | None:
    """What went wrong in a step's metrics, by the rule of `steps.diverged` (a non-finite
    gradient with a finite loss has already made the parameters NaN), or None; "{step}" is left
    for the caller."""
    loss, grad_norm = metrics["loss"], metrics["grad_norm"]
    if not bool(steps.diverged(loss, grad_norm, config)):
        return None
    if not np.isfinite(loss):
        return f"the training loss is {loss:.4g} at step {{step}}"
    if not np.isfinite(grad_norm):
        return f"the gradient norm is {grad_norm:.4g} at step {{step}} (loss {loss:.4g})"
    return (f"the training loss is {loss:.4g} at step {{step}}, above config.divergence_factor="
            f"{config.divergence_factor:g} x ln(vocab_size) = {steps.divergence_limit(config):.1f}: "
            "the run diverged")


def starting_state(config: ml_collections.ConfigDict, experiment: Experiment,
                   checkpoints: Checkpoints, batches: pipeline.TrainBatches | None
                   ) -> steps.TrainState:
    """The newest checkpoint of the workdir that every process restores (`Checkpoints.resume`;
    `batches`, if given, continue from its data position unless config.data.reset_position),
    restored into the abstract state, so no random state is made beside it; else, when the
    workdir has no checkpoints, config.init_from's parameters with the optimizer, step and RNG
    afresh; else the random `experiment.state`. A workdir whose checkpoints do not restore is
    refused (an error), never trained from step 0. Process 0 says which."""
    main_process = jax.process_index() == 0
    reset_data = config.data.reset_position
    latest, state = checkpoints.resume(experiment.abstract_state, None if reset_data else batches)
    if latest is not None:
        if main_process:
            print(f"resuming from step {latest} in {checkpoints.directory}"
                  + (" with the data afresh (config.data.reset_position)" if reset_data else "")
                  + (f"; config.init_from={config.init_from!r} is ignored" if config.init_from else ""))
        return state
    if not config.init_from:
        return experiment.state
    label, params = rundir.init_params(config, experiment.abstract_state)
    if main_process:
        print(f"initialised from {config.init_from} {label}")
    return steps.fresh_state(config, params, experiment.shardings)


def train(config: ml_collections.ConfigDict, workdir: str, make_bleu: MakeBleu | None = None
          ) -> dict[str, float]:
    """Trains (or resumes) in `workdir`; returns the last eval metrics (empty if none ran).
    Each eval also reports BLEU on the first config.eval_bleu_examples eval pairs when
    `make_bleu` is given (train.py gives tfx.infer.evaluate.periodic_bleu), and the checkpoint
    with the best BLEU is kept."""
    with contextlib.ExitStack() as cleanup:  # closed however the run ends.
        held_lock = None
        if jax.process_index() == 0:
            held_lock = cleanup.enter_context(lock.WorkdirLock(workdir, config.lock_timeout_s))
        return _train(config, workdir, make_bleu, cleanup, held_lock)


def _train(config: ml_collections.ConfigDict, workdir: str, make_bleu: MakeBleu | None,
           cleanup: contextlib.ExitStack, held_lock: lock.WorkdirLock | None) -> dict[str, float]:
    experiment = Experiment(config)
    checkpoints = Checkpoints(workdir, config)
    cleanup.callback(checkpoints.close)
    cleanup.callback(checkpoints.wait)  # (callbacks run last first: wait, then close)
    batches, length_counts = pipeline.train_iterator(
        config, experiment.splits["train"], experiment.tokenizer, experiment.train_shard)
    cleanup.callback(batches.close)
    main_process = jax.process_index() == 0
    if main_process and config.model.dtype == precision.AUTO:
        dtype, why = precision.auto_dtype()
        print(f"config.model.dtype='auto' computes in {dtype}: {why}")
    state = starting_state(config, experiment, checkpoints, batches)
    teacher = None
    if config.distill.teacher_config:
        teacher = rundir.load_teacher(config, experiment.mesh, experiment.tokenizer)
        if main_process:
            print(f"distilling from {config.distill.teacher_workdir} {teacher.label}")
    if main_process:
        config_lib.save_run(config, workdir)
        rundir.keep_tokenizer(experiment.tokenizer, workdir)
    config, timed_steps = _budget_start(config, workdir, int(state.step), checkpoints)
    loop = _Loop(config, workdir, experiment, checkpoints, batches, cleanup, teacher=teacher,
                 make_bleu=make_bleu, timed_steps=timed_steps, first_step=int(state.step))
    if timed_steps is None and config.num_train_steps == budget.UNPLANNED_STEPS:
        loop.plan_on_a_copy(state)  # a resume without its plan: plans before its first step.
    eval_metrics = loop.run(state, held_lock)
    if main_process:
        print(f"training data: {length_counts.report()}")
    return eval_metrics


def _budget_start(config: ml_collections.ConfigDict, workdir: str, step: int,
                  checkpoints: Checkpoints) -> tuple[ml_collections.ConfigDict, tuple[int, int] | None]:
    """With config.train_minutes: the config with the recorded number of steps (train_steps.json,
    or the plan saved with checkpoint `step`), which `checkpoints` goes on saving; else with
    budget.UNPLANNED_STEPS and, for a run from step 0, the (first, last) steps whose time plans
    the number (the first compiles, so the timing starts after it), or None for a resume, which
    plans on a copy of its state before its first step (`_Loop.plan_on_a_copy`). Without
    config.train_minutes the config as it is and None."""
    if not config.train_minutes:
        return config, None
    main_process = jax.process_index() == 0
    saved = checkpoints.saved_plan(step) if step and main_process else None
    plan = budget.recorded(workdir, config, saved)
    if plan:
        config = budget.with_steps(config, plan["num_train_steps"])
        checkpoints.plan = plan
        if main_process:
            print(f"keeping the recorded plan: {budget.describe(plan)}")
        return config, None
    config = budget.with_steps(config, budget.UNPLANNED_STEPS)
    if step:
        if main_process:
            print(f"config.train_minutes={config.train_minutes}: no plan for it in {budget.PLAN_FILE} "
                  f"or checkpoint step {step}; timing {budget.TIMED_STEPS} train steps on a copy of "
                  "the state to plan the number of steps before resuming")
        return config, None
    first = step + 1
    last = budget.plan_step(first, config.warmup_steps)
    if main_process:
        print(f"config.train_minutes={config.train_minutes}: timing steps {first + 1}-{last} to "
              "plan the number of steps")
    return config, (first, last)


def window_summary(window: list[dict], elapsed_s: float, wall_time_s: float) -> dict[str, float]:
    """The log line's figures of the train steps' metrics in `window`, run in `elapsed_s`:
    their mean loss, accuracy, gradient norm etc., target tokens per second and step time."""
    tokens = sum(float(m["weight"]) for m in window)
    summary = {k: float(np.mean([m[k] for m in window]))
               for k in ("loss", "nll", "accuracy", "grad_norm", "learning_rate", "distill_kl")
               if k in window[0]}
    summary.update(perplexity=math.exp(min(summary["nll"], 50)),
                   target_tokens_per_sec=tokens / elapsed_s, step_time_s=elapsed_s / len(window),
                   wall_time_s=wall_time_s)
    if "skipped" in window[0]:
        summary["skipped_steps"] = sum(int(m["skipped"]) for m in window)
    return summary


class _Loop:
    """The state of one training loop: the compiled steps, the metric window, the progress
    display, preemption and the budget's timing. Step N's metrics are read once step N+1 is
    dispatched (`pending`), except before an eval or checkpoint, which waits for them."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, experiment: Experiment,
                 checkpoints: Checkpoints, batches: pipeline.TrainBatches,
                 cleanup: contextlib.ExitStack, *, teacher: rundir.TrainedModel | None,
                 make_bleu: MakeBleu | None, timed_steps: tuple[int, int] | None, first_step: int):
        self.config, self.workdir, self.experiment = config, workdir, experiment
        self.checkpoints, self.batches, self.timed_steps = checkpoints, batches, timed_steps
        self.teacher_spec = None if teacher is None else (teacher.graphdef, teacher.params_shardings)
        self.teacher_args = () if teacher is None else (teacher.params,)  # not donated, so kept.
        self.train_step = self._make_train_step()
        self.eval_step = steps.make_eval_step(config, experiment.graphdef, experiment.mesh,
                                              experiment.shardings.params)
        self.eval_batches = experiment.eval_batches("eval") if "eval" in experiment.splits else []
        self.bleu_of = None
        if make_bleu and self.eval_batches and config.eval_every_steps:
            self.bleu_of = make_bleu(config, experiment, experiment.first_batches(
                self.eval_batches, config.eval_bleu_examples))
        self.writer = MetricWriter(workdir)
        cleanup.callback(self.writer.close)
        self.start_time = time.perf_counter() - previous_wall_time(workdir)
        self.preemption = Preemption()
        cleanup.callback(self.preemption.restore)
        self.main_process = jax.process_index() == 0
        # On a terminal a progress bar; in a log file (SLURM, Kubernetes, nohup) a line per log step.
        self.on_terminal = sys.stderr.isatty()
        self.progress = tqdm.tqdm(total=None if timed_steps else config.num_train_steps,
                                  initial=first_step, unit="step",
                                  disable=not (self.main_process and self.on_terminal),
                                  dynamic_ncols=True)
        cleanup.callback(self.progress.close)
        self.window = []  # the train metrics since the last log line, read one step late.
        self.window_start = time.perf_counter()
        self.stop_agreed = False  # some process was signalled: all save at this step and exit.
        self.timed_start = None  # when the budget's first timed step ended.

    def _make_train_step(self) -> Callable:
        e = self.experiment
        return steps.make_train_step(self.config, e.graphdef, e.mesh, e.shardings, self.teacher_spec)

    def run(self, state: steps.TrainState, held_lock: lock.WorkdirLock | None = None
            ) -> dict[str, float]:
        """Trains to config.num_train_steps or a preemption; returns the last eval metrics.
        `held_lock` is process 0's workdir lock: once it is lost, every process stops at the
        same step without saving (LockLostError)."""
        self.preemption.held_lock = held_lock
        step = int(state.step)
        pending = None  # (step, metrics on device) of the step just dispatched
        eval_metrics: dict[str, float] = {}
        while step < self.config.num_train_steps:
            batch = next(self.batches)  # then the stop flags, as fresh as they can be.
            batch["stop"] = self.preemption.stop_rows(self.experiment.train_shard.rows, self._saves(step + 1))
            batch = pipeline.to_global(batch, self.experiment.sharding, self.experiment.train_shard)
            state, metrics = self.train_step(state, batch, *self.teacher_args)
            step += 1
            if self.timed_steps is not None:
                self._time_for_plan(step, metrics)
            if pending is not None:
                self._read(*pending)
            pending = (step, metrics)
            self.progress.update(1)
            if not (self._saves(step) or self.stop_agreed):
                continue
            self._read(*pending)
            pending = None
            evaluate_now = self._evaluates(step)
            if evaluate_now:
                eval_metrics = self._evaluate(step, state.params)
            bleu = eval_metrics.get("bleu") if evaluate_now else None
            self.checkpoints.save(state, self.batches, {"bleu": bleu} if bleu is not None else None)
            if self.stop_agreed:
                self.progress.write(f"{self.preemption.signal or 'a signal to another process'}: "
                                    f"saved step {step}, exiting.")
                break
        return eval_metrics

    def _evaluates(self, step: int) -> bool:
        config = self.config
        return bool(self.eval_batches) and bool(config.eval_every_steps) and (
            step % config.eval_every_steps == 0 or step == config.num_train_steps)

    def _saves(self, step: int) -> bool:
        """Whether `step` saves a checkpoint (at an eval, the last step and every
        config.checkpoint_every_steps; a preemption saves at any step)."""
        config = self.config
        return (self._evaluates(step) or step == config.num_train_steps
                or step % config.checkpoint_every_steps == 0)

    def _time_for_plan(self, step: int, metrics):
        """At the budget's first and last timed steps, waits for the device and reads the
        clock; at the last, plans the number of steps (budget.plan) and recompiles for it."""
        first, last = self.timed_steps
        if step not in (first, last):
            return
        jax.block_until_ready(metrics)
        if step == first:
            self.timed_start = time.perf_counter()
            return
        step_time = (time.perf_counter() - self.timed_start) / (last - first)
        self._follow(budget.plan(self.config, self.workdir, step_time, step, last - first))

    def plan_on_a_copy(self, state: steps.TrainState):
        """Plans the number of steps (budget.plan) from the time of budget.TIMED_STEPS train
        steps on a copy of `state` and the next batch, after one that compiles; their results
        are discarded and the data position is put back, so the run goes on as if no step had
        been taken. For a resume without its plan: it never trains on budget.UNPLANNED_STEPS."""
        position = self.batches.get_state()
        rows = self.experiment.train_shard.rows
        batch = {**next(self.batches), "stop": np.zeros((rows, 1), np.int32)}
        self.batches.set_state(position)
        batch = pipeline.to_global(batch, self.experiment.sharding, self.experiment.train_shard)
        copy = jax.jit(lambda s: jax.tree.map(jnp.copy, s),  # new buffers, as placed.
                       out_shardings=self.experiment.shardings)(state)
        copy, metrics = self.train_step(copy, batch, *self.teacher_args)
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(budget.TIMED_STEPS):
            copy, metrics = self.train_step(copy, batch, *self.teacher_args)
        jax.block_until_ready((copy, metrics))
        step_time = (time.perf_counter() - start) / budget.TIMED_STEPS
        del copy, metrics
        self._follow(budget.plan(self.config, self.workdir, step_time, int(state.step),
                                 budget.TIMED_STEPS, on_a_copy=True))

    def _follow(self, plan: dict):
        """Trains to `plan`'s number of steps from now on (recompiled), and saves it with
        each checkpoint."""
        self.config = budget.with_steps(self.config, plan["num_train_steps"])
        self.checkpoints.plan = plan
        self.train_step = self._make_train_step()
        self.progress.total = self.config.num_train_steps
        self.progress.write(budget.describe(plan))
        self.timed_steps = None

    def _read(self, done_step: int, device_metrics: dict):
        """Fetches a step's metrics: stops on a lost workdir lock or divergence
        (config.nonfinite_loss='stop'), notes an agreed preemption, and logs the window at
        every config.log_every_steps."""
        config = self.config
        metrics = jax.device_get(device_metrics)
        stop = int(metrics.pop("stop"))
        if stop == Preemption.LOCK_LOST:
            lost = self.preemption.lock_lost or (
                f"process 0 lost the lock of {self.workdir} (its output says why); resume once "
                "no other run uses the workdir.")
            raise lock.LockLostError(f"stopped at step {done_step} without saving it: {lost}")
        self.stop_agreed = self.stop_agreed or stop == Preemption.SAVE
        what = divergence(metrics, config) if config.nonfinite_loss == "stop" else None
        if what:
            raise NonFiniteLossError(
                f"{what.format(step=done_step)}; stopped without "
                f"saving it. The last good checkpoint is step {self.checkpoints.latest_step()} in "
                f"{self.checkpoints.directory}. Lower config.learning_rate, or set "
                "config.nonfinite_loss='skip' to skip such steps.")
        self.window.append(metrics)
        if done_step % config.log_every_steps == 0 or done_step == config.num_train_steps:
            self._log_window(done_step)

    def _log_window(self, step: int):
        summary = window_summary(self.window, time.perf_counter() - self.window_start,
                                 time.perf_counter() - self.start_time)
        self.writer.write("train", step, summary)
        self.progress.set_postfix(loss=f"{summary['loss']:.3f}",
                                  tok_s=f"{summary['target_tokens_per_sec']:.0f}")
        if self.main_process and not self.on_terminal:
            print(log_line(step, self.config.num_train_steps, summary), flush=True)
        self.window.clear()
        self.window_start = time.perf_counter()

    def _evaluate(self, step: int, params: nnx.State) -> dict[str, float]:
        """The eval split's loss (and BLEU with `make_bleu`), written to the metrics."""
        eval_metrics = _eval_loss(self.eval_step, params, self.eval_batches, self.experiment)
        if self.bleu_of is not None:
            eval_metrics.update(self.bleu_of(params))
        eval_metrics.update(wall_time_s=time.perf_counter() - self.start_time)
        self.writer.write("eval", step, eval_metrics)
        bleu = eval_metrics.get("bleu")
        self.progress.write(f"step {step}: eval loss {eval_metrics['loss']:.3f}"
                            + ("" if bleu is None else f", BLEU {bleu:.2f}"))
        return eval_metrics
