"""The "What each method makes smaller" table of docs/compression.md, measured in one run:
prints one JSON line (its last line), after the table in Markdown.

    python bench/table.py [--rows teacher,student-seq,...] [--batch 32] [--beam 4] [--passes 3]

Every row is a trained (or tool-written) run of docs/compression.md, at the path its
commands write. Each is decoded on the test split (Multi30k test2016) with beam search,
the same beam and batch for all, in this one process, and scored with sacreBLEU, as eval.py
does (its hypotheses files land in the row's workdir). `seconds` are the median, min and max
of --passes decodes of the split after compilation, taken in rounds that decode every row once
each (so a slow stretch of a shared machine hits all rows alike); `sentences_per_sec` is at the
median, and `speedup` is that over the teacher's decoding alike (with the same shortlist or
none). `checkpoint_mb` is the row's parameters alone
saved by orbax as tfx stores them (float32; zeros compress), `ctranslate2_int8_mb` its
model.bin exported to CTranslate2 with int8 weights (`python -m tfx.export ctranslate2
--quantization int8`: what a phone or browser would ship), `nonzero_params` counts the
parameters that are not exactly 0, `train_minutes` is the wall time of the row's own training or
fine-tune (its metrics.jsonl; post-training quantization and tool-written rows have none).
Rows whose workdir is missing are listed under `missing`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from tfx.core import config as config_lib
from tfx.core import host_memory
from tfx.export import ctranslate2 as export
from tfx.infer import evaluate, trained
from tfx.model.transformer import count_params
from tfx.train.metrics import METRICS_FILE, read_metrics

from peak import cpu_name
from stats import summary

TEACHER = "configs/multi30k.py"
STUDENT = "configs/multi30k_student.py"


@dataclasses.dataclass(frozen=True)
class Row:
    name: str  # the key of --rows.
    label: str  # the table's model column.
    command: str  # where docs/ give its command.
    config: str
    workdir: str
    checkpoint: str = "latest"
    overrides: tuple[tuple[str, object], ...] = ()  # (dotted config key, value).
    trains: bool = True  # False: the workdir's training time is not this row's.
    baseline: str = "teacher"  # the row whose speed `speedup` divides by: the teacher decoding alike.


HEADS2 = (("model.num_heads", 2), ("model.num_kv_heads", 2), ("model.head_dim", 64))
INT8 = (("quantization", "int8"),)
RANK25 = (("model.rank_fraction", 0.25),)
RANK125 = (("model.rank_fraction", 0.125),)
SHORTLIST = (("decode.shortlist", "runs/multi30k/shortlist.npz"),)
ROWS = (
    Row("teacher", "teacher (`configs/multi30k.py`)", "the README's set-up command", TEACHER, "runs/multi30k", "average:5"),
    Row("teacher-shortlist", "teacher, lexical shortlist", "step 7, eval.py", TEACHER, "runs/multi30k",
        "average:5", SHORTLIST, trains=False, baseline="teacher-shortlist"),
    Row("teacher-ptq", "teacher, int8 PTQ", "step 4, eval.py", TEACHER, "runs/multi30k", "average:5",
        INT8, trains=False),
    Row("teacher-qat", "teacher, int8 QAT, 500-step fine-tune (lr 2e-4)", "step 4, train.py", TEACHER,
        "runs/teacher-qat", overrides=INT8),
    Row("teacher-sparse50", "teacher, 50% pruned, 1,500-step fine-tune (lr 5e-4)", "step 5, `--config.prune.sparsity=0.5`",
        TEACHER, "runs/teacher-sparse50"),
    Row("teacher-2of4", "teacher, 2:4 pruned, 1,000-step fine-tune (lr 5e-4)", "step 5, `--config.prune.pattern=2:4`",
        TEACHER, "runs/teacher-2of4"),
    Row("teacher-heads2", "teacher, 2 of 4 heads removed in every module, no fine-tune", "step 5, `tfx.compress.heads`",
        TEACHER, "runs/teacher-heads2", overrides=HEADS2),
    Row("teacher-heads2-ft", "teacher, 2 of 4 heads removed, 1,000-step fine-tune (lr 5e-4)", "step 5, train.py",
        TEACHER, "runs/teacher-heads2-ft", overrides=HEADS2),
    Row("teacher-r25", "teacher, low rank 0.25, no fine-tune", "step 6, `tfx.compress.lowrank`", TEACHER,
        "runs/teacher-r25", overrides=RANK25),
    Row("teacher-r25-ft", "teacher, low rank 0.25, 500-step fine-tune (lr 5e-4)", "step 6, train.py", TEACHER,
        "runs/teacher-r25-ft", overrides=RANK25),
    Row("teacher-r125", "teacher, low rank 0.125, no fine-tune", "step 6, `tfx.compress.lowrank`", TEACHER,
        "runs/teacher-r125", overrides=RANK125),
    Row("teacher-r125-ft", "teacher, low rank 0.125, 500-step fine-tune (lr 5e-4)", "step 6, train.py", TEACHER,
        "runs/teacher-r125-ft", overrides=RANK125),
    Row("student", "student, original pairs", "step 3", STUDENT, "runs/student", "average:5"),
    Row("student-shortlist", "student, lexical shortlist", "step 7, eval.py", STUDENT, "runs/student",
        "average:5", SHORTLIST, trains=False, baseline="teacher-shortlist"),
    Row("student-ptq", "student, int8 PTQ", "step 4, eval.py", STUDENT, "runs/student", "average:5", INT8,
        trains=False),
    Row("student-qat", "student, int8 QAT, 500-step fine-tune (lr 2e-4)", "step 4, train.py", STUDENT,
        "runs/student-qat", overrides=INT8),
    Row("student-seq", "student, sequence-level (teacher + original)", "step 3, `:seq`", f"{STUDENT}:seq",
        "runs/student-seq", "average:5"),
    Row("student-word", "student, then a 1,000-step word-level fine-tune", "step 3, `:word`", f"{STUDENT}:word",
        "runs/student-word", "average:5"),
    Row("student-seq-word", "student, sequence-level, then a 1,000-step word-level fine-tune", "step 3, `:seq+word`",
        f"{STUDENT}:seq+word", "runs/student-seq-word", "average:5"),
    Row("student-word-shortlist", "student, word-level fine-tune, lexical shortlist", "step 7, eval.py",
        f"{STUDENT}:word", "runs/student-word", "average:5", SHORTLIST, trains=False,
        baseline="teacher-shortlist"),
)


def train_minutes(workdir: str) -> float | None:
    """Wall minutes to the last train record of the run's metrics.jsonl, or None."""
    if not os.path.isfile(os.path.join(workdir, METRICS_FILE)):
        return None
    seconds = [r["wall_time_s"] for r in read_metrics(workdir) if r["split"] == "train"]
    return round(seconds[-1] / 60, 1) if seconds else None


