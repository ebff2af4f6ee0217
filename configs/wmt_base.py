"""Transformer on WMT14 en-de: `configs/wmt_base.py:tiny|base|big[,SLICE]` (default base).

base and big follow Vaswani et al. (2017): d_model 512/1024, MLP 2048/4096, 8/16 heads, 6+6
layers, a shared 32k vocabulary tied to the output projection, dropout 0.1/0.3, label
smoothing 0.1, Adam (0.9, 0.98, 1e-9) with 4000 warmup steps of the inverse-sqrt schedule.

A Cloud TPU slice after the comma (`configs/wmt_base.py:big,v5e-256`) sets the mesh and rows
per chip that `python -m tfx.tpu.aot` found to fit that slice with the least communication
(docs/tpu.md, "Before you rent a TPU"); compile it for the slice's `topology` to check a change.
"""
import ml_collections

from tfx.core.config import default_config

VARIANTS = {
    "tiny": dict(emb_dim=128, mlp_dim=512, num_heads=4, num_kv_heads=4, num_encoder_layers=2,
                 num_decoder_layers=2, dropout_rate=0.1),
    "base": dict(emb_dim=512, mlp_dim=2048, num_heads=8, num_kv_heads=8, num_encoder_layers=6,
                 num_decoder_layers=6, dropout_rate=0.1),
    "big": dict(emb_dim=1024, mlp_dim=4096, num_heads=16, num_kv_heads=16, num_encoder_layers=6,
                num_decoder_layers=6, dropout_rate=0.3),
}


# Cloud TPU slices: the topology tfx.tpu.aot compiles for, and per variant the rows per chip. Every
# preset is data-parallel (mesh_shape data:-1), which tfx.tpu.aot found to fit them all.
SLICES = {
    "v5e-8": dict(topology="v5e:2x4", base=64, big=32),
    "v5e-256": dict(topology="v5e:16x16", base=16, big=16),
    "v4-8": dict(topology="v4:2x2x1", base=64, big=32),
    "v5p-128": dict(topology="v5p:4x4x4", base=32, big=32),
}


def get_config(arg: str = "base") -> ml_collections.ConfigDict:
    variant, _, tpu_slice = arg.partition(",")
    if variant not in VARIANTS:
        raise ValueError(f"configs/wmt_base.py:{arg}: unknown variant; use one of {', '.join(VARIANTS)}.")
    if tpu_slice and (variant == "tiny" or tpu_slice not in SLICES):
        raise ValueError(f"configs/wmt_base.py:{arg}: no preset for {variant} on {tpu_slice!r}; "
                         f"slices: {', '.join(SLICES)} (base and big).")
    config = default_config()
    config.model.update(VARIANTS[variant])
    config.model.vocab_size = 32000
    config.variant = variant
    config.learning_rate = 7e-4 if variant != "big" else 5e-4  # peak of the rsqrt schedule.
    config.warmup_steps = 4000
    config.num_train_steps = 100_000 if variant != "big" else 300_000
    config.per_device_batch_size = 16
    config.max_source_length = 64
    config.max_target_length = 64
    config.mesh_shape = "data:-1,fsdp:1,tensor:1"
    # WMT14 en-de from TFDS: train 4.5M pairs, newstest2013 to validate, newstest2014 (full) to test.
    config.data.update(dict(source_lang="en", target_lang="de",
                            train="tfds:wmt14_translate/de-en:train",
                            eval="tfds:wmt14_translate/de-en:validation",
                            test="tfds:wmt14_translate/de-en:test"))
    config.tokenizer.input_sentence_size = 2_000_000  # sentences sampled to train the vocabulary.
    if tpu_slice:
        config.per_device_batch_size = SLICES[tpu_slice][variant]
    return config
