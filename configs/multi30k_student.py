"""A small, fast student of the Multi30k teacher (configs/multi30k.py trained into runs/multi30k):
docs/compression.md.

192 wide (4 heads of 48), a 4-layer encoder and a single decoder layer: a beam-search step runs
one decoder layer and a 192-wide vocabulary projection instead of three layers and a 256-wide
one. It reads the teacher's vocabulary (runs/multi30k/tokenizer.model), so its outputs and
the teacher's are over the same pieces.

Variants, by what the student learns from:
    ""          the original Multi30k pairs
    "seq"       the teacher's translations of them beside the original pairs (`python -m
                tfx.compress.distill ... --targets teacher+original --output runs/teacher-corpus`):
                sequence-level distillation (Kim and Rush, 2016)
    "word"      the "" student (runs/student, average:5) fine-tuned on the original pairs with
                the teacher's token distributions too (word level): 1,000 steps, learning
                rate 5e-4
    "seq+word"  the "seq" student (runs/student-seq, average:5) fine-tuned the same way on its
                corpus
The teacher's forward pass makes a word-level step dearer (docs/compression.md), so
it is spent at the end only.
Paths are relative to the repository root, like the commands in docs/.
"""
import os

import ml_collections

from tfx.core import config as config_lib

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
TEACHER_CONFIG = os.path.join(ROOT, "configs", "multi30k.py")
TEACHER_RUN = os.path.join(ROOT, "runs", "multi30k")
TEACHER_CORPUS = os.path.join(ROOT, "runs", "teacher-corpus", "train")
VARIANTS = ("", "seq", "word", "seq+word")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"configs/multi30k_student.py:{variant}: unknown variant; use one of "
                         f"{', '.join(repr(v) for v in VARIANTS)}.")
    config = config_lib.load(TEACHER_CONFIG)
    config.variant = f"student{'-' + variant if variant else ''}"
    config.model.update(dict(emb_dim=192, mlp_dim=768, num_heads=4, num_kv_heads=4,
                             num_encoder_layers=4, num_decoder_layers=1))
    config.tokenizer.model_path = os.path.join(TEACHER_RUN, "tokenizer.model")
    config.train_minutes = 40.0
    if "seq" in variant:
        config.data.train = f"text:{TEACHER_CORPUS}"
    if "word" in variant:
        start = "student-seq" if "seq" in variant else "student"
        config.update(dict(init_from=os.path.join(ROOT, "runs", start), init_checkpoint="average:5",
                           train_minutes=0.0, num_train_steps=1000, warmup_steps=100, learning_rate=5e-4,
                           checkpoint_every_steps=100))  # average:5 = steps 600-1000.
        config.distill.update(dict(teacher_config=TEACHER_CONFIG, teacher_workdir=TEACHER_RUN,
                                   teacher_checkpoint="average:5", weight=0.5, temperature=1.0))
    return config
