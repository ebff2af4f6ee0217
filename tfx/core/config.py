"""The config schema: every key tfx reads, its default, and its validation.

This is the only place that knows defaults. A config file (`configs/*.py`) starts from
`default_config()` and overrides keys; `validate()` runs once at start-up and names the key
that is wrong.
"""
from __future__ import annotations

import copy
import importlib.util
import inspect
import json
import os
import re
from collections.abc import Mapping

import ml_collections

from tfx.core import files

ACTIVATIONS = ("relu", "gelu", "swiglu", "squared_relu", "swish", "gelu_sigmoid")
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
POSITIONS = ("sinusoidal", "learned")
DTYPES = ("auto", "float32", "bfloat16")
DECODE_STRATEGIES = ("beam", "greedy", "sample")
BEAM_STOPS = ("bound", "fairseq")
TOO_LONG_POLICIES = ("drop", "truncate")
NONFINITE_POLICIES = ("stop", "skip")
TOKENIZER_MODEL_TYPES = ("unigram", "bpe")
OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("rsqrt", "cosine")
MESH_AXES = ("data", "fsdp", "tensor")
REMAT_POLICIES = ("none", "full", "dots")
QUANTIZATIONS = ("none", "int8")
PRUNE_PATTERNS = ("unstructured", "2:4")

# Logical axis -> mesh axes, first match that is still free wins (see tfx/core/parallel.py).
# Parameters: embed over fsdp (ZeRO-3 style), heads/mlp/vocab over tensor.
# Activations: batch over data and fsdp; their embed then finds fsdp taken and stays whole.
DEFAULT_LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("position", None),
    ("layers", None),  # the stacked-layer axis of model.scan_layers.
)


def model_config() -> ml_collections.ConfigDict:
    """Architecture keys (`config.model.*`); the defaults are a tiny Transformer."""
    return ml_collections.ConfigDict(
        dict(
            vocab_size=32000,  # pieces of the vocabulary: one id space for source and target.
            emb_dim=64,  # d_model.
            num_heads=4,
            num_kv_heads=4,  # = num_heads: MHA; 1: MQA; in between: GQA.
            head_dim=0,  # 0: emb_dim // num_heads.
            mlp_dim=256,  # hidden width of the position-wise MLP.
            num_encoder_layers=2,
            num_decoder_layers=2,
            activation="relu",  # relu, gelu (tanh form), swiglu, squared_relu (Primer), swish (x sigmoid(x)) or gelu_sigmoid (x sigmoid(1.702 x), Marian's gelu).
            norm="layernorm",  # layernorm or rmsnorm.
            norm_position="pre",  # pre (pre-LN, stable) or post (the original Transformer).
            norm_epsilon=1e-6,
            positions="sinusoidal",  # sinusoidal or learned.
            max_len=256,  # longest sequence the model accepts (learned positions, decoding).
            share_embeddings=True,  # one embedding for source and target.
            logits_via_embedding=True,  # output projection tied to the target embedding (the shared one with share_embeddings).
            use_bias=False,  # a bias on every attention and MLP projection (Marian).
            output_bias=False,  # a bias on the logits (Marian).
            embedding_norm=False,  # a norm of embeddings plus positions, before the first layer (Marian's transformer-postprocess-emb n).
            scale_embeddings=True,  # token embeddings times sqrt(emb_dim); False: as they are.
            start_from_zero_embedding=False,  # the decoder's start token (0) embeds as a zero vector, positions still added (Marian).
            dropout_rate=0.1,  # embeddings and residual branches, as in Vaswani et al.
            attention_dropout_rate=0.0,  # attention weights; > 0 leaves the fused kernel.
            activation_dropout_rate=0.0,  # MLP hidden activations (fairseq's default is 0).
            dtype="auto",  # computation dtype: auto (bfloat16 on TPUs, Ampere+ GPUs and CPUs where it measures faster: tfx/core/precision.py), float32 or bfloat16; parameters stay float32.
            float32_logits=True,  # the output projection in float32 whatever dtype is (MaxText's logits_dot_in_fp32).
            remat="none",  # recompute activations in the backward pass: none, full, or dots (keep matmul outputs).
            scan_layers=False,  # one lax.scan over stacked layers: compile time flat in depth.
            rank_fraction=0.0,  # > 0: every projection is a product of two of rank fraction x min(fan-in, fan-out) (low-rank, tfx/model/layers.py; python -m tfx.compress.lowrank factorizes a run); 0: one full matrix.
        )
    )


