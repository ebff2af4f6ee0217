"""Imports a Marian Transformer (an OPUS-MT model) as a tfx run directory.

    python -m tfx.convert marian --model opus-mt-en-de/opus.spm32k-spm32k.transformer-align.model1.npz.best-perplexity.npz \\
        --vocab opus-mt-en-de/opus.spm32k-spm32k.vocab.yml \\
        --source_spm opus-mt-en-de/source.spm --target_spm opus-mt-en-de/target.spm \\
        --source_lang en --target_lang de --workdir runs/opus-mt-en-de

writes the workdir a trained run would have: config.json, one checkpoint (step 0, the optimizer
state fresh) and the tokenizer (source.spm, target.spm and vocabulary.json), so that eval.py,
translate.py, `python -m tfx.export ctranslate2` and a fine-tune (configs/opus_mt.py) take it
as it is.

The architecture comes from the weights and the options Marian stores inside the .npz
(`special:model.yml`); each Marian option becomes the config key that computes the same thing
(see `model_config`), and what tfx cannot compute is refused, naming the option (`unsupported`).

Ids: tfx keeps its own (0 padding and the decoder's start, 1 `</s>`, 2 `<unk>`), so Marian's
vocabulary is renumbered: `</s>` and `<unk>` take ids 1 and 2, the other pieces follow in
Marian's order, and id 0 is a new `<pad>` piece whose embedding is zero and whose output bias
is PAD_BIAS, so it takes no probability and the softmax is Marian's. With two vocabularies
(source and target), tfx's ids cover both: a piece of one side only has a zero row in the other
side's embedding, and a target PAD_BIAS when it is not a target piece.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping, Sequence

import jax
import ml_collections
import numpy as np
import yaml
from flax import nnx

from tfx.core import config as config_lib
from tfx.core import files, parallel
from tfx.data import tokenizer as tokenizer_lib
from tfx.data import vocabulary as vocabulary_lib
from tfx.model.params import abstract_params
from tfx.train import rundir

OPTIONS_KEY = "special:model.yml"  # where Marian stores its options inside the .npz.
PAD_BIAS = -1e4  # the output bias of pieces the model never says: no probability, finite in float16.
ACTIVATIONS = {"relu": "relu", "swish": "swish", "gelu": "gelu_sigmoid"}  # Marian's gelu is x sigmoid(1.702 x).
PRE_NORM, POST_NORM = ("n", "da", "n"), ("", "dan", "")  # transformer-preprocess, -postprocess, -postprocess-top.
EMBEDDING_POSTPROCESS = {"": False, "d": False, "n": True, "nd": True}  # -> config.model.embedding_norm.
SINUSOID_MAX_LEN = 512  # model.max_len of a model with sinusoidal positions (no table to size it).


def read_options(model: Mapping[str, np.ndarray], path: str) -> dict:
    """The options Marian trained the model with, from its `special:model.yml`."""
    if OPTIONS_KEY not in model:
        raise ValueError(f"--model={path} has no {OPTIONS_KEY!r}: not a Marian model, or one saved "
                         "without its options.")
    text = model[OPTIONS_KEY].tobytes().rstrip(b"\0").decode("utf-8")
    try:
        options = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"--model={path}: {OPTIONS_KEY} is not YAML ({error}).".replace("\n", " ")) from None
    if not isinstance(options, dict):
        raise ValueError(f"--model={path}: {OPTIONS_KEY} is not a mapping of options.")
    return options


def read_vocabulary(path: str) -> list[str]:
    """The pieces of a Marian vocabulary (.yml: `piece: id`), in id order. Read with YAML's base
    loader, which keeps every key a string: the safe loader would turn pieces such as `yes`,
    `No` or `null` into values, and equal values into one key."""
    try:
        entries = yaml.load(files.path(path).read_text(encoding="utf-8"), Loader=yaml.CBaseLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"--vocab={path}: not a Marian vocabulary ({error}).".replace("\n", " ")) from None
    if not isinstance(entries, dict) or not entries:
        raise ValueError(f"--vocab={path}: expected lines `piece: id`, Marian's .yml vocabulary.")
    pieces = {}
    for piece, index in entries.items():
        if not isinstance(index, str) or not index.isdigit():
            raise ValueError(f"--vocab={path}: piece {piece!r} has id {index!r}; expected a number.")
        pieces[int(index)] = piece
    if sorted(pieces) != list(range(len(pieces))):
        missing = sorted(set(range(max(pieces) + 1)) - set(pieces))[:5]
        raise ValueError(f"--vocab={path}: ids are not 0..{len(pieces) - 1}; missing {missing}.")
    for special in ("</s>", "<unk>"):
        if special not in entries:
            raise ValueError(f"--vocab={path}: no {special!r} piece; Marian vocabularies have one.")
    return [pieces[i] for i in range(len(pieces))]


def unsupported(options: Mapping) -> list[str]:
    """What in Marian's `options` tfx cannot compute, one sentence per option."""
    problems = []

    def refuse(option: str, expected: str):
        problems.append(f"{option}={options.get(option)!r} ({expected})")

    if options.get("type", "transformer") != "transformer":
        refuse("type", "tfx imports Marian's transformer")
    if options.get("transformer-decoder-autoreg", "self-attention") != "self-attention":
        refuse("transformer-decoder-autoreg", "tfx's decoder has self-attention only")
    if options.get("transformer-no-projection", False):
        refuse("transformer-no-projection", "tfx's attention has an output projection")
    if options.get("transformer-ffn-depth", 2) != 2 or options.get("transformer-decoder-ffn-depth", 0) not in (0, 2):
        refuse("transformer-ffn-depth", "tfx's feed-forward block has two layers")
    if options.get("transformer-decoder-dim-ffn", 0) not in (0, options.get("transformer-dim-ffn")):
        refuse("transformer-decoder-dim-ffn", "tfx's decoder has the encoder's feed-forward width")
    if options.get("transformer-tied-layers"):
        refuse("transformer-tied-layers", "tfx's layers have parameters of their own")
    if options.get("right-left", False):
        refuse("right-left", "tfx decodes left to right")
    if options.get("transformer-ffn-activation", "swish") not in ACTIVATIONS:
        refuse("transformer-ffn-activation", f"tfx imports {', '.join(ACTIVATIONS)}")
    if _processing(options) not in (PRE_NORM, POST_NORM):
        given = ", ".join(f"transformer-{key}={value!r}" for key, value in
                          zip(("preprocess", "postprocess", "postprocess-top"), _processing(options)))
        problems.append(f"{given} (tfx computes post-norm: '', 'dan', ''; or pre-norm: 'n', 'da', 'n')")
    if options.get("transformer-postprocess-emb", "d") not in EMBEDDING_POSTPROCESS:
        refuse("transformer-postprocess-emb", f"tfx computes {', '.join(map(repr, EMBEDDING_POSTPROCESS))}")
    for option in ("factors-dim-emb", "lemma-dim-emb"):
        if options.get(option, 0):
            refuse(option, "tfx has no factored vocabularies")
    return problems


