"""A small Transformer on the bundled Multi30k en-de (data/multi30k-en-de): trains on a laptop CPU.

Validation is Multi30k's valid split, the test split is test2016 (flickr), as in the WMT16
multimodal task. `configs/multi30k.py:de-en` translates the other way, and
`configs/multi30k.py:multilingual` both ways in one model: each source starts with its target
language's token (<2de>, <2en>), and eval.py scores each direction on its own.
"""
import os

import ml_collections

from tfx.core.config import default_config

DATA = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data",
                                    "multi30k-en-de"))


def get_config(direction: str = "en-de") -> ml_collections.ConfigDict:
    if direction not in ("en-de", "de-en", "multilingual"):
        raise ValueError(f"configs/multi30k.py:{direction}: unknown direction; use en-de, de-en "
                         "or multilingual.")
    config = default_config()
    config.variant = direction
    config.model.update(dict(vocab_size=8000, emb_dim=256, mlp_dim=1024, num_heads=4,
                             num_kv_heads=4, num_encoder_layers=3, num_decoder_layers=3,
                             dropout_rate=0.3, max_len=128))
    if direction == "multilingual":
        both_ways(config)
    else:
        source_lang, target_lang = direction.split("-")
        config.data.update(dict(source_lang=source_lang, target_lang=target_lang,
                                train=f"text:{DATA}/train", eval=f"text:{DATA}/valid",
                                test=f"text:{DATA}/test_2016_flickr"))
    # The README's main job, on a fixed wall-clock budget whatever the CPU's speed: training
    # steps fill config.train_minutes (timed on the first steps; evals and checkpoints on top),
    # cosine to zero, then eval.py --checkpoint average:5 averages the last 5 checkpoints.
    # model.dtype is 'auto' (the default): bfloat16 on a CPU with AMX, float32 elsewhere.
    config.schedule = "cosine"
    config.learning_rate = 2e-3
    config.warmup_steps = 500
    config.train_minutes = 48.0
    config.per_device_batch_size = 32
    config.max_source_length = 64
    config.max_target_length = 64
    config.eval_every_steps = 1000
    config.checkpoint_every_steps = 250
    config.keep_checkpoints = 5
    config.log_every_steps = 100
    return config


def both_ways(config: ml_collections.ConfigDict):
    """en->de and de->en from the same files, one corpus per direction and split."""
    config.data.target_lang_token = "<2{lang}>"
    splits = {"train": "train", "eval": "valid", "test": "test_2016_flickr"}
    config.data.corpora = {
        f"{which}-{source}-{target}": dict(spec=f"text:{DATA}/{files}", source_lang=source,
                                           target_lang=target)
        for which, files in splits.items() for source, target in (("en", "de"), ("de", "en"))}
    for which in splits:
        config.data[which] = f"{which}-en-de,{which}-de-en"