def tokenizer_config() -> dict:
    """`config.tokenizer.*`: the vocabulary of model.vocab_size pieces: one SentencePiece model
    joint over source and target (tfx's own), or, with vocabulary_path, a source and a target
    SentencePiece model whose pieces a vocabulary file maps to one id space (imported models)."""
    return dict(
        model_path="",  # the joint SentencePiece model; "": train on the training split on first use, then cache.
        model_type="unigram",  # unigram or bpe.
        character_coverage=1.0,  # characters covered; the rest fall back to bytes.
        input_sentence_size=0,  # > 0: train on that many sampled lines (big corpora).
        source_model_path="",  # mapped: the source side's SentencePiece model.
        target_model_path="",  # mapped: the target side's SentencePiece model.
        vocabulary_path="",  # mapped: the JSON vocabulary of pieces and the ids each side may produce (tfx/data/vocabulary.py); "": the joint model.
    )


def data_config() -> dict:
    """`config.data.*`: each split is a split spec, "tfds:NAME[/CONFIG]:SPLIT" or
    "text:PATH_PREFIX" (the files PATH_PREFIX.<source_lang> and PATH_PREFIX.<target_lang>,
    line-aligned), or names of `data.corpora` joined by commas (docs/data.md)."""
    return dict(
        source_lang="en",  # translate from this language ...
        target_lang="de",  # ... into this one.
        target_lang_token="",  # a vocabulary piece put before every source: the output language of a multilingual model; '{lang}' in it stands for the pair's target language ('<2{lang}>' for tfx's own, OPUS-MT's '>>{lang}<<'); '': none.
        train="",  # the training data (required): a split spec, or names of data.corpora (a,b), mixed by weight.
        eval="",  # validation (eval loss and BLEU during training): a split spec or names of data.corpora.
        test="",  # what eval.py scores by default: a split spec, or names of data.corpora, each scored on its own.
        corpora=ml_collections.ConfigDict(),  # named corpora that train, eval and test may list: NAME -> the keys of data.corpora.NAME.* below.
        temperature=0.0,  # > 0: each training corpus's share is proportional to (pairs x weight) ** (1 / temperature) (1: by size; larger: towards uniform); 0: to its weight.
        clean=dict(  # filters applied when a training corpus is prepared, in this order; a corpus may override them (data.corpora.NAME.clean).
            empty=True,  # drop a pair with an empty or whitespace-only side.
            max_chars=0,  # drop a pair with a side longer than this many characters; 0: no limit.
            max_words=0,  # drop a pair with a side of more whitespace-separated words; 0: no limit.
            max_ratio=0.0,  # drop a pair whose longer side has more than this times the characters of the shorter; 0: off.
            identical=False,  # drop a pair whose source equals its target (copies).
            min_letters=0.0,  # drop a pair with a side whose share of letters (their combining marks included) among its non-space characters is below this; 0: off.
            nonprinting=False,  # drop a pair with a non-printing character (control, format, private use, unassigned; tab and zero-width joiners are fine).
            langid=False,  # drop a pair with a side that py3langid (offline, its model in the wheel) identifies as another language than the corpus's.
            dedup=False,  # drop repeats of a pair seen before (exact, by hash, in bounded memory).
        ),
        augment=dict(  # training pairs changed as they are read, each chosen at random with this probability (OpusTrainer's modifiers).
            uppercase=0.0,  # both sides in upper case.
            titlecase=0.0,  # both sides in title case.
            typos=0.0,  # the source with a few character typos (swap, drop, repeat or replace).
        ),
        pretokenize=False,  # tokenize each training corpus once, when first used, and store its token ids: training reads ids (tfx/data/tokenized.py).
        data_dir="",  # "": $TFDS_DATA_DIR or ~/tensorflow_datasets.
        too_long="drop",  # pairs over max_source/target_length: drop or truncate.
        pack=True,  # several pairs per row (segment ids + positions); False pads.
        worker_count=0,  # grain worker processes for the train split (0: in-process).
        shards=0,  # fixed train-data shards (a multiple of the process count) keep batches and resume across slice sizes; 0: one per process.
        reset_position=False,  # on resume, start the data afresh instead of refusing a changed global batch.
    )