def _processing(options: Mapping) -> tuple[str, str, str]:
    return tuple(options.get(f"transformer-{key}", default) or "" for key, default in
                 (("preprocess", ""), ("postprocess", "dan"), ("postprocess-top", "")))


@dataclasses.dataclass(frozen=True)
class Renumbering:
    """tfx's id space over Marian's vocabularies: `pieces` in tfx id order, and the tfx id of
    each Marian id of the source (`source_ids`) and target (`target_ids`) vocabulary."""
    pieces: list[str]
    source_ids: np.ndarray
    target_ids: np.ndarray

    def vocabulary(self) -> vocabulary_lib.Vocabulary:
        """The vocabulary file of tfx's mapped tokenizer (tfx/data/vocabulary.py)."""
        return vocabulary_lib.Vocabulary(tuple(self.pieces), frozenset(self.source_ids.tolist()),
                                         frozenset(self.target_ids.tolist()))


def renumber(source: Sequence[str], target: Sequence[str]) -> Renumbering:
    """tfx ids for Marian's source and target pieces (one list twice for a joint vocabulary):
    `<pad>` 0, `</s>` 1, `<unk>` 2, then every other piece once, the source's first."""
    pieces = ["<pad>", "</s>", "<unk>"]
    index = {piece: i for i, piece in enumerate(pieces)}

    def ids(vocabulary: Sequence[str]) -> np.ndarray:
        for piece in vocabulary:
            if piece not in index:
                index[piece] = len(pieces)
                pieces.append(piece)
        return np.array([index[piece] for piece in vocabulary], np.int64)

    return Renumbering(pieces, ids(source), ids(target))


