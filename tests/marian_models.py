"""Tiny random Marian (OPUS-MT) models in Marian's own file format, and CTranslate2's reading of them.

`write_marian_model` writes what an OPUS-MT download holds: `model.npz` (parameters under Marian's
names, its options as YAML bytes under `special:model.yml`), the vocabulary YAML file(s), the
SentencePiece models `source.spm` / `target.spm` and a `decoder.yml`. The weights are random, except
that `</s>` reads a position signal so that greedy translations of random sources end
(`_make_translations_end`).

`ctranslate2_marian` converts such a model with CTranslate2's own Marian converter, corrected where
that converter departs from Marian (see `MarianConverterAsMarian`): the independent answer that the
tests of tfx's Marian importer compare with.

Marian's names and shapes (src/models/transformer.h, src/layers): per layer
`{encoder,decoder}_l{i}_{self,context}_{Wq,Wk,Wv,Wo}` [D, D] and `_{bq,bk,bv,bo}` [1, D];
`..._ffn_W1` [D, F], `_b1` [1, F], `_W2` [F, D], `_b2` [1, D]; layer norms `<prefix>_ln_scale` /
`_ln_bias` [1, D] after a block (post-norm, prefixes `..._self_Wo`, `..._context_Wo`,
`..._ffn_ffn`) or with the suffix `_pre` before it (pre-norm); `{encoder,decoder}_emb_ln_*_pre`
for an embedding layer norm; `{encoder,decoder}_top_ln_*` after the stack (pre-norm). Layers count
from 1. Embeddings `Wemb` [V, D] when shared by encoder and decoder, else `encoder_Wemb` and
`decoder_Wemb`; the output layer is `decoder_ff_logit_out_b` [1, V] and, only when it is not tied
to an embedding, `decoder_ff_logit_out_W` [D, V]. Learned positions are one `Wpos`
[max-length, D] shared by encoder and decoder.
"""
import dataclasses
import os

import numpy as np
import sentencepiece as spm
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MULTI30K = os.path.join(ROOT, "data", "multi30k-en-de")