def corpus_config() -> dict:
    """`config.data.corpora.NAME.*`: one corpus; only `spec` is required."""
    return dict(
        spec="",  # its split spec (tfds: or text:).
        weight=1.0,  # its share of the training mix, relative to the other corpora's (see data.temperature).
        tag="",  # a piece put before each of its sources, e.g. '<BT>' for back-translation (tagged back-translation); added to a trained vocabulary.
        source_lang="",  # its languages; '': data.source_lang ...
        target_lang="",  # ... and data.target_lang.
        clean={},  # its own values of data.clean keys, e.g. {'max_ratio': 2.0}; the others are data.clean's.
    )


def decode_config() -> dict:
    """`config.decode.*`: decoding (eval.py, translate.py, the periodic BLEU). Outputs stop at
    source length + max_length_offset."""
    return dict(
        strategy="beam",  # beam, greedy or sample.
        beam_size=4,  # hypotheses kept per sentence.
        length_penalty=0.6,  # GNMT alpha: ((5 + length) / 6) ** alpha.
        beam_stop="bound",  # a sentence's beam stops when no unfinished hypothesis can beat its finished n-best (bound), or when beam_size have finished (fairseq).
        batch_halvings=3,  # beam search: up to this many times a batch halves once half its sentences are done, going on with the others only (CTranslate2 drops finished ones); 0: never.
        cache_window=16,  # cached decoding: each step's self-attention reads the first window of its cache that holds it, of this many steps, doubling up to the whole cache (attention grows with the output, as CTranslate2's cache does); 0: always the whole cache.
        max_length_offset=50,  # outputs stop at source length + this many tokens.
        max_length=0,  # outputs stop at this many tokens too (EOS included); 0: model.max_len.
        max_len_a=1.5,  # with max_len_b (both 0: off): each sentence's output stops at max_len_a * its source length + max_len_b tokens (EOS included; fairseq's --max-len-a/b).
        max_len_b=5,
        no_repeat_ngram_size=0,  # > 0: no n-gram of this many tokens twice in an output (fairseq, CTranslate2).
        repetition_penalty=1.0,  # > 1: the logits of tokens an output already holds are penalised (CTRL's, as in CTranslate2 and Hugging Face).
        temperature=1.0,  # sampling only.
        top_k=0,  # sampling only; 0: no top-k cut.
        top_p=1.0,  # sampling only; 1.0: no nucleus cut.
        shortlist="",  # a lexical shortlist (python -m tfx.compress.shortlist); "": none.
        shortlist_size=1024,  # with a shortlist: target tokens each batch decodes over.
    )


def distill_config() -> dict:
    """`config.distill.*`: word-level distillation from a teacher run."""
    return dict(
        teacher_config="",  # word-level distillation from this teacher's config file ("": off; python -m tfx.compress.distill makes sequence-level corpora).
        teacher_workdir="",  # the teacher's run (same tokenizer as the student).
        teacher_checkpoint="latest",  # latest, a step, or average:N of the teacher.
        weight=0.5,  # loss = (1 - weight) x label-smoothed cross-entropy + weight x temperature^2 x KL(teacher || student).
        temperature=1.0,  # softens both distributions in the KL term.
    )


def prune_config() -> dict:
    """`config.prune.*`: gradual magnitude pruning."""
    return dict(
        sparsity=0.0,  # gradual magnitude pruning of the projection matrices to this fraction of zeros; 0: off.
        pattern="unstructured",  # unstructured, or 2:4 (two of every four consecutive weights of a fan-in kept; sparsity 0.5).
        begin_step=0,  # pruning starts at this step ...
        end_step=0,  # ... and reaches the target sparsity here (cubic schedule of Zhu and Gupta, 2017); 0: num_train_steps.
        every_steps=100,  # masks are recomputed this often in between.
    )