class Weights:
    """Marian's parameters by name (float32), remembering which were taken."""

    def __init__(self, model: Mapping[str, np.ndarray], path: str):
        self.arrays = {name: array for name, array in model.items() if name != OPTIONS_KEY}
        self.path, self.taken = path, set()

    def has(self, name: str) -> bool:
        return name in self.arrays

    def take(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            raise ValueError(f"--model={self.path} has no parameter {name!r}, which its options imply.")
        self.taken.add(name)
        return np.asarray(self.arrays[name], np.float32)

    def vector(self, name: str) -> np.ndarray:
        """A [1, N] bias or norm parameter as [N]."""
        return self.take(name).reshape(-1)

    def left_over(self) -> list[str]:
        return sorted(set(self.arrays) - self.taken)

    def depth(self, stack: str) -> int:
        """How many layers `stack` ("encoder" or "decoder") has: Marian counts them from 1."""
        count = 0
        while self.has(f"{stack}_l{count + 1}_self_Wq"):
            count += 1
        return count


def model_config(options: Mapping, weights: Weights, renumbering: Renumbering) -> dict:
    """The config.model keys of the Marian model (its `options` and parameter shapes)."""
    pre_norm = _processing(options) == PRE_NORM
    embedding = weights.arrays["Wemb" if weights.has("Wemb") else "encoder_Wemb"]
    untied = weights.has("decoder_ff_logit_out_W") or weights.has("decoder_ff_logit_out_Wt")
    return dict(
        vocab_size=len(renumbering.pieces), emb_dim=int(embedding.shape[1]),
        num_heads=int(options.get("transformer-heads", 8)),
        num_kv_heads=int(options.get("transformer-heads", 8)), head_dim=0,
        mlp_dim=int(weights.arrays["encoder_l1_ffn_W1"].shape[1]),
        num_encoder_layers=weights.depth("encoder"), num_decoder_layers=weights.depth("decoder"),
        activation=ACTIVATIONS[options.get("transformer-ffn-activation", "swish")],
        norm="layernorm", norm_position="pre" if pre_norm else "post", norm_epsilon=1e-6,
        positions="learned" if weights.has("Wpos") else "sinusoidal",
        max_len=int(weights.arrays["Wpos"].shape[0]) if weights.has("Wpos") else SINUSOID_MAX_LEN,
        share_embeddings=weights.has("Wemb"), logits_via_embedding=not untied,
        dropout_rate=float(options.get("transformer-dropout", 0.0)),
        attention_dropout_rate=float(options.get("transformer-dropout-attention", 0.0)),
        activation_dropout_rate=float(options.get("transformer-dropout-ffn", 0.0)),
        # Marian scales the embeddings by sqrt(d) where it adds sinusoids, not a learned Wpos.
        use_bias=True, output_bias=True, scale_embeddings=not weights.has("Wpos"),
        start_from_zero_embedding=True,
        embedding_norm=EMBEDDING_POSTPROCESS[options.get("transformer-postprocess-emb", "d")],
    )


def _rows(table_VxD: np.ndarray, ids_V: np.ndarray, vocab_size: int) -> np.ndarray:
    """Marian's table with rows at tfx's ids; the rows of pieces it lacks are zero."""
    rows = np.zeros((vocab_size, table_VxD.shape[1]), np.float32)
    rows[ids_V] = table_VxD
    return rows


def _norm(weights: Weights, prefix: str, pre_norm: bool) -> dict:
    suffix = "_pre" if pre_norm else ""
    return {"scale": weights.vector(f"{prefix}_ln_scale{suffix}"),
            "bias": weights.vector(f"{prefix}_ln_bias{suffix}")}


def _attention(weights: Weights, prefix: str, heads: int) -> dict:
    """Marian's [D, D] projections with heads side by side in D (head n: columns n*H..n*H+H-1)."""
    dim = weights.arrays[f"{prefix}_Wq"].shape[0]
    head_dim = dim // heads
    by_heads = {name: weights.take(f"{prefix}_W{letter}").reshape(dim, heads, head_dim)
                for name, letter in (("query", "q"), ("key", "k"), ("value", "v"))}
    biases = {f"{name}_bias": weights.vector(f"{prefix}_b{letter}").reshape(heads, head_dim)
              for name, letter in (("query", "q"), ("key", "k"), ("value", "v"))}
    out = {"out": weights.take(f"{prefix}_Wo").reshape(heads, head_dim, dim),
           "out_bias": weights.vector(f"{prefix}_bo")}
    return {**by_heads, **biases, **out}


def _mlp(weights: Weights, prefix: str) -> dict:
    return {"wi": weights.take(f"{prefix}_W1"), "wi_bias": weights.vector(f"{prefix}_b1"),
            "wo": weights.take(f"{prefix}_W2"), "wo_bias": weights.vector(f"{prefix}_b2")}


def _layers(weights: Weights, model: ml_collections.ConfigDict) -> dict:
    """The encoder's and decoder's layers, as tfx's unstacked `nnx.List`s ({0: ..., 1: ...})."""
    pre, heads = model.norm_position == "pre", model.num_heads
    encoder = {i: {"attention_norm": _norm(weights, f"encoder_l{i + 1}_self_Wo", pre),
                   "attention": _attention(weights, f"encoder_l{i + 1}_self", heads),
                   "mlp_norm": _norm(weights, f"encoder_l{i + 1}_ffn_ffn", pre),
                   "mlp": _mlp(weights, f"encoder_l{i + 1}_ffn")}
               for i in range(model.num_encoder_layers)}
    decoder = {i: {"self_attention_norm": _norm(weights, f"decoder_l{i + 1}_self_Wo", pre),
                   "self_attention": _attention(weights, f"decoder_l{i + 1}_self", heads),
                   "cross_attention_norm": _norm(weights, f"decoder_l{i + 1}_context_Wo", pre),
                   "cross_attention": _attention(weights, f"decoder_l{i + 1}_context", heads),
                   "mlp_norm": _norm(weights, f"decoder_l{i + 1}_ffn_ffn", pre),
                   "mlp": _mlp(weights, f"decoder_l{i + 1}_ffn")}
               for i in range(model.num_decoder_layers)}
    return {"encoder_layers": encoder, "decoder_layers": decoder}


def _embeddings(weights: Weights, model: ml_collections.ConfigDict, renumbering: Renumbering) -> dict:
    """Token and position embeddings, their norms, the output projection and its bias."""
    v = model.vocab_size
    params = {}
    if model.share_embeddings:
        params["source_embed"] = {"embedding": _rows(weights.take("Wemb"), renumbering.source_ids, v)}
    else:
        params["source_embed"] = {"embedding": _rows(weights.take("encoder_Wemb"), renumbering.source_ids, v)}
        params["target_embed"] = {"embedding": _rows(weights.take("decoder_Wemb"), renumbering.target_ids, v)}
    if model.positions == "learned":
        table = weights.take("Wpos")
        params["source_positions"], params["target_positions"] = {"table": table}, {"table": table.copy()}
    if model.embedding_norm:
        params["source_embed_norm"] = _norm(weights, "encoder_emb", pre_norm=True)
        params["target_embed_norm"] = _norm(weights, "decoder_emb", pre_norm=True)
    if model.norm_position == "pre":
        params["encoder_norm"] = _norm(weights, "encoder_top", pre_norm=False)
        params["decoder_norm"] = _norm(weights, "decoder_top", pre_norm=False)
    if not model.logits_via_embedding:
        if weights.has("decoder_ff_logit_out_W"):
            table_VxD = weights.take("decoder_ff_logit_out_W").T
        else:
            table_VxD = weights.take("decoder_ff_logit_out_Wt")
        params["logits_projection"] = _rows(table_VxD, renumbering.target_ids, v).T
    bias_V = np.full((v,), PAD_BIAS, np.float32)
    if weights.has("decoder_ff_logit_out_b"):
        bias_V[renumbering.target_ids] = weights.vector("decoder_ff_logit_out_b")
    else:
        bias_V[renumbering.target_ids] = 0.0
    bias_V[tokenizer_lib.PAD_ID] = PAD_BIAS
    params["logits_bias"] = bias_V
    return params


def marian_params(weights: Weights, model: ml_collections.ConfigDict, renumbering: Renumbering) -> dict:
    """tfx's parameters (`nnx.to_pure_dict`'s layout) of the Marian model; refuses parameters
    that would be left unused."""
    params = {**_embeddings(weights, model, renumbering), **_layers(weights, model)}
    left = weights.left_over()
    if left:
        raise ValueError(f"--model={weights.path} has parameters tfx does not compute: "
                         f"{', '.join(left[:6])}{' ...' if len(left) > 6 else ''}.")
    return params


def run_config(options: Mapping, weights: Weights, renumbering: Renumbering, workdir: str,
               source_lang: str, target_lang: str) -> ml_collections.ConfigDict:
    """The imported run's config: the model, its tokenizer's files in `workdir`, the languages,
    and Marian's label smoothing; training keys a fine-tune sets are configs/opus_mt.py's."""
    config = config_lib.default_config()
    config.model.update(model_config(options, weights, renumbering))
    config.tokenizer.update(source_model_path=files.join(workdir, tokenizer_lib.SOURCE_FILE),
                            target_model_path=files.join(workdir, tokenizer_lib.TARGET_FILE),
                            vocabulary_path=files.join(workdir, tokenizer_lib.VOCABULARY_FILE))
    config.data.update(source_lang=source_lang, target_lang=target_lang)
    config.label_smoothing = float(options.get("label-smoothing", config.label_smoothing))
    config.max_source_length = config.max_target_length = min(128, config.model.max_len)
    return config_lib.validate(config)


def _vocabularies(paths: Sequence[str], options: Mapping) -> Renumbering:
    """tfx's ids for one joint vocabulary or a source and a target one, each cut to the size
    Marian used (`dim-vocabs`)."""
    if len(paths) not in (1, 2):
        raise ValueError(f"--vocab: give one joint vocabulary or two (source, target), not {len(paths)}.")
    vocabularies = [read_vocabulary(path) for path in paths]
    sizes = options.get("dim-vocabs") or [len(v) for v in vocabularies]
    for path, vocabulary, size in zip(paths, vocabularies, [sizes[0], sizes[-1]]):
        if len(vocabulary) < size:
            raise ValueError(f"--vocab={path} has {len(vocabulary)} pieces, the model {size} (dim-vocabs).")
    return renumber(vocabularies[0][:sizes[0]], vocabularies[-1][:sizes[-1]])


def _check_shapes(abstract: nnx.State, params: dict):
    """Raises naming every parameter whose shape is not the one tfx's model has."""
    expected = dict(jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(abstract))[0])
    got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    wrong = [f"{jax.tree_util.keystr(path)}: {getattr(got.get(path), 'shape', None)} for "
             f"{expected.get(path, np.empty(0)).shape if path in expected else None}"
             for path in sorted(set(expected) | set(got), key=str)
             if path not in expected or path not in got or got[path].shape != expected[path].shape]
    if wrong:
        raise ValueError("the Marian parameters do not fit tfx's model: " + "; ".join(wrong[:6]))