DIM, HEADS, FFN, DEPTH = 32, 4, 64, 2
MAX_LENGTH = 256
SOURCE_SPM_SIZE, TARGET_SPM_SIZE = 200, 220
SPM_LINES = 500
LANGUAGE_TOKENS = (">>deu<<", ">>fra<<")
EOS, UNK = "</s>", "<unk>"
CONTEXT_QK_GAIN = 3.0  # see _random_parameters
# How random models are made to end (see _make_translations_end): the output bias of </s> (id 0),
# the weight its output vector gives the position features below, and those features (for
# D = 32: sin and cos of the sinusoids whose phase p * w_k moves steadily over steps 0-25).
EOS_BIAS = 4.0
EOS_WEIGHT = 16.0
_COUNTER_SIN = [4, 5, 6, 7]
_COUNTER_COS = [DIM // 2 + k for k in (4, 5, 6)]

# Options every variant shares: a Marian v1.11 model.yml of a transformer, with the leftovers of
# other model types (RNN cells, AAN, BERT, ULR) that real files carry and an importer must ignore.
_BASE_OPTIONS = {
    "bert-class-symbol": "[CLS]",
    "bert-mask-symbol": "[MASK]",
    "bert-masking-fraction": 0.15,
    "bert-sep-symbol": "[SEP]",
    "bert-train-type-embeddings": True,
    "bert-type-vocab-size": 2,
    "build-info": "",
    "dec-cell": "gru",
    "dec-cell-base-depth": 2,
    "dec-cell-high-depth": 1,
    "dec-depth": DEPTH,
    "dim-emb": DIM,
    "dim-rnn": 1024,
    "enc-cell": "gru",
    "enc-cell-depth": 1,
    "enc-depth": DEPTH,
    "enc-type": "bidirectional",
    "factors-combine": "sum",
    "factors-dim-emb": 0,
    "guided-alignment": "none",
    "input-types": [],
    "layer-normalization": False,
    "lemma-dim-emb": 0,
    "max-length": MAX_LENGTH,
    "output-omit-bias": False,
    "right-left": False,
    "skip": False,
    "tied-embeddings": False,
    "tied-embeddings-all": False,
    "tied-embeddings-src": False,
    "transformer-aan-activation": "swish",
    "transformer-aan-depth": 2,
    "transformer-aan-nogate": False,
    "transformer-decoder-autoreg": "self-attention",
    "transformer-depth-scaling": False,
    "transformer-dim-aan": 2048,
    "transformer-dim-ffn": FFN,
    "transformer-ffn-activation": "swish",
    "transformer-ffn-depth": 2,
    "transformer-guided-alignment-layer": "last",
    "transformer-heads": HEADS,
    "transformer-no-projection": False,
    "transformer-pool": False,
    "transformer-postprocess": "dan",
    "transformer-postprocess-emb": "d",
    "transformer-postprocess-top": "",
    "transformer-preprocess": "",
    "transformer-tied-layers": [],
    "transformer-train-position-embeddings": False,
    "type": "transformer",
    "ulr": False,
    "ulr-dim-emb": 0,
    "ulr-trainable-transformation": False,
    "version": "v1.11.0 f00d0621 2022-02-08 08:39:24 -0800",
}
_POST_NORM = {"transformer-preprocess": "", "transformer-postprocess": "dan",
              "transformer-postprocess-top": ""}
_PRE_NORM = {"transformer-preprocess": "n", "transformer-postprocess": "da",
             "transformer-postprocess-top": "n"}

# The options that make each variant (merged over _BASE_OPTIONS; dim-vocabs comes from the vocab).
VARIANTS = {
    # The classic OPUS-MT model: post-norm, one Wemb for source, target and output.
    "post_relu_tied": {**_POST_NORM, "transformer-ffn-activation": "relu",
                       "transformer-postprocess-emb": "d", "tied-embeddings-all": True},
    # Pre-norm with final ("top") norms and a layer norm on the embeddings.
    "pre_swish_embnorm": {**_PRE_NORM, "transformer-ffn-activation": "swish",
                          "transformer-postprocess-emb": "nd", "tied-embeddings-all": True},
    # Nothing tied: encoder_Wemb, decoder_Wemb and decoder_ff_logit_out_W over one joint vocab.
    "pre_gelu_untied": {**_PRE_NORM, "transformer-ffn-activation": "gelu",
                        "transformer-postprocess-emb": "d"},
    # Source and target vocabularies of their own, the output tied to decoder_Wemb, learned positions.
    # Marian's sequence-to-sequence transformer (src/models/transformer.h, addSpecialEmbeddings)
    # reads the option `transformer-train-positions`, not the command-line name
    # `transformer-train-position-embeddings` (only BERT and the new layers read that one), so a
    # model that Marian itself runs with Wpos carries both.
    "post_swish_two_vocabs_wpos": {**_POST_NORM, "transformer-ffn-activation": "swish",
                                   "transformer-postprocess-emb": "d", "tied-embeddings": True,
                                   "transformer-train-position-embeddings": True,
                                   "transformer-train-positions": True},
}
_SEPARATE_VOCABS = {"post_swish_two_vocabs_wpos"}
_LEFT_OUT = 3  # real pieces of each SentencePiece model missing from the vocabulary (-> <unk>)


@dataclasses.dataclass(frozen=True)
class MarianFiles:
    """A Marian model directory as OPUS-MT ships it. `vocabs` holds one joint vocabulary, or the
    source and the target vocabulary; `options` is what `special:model.yml` holds."""
    directory: str
    model: str
    vocabs: list[str]
    source_spm: str
    target_spm: str
    decoder_yml: str
    variant: str
    options: dict


def write_marian_model(directory: str, variant: str, seed: int = 0) -> MarianFiles:
    """Trains the two SentencePiece models, writes the vocabularies and a random `variant` model."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown Marian variant {variant!r}; choose one of {sorted(VARIANTS)}")
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    source_spm = _train_spm(os.path.join(directory, "source.spm"), "en", SOURCE_SPM_SIZE)
    target_spm = _train_spm(os.path.join(directory, "target.spm"), "de", TARGET_SPM_SIZE)
    source_pieces, target_pieces = _spm_pieces(source_spm), _spm_pieces(target_spm)
    if variant in _SEPARATE_VOCABS:
        vocabs = {"vocab.src.yml": [EOS, UNK, *_leave_out(source_pieces, rng)],
                  "vocab.trg.yml": [EOS, UNK, *_leave_out(target_pieces, rng)]}
    else:
        joint = source_pieces + [p for p in target_pieces if p not in set(source_pieces)]
        vocabs = {"vocab.yml": [EOS, UNK, *LANGUAGE_TOKENS, *_leave_out(joint, rng)]}
    vocab_paths = []
    for name, pieces in vocabs.items():
        vocab_paths.append(os.path.join(directory, name))
        with open(vocab_paths[-1], "w", encoding="utf-8") as f:
            f.writelines(f"{_yaml_scalar(piece)}: {i}\n" for i, piece in enumerate(pieces))
    sizes = [len(pieces) for pieces in vocabs.values()]
    options = {**_BASE_OPTIONS, **VARIANTS[variant], "dim-vocabs": [sizes[0], sizes[-1]]}

    params = _random_parameters(options, rng)
    text = _yaml_document(options).encode("utf-8") + b"\0"
    params["special:model.yml"] = np.frombuffer(text, dtype=np.int8)
    model = os.path.join(directory, "model.npz")
    np.savez(model, **params)

    decoder_yml = os.path.join(directory, "decoder.yml")
    names = [os.path.basename(p) for p in vocab_paths]
    with open(decoder_yml, "w", encoding="utf-8") as f:
        f.write(_yaml_document({
            "relative-paths": True, "models": ["model.npz"], "vocabs": [names[0], names[-1]],
            "beam-size": 6, "normalize": 0.6, "word-penalty": 0, "mini-batch": 16,
            "maxi-batch": 100, "maxi-batch-sort": "src"}))
    return MarianFiles(directory, model, vocab_paths, source_spm, target_spm, decoder_yml,
                       variant, options)


def read_vocab(path: str) -> list[str]:
    """A Marian vocabulary file's pieces in id order, read as YAML with every scalar a string."""
    with open(path, encoding="utf-8") as f:
        ids = yaml.load(f, Loader=yaml.BaseLoader)
    return [piece for piece, _ in sorted(ids.items(), key=lambda item: int(item[1]))]


def random_sources(files: MarianFiles, count: int, seed: int) -> list[list[str]]:
    """`count` random source piece sequences of 1-12 pieces, from the source vocabulary without
    </s>, <unk> and the language tokens."""
    pieces = [p for p in read_vocab(files.vocabs[0]) if p not in (EOS, UNK, *LANGUAGE_TOKENS)]
    rng = np.random.default_rng(seed)
    return [[pieces[i] for i in rng.integers(0, len(pieces), rng.integers(1, 13))]
            for _ in range(count)]


def marian_sinusoids(length: int, dim: int) -> np.ndarray:
    """Marian's sinusoidal positions [length, dim] (src/graph/node_initializers.cpp,
    sinusoidalPositionEmbeddings), in float32 as Marian computes them: for position p and
    k = i mod dim/2, v = p * exp(-k * log(10000) / (dim/2 - 1)); sin(v) in the first half of the
    features, cos(v) in the second. The last timescale is exactly 1/10000."""
    half = dim // 2
    increment = np.float32(np.log(np.float32(10000.0)) / np.float32(half - 1))
    inverse = np.exp(np.arange(half, dtype=np.float32) * -increment)
    v = np.arange(length, dtype=np.float32)[:, None] * inverse[None, :]
    return np.concatenate([np.sin(v), np.cos(v)], axis=1).astype(np.float32)


def ctranslate2_converter(files: MarianFiles):
    """CTranslate2's MarianConverter for `files`, corrected where it departs from Marian (below).
    CTranslate2 is imported here, so that this module imports where it is not installed."""
    from ctranslate2.converters import marian

    class MarianConverterAsMarian(marian.MarianConverter):
        """CTranslate2's MarianConverter, with its spec corrected where it departs from Marian:

        (a) Positions: the converter builds its sinusoids with timescales 10000^(2*(i//2)/dim), while
            Marian (src/tensors/cpu/tensor_operators.cpp and src/graph/node_initializers.cpp,
            SinusoidalPositionEmbeddings) uses exp(-k*log(10000)/(dim/2 - 1)) for k = i mod dim/2,
            sin in the first half of the features and cos in the second (`marian_sinusoids`).
            Replaced for encoder and decoder, 512 rows, when the model has no Wpos.
        (b) Layer norm epsilon: Marian normalises with 1e-6 (src/models/transformer.h layerNorm ->
            marian::layerNorm(x, scale, bias, 1e-6f)); CTranslate2's default is 1e-5.
        (c) With learned positions (Wpos), Marian adds them to the embeddings without the
            sqrt(dim) scale it applies before sinusoids (transformer.h addPositionalEmbeddings;
            also the new layers' LearnedPositionEmbedding); CTranslate2 always scales, so
            scale_embeddings is turned off for such models. Not copied: Marian's legacy decoder
            adds Wpos row 0 at every incremental step (its Wpos branch ignores `start`), a bug
            of its inference that training never sees.
        """

        def _load(self):
            spec = super()._load()
            spec.config.layer_norm_epsilon = 1e-6
            if "Wpos" in np.load(self._model_path):
                spec.encoder.scale_embeddings = False
                spec.decoder.scale_embeddings = False
            else:
                dim = spec.encoder.embeddings[0].weight.shape[1]
                table = marian_sinusoids(512, dim)
                spec.encoder.position_encodings.encodings = table
                spec.decoder.position_encodings.encodings = table
            return spec

    return MarianConverterAsMarian(files.model, files.vocabs)


def ctranslate2_marian(files: MarianFiles, output_dir: str) -> str:
    """Converts the model with `ctranslate2_converter`; returns output_dir, a CTranslate2 model."""
    return ctranslate2_converter(files).convert(output_dir, force=True)


def _train_spm(path: str, language: str, vocab_size: int) -> str:
    with open(os.path.join(MULTI30K, f"train.{language}"), encoding="utf-8") as f:
        lines = [next(f).rstrip("\n") for _ in range(SPM_LINES)]
    prefix = path + ".tmp"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, num_threads=1, minloglevel=2)
    os.replace(prefix + ".model", path)
    os.remove(prefix + ".vocab")
    return path