def distributed_config() -> dict:
    """`config.distributed.*`: multi-process (multi-host) runs; every process runs the same
    command."""
    return dict(
        coordinator_address="",  # host:port of process 0; "": $JAX_COORDINATOR_ADDRESS or the detected cluster (TPU VM, SLURM, Open MPI).
        num_processes=0,  # 0: from the cluster; 1 with no coordinator: single process.
        process_id=-1,  # -1: from the cluster.
        heartbeat_timeout_s=100,  # a process silent this long is declared dead and the others stop.
        initialization_timeout_s=300,  # how long to wait for all processes to connect.
    )


SECTIONS = {"tokenizer": tokenizer_config, "data": data_config, "decode": decode_config,
            "distill": distill_config, "prune": prune_config, "distributed": distributed_config}


def default_config() -> ml_collections.ConfigDict:
    """Every key with its default. Configs override these; nothing else defines defaults."""
    config = ml_collections.ConfigDict(
        dict(
            variant="",  # a label for reports, set by configs with variants.
            model=model_config(),
            tokenizer=tokenizer_config(),
            data=data_config(),
            decode=decode_config(),
            per_device_eval_batch_size=32,  # eval loss and decoding, separate from training.
            seed=0,  # parameters, dropout and data order.
            # Optimisation.
            optimizer="adamw",  # adamw or adafactor.
            learning_rate=1e-3,  # peak, reached at the end of warmup.
            schedule="rsqrt",  # rsqrt (inverse square root) or cosine, both after a linear warmup.
            warmup_steps=4000,  # linear warmup from 0 to learning_rate.
            num_train_steps=100_000,  # optimizer updates to train for.
            train_minutes=0.0,  # > 0: num_train_steps is set to fill this many minutes of train steps, timed on the first steps (tfx/train/budget.py).
            cosine_end_fraction=0.0,  # cosine schedule ends at this fraction of learning_rate.
            adam_b1=0.9,
            adam_b2=0.98,
            adam_eps=1e-9,
            weight_decay=0.0,  # decoupled (AdamW) weight decay.
            weight_decay_norms=False,  # also decay norm scales and biases (optax's default decays every parameter).
            grad_clip_norm=1.0,  # 0 disables clipping.
            grad_accum_steps=1,  # microbatches per update (the global batch is split into these).
            # Loss.
            label_smoothing=0.1,
            z_loss=0.0,  # weight of log(Z)^2, which keeps the softmax normaliser near 1.
            # Batch shape.
            per_device_batch_size=16,  # rows per data-parallel device; global = this x (data x fsdp).
            max_source_length=64,  # row length of the source side (packed rows hold several pairs).
            max_target_length=64,  # row length of the target side.
            # Training loop (train.py). Steps count optimizer updates.
            log_every_steps=50,  # metrics to the JSONL/TensorBoard files and the progress bar.
            eval_every_steps=1000,  # eval loss and BLEU on data.eval; 0 disables.
            eval_bleu_examples=0,  # periodic BLEU on the first N eval pairs; 0: all of them.
            checkpoint_every_steps=1000,  # also at the end and on SIGTERM/SIGINT.
            keep_checkpoints=3,  # the latest K, plus the best by eval BLEU.
            lock_timeout_s=300.0,  # a workdir lock from another machine or container (boot id, pid namespace) whose heartbeat (every 30 s) is older than this is stale (tfx/train/lock.py).
            nonfinite_loss="stop",  # a NaN, infinite or diverged loss: stop (exit naming the step) or skip (leave the parameters and moments unchanged).
            divergence_factor=3.0,  # a loss above this x ln(vocab_size) (a uniform prediction's, about where training starts) has diverged; 0: only NaN/inf.
            # Starting from another run (fine-tunes: int8 QAT, pruning, low-rank, pruned heads).
            init_from="",  # a workdir whose parameters a new run starts from (its optimizer and step start afresh); "": random initialisation.
            init_checkpoint="latest",  # which of init_from's checkpoints: latest, a step, or average:N.
            # Efficiency toolbox (docs/compression.md).
            quantization="none",  # none or int8: training is quantization-aware (QAT), eval and translation run int8 matmuls (PTQ of float parameters); qwix (tfx/model/quantize.py).
            distill=distill_config(),
            prune=prune_config(),
            distributed=distributed_config(),
            # Parallelism.
            mesh_shape="data:-1,fsdp:1,tensor:1",  # device mesh; -1: the devices left over.
            logical_axis_rules=DEFAULT_LOGICAL_AXIS_RULES,  # logical axis -> mesh axes (see above).
        )
    )
    config.lock()  # configs may change values, not invent keys: a typo fails loudly.
    config.data.corpora.unlock()  # but name their corpora (each checked by `validate`).
    return config


