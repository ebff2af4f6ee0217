"""The main command's data path, `tfds:wmt14_translate/de-en`, read for real: TFDS's own mock
gives fake examples with the registered dataset's features (no download), in both directions."""
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tfx.core import config as config_lib
from tfx.data import prepare
from tfx.infer import evaluate
from tfx.train import trainer

from runs import ROOT

EXAMPLES = 48


@pytest.mark.parametrize("direction", ["en-de", "de-en"])
def test_wmt_base_prepares_trains_and_evaluates_through_tfds(tmp_path, direction):
    config = config_lib.load(os.path.join(ROOT, "configs", "wmt_base.py:tiny"))
    source_lang, target_lang = direction.split("-")
    config.data.update(dict(source_lang=source_lang, target_lang=target_lang,
                            data_dir=str(tmp_path / "tfds")))
    config.model.update(dict(vocab_size=300, dtype="float32", max_len=64))
    config.update(dict(per_device_batch_size=1, per_device_eval_batch_size=2, num_train_steps=2,
                       warmup_steps=1, checkpoint_every_steps=2, eval_every_steps=2,
                       max_source_length=32, max_target_length=32, log_every_steps=1))
    config.decode.update(dict(strategy="greedy", max_length_offset=4))
    workdir = str(tmp_path / "run")
    with tfds.testing.mock_data(num_examples=EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE):
        report = list(prepare.prepare(config_lib.validate(config)))
        assert report[:3] == [f"{which}: tfds:wmt14_translate/de-en:{split}: {EXAMPLES} pairs (0 skipped empty)"
                              for which, split in (("train", "train"), ("eval", "validation"), ("test", "test"))]
        assert report[3].startswith("tokenizer: ") and report[3].endswith("(300 pieces)")
        metrics = trainer.train(config, workdir, evaluate.periodic_bleu)
        assert np.isfinite(metrics["loss"]) and metrics["bleu"] >= 0
        results = evaluate.evaluate_checkpoint(config, workdir, "test", "latest")
        expected = [r[target_lang] for r in tfds.data_source("wmt14_translate/de-en", split="test")]
    with open(results["references"], encoding="utf-8") as f:
        references = f.read().splitlines()
    assert references == [t.decode() if isinstance(t, bytes) else t for t in expected]
    with open(results["hypotheses"], encoding="utf-8") as f:
        assert len(f.read().splitlines()) == EXAMPLES
