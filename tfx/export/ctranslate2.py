"""Exports a trained run for other inference engines: for now CTranslate2.

    python -m tfx.export ctranslate2 --workdir runs/multi30k --checkpoint average:5 \\
        --output runs/multi30k-ct2 [--quantization int8] [--force]

The output directory is a CTranslate2 model (model.bin, config.json, shared_vocabulary.json)
plus the run's SentencePiece model, `sentencepiece.model`, so it is all that translation needs:

    sp = sentencepiece.SentencePieceProcessor(model_file="runs/multi30k-ct2/sentencepiece.model")
    translator = ctranslate2.Translator("runs/multi30k-ct2", compute_type="int8")
    result = translator.translate_batch([sp.encode(line, out_type=str)], beam_size=4)
    sp.decode(result[0].hypotheses[0])

The run's config goes with them as `tfx_config.json`, whose languages, config.decode, batch size
and lengths `python serve.py --backend ctranslate2 --model DIR` serves the export with.

A run with a mapped tokenizer (an imported model, tfx/data/tokenizer.py) gets its two models,
`source.spm` and `target.spm`, instead: sources are the source model's pieces, outputs decode
with the target model's, and a piece outside the vocabulary reads as <unk>. (tfx also maps a
source piece outside the vocabulary's source ids to <unk>, which CTranslate2 does not.) A
config.data.target_lang_token is not part of the export: put it before each source's pieces.

The mapping is exact: CTranslate2's vocabulary is the tokenizer's pieces in id order, sources
get EOS appended as in tfx, the decoder starts from piece 0 at position 0, and the position
table is tfx's own (learned, or the sinusoids of positions 0..max_len-1), so sequences are
limited to model.max_len tokens as in tfx. Grouped-query key/value heads are repeated into
plain multi-head attention. One difference is deliberate: tfx never generates token 0 (padding
and the start token), and neither does the export, whose output projection has a bias of
NO_TOKEN_BIAS at id 0; CTranslate2's probabilities are therefore tfx's renormalised without
token 0, log p + log(1 / (1 - p(token 0))), which for a trained model is close to tfx's own.
A low-rank model (model.rank_fraction > 0, tfx/lowrank.py) is exported with its factors
multiplied back: CTranslate2 runs it at the full-rank model's size and speed.

With config.decode.shortlist (tfx/data/shortlist.py) the export also holds it as CTranslate2's
vocabulary map, `vmap.txt`: each source piece with its candidate pieces, and the frequent pieces
on the line of the empty key, which `translate_batch(..., use_vmap=True)` turns into each batch's
output vocabulary. CTranslate2 takes all of the batch's candidates, with no cap, and always
allows `<unk>`; tfx takes the `shortlist_size` of highest priority.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx

try:
    from ctranslate2.converters import Converter
    from ctranslate2.specs import common_spec, model_spec, transformer_spec
except ModuleNotFoundError as error:
    raise ModuleNotFoundError(f"tfx.export.ctranslate2 needs CTranslate2 ({error}): pip install 'tfx-mt[export]'.") from None

from tfx.core import files
from tfx.core.config import head_dim
from tfx.data.tokenizer import EOS_ID, JOINT_FILE, PAD_ID, UNK_ID, VOCABULARY_FILE
from tfx.export.layout import SENTENCEPIECE_FILE, TFX_CONFIG_FILE, VOCABULARY_MAP_FILE
from tfx.model import shortlist
from tfx.model.layers import sinusoidal_positions

FORMATS = ("ctranslate2",)
QUANTIZATIONS = tuple(model_spec.ACCEPTED_MODEL_TYPES)  # int8, int8_float32, float32, ...
NO_TOKEN_BIAS = -1e4  # output bias of token 0: never generated; still finite in float16.
ACTIVATIONS = {"relu": common_spec.Activation.RELU,
               "gelu": common_spec.Activation.GELUTanh,  # jax.nn.gelu's default tanh form.
               "swiglu": common_spec.Activation.SWISH,  # silu(x @ wi_gate) * (x @ wi).
               "swish": common_spec.Activation.SWISH,
               "gelu_sigmoid": common_spec.Activation.GELUSigmoid}


def unsupported(model: ml_collections.ConfigDict) -> list[str]:
    """What in `config.model` CTranslate2 cannot represent, one sentence per config key."""
    problems = []
    if model.activation not in ACTIVATIONS:
        problems.append(f"config.model.activation={model.activation!r}: CTranslate2 has no such "
                        f"activation; it runs {', '.join(map(repr, ACTIVATIONS))}.")
    return problems


def ctranslate2_spec(model: ml_collections.ConfigDict, params: nnx.State | Mapping,
                     pieces: Sequence[str]) -> transformer_spec.TransformerSpec:
    """The CTranslate2 Transformer of `config.model` with `params` (the model's parameters, as
    an `nnx.State` or its `nnx.to_pure_dict`) and vocabulary `pieces` (in id order).

    Raises ValueError naming every config key CTranslate2 cannot represent.
    """
    problems = unsupported(model)
    if len(pieces) != model.vocab_size:
        problems.append(f"config.model.vocab_size={model.vocab_size} but the vocabulary has "
                        f"{len(pieces)} pieces.")
    if problems:
        raise ValueError("cannot export to CTranslate2: " + " ".join(problems))
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    p = jax.tree.map(lambda x: np.array(x, np.float32), dict(params))  # copies: CTranslate2 writes.
    pre_norm = model.norm_position == "pre"
    options = dict(pre_norm=pre_norm, activation=ACTIVATIONS[model.activation],
                   ffn_glu=model.activation == "swiglu", rms_norm=model.norm == "rmsnorm",
                   head_dim=head_dim(model), layernorm_embedding=model.embedding_norm)
    encoder = transformer_spec.TransformerEncoderSpec(model.num_encoder_layers, model.num_heads, **options)
    decoder = transformer_spec.TransformerDecoderSpec(model.num_decoder_layers, model.num_heads, **options)

    source_embedding_VxD = p["source_embed"]["embedding"]
    target_embedding_VxD = p["target_embed"]["embedding"] if "target_embed" in p else source_embedding_VxD
    encoder.embeddings[0].weight, decoder.embeddings.weight = source_embedding_VxD, target_embedding_VxD
    for stack, side in ((encoder, "source"), (decoder, "target")):
        stack.scale_embeddings = float(np.sqrt(model.emb_dim)) if model.scale_embeddings else False
        stack.position_encodings.encodings = _position_table(model, p, side)
        if model.embedding_norm:
            _set_norm(stack.layernorm_embedding, p[f"{side}_embed_norm"])
    decoder.start_from_zero_embedding = model.start_from_zero_embedding
    if pre_norm:
        _set_norm(encoder.layer_norm, p["encoder_norm"])
        _set_norm(decoder.layer_norm, p["decoder_norm"])

    for spec, layer in zip(encoder.layer, _layers(p["encoder_layers"], model.num_encoder_layers)):
        _set_norm(spec.self_attention.layer_norm, layer["attention_norm"])
        _set_attention(spec.self_attention, layer["attention"], model, self_attention=True)
        _set_mlp(spec.ffn, layer["mlp_norm"], layer["mlp"])
    for spec, layer in zip(decoder.layer, _layers(p["decoder_layers"], model.num_decoder_layers)):
        _set_norm(spec.self_attention.layer_norm, layer["self_attention_norm"])
        _set_attention(spec.self_attention, layer["self_attention"], model, self_attention=True)
        _set_norm(spec.attention.layer_norm, layer["cross_attention_norm"])
        _set_attention(spec.attention, layer["cross_attention"], model, self_attention=False)
        _set_mlp(spec.ffn, layer["mlp_norm"], layer["mlp"])

    decoder.projection.weight = (target_embedding_VxD if model.logits_via_embedding
                                 else p["logits_projection"].T)
    bias_V = p["logits_bias"] if model.output_bias else np.zeros((model.vocab_size,), np.float32)
    bias_V[PAD_ID] = NO_TOKEN_BIAS
    decoder.projection.bias = bias_V

    spec = transformer_spec.TransformerSpec(encoder, decoder)
    spec.config.layer_norm_epsilon = model.norm_epsilon
    spec.config.unk_token, spec.config.eos_token = pieces[UNK_ID], pieces[EOS_ID]
    spec.config.bos_token = spec.config.decoder_start_token = pieces[PAD_ID]
    spec.config.add_source_eos = True
    spec.register_source_vocabulary(list(pieces))
    spec.register_target_vocabulary(list(pieces))
    return spec


def _layers(tree: Mapping, count: int) -> list[Mapping]:
    """Per-layer parameter trees of an `nnx.List` ({0: ..., 1: ...}) or of stacked layers
    (`model.scan_layers`: every array has a leading layers axis)."""
    if 0 in tree:
        return [tree[i] for i in range(count)]
    return [jax.tree.map(lambda x: x[i], tree) for i in range(count)]


def _position_table(model: ml_collections.ConfigDict, p: Mapping, side: str) -> np.ndarray:
    """[max_len, D] encodings of positions 0..max_len-1 (CTranslate2's own sinusoids start
    at position 1)."""
    if model.positions == "learned":
        return p[f"{side}_positions"]["table"]
    positions_1xL = np.arange(model.max_len)[None, :]
    return np.asarray(sinusoidal_positions(positions_1xL, model.emb_dim)[0], np.float32)


def _set_norm(spec, norm: Mapping):
    spec.gamma = norm["scale"]
    if "bias" in norm:
        spec.beta = norm["bias"]


def _set_attention(spec, attention: Mapping, model: ml_collections.ConfigDict, self_attention: bool):
    """[out, in] weights and, with use_bias, biases; grouped key/value heads repeated so query
    head n reads kv head n // (N / K), as tfx's `Attention` groups them. CTranslate2 fuses
    query, key and value into one linear in self-attention, key and value in cross-attention."""
    groups = model.num_heads // model.num_kv_heads
    weights, biases = {}, {}
    for name, repeat in (("query", 1), ("key", groups), ("value", groups)):
        w_DxNxH = np.repeat(_full(attention[name]), repeat, axis=1)
        weights[name] = w_DxNxH.reshape(w_DxNxH.shape[0], -1).T
        if model.use_bias:
            biases[name] = np.repeat(attention[f"{name}_bias"], repeat, axis=0).reshape(-1)
    out_NxHxD = _full(attention["out"])
    weights["out"] = out_NxHxD.reshape(-1, out_NxHxD.shape[-1]).T
    if model.use_bias:
        biases["out"] = attention["out_bias"]
    fused = ((("query", "key", "value"), ("out",)) if self_attention
             else (("query",), ("key", "value"), ("out",)))
    for linear, names in zip(spec.linear, fused, strict=True):
        linear.weight = np.concatenate([weights[name] for name in names])
        if biases:
            linear.bias = np.concatenate([biases[name] for name in names])


def _set_mlp(spec, norm: Mapping, mlp: Mapping):
    """CTranslate2 applies the activation to `linear_0` and multiplies by `linear_0_noact`."""
    _set_norm(spec.layer_norm, norm)
    mlp = {name: _full(weight) for name, weight in mlp.items()}
    linears = ({"wi_gate": spec.linear_0, "wi": spec.linear_0_noact} if "wi_gate" in mlp
               else {"wi": spec.linear_0})
    for name, linear in {**linears, "wo": spec.linear_1}.items():
        linear.weight = mlp[name].T
        if f"{name}_bias" in mlp:
            linear.bias = mlp[f"{name}_bias"]


def _full(weight) -> np.ndarray:
    """A projection's weight, or the product of its low-rank factors ({"a", "b"}, see
    `layers.LowRank`)."""
    if isinstance(weight, Mapping):
        return np.tensordot(weight["a"], weight["b"], axes=1)
    return weight


class _SpecConverter(Converter):
    """CTranslate2's converter around a ready spec: it validates, quantizes and saves."""

    def __init__(self, spec: model_spec.ModelSpec):
        self._spec = spec

    def _load(self):
        return self._spec