def head_dim(model: ml_collections.ConfigDict) -> int:
    """`model.head_dim`, or emb_dim // num_heads when it is 0."""
    return model.head_dim or model.emb_dim // model.num_heads


def load(spec: str) -> ml_collections.ConfigDict:
    """Loads and validates `path/to/config.py[:variant]` (the variant goes to get_config)."""
    path, _, variant = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("tfx_user_config", path)
    if module_spec is None or not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} does not exist.")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(variant) if variant else module.get_config()
    return validate(config)


def get_config() -> ml_collections.ConfigDict:
    """The schema's defaults, so that this file is itself a config file: the command-line
    tools' `--config` default, which a run's config.json then replaces (tfx/core/cli.py)."""
    return default_config()


OPEN_KEYS = ("data.corpora",)  # whose keys a config names itself: set whole from JSON.
RUN_CONFIG_FILE = "config.json"  # the config a training run saves in its workdir.
# What a trained run fixes: its parameters' shapes and meaning, and the vocabulary they index.
FIXED_BY_TRAINING = ("model", "tokenizer")
CHOSEN_AT_INFERENCE = ("model.dtype",)  # the compute dtype, as CTranslate2's compute_type.


def from_json(text: str, source: str) -> ml_collections.ConfigDict:
    """The config that `config.to_json()` wrote (to `source`, named in errors), rebuilt on the
    schema: default_config() with the saved values, so types are the schema's (JSON turns
    tuples into lists) and keys added to tfx since keep their defaults."""
    config = default_config()
    for key, value in _flatten_json(json.loads(text)):
        try:
            default = _lookup(config, key)
        except (KeyError, AttributeError):
            raise ValueError(f"{source}: config.{key} is not a key of this tfx's config "
                             "(tfx/core/config.py); was the run trained by another version?"
                             ) from None
        try:
            if key in OPEN_KEYS:
                config.data.corpora = value
                continue
            config.update_from_flattened_dict(
                {key: _tuples(value) if isinstance(default, tuple) else value})
        except TypeError as error:
            raise ValueError(f"{source}: config.{key}={value!r}: {error}") from None
    return config


def _flatten_json(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict) and f"{prefix}{key}" not in OPEN_KEYS:
            yield from _flatten_json(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _tuples(value):
    return tuple(map(_tuples, value)) if isinstance(value, list) else value


def save_run(config: ml_collections.ConfigDict, workdir: str):
    """Writes `config` as the run's config.json in `workdir` (atomically), for `load_run`."""
    files.write_text(files.join(workdir, RUN_CONFIG_FILE), config.to_json(indent=2))


def load_run(workdir: str) -> ml_collections.ConfigDict:
    """The config the run in `workdir` was trained with (its config.json), not yet validated."""
    path = os.path.join(workdir, RUN_CONFIG_FILE)
    if not files.path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist: give the run's --config FILE[:variant] "
                                "and the overrides it was trained with.")
    return from_json(files.path(path).read_text(encoding="utf-8"), path)


def for_inference(run: ml_collections.ConfigDict | None, source: str,
                  given: ml_collections.ConfigDict | None = None,
                  overrides: Mapping[str, object] | None = None) -> ml_collections.ConfigDict:
    """The validated config to run a trained model with: the run's own (`run`, read from
    `source`), or `given` (a config file the user named, its overrides applied) instead, else
    the run's with `overrides` (flattened `--config.KEY=VALUE`) on top. Only what may change at
    inference changes (decoding, batch sizes, mesh, quantization, data splits, the compute
    dtype model.dtype): a model or tokenizer key that differs from the run's is refused, naming
    it. `run` None (a workdir without config.json) accepts `given` as it is."""
    if given is None:
        if run is None:
            raise FileNotFoundError(f"{source} does not exist: give the run's --config "
                                    "FILE[:variant] and the overrides it was trained with.")
        config = copy.deepcopy(run)
        config.update_from_flattened_dict(dict(overrides or {}))
    else:
        config = given
    if run is not None:
        for key, trained in _flatten(run):
            if (key.split(".")[0] in FIXED_BY_TRAINING and key not in CHOSEN_AT_INFERENCE
                    and _lookup(config, key) != trained):
                raise ValueError(f"--config: {key}={_lookup(config, key)!r} differs from the "
                                 f"run's {trained!r} ({source}); a run's model cannot change at "
                                 "inference.")
    return validate(config)


