"""Metric files in the workdir: `metrics.jsonl` (one JSON object per line) and TensorBoard
event files (tensorboardX, no TensorFlow). Only process 0 writes; other processes get a writer
that does nothing, so callers need no `if`.
"""
from __future__ import annotations

import json
import os

import jax
import tensorboardX

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
    """Scalars per (split, step): appended to metrics.jsonl and to TensorBoard under split/."""

    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        if self.active:
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, METRICS_FILE)
            _drop_partial_last_line(path)
            self.jsonl = open(path, "a", encoding="utf-8")
            self.tensorboard = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, split: str, step: int, scalars: dict[str, float]):
        if not self.active:
            return
        scalars = {name: float(value) for name, value in scalars.items()}
        self.jsonl.write(json.dumps({"split": split, "step": step, **scalars}) + "\n")
        self.jsonl.flush()
        for name, value in scalars.items():
            self.tensorboard.add_scalar(f"{split}/{name}", value, step)
        self.tensorboard.flush()

    def close(self):
        if self.active:
            self.jsonl.close()
            self.tensorboard.close()


def _drop_partial_last_line(path: str):
    """Cuts what a run killed mid-write left after the last complete line."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def read_metrics(workdir: str) -> list[dict]:
    """The records of metrics.jsonl; for a step written twice (a resumed run), the last."""
    records = {}
    with open(os.path.join(workdir, METRICS_FILE), encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            records[(record["split"], record["step"])] = record
    return sorted(records.values(), key=lambda r: (r["split"], r["step"]))
