import os

import pytest

from tfx.core import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_docs_config_reference_is_the_generated_table():
    with open(os.path.join(ROOT, "docs", "config.md"), encoding="utf-8") as f:
        page = f.read()
    start = page.index("<!-- config-reference:start -->\n") + len("<!-- config-reference:start -->\n")
    table = page[start:page.index("<!-- config-reference:end -->")]
    assert table == config_lib.reference_table(), (
        "docs/config.md: regenerate its table with: python -m tfx.core.config")


def test_every_default_key_is_in_the_reference():
    table = config_lib.reference_table()
    for key in ("model.num_kv_heads", "data.train", "decode.length_penalty", "nonfinite_loss"):
        assert f"| `{key}` |" in table


@pytest.mark.parametrize("key, value, message", [
    ("decode.strategy", "nucleus", "config.decode.strategy='nucleus' is not one of"),
    ("decode.top_p", 0.0, r"config.decode.top_p=0.0 must be in \(0, 1\]"),
    ("decode.shortlist_size", 2, "config.decode.shortlist_size=2 must be at least 3"),
    ("nonfinite_loss", "ignore", "config.nonfinite_loss='ignore' is not one of 'stop', 'skip'"),
    ("data.too_long", "wrap", "config.data.too_long='wrap' is not one of 'drop', 'truncate'"),
    ("per_device_eval_batch_size", 0, "config.per_device_eval_batch_size=0 must be a positive"),
    ("eval_every_steps", -1, "config.eval_every_steps=-1 must be a non-negative"),
    ("quantization", "int4", "config.quantization='int4' is not one of 'none', 'int8'"),
    ("prune.pattern", "4:8", "config.prune.pattern='4:8' is not one of"),
    ("prune.sparsity", 1.0, r"config.prune.sparsity=1.0 must be in \[0, 1\)"),
    ("distill.weight", 1.5, r"config.distill.weight=1.5 must be in \[0, 1\]"),
    ("distill.temperature", 0.0, "config.distill.temperature=0.0 must be a positive"),
    ("distill.teacher_config", "configs/multi30k.py", "config.distill.teacher_workdir is empty"),
    ("model.rank_fraction", -0.5, r"config.model.rank_fraction=-0.5 must be in \[0, 1\]"),
])
def test_bad_values_name_the_key(key, value, message):
    config = config_lib.default_config()
    section, _, leaf = key.rpartition(".")
    (config[section] if section else config)[leaf] = value
    with pytest.raises(ValueError, match=message):
        config_lib.validate(config)


def test_two_four_pruning_is_half_sparse():
    config = config_lib.default_config()
    config.prune.update(pattern="2:4", sparsity=0.75)
    with pytest.raises(ValueError, match="set it to 0.5"):
        config_lib.validate(config)


def test_configs_load_with_their_variants():
    assert config_lib.load(os.path.join(ROOT, "configs/multi30k.py:de-en")).data.source_lang == "de"
    assert config_lib.load(os.path.join(ROOT, "configs/wmt_base.py:big")).model.emb_dim == 1024
    with pytest.raises(ValueError, match="unknown variant; use one of en-de, de-en, multilingual, bt"):
        config_lib.load(os.path.join(ROOT, "configs/multi30k.py:fr-en"))
    student = os.path.join(ROOT, "configs/multi30k_student.py")
    assert config_lib.load(student).data.train == config_lib.load(os.path.join(ROOT, "configs/multi30k.py")).data.train
    assert config_lib.load(f"{student}:seq").data.train.endswith("runs/teacher-corpus/train")
    both = config_lib.load(f"{student}:seq+word")
    assert both.distill.teacher_workdir.endswith("runs/multi30k") and both.model.num_decoder_layers == 1
    assert both.init_from.endswith("runs/student-seq") and both.data.train == config_lib.load(f"{student}:seq").data.train
    word = config_lib.load(f"{student}:word")
    assert word.init_from.endswith("runs/student") and word.data.train == config_lib.load(student).data.train
    assert word.distill.weight > 0 and word.num_train_steps == both.num_train_steps == 1000
    with pytest.raises(ValueError, match="unknown variant"):
        config_lib.load(f"{student}:words")
