"""A small Transformer on the bundled Multi30k en-de (data/multi30k-en-de): trains on a laptop CPU.

Validation is Multi30k's valid split, the test split is test2016 (flickr), as in the WMT16
multimodal task. `configs/multi30k.py:de-en` translates the other way, and
`configs/multi30k.py:multilingual` both ways in one model: each source starts with its target
language's token (<2de>, <2en>), and eval.py scores each direction on its own.
`configs/multi30k.py:bt` trains en-de on Multi30k mixed 2:1 with a cleaned back-translation
tagged <BT> (`python -m tfx.infer.backtranslate ... --output runs/bt`; docs/data.md).
Paths under runs/ are relative to the repository root, like the commands in docs/.
"""
import os

import ml_collections

from tfx.core.config import default_config

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
DATA = os.path.join(ROOT, "data", "multi30k-en-de")
VARIANTS = ("en-de", "de-en", "multilingual", "bt")


def get_config(variant: str = "en-de") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"configs/multi30k.py:{variant}: unknown variant; use one of "
                         f"{', '.join(VARIANTS)}.")
    config = default_config()
    config.variant = variant
    config.model.update(dict(vocab_size=8000, emb_dim=256, mlp_dim=1024, num_heads=4,
                             num_kv_heads=4, num_encoder_layers=3, num_decoder_layers=3,
                             dropout_rate=0.3, max_len=128))
    if variant == "multilingual":
        both_ways(config)
    else:
        source_lang, target_lang = ("en", "de") if variant == "bt" else variant.split("-")
        config.data.update(dict(source_lang=source_lang, target_lang=target_lang,
                                train=f"text:{DATA}/train", eval=f"text:{DATA}/valid",
                                test=f"text:{DATA}/test_2016_flickr"))
    # The README's main job, on a fixed wall-clock budget whatever the CPU's speed: training
    # steps fill config.train_minutes (timed on the first steps; evals and checkpoints on top),
    # cosine to zero, then eval.py --checkpoint average:5 averages the last 5 checkpoints.
    # model.dtype is 'auto' (the default): bfloat16 on a CPU where it measures faster.
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
    # Chosen on the validation split (docs/training.md, "The Multi30k recipe"): a wider beam and
    # a stronger length penalty than the defaults' 4 and 0.6, whose outputs run short here.
    config.decode.update(beam_size=8, length_penalty=1.2)
    if variant == "bt":
        with_back_translation(config)
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


def with_back_translation(config: ml_collections.ConfigDict):
    """Multi30k and runs/bt (German text and its back-translation) mixed 2:1, the latter tagged
    <BT> and cleaned: implausible length ratios, copies, other languages and repeats dropped."""
    config.data.corpora = {
        "multi30k": dict(spec=config.data.train, weight=2.0),
        "bt": dict(spec=f"text:{ROOT}/runs/bt/train", weight=1.0, tag="<BT>",
                   clean=dict(max_ratio=3.0, identical=True, langid=True, dedup=True))}
    config.data.train = "multi30k,bt"
