"""Metric files in the workdir: `metrics.jsonl` (one JSON object per line) and TensorBoard
event files (tensorboardX, no TensorFlow). Only process 0 writes; other processes get a writer
that does nothing, so callers need no `if`.

On local disk each record is appended to metrics.jsonl. Cloud Storage has no append: there the
writer keeps the file's lines in memory (what an earlier run left, read at the start) and
uploads the whole file after each record, which Cloud Storage replaces in one step.
"""
from __future__ import annotations

import json

import jax
import tensorboardX

from tfx.core import files

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
    """Scalars per (split, step): appended to metrics.jsonl and to TensorBoard under split/."""

    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        if self.active:
            files.path(workdir).mkdir(parents=True, exist_ok=True)
            self.path = files.join(workdir, METRICS_FILE)
            complete = _complete_lines(self.path)
            if files.is_local(self.path):
                if files.path(self.path).exists():
                    with open(self.path, "rb+") as f:
                        f.truncate(len(complete))
                self.jsonl, self.lines = open(self.path, "a", encoding="utf-8"), None
            else:
                self.jsonl, self.lines = None, [complete.decode("utf-8")]
            self.tensorboard = tensorboardX.SummaryWriter(files.join(workdir, "tensorboard"))

    def write(self, split: str, step: int, scalars: dict[str, float]):
        if not self.active:
            return
        scalars = {name: float(value) for name, value in scalars.items()}
        line = json.dumps({"split": split, "step": step, **scalars}) + "\n"
        if self.jsonl:
            self.jsonl.write(line)
            self.jsonl.flush()
        else:
            self.lines.append(line)
            files.write_text(self.path, self.lines)
        for name, value in scalars.items():
            self.tensorboard.add_scalar(f"{split}/{name}", value, step)
        self.tensorboard.flush()

    def close(self):
        if self.active:
            if self.jsonl:
                self.jsonl.close()
            self.tensorboard.close()


def _complete_lines(path: str) -> bytes:
    """The file's bytes up to its last line end: without what a run killed mid-write left."""
    if not files.path(path).exists():
        return b""
    data = files.path(path).read_bytes()
    return data[:data.rfind(b"\n") + 1]


def read_metrics(workdir: str) -> list[dict]:
    """The records of metrics.jsonl; for a step written twice (a resumed run), the last."""
    records = {}
    with files.path(workdir).joinpath(METRICS_FILE).open("r", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            records[(record["split"], record["step"])] = record
    return sorted(records.values(), key=lambda r: (r["split"], r["step"]))
