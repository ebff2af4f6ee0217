"""`config.train_minutes`: the number of train steps that fills a wall-clock budget.

The trainer times the steps after the first (compiling) one to the end of the warmup (at
least `TIMED_STEPS` of them: the first steps of a process run slower than the rest), sets
`num_train_steps = train_minutes x 60 / step time`, and records the plan in
`<workdir>/train_steps.json`, so that a resumed run keeps the same schedule instead of planning
again on a machine that may be busier or faster. Process 0 decides and every process follows it,
so all of them stop at the same step. The steps before the plan run on a schedule with no end
yet: in the warmup of either schedule the learning rate does not depend on num_train_steps.
Evals and checkpoints come on top of the budget.
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from tfx.core import files

PLAN_FILE = "train_steps.json"
TIMED_STEPS = 20
UNPLANNED_STEPS = 2**31 - 1  # num_train_steps until the plan: no end yet.


def recorded(workdir: str, config: ml_collections.ConfigDict) -> dict | None:
    """The plan an earlier run in `workdir` recorded for this budget, or None (process 0
    reads it; every process gets its answer)."""
    plan = {}
    path = os.path.join(workdir, PLAN_FILE)
    if jax.process_index() == 0 and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            plan = json.load(f)
        if plan.get("train_minutes") != config.train_minutes:
            plan = {}  # the budget changed: plan again.
    steps = int(multihost_utils.broadcast_one_to_all(np.int32(plan.get("num_train_steps", 0))))
    return {**plan, "num_train_steps": steps} if steps else None


def plan_step(first_step: int, warmup_steps: int) -> int:
    """The step after which to plan, when `first_step` is the first (compiling) step of this
    process: the end of the warmup, at least TIMED_STEPS steps after the first."""
    return max(first_step + TIMED_STEPS, warmup_steps)


def with_steps(config: ml_collections.ConfigDict, num_train_steps: int) -> ml_collections.ConfigDict:
    """A copy of `config` that trains for `num_train_steps`."""
    config = config.copy_and_resolve_references()
    config.num_train_steps = num_train_steps
    return config


def plan(config: ml_collections.ConfigDict, workdir: str, step_time_s: float, done_steps: int,
         timed_steps: int) -> dict:
    """Process 0's plan from its measured step time, the same on every process, recorded."""
    steps = max(done_steps, round(config.train_minutes * 60 / step_time_s))
    steps = int(multihost_utils.broadcast_one_to_all(np.int32(steps)))
    result = dict(train_minutes=config.train_minutes, num_train_steps=steps,
                  step_time_s=round(step_time_s, 4), timed_steps=timed_steps, planned_at_step=done_steps)
    if jax.process_index() == 0:
        files.write_text(os.path.join(workdir, PLAN_FILE), json.dumps(result, indent=2))
    return result


def describe(plan_: dict) -> str:
    return (f"config.train_minutes={plan_['train_minutes']}: {plan_['num_train_steps']} steps at "
            f"{plan_['step_time_s']:.3f} s a step (timed over steps {plan_['planned_at_step'] - plan_['timed_steps'] + 1}"
            f"-{plan_['planned_at_step']}; recorded in {PLAN_FILE})")