def saved_mb(params) -> float:
    """Megabytes of `params` saved alone by orbax."""
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "params")
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(path, params)
            checkpointer.wait_until_finished()
        size = sum(os.path.getsize(os.path.join(root, name))
                   for root, _, names in os.walk(path) for name in names)
    return round(size / 1e6, 2)


def exported_int8_mb(model: trained.TrainedModel) -> float | None:
    """Megabytes of the CTranslate2 model.bin of `model` with int8 weights, or None where the
    model cannot be exported."""
    if export.unsupported(model.config.model):
        return None
    with tempfile.TemporaryDirectory() as scratch:
        written = export.export_ctranslate2(model, os.path.join(scratch, "model"), "int8")
        return round(os.path.getsize(os.path.join(written, "model.bin")) / 1e6, 2)


def measure(row: Row, beam: int, batch: int) -> tuple[dict, evaluate.SplitDecoder]:
    """The row's figures but its speed, and its test-split decoder (compiled)."""
    config = config_lib.load(row.config)
    config.update_from_flattened_dict(dict(row.overrides))
    config.decode.beam_size = beam
    config.per_device_eval_batch_size = batch
    config = config_lib.validate(config)
    model = trained.load(config, row.workdir, row.checkpoint)
    params = jax.device_get(nnx.to_pure_dict(model.params))
    leaves = jax.tree.leaves(params)
    decoder = evaluate.SplitDecoder(config, row.workdir, "test", row.checkpoint)
    scores = decoder.results(*decoder(progress=True))["scores"]
    return dict(
        name=row.name, checkpoint=decoder.label, quantization=config.quantization,
        params=count_params(model.params), nonzero_params=int(sum(np.count_nonzero(x) for x in leaves)),
        checkpoint_mb=saved_mb(params), ctranslate2_int8_mb=exported_int8_mb(model),
        bleu=round(scores["bleu"]["score"], 2), chrf=round(scores["chrf"]["score"], 2),
        train_minutes=train_minutes(row.workdir) if row.trains else None), decoder