@dataclasses.dataclass(frozen=True)
class Imported:
    config: ml_collections.ConfigDict
    notes: list[str]  # what the user should know about the import


def convert(model_path: str, vocab_paths: Sequence[str], source_spm: str, target_spm: str,
            workdir: str, source_lang: str = "src", target_lang: str = "trg") -> Imported:
    """Writes the Marian model as the tfx run directory `workdir` (see the module doc)."""
    rundir.check_new_run(workdir)
    with files.path(model_path).open("rb") as f:
        try:
            model = dict(np.load(f))
        except (ValueError, OSError) as error:
            raise ValueError(f"--model={model_path} is not an .npz file ({error}).") from None
    options = read_options(model, model_path)
    problems = unsupported(options)
    if problems:
        raise ValueError(f"cannot import --model={model_path}: Marian option " + "; ".join(problems) + ".")
    renumbering = _vocabularies(vocab_paths, options)
    weights = Weights(model, model_path)
    if weights.has("Wemb") and not np.array_equal(renumbering.source_ids, renumbering.target_ids):
        raise ValueError(f"--model={model_path} ties source and target embeddings (Wemb) but the "
                         "two --vocab files differ.")
    config = run_config(options, weights, renumbering, workdir, source_lang, target_lang)
    params = marian_params(weights, config.model, renumbering)
    mesh = parallel.make_mesh(config.mesh_shape)
    _, abstract, _ = abstract_params(config, mesh)
    _check_shapes(abstract, params)
    nnx.replace_by_pure_dict(abstract, params)
    notes = []
    if options.get("guided-alignment", "none") not in ("none", "", None):
        notes.append("the model was trained with guided alignment; tfx translates with it as "
                     "any other model but outputs no alignments.")
    with tempfile.TemporaryDirectory() as scratch:
        vocabulary_file = os.path.join(scratch, tokenizer_lib.VOCABULARY_FILE)
        with open(vocabulary_file, "w", encoding="utf-8") as f:
            f.write(renumbering.vocabulary().to_json())
        tokenizer = tokenizer_lib.MappedTokenizer(source_spm, target_spm, vocabulary_file)
        files.path(workdir).mkdir(parents=True, exist_ok=True)
        rundir.write_run(config, mesh, abstract, tokenizer, workdir)
    return Imported(config, notes)