def _spm_pieces(path: str) -> list[str]:
    """The model's real pieces in id order (without its <unk>, <s>, </s>)."""
    sp = spm.SentencePieceProcessor(model_file=path)
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size())
            if not (sp.is_unknown(i) or sp.is_control(i))]


def _leave_out(pieces: list[str], rng: np.random.Generator) -> list[str]:
    """`pieces` without _LEFT_OUT random word-initial pieces, so some spm pieces map to <unk>."""
    candidates = [p for p in pieces if p.startswith("\u2581") and len(p) > 2]
    dropped = set(rng.choice(candidates, _LEFT_OUT, replace=False).tolist())
    return [p for p in pieces if p not in dropped]


def _yaml_scalar(text) -> str:
    """A scalar as yaml-cpp (Marian's YAML writer) emits it: plain where that is valid YAML, else
    double-quoted with \\ and \" escaped. Numbers-as-text such as `5` stay plain, as in Marian's
    vocabularies, so a YAML reader that resolves types reads them as ints."""
    if isinstance(text, bool):
        return "true" if text else "false"
    if not isinstance(text, str):
        return str(text)
    plain = not (
        text in ("", "~", "null", "Null", "NULL")
        or text[0] in ",[]{}#&*!|>'\"%@`"
        or (text[0] in "-?:" and (len(text) == 1 or text[1] == " "))
        or text.endswith((" ", ":")) or ": " in text or " #" in text
        or any(ord(c) < 0x20 or c == "\x7f" for c in text))
    if plain:
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _yaml_document(options: dict) -> str:
    """Options as Marian writes model.yml: keys sorted, lists as block sequences, `[]` if empty."""
    lines = []
    for key in sorted(options):
        value = options[key]
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines.extend([f"  - {_yaml_scalar(v)}" for v in value] or ["  []"])
        else:
            lines.append(f"{key}: {_yaml_scalar(value)}")
    return "\n".join(lines) + "\n"