def time_passes(results: list[dict], decoders: list[evaluate.SplitDecoder], passes: int):
    """Adds each row's `seconds` (median, min and max of `passes` decodes of the split, taken in
    rounds that decode every row once) and its `sentences_per_sec` at the median."""
    seconds, sentences = [[] for _ in decoders], [0] * len(decoders)
    for _ in range(passes):
        for i, decoder in enumerate(decoders):
            hypotheses, speed = decoder()
            sentences[i] = len(hypotheses)
            seconds[i].append(sentences[i] / speed["sentences_per_sec"])
    for r, times, count in zip(results, seconds, sentences):
        r["seconds"] = summary(times)
        r["sentences_per_sec"] = round(count / float(np.median(times)), 2)


def markdown(rows: list[Row], results: list[dict]) -> str:
    lines = ["| model | command | parameters | checkpoint MB | CTranslate2 int8 MB | BLEU | chrF | "
             "sentences/s | train minutes |", "|---|---|---|---|---|---|---|---|---|"]
    for row, r in zip(rows, results):
        params = f"{r['params'] / 1e6:.2f}M"
        if r["nonzero_params"] < 0.99 * r["params"]:
            params = f"{r['nonzero_params'] / 1e6:.2f}M nonzero of {params}"
        speed = f"{r['sentences_per_sec']:.1f}" + (f" ({r['speedup']:.2f}x)" if "speedup" in r else "")
        minutes = "" if r["train_minutes"] is None else f"{r['train_minutes']:.0f}"
        exported = "" if r["ctranslate2_int8_mb"] is None else f"{r['ctranslate2_int8_mb']:.1f}"
        lines.append(f"| {row.label} | {row.command} | {params} | {r['checkpoint_mb']:.1f} | {exported} | "
                     f"{r['bleu']:.2f} | {r['chrf']:.2f} | {speed} | {minutes} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(row.name for row in ROWS),
                        help="comma-separated row names (default: all)")
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32, help="sentences per decoding batch")
    parser.add_argument("--passes", type=int, default=3,
                        help="rounds of timed decodes of the split, every row once a round; the median counts")
    args = parser.parse_args()
    by_name = {row.name: row for row in ROWS}
    unknown = [name for name in args.rows.split(",") if name not in by_name]
    if unknown:
        sys.exit(f"--rows: unknown {', '.join(unknown)}; rows are {', '.join(by_name)}.")
    host_memory.keep_freed_memory_on_cpu()
    chosen = [by_name[name] for name in args.rows.split(",")]
    present = [row for row in chosen if os.path.isdir(row.workdir)]
    results, decoders = zip(*(measure(row, args.beam, args.batch) for row in present)) if present else ((), ())
    time_passes(results, decoders, args.passes)
    speeds = {r["name"]: r["sentences_per_sec"] for r in results}
    for row, r in zip(present, results):
        if row.baseline in speeds:
            r["speedup"] = round(r["sentences_per_sec"] / speeds[row.baseline], 2)
    print(markdown(present, results))
    print(json.dumps(dict(cpu=cpu_name(), devices=jax.device_count(), beam=args.beam, batch=args.batch,
                          passes=args.passes,
                          rows=results, missing=[row.name for row in chosen if row not in present])))


if __name__ == "__main__":
    main()