def choice_error(key: str, value, choices: tuple[str, ...]) -> ValueError:
    """The error for a config key whose value is not one of `choices`."""
    return ValueError(f"config.{key}={value!r} is not one of {', '.join(map(repr, choices))}.")


def _check_choice(config: ml_collections.ConfigDict, key: str, choices: tuple[str, ...]):
    value = _lookup(config, key)
    if value not in choices:
        raise choice_error(key, value, choices)


def _check_positive(config: ml_collections.ConfigDict, key: str, allow_zero: bool = False):
    value = _lookup(config, key)
    if not isinstance(value, (int, float)) or value < 0 or (value == 0 and not allow_zero):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"config.{key}={value!r} must be a {kind} number.")


def _lookup(config: ml_collections.ConfigDict, key: str):
    value = config
    for part in key.split("."):
        value = value[part]
    return value


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks values and their combinations; raises ValueError naming the config key."""
    _check_values(config)
    _check_data(config)
    _check_tokenizer(config)
    _check_training(config)
    _check_model(config)
    return config


def _check_values(config: ml_collections.ConfigDict):
    """Each key alone: one of its choices, positive, or in its range."""
    for key, choices in (("model.activation", ACTIVATIONS), ("model.norm", NORMS),
                         ("model.norm_position", NORM_POSITIONS), ("model.positions", POSITIONS),
                         ("model.dtype", DTYPES), ("model.remat", REMAT_POLICIES),
                         ("tokenizer.model_type", TOKENIZER_MODEL_TYPES),
                         ("decode.strategy", DECODE_STRATEGIES), ("decode.beam_stop", BEAM_STOPS),
                         ("data.too_long", TOO_LONG_POLICIES),
                         ("nonfinite_loss", NONFINITE_POLICIES), ("optimizer", OPTIMIZERS),
                         ("schedule", SCHEDULES), ("quantization", QUANTIZATIONS),
                         ("prune.pattern", PRUNE_PATTERNS)):
        _check_choice(config, key, choices)
    for key in ("model.vocab_size", "model.emb_dim", "model.num_heads", "model.num_kv_heads",
                "model.mlp_dim", "model.max_len", "per_device_batch_size", "max_source_length",
                "max_target_length", "grad_accum_steps", "learning_rate", "num_train_steps",
                "per_device_eval_batch_size", "decode.beam_size", "decode.temperature",
                "decode.repetition_penalty",
                "log_every_steps", "checkpoint_every_steps", "keep_checkpoints", "lock_timeout_s",
                "distributed.heartbeat_timeout_s", "distributed.initialization_timeout_s",
                "distill.temperature", "prune.every_steps"):
        _check_positive(config, key)
    for key in ("model.num_encoder_layers", "model.num_decoder_layers", "model.head_dim",
                "warmup_steps", "train_minutes", "divergence_factor", "weight_decay",
                "grad_clip_norm", "z_loss", "decode.length_penalty", "decode.max_length_offset",
                "decode.max_length", "decode.top_k", "data.worker_count", "eval_every_steps",
                "decode.max_len_a", "decode.max_len_b", "decode.no_repeat_ngram_size",
                "decode.batch_halvings", "decode.cache_window",
                "eval_bleu_examples", "data.shards", "distributed.num_processes",
                "prune.begin_step", "prune.end_step"):
        _check_positive(config, key, allow_zero=True)
    for key in ("model.dropout_rate", "model.attention_dropout_rate",
                "model.activation_dropout_rate", "label_smoothing", "prune.sparsity"):
        if not 0.0 <= _lookup(config, key) < 1.0:
            raise ValueError(f"config.{key}={_lookup(config, key)!r} must be in [0, 1).")
    for key in ("distill.weight", "model.rank_fraction"):
        if not 0.0 <= _lookup(config, key) <= 1.0:
            raise ValueError(f"config.{key}={_lookup(config, key)!r} must be in [0, 1].")


SPLITS = ("train", "eval", "test")


def is_split_spec(value: str) -> bool:
    """Whether a config.data.train/eval/test value is a split spec (else: corpus names)."""
    return ":" in value


def corpus_names(config: ml_collections.ConfigDict, split: str) -> list[str]:
    """The data.corpora that config.data.`split` names ([] for a split spec or "")."""
    value = config.data[split]
    return [] if not value or is_split_spec(value) else [n.strip() for n in value.split(",")]


def corpus(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """data.corpora.`name` with every key: its own values, else the defaults, the languages of
    config.data, and data.clean under its own clean values."""
    given = config.data.corpora[name].to_dict()
    settings = {**corpus_config(), **given}
    settings["source_lang"] = settings["source_lang"] or config.data.source_lang
    settings["target_lang"] = settings["target_lang"] or config.data.target_lang
    settings["clean"] = {**config.data.clean.to_dict(), **given.get("clean", {})}
    return ml_collections.ConfigDict(settings)


def _check_data(config: ml_collections.ConfigDict):
    """data.corpora's entries and the names that train, eval and test give."""
    known = corpus_config()
    for name in config.data.corpora:
        key = f"data.corpora.{name}"
        if not isinstance(config.data.corpora[name], ml_collections.ConfigDict):
            raise ValueError(f"config.{key} must be a dict of {', '.join(known)}.")
        given = config.data.corpora[name]
        for field in given:
            if field not in known:
                raise ValueError(f"config.{key}.{field} is not a corpus key; they are "
                                 f"{', '.join(known)}.")
        for field in given.get("clean", {}):
            if field not in config.data.clean:
                raise ValueError(f"config.{key}.clean.{field} is not a key of config.data.clean; "
                                 f"they are {', '.join(config.data.clean)}.")
        if not given.get("spec") or not is_split_spec(given.spec):
            raise ValueError(f"config.{key}.spec={given.get('spec', '')!r} must be a split spec, "
                             '"tfds:NAME[/CONFIG]:SPLIT" or "text:PATH_PREFIX".')
        weight = given.get("weight", known["weight"])
        if not isinstance(weight, (int, float)) or weight <= 0:
            raise ValueError(f"config.{key}.weight={weight!r} must be a positive number.")
    for split in SPLITS:
        names = corpus_names(config, split)
        for name in names:
            if name not in config.data.corpora:
                listed = ", ".join(config.data.corpora) or "none"
                raise ValueError(f"config.data.{split}={config.data[split]!r} names the corpus "
                                 f"{name!r}, which config.data.corpora does not have ({listed}).")
        if len(set(names)) < len(names):
            raise ValueError(f"config.data.{split}={config.data[split]!r} names a corpus twice.")
    for name, probability in config.data.augment.items():
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"config.data.augment.{name}={probability!r} must be in [0, 1].")
    if config.data.pretokenize and any(config.data.augment.values()):
        raise ValueError("config.data.pretokenize stores token ids, but config.data.augment changes "
                         "the text as it is read; turn one off.")
    _check_positive(config, "data.temperature", allow_zero=True)