def check_output(output: str, quantization: str, force: bool):
    """Raises for an unknown `quantization`, or an existing `output` without `force`."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"--quantization={quantization!r} is not one of {', '.join(QUANTIZATIONS)}.")
    if files.path(output).exists() and not force:
        raise FileExistsError(f"--output={output} exists; pass --force to replace it.")


def write_ctranslate2(spec: model_spec.ModelSpec, output: str, quantization: str = "float32",
                      force: bool = False, extra: Mapping[str, str] | None = None) -> str:
    """Saves `spec` (its weights stored as `quantization`) and copies of the files `extra`
    ({name: path}) as the directory `output` (local or gs://), which must not exist unless
    `force`; returns its path (absolute if local).

    CTranslate2 validates, quantizes and writes the model into a local temporary directory,
    beside `output` when it is local, then renamed there, so a failed export leaves `output`
    as it was. A gs:// `output` is uploaded from a temporary directory once the model is
    whole: Cloud Storage has no renames, so an upload that fails part way leaves part of
    the files (an export with --force writes them again).
    """
    output = os.fspath(files.path(output))
    check_output(output, quantization, force)
    local = files.is_local(output)
    parent = os.path.dirname(output) if local else None
    if parent:
        os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.", dir=parent)
    try:
        written = _SpecConverter(spec).convert(os.path.join(scratch, "model"), quantization=quantization)
        for name, path in (extra or {}).items():
            files.copy_file(path, os.path.join(written, name))
        if not local:
            if files.path(output).exists():
                files.path(output).rmtree()
            files.copy_tree(written, output)
            return output
        if os.path.exists(output):
            os.replace(output, os.path.join(scratch, "old"))
        os.replace(written, output)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return output


def export_ctranslate2(trained, output: str, quantization: str = "float32", force: bool = False) -> str:
    """Writes `trained` (a `tfx.infer.trained.TrainedModel`) as a CTranslate2 model directory
    `output` with its SentencePiece model(s) and config (see the module doc); returns the directory."""
    check_output(output, quantization, force)
    params = jax.device_get(nnx.to_pure_dict(trained.params))  # whole arrays, off their shards.
    pieces = trained.tokenizer.pieces()
    spec = ctranslate2_spec(trained.config.model, params, pieces)
    extra = {SENTENCEPIECE_FILE if name == JOINT_FILE else name: path  # the vocabulary is the spec's.
             for name, path in trained.tokenizer.files.items() if name != VOCABULARY_FILE}
    with tempfile.TemporaryDirectory() as scratch:
        extra[TFX_CONFIG_FILE] = os.path.join(scratch, TFX_CONFIG_FILE)
        with open(extra[TFX_CONFIG_FILE], "w", encoding="utf-8") as f:
            f.write(trained.config.to_json(indent=2))
        if trained.config.decode.shortlist:
            extra[VOCABULARY_MAP_FILE] = os.path.join(scratch, VOCABULARY_MAP_FILE)
            table = shortlist.load(trained.config.decode.shortlist, trained.config.model.vocab_size)
            write_vocabulary_map(extra[VOCABULARY_MAP_FILE], table, pieces)
        return write_ctranslate2(spec, output, quantization, force, extra)


def write_vocabulary_map(path: str, table: shortlist.Shortlist, pieces: Sequence[str]):
    """CTranslate2's vmap.txt of a shortlist: "<source piece>\t<candidate> <candidate> ...",
    and the tokens in every shortlist under the empty key."""
    lines = ["\t" + " ".join(pieces[i] for i in shortlist.always_listed(table))]
    for source, (candidates_K, probs_K) in enumerate(zip(table.candidates_VxK, table.probs_VxK)):
        if probs_K[0] > 0:
            lines.append(pieces[source] + "\t" + " ".join(pieces[i] for i in candidates_K[probs_K > 0]))
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def main():
    """The command line (absl flags, defined here so that importing tfx.export.ctranslate2 defines none)."""
    from absl import app, flags

    from tfx.core import cli
    from tfx.infer import trained as trained_lib

    shared = cli.define_flags(workdir="The training run's workdir.", checkpoint=True)
    output = flags.DEFINE_string("output", None, "The directory to write (must not exist).")
    quantization = flags.DEFINE_enum("quantization", "float32", QUANTIZATIONS,
                                     "Weight type of the export (int8 quarters the size).")
    force = flags.DEFINE_bool("force", False, "Replace --output if it exists.")
    flags.mark_flag_as_required("output")

    def export(arguments):
        if arguments != ["ctranslate2"]:
            raise app.UsageError(f"give one format, the first argument: {', '.join(FORMATS)} "
                                 f"(got {' '.join(arguments) or 'none'}).")
        config = shared.run_config()
        # What can be refused is refused before the checkpoint is loaded.
        check_output(output.value, quantization.value, force.value)
        problems = unsupported(config.model)
        if problems:
            raise ValueError("cannot export to CTranslate2: " + " ".join(problems))
        model = trained_lib.load(config, shared.workdir.value, shared.checkpoint.value)
        written = export_ctranslate2(model, output.value, quantization.value, force.value)
        print(f"exported {shared.workdir.value} ({model.label}) to {written} as CTranslate2 "
              f"{quantization.value}")

    cli.run("tfx.export.ctranslate2", export, arguments=True)


if __name__ == "__main__":
    main()