def main():
    """The command line (absl flags, defined here so that importing this module defines none)."""
    from absl import flags

    from tfx.core import cli

    model = flags.DEFINE_string("model", None, "Marian's model.npz (its options inside, special:model.yml).")
    vocab = flags.DEFINE_multi_string("vocab", None, "Marian's vocab.yml: once (joint), or twice "
                                      "(source, then target).")
    source_spm = flags.DEFINE_string("source_spm", None, "The source side's SentencePiece model.")
    target_spm = flags.DEFINE_string("target_spm", None, "The target side's SentencePiece model.")
    workdir = flags.DEFINE_string("workdir", None, "The tfx run directory to write.")
    source_lang = flags.DEFINE_string("source_lang", "src", "config.data.source_lang of the run.")
    target_lang = flags.DEFINE_string("target_lang", "trg", "config.data.target_lang of the run.")
    flags.mark_flags_as_required(["model", "vocab", "source_spm", "target_spm", "workdir"])
    for name in ("source_spm", "target_spm", "source_lang", "target_lang"):
        cli.alias(name.replace("_", "-"), name)

    def command():
        imported = convert(model.value, vocab.value, source_spm.value, target_spm.value,
                           workdir.value, source_lang.value, target_lang.value)
        m = imported.config.model
        print(f"imported {model.value} into {workdir.value}: {m.num_encoder_layers}+"
              f"{m.num_decoder_layers} layers, d={m.emb_dim}, {m.num_heads} heads, "
              f"{m.vocab_size} pieces, {m.activation}, {m.norm_position}-norm")
        for note in imported.notes:
            print(f"note: {note}")
        print(f"translate: python translate.py --workdir {workdir.value} --input FILE --output FILE")
        print(f"fine-tune: python train.py --config configs/opus_mt.py:{workdir.value} "
              f"--config.data.train=text:PREFIX --workdir {workdir.value}-ft")

    cli.run("tfx.convert.marian", command)