def _check_tokenizer(config: ml_collections.ConfigDict):
    """One tokenizer kind: the joint model (model_path, or trained) or the mapped one."""
    t = config.tokenizer
    if t.vocabulary_path and not (t.source_model_path and t.target_model_path):
        raise ValueError("config.tokenizer.vocabulary_path is set, so the tokenizer is mapped and "
                         "needs config.tokenizer.source_model_path and "
                         "config.tokenizer.target_model_path.")
    if t.vocabulary_path and t.model_path:
        raise ValueError("config.tokenizer.model_path (a joint model) and "
                         "config.tokenizer.vocabulary_path (a mapped one) are both set; keep one.")
    if not t.vocabulary_path and (t.source_model_path or t.target_model_path):
        raise ValueError("config.tokenizer.source_model_path/target_model_path are set without "
                         "config.tokenizer.vocabulary_path, which maps their pieces to ids.")


def _check_training(config: ml_collections.ConfigDict):
    """Training and decoding keys that constrain each other."""
    if config.distill.teacher_config and not config.distill.teacher_workdir:
        raise ValueError("config.distill.teacher_config is set but config.distill.teacher_workdir "
                         "is empty: name the teacher's run.")
    if config.prune.pattern == "2:4" and config.prune.sparsity not in (0.0, 0.5):
        raise ValueError(f"config.prune.pattern='2:4' keeps half the weights, but "
                         f"config.prune.sparsity={config.prune.sparsity!r}; set it to 0.5.")
    if config.per_device_batch_size % config.grad_accum_steps:
        raise ValueError(
            f"config.per_device_batch_size={config.per_device_batch_size} is not divisible by "
            f"config.grad_accum_steps={config.grad_accum_steps}: each microbatch must still split "
            "evenly over the data axes.")
    if config.decode.shortlist_size < 3:
        raise ValueError(f"config.decode.shortlist_size={config.decode.shortlist_size!r} must be at "
                         "least 3: PAD, EOS and a token to say.")
    if not 0.0 < config.decode.top_p <= 1.0:
        raise ValueError(f"config.decode.top_p={config.decode.top_p!r} must be in (0, 1].")