def _random_parameters(options: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random float32 parameters under Marian's names for `options`. Matrices N(0, 1/fan_in),
    embeddings N(0, 1/D) (Marian scales them by sqrt(D)), layer-norm scales 1 + N(0, 0.01) and all
    biases N(0, 0.01), so that a scale taken for a bias or one norm taken for another shows. The
    cross-attention queries and keys are CONTEXT_QK_GAIN times larger: near-uniform attention
    would average the source away, and translations would hardly depend on it."""
    d, f = options["dim-emb"], options["transformer-dim-ffn"]
    source_size, target_size = options["dim-vocabs"]
    norm_suffix = "_pre" if "n" in options["transformer-preprocess"] else ""
    params = {}

    def matrix(name, rows, cols, std=None):
        params[name] = rng.normal(0.0, std or rows ** -0.5, (rows, cols))

    def bias(name, size):
        params[name] = rng.normal(0.0, 0.1, (1, size))

    def norm(prefix, suffix):
        params[f"{prefix}_ln_scale{suffix}"] = 1.0 + rng.normal(0.0, 0.1, (1, d))
        params[f"{prefix}_ln_bias{suffix}"] = rng.normal(0.0, 0.1, (1, d))

    def attention(prefix):
        for x in "qkvo":
            sharp = prefix.endswith("_context") and x in "qk"
            matrix(f"{prefix}_W{x}", d, d, std=CONTEXT_QK_GAIN * d ** -0.5 if sharp else None)
            bias(f"{prefix}_b{x}", d)
        norm(f"{prefix}_Wo", norm_suffix)

    def ffn(prefix):
        matrix(f"{prefix}_W1", d, f)
        bias(f"{prefix}_b1", f)
        matrix(f"{prefix}_W2", f, d)
        bias(f"{prefix}_b2", d)
        norm(f"{prefix}_ffn", norm_suffix)

    if options["tied-embeddings-all"] or options["tied-embeddings-src"]:
        matrix("Wemb", target_size, d, std=d ** -0.5)
    else:
        matrix("encoder_Wemb", source_size, d, std=d ** -0.5)
        matrix("decoder_Wemb", target_size, d, std=d ** -0.5)
    if options["transformer-train-position-embeddings"]:
        matrix("Wpos", options["max-length"], d, std=d ** -0.5)
    for stack, depth in (("encoder", options["enc-depth"]), ("decoder", options["dec-depth"])):
        if "n" in options["transformer-postprocess-emb"]:
            norm(f"{stack}_emb", "_pre")
        for i in range(1, depth + 1):
            attention(f"{stack}_l{i}_self")
            if stack == "decoder":
                attention(f"{stack}_l{i}_context")
            ffn(f"{stack}_l{i}_ffn")
        if "n" in options["transformer-postprocess-top"]:
            norm(f"{stack}_top", "")
    if not (options["tied-embeddings"] or options["tied-embeddings-all"]):
        matrix("decoder_ff_logit_out_W", d, target_size)
    bias("decoder_ff_logit_out_b", target_size)
    _make_translations_end(params, options)
    return {name: value.astype(np.float32) for name, value in sorted(params.items())}


def _make_translations_end(params: dict[str, np.ndarray], options: dict) -> None:
    """Makes greedy translations of random sources end after about 10-25 tokens, in place.

    A random decoder falls into repeating one token, and a raised </s> bias alone either never
    beats it or beats it at the first step. Instead the logit of </s> rises with the decoding step:
    a few position features (`_COUNTER_*`, sinusoids that move steadily over the first 25 steps)
    reach the output unmixed, because the target embedding is zero there and the decoder's blocks
    and layer-norm biases never write there (columns of Wo, bo, W2, b2 and ln_bias are zero), and
    the output vector of </s> reads only them (+EOS_WEIGHT on the sin features, -EOS_WEIGHT on the
    cos ones). With learned positions, Wpos carries the same sinusoids in those features. Every
    other weight stays random, and the mechanism uses nothing but Marian's ordinary parameters.
    """
    counter = _COUNTER_SIN + _COUNTER_COS
    reads = np.zeros(options["dim-emb"])
    reads[_COUNTER_SIN], reads[_COUNTER_COS] = EOS_WEIGHT, -EOS_WEIGHT
    target_embedding = "Wemb" if "Wemb" in params else "decoder_Wemb"
    params[target_embedding][:, counter] = 0.0
    for name, value in params.items():
        if name.startswith("decoder_") and (name.endswith(("_Wo", "_bo", "_W2", "_b2"))
                                            or "_ln_bias" in name):
            value[:, counter] = 0.0
    if "Wpos" in params:
        params["Wpos"][:, counter] = marian_sinusoids(len(params["Wpos"]), options["dim-emb"])[:, counter]
    if "decoder_ff_logit_out_W" in params:
        params["decoder_ff_logit_out_W"][:, 0] = reads
    else:
        params[target_embedding][0] = reads
    params["decoder_ff_logit_out_b"][0, 0] += EOS_BIAS
