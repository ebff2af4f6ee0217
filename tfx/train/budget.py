"""`config.train_minutes`: the number of train steps that fills a wall-clock budget.

The trainer times the steps after the first (compiling) one to the end of the warmup (at
least `TIMED_STEPS` of them: the first steps of a process run slower than the rest), sets
`num_train_steps = train_minutes x 60 / step time`, and records the plan in
`<workdir>/train_steps.json` and in each checkpoint saved after it (`Checkpoints.plan`), so that
a resumed run keeps the same schedule instead of planning again on a machine that may be busier
or faster, even when the file is lost. Process 0 decides and every process follows it, so all of
them stop at the same step. The steps before the plan run on a schedule with no end yet
(`UNPLANNED_STEPS`): in the warmup of either schedule the learning rate does not depend on
num_train_steps. A resumed run never trains on it: without a plan for its budget it times the
train step on a copy of its state before its first step (trainer). Evals and checkpoints come on
top of the budget.
"""
from __future__ import annotations

import json

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from tfx.core import files

PLAN_FILE = "train_steps.json"
TIMED_STEPS = 20
UNPLANNED_STEPS = 2**31 - 1  # num_train_steps until the plan: no end yet.


def recorded(workdir: str, config: ml_collections.ConfigDict, saved: dict | None = None
             ) -> dict | None:
    """The plan for this budget that an earlier run recorded: in `<workdir>/train_steps.json`,
    else `saved`, the plan saved with the checkpoint being resumed (which then writes the file
    again); None if neither is for config.train_minutes. Process 0 reads; every process gets
    its answer."""
    plan = {}
    if jax.process_index() == 0:
        plan = _read_plan(workdir)
        if plan.get("train_minutes") != config.train_minutes:  # none, or the budget changed.
            plan = saved if saved and saved.get("train_minutes") == config.train_minutes else {}
            if plan:
                files.write_text(files.join(workdir, PLAN_FILE), json.dumps(plan, indent=2))
    steps = int(multihost_utils.broadcast_one_to_all(np.int32(plan.get("num_train_steps", 0))))
    return {**plan, "num_train_steps": steps} if steps else None


def _read_plan(workdir: str) -> dict:
    path = files.path(workdir) / PLAN_FILE
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        logging.warning("%s does not parse (%s); using the plan saved with the checkpoint", path, error)
        return {}


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
         timed_steps: int, on_a_copy: bool = False) -> dict:
    """Process 0's plan from its measured step time, the same on every process, recorded in
    train_steps.json. `timed_steps` steps were timed: the ones before `done_steps`, or, with
    `on_a_copy`, steps on a copy of the state at `done_steps` whose results were discarded."""
    steps = max(done_steps, round(config.train_minutes * 60 / step_time_s))
    steps = int(multihost_utils.broadcast_one_to_all(np.int32(steps)))
    result = dict(train_minutes=config.train_minutes, num_train_steps=steps,
                  step_time_s=round(step_time_s, 4), timed_steps=timed_steps, planned_at_step=done_steps)
    if on_a_copy:
        result["timed_on_a_copy"] = True
    if jax.process_index() == 0:
        files.write_text(files.join(workdir, PLAN_FILE), json.dumps(result, indent=2))
    return result


def describe(plan_: dict) -> str:
    if plan_.get("timed_on_a_copy"):
        timed = (f"timed over {plan_['timed_steps']} steps on a copy of step "
                 f"{plan_['planned_at_step']}'s state")
    else:
        timed = (f"timed over steps {plan_['planned_at_step'] - plan_['timed_steps'] + 1}"
                 f"-{plan_['planned_at_step']}")
    return (f"config.train_minutes={plan_['train_minutes']}: {plan_['num_train_steps']} steps at "
            f"{plan_['step_time_s']:.3f} s a step ({timed}; recorded in {PLAN_FILE})")