def _check_model(config: ml_collections.ConfigDict):
    """The model's shapes: heads, head_dim, tied embeddings and the longest sequence."""
    m = config.model
    if m.num_heads % m.num_kv_heads:
        raise ValueError(
            f"config.model.num_heads={m.num_heads} must be a multiple of "
            f"config.model.num_kv_heads={m.num_kv_heads} (grouped-query attention)."
        )
    if m.head_dim == 0 and m.emb_dim % m.num_heads:
        raise ValueError(
            f"config.model.emb_dim={m.emb_dim} is not divisible by config.model.num_heads="
            f"{m.num_heads}; set config.model.head_dim explicitly."
        )
    if max(config.max_source_length, config.max_target_length) > m.max_len:
        raise ValueError(
            f"config.max_source_length/max_target_length ({config.max_source_length}/"
            f"{config.max_target_length}) exceed config.model.max_len={m.max_len}."
        )


def reference_table() -> str:
    """Markdown table of every key, its default and the comment beside it in this file (the
    config reference in docs/config.md is this output: `python -m tfx.core.config`)."""
    comments = {}
    sources = ((model_config, "model."), (default_config, ""), (corpus_config, "data.corpora.NAME."),
               *((function, f"{name}.") for name, function in SECTIONS.items()))
    for function, prefix in sources:
        sections = [prefix]  # the dotted prefix of the `name=dict(` blocks the line is in.
        for line in inspect.getsource(function).splitlines():
            if match := re.match(r"\s+(\w+)=dict\((\s+# .*)?$", line):
                sections.append(f"{sections[-1]}{match.group(1)}.")
            elif re.match(r"\s+\),$", line) and len(sections) > 1:
                sections.pop()
            elif match := re.match(r"\s+(\w+)=.*?,\s+# (.*)$", line):
                comments[sections[-1] + match.group(1)] = match.group(2)
    rows = ["| key | default | meaning |", "|---|---|---|"]
    corpus_keys = [(f"data.corpora.NAME.{key}", value) for key, value in corpus_config().items()]
    for key, value in [*_flatten(default_config()), *corpus_keys]:
        shown = "see DEFAULT_LOGICAL_AXIS_RULES" if key == "logical_axis_rules" else repr(value)
        rows.append(f"| `{key}` | `{shown}` | {comments.get(key, '')} |")
    return "\n".join(rows) + "\n"


def _flatten(config: ml_collections.ConfigDict, prefix: str = ""):
    for key in sorted(config.keys(), key=lambda k: isinstance(config[k], ml_collections.ConfigDict)):
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        elif isinstance(value, ml_collections.ConfigDict):  # an empty data.corpora.
            yield f"{prefix}{key}", {}
        else:
            yield f"{prefix}{key}", value


if __name__ == "__main__":
    print(reference_table(), end="")
