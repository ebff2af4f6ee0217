"""Fine-tune an imported OPUS-MT model on your own text (docs/opus_mt.md).

    python -m tfx.convert marian --model MODEL.npz --vocab vocab.yml --source_spm source.spm \\
        --target_spm target.spm --source_lang en --target_lang de --workdir runs/opus-mt-en-de
    python train.py --config configs/opus_mt.py:runs/opus-mt-en-de --workdir runs/opus-mt-en-de-ft \\
        --config.data.train=text:mydata/train --config.data.eval=text:mydata/valid

The variant is the converted run: its model and tokenizer (config.json) are the ones trained,
and `init_from` starts from its parameters. Without a variant, the config trains OPUS-MT's
architecture from scratch, with OPUS-MT's schedule. OPUS-MT's architecture is Marian's
`transformer-align` base: 6 + 6 post-norm layers of width 512, 8 heads, a swish feed-forward
of 2048, biases on every projection and the output, sinusoidal positions, the decoder starting
from a zero embedding, source, target and output embeddings tied; `ARCHITECTURE` spells it out
and a converted run that differs (a `transformer-big` model, say) brings its own.

The training keys are those of a fine-tune: OPUS-MT trained with label smoothing 0.1, Adam
(0.9, 0.98, 1e-9), gradient clipping at norm 5 and a peak learning rate of 3e-4 (OPUS-MT-train's
Marian options); a fine-tune starts from trained weights, so it warms up briefly to a sixth of
that peak and decays it to zero (cosine) over `num_train_steps`.
"""
import ml_collections

from tfx.core.config import default_config, load_run

ARCHITECTURE = dict(emb_dim=512, num_heads=8, num_kv_heads=8, mlp_dim=2048, num_encoder_layers=6,
                    num_decoder_layers=6, activation="swish", norm_position="post",
                    norm_epsilon=1e-6, positions="sinusoidal", max_len=512, share_embeddings=True,
                    logits_via_embedding=True, use_bias=True, output_bias=True,
                    scale_embeddings=True, start_from_zero_embedding=True, dropout_rate=0.1)


def get_config(workdir: str = "") -> ml_collections.ConfigDict:
    """With a converted run, its fine-tune; without one, OPUS-MT's architecture and training
    from scratch (set config.data.* to your corpus; tfx trains its own SentencePiece model)."""
    config = default_config()
    config.model.update(ARCHITECTURE, vocab_size=32000)
    config.adam_b1, config.adam_b2, config.adam_eps = 0.9, 0.98, 1e-9
    config.grad_clip_norm = 5.0
    config.label_smoothing = 0.1
    config.max_source_length = config.max_target_length = 128
    if not workdir:
        config.learning_rate, config.schedule, config.warmup_steps = 3e-4, "rsqrt", 16000
        return config
    converted = load_run(workdir)
    config.model = converted.model  # the vocabulary's size, and any size that differs.
    config.tokenizer = converted.tokenizer
    config.data.update(source_lang=converted.data.source_lang, target_lang=converted.data.target_lang,
                       target_lang_token=converted.data.target_lang_token)
    config.init_from = workdir
    config.learning_rate, config.schedule, config.warmup_steps = 5e-5, "cosine", 200
    config.num_train_steps = 5000
    config.eval_every_steps = config.checkpoint_every_steps = 500
    return config
