"""The CTranslate2 export computes what tfx computes: the same log-probabilities for every
architecture variant it accepts, and on a trained model the same greedy and beam translations."""
import dataclasses
import os
import subprocess
import sys

import ctranslate2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tfx.compress import shortlist as shortlist_tool
from tfx.core import precision
from tfx.data.tokenizer import EOS_ID, UNK_ID
from tfx.export import ctranslate2 as export
from tfx.infer import trained
from tfx.model import decode, shortlist
from tfx.model.transformer import EncoderDecoder
from tfx.train import rundir, steps

from conftest import random_batch
from runs import ROOT

DATA = os.path.join(ROOT, "data", "multi30k-en-de")
TEST_SOURCES = os.path.join(DATA, "test_2016_flickr.en")
TEST_TARGETS = os.path.join(DATA, "test_2016_flickr.de")
NUM_SENTENCES = 64


@pytest.fixture(scope="module")
def run(converged, tmp_path_factory):
    """The session's converged tiny model (conftest.py), its float32 export, and the first
    NUM_SENTENCES test sources as ids (with EOS)."""
    config, workdir = converged
    model = trained.load(config, workdir)
    output = export.export_ctranslate2(model, str(tmp_path_factory.mktemp("ct2") / "float32"))
    with open(TEST_SOURCES, encoding="utf-8") as f:
        sources = [model.tokenizer.encode_source(line.rstrip("\n")) for line in f][:NUM_SENTENCES]
    return model, workdir, output, sources


def padded(rows: list[list[int]]) -> np.ndarray:
    """Right-padded int32, a multiple of the 8 data-parallel devices of rows."""
    out = np.zeros((-(-len(rows) // 8) * 8, max(map(len, rows))), np.int32)
    for row, ids in enumerate(rows):
        out[row, :len(ids)] = ids
    return out


def tfx_translate(model: rundir.TrainedModel, sources: list[list[int]], prefixes=None, **options) -> list[list[int]]:
    """tfx's translations (ids before EOS) of `sources` (forced to begin with `prefixes`), with
    config.decode `options`, capped for the batch alone (`output_limit`; CTranslate2 has no
    per-sentence cap: max_len_a/b off)."""
    translate = decode.make_translate(model.config, model.graphdef, model.mesh, model.params_shardings,
                                      **{"max_len_a": 0.0, "max_len_b": 0, **options})
    prefix_BxP = None if prefixes is None else padded(prefixes)
    tokens_BxT = np.asarray(translate(model.params, padded(sources), None, prefix_BxP))[:len(sources)].tolist()
    return [row[:row.index(EOS_ID)] for row in tokens_BxT]


def output_limit(model: rundir.TrainedModel, sources: list[list[int]]) -> int:
    """Tokens tfx may generate for `sources` before the last step, which only allows EOS."""
    return min(max(map(len, sources)) + model.config.decode.max_length_offset, model.config.model.max_len) - 1


def has_vnni() -> bool:
    """Whether the CPU has VNNI (AVX512-VNNI or AVX-VNNI), on which CTranslate2's int8 greedy
    outputs of the test model mostly match float32's; True where /proc/cpuinfo has no flags."""
    flags = precision.cpu_info().get("flags")
    return flags is None or bool(set(flags.split()) & {"avx512_vnni", "avx_vnni"})


def ct2_translate(translator, model: rundir.TrainedModel, sources: list[list[int]],
                  beam_size: int, **options) -> list[list[int]]:
    """CTranslate2's translations (ids) of `sources` as tfx decodes them: EOS allowed from the
    first step, no length penalty, at most `output_limit` tokens before EOS."""
    pieces = model.tokenizer.pieces()
    ids_of = {piece: i for i, piece in enumerate(pieces)}
    source_pieces = [[pieces[i] for i in ids[:-1]] for ids in sources]  # EOS: the export adds it.
    results = translator.translate_batch(source_pieces, beam_size=beam_size, length_penalty=0.0,
                                         min_decoding_length=0,
                                         max_decoding_length=output_limit(model, sources), **options)
    return [[ids_of[p] for p in result.hypotheses[0]] for result in results]


def test_greedy_translations_are_token_identical(run):
    model, _, output, sources = run
    translator = ctranslate2.Translator(output, device="cpu", compute_type="float32")
    expected = tfx_translate(model, sources, strategy="greedy")
    got = ct2_translate(translator, model, sources, beam_size=1)
    limit = output_limit(model, sources)
    ended = sum(len(ids) < limit for ids in expected)
    assert ended >= 50, f"only {ended} of {len(sources)} translations end before the limit: train more"
    identical = sum(e == g for e, g in zip(expected, got))
    assert identical == len(sources), f"{identical} of {len(sources)} greedy translations are identical"


def test_forced_prefixes_decode_as_ctranslate2_target_prefix(run):
    """Each test sentence forced to begin with the first 0 to 3 tokens of its reference."""
    model, _, output, sources = run
    translator = ctranslate2.Translator(output, device="cpu", compute_type="float32")
    with open(TEST_TARGETS, encoding="utf-8") as f:
        references = [line.rstrip("\n") for line in f][:NUM_SENTENCES]
    prefixes = [model.tokenizer.encode_target(text)[:-1][:i % 4] for i, text in enumerate(references)]
    expected = tfx_translate(model, sources, prefixes, strategy="greedy")
    pieces = model.tokenizer.pieces()
    got = ct2_translate(translator, model, sources, beam_size=1,
                        target_prefix=[[pieces[i] for i in prefix] for prefix in prefixes])
    assert all(e[:len(p)] == p for e, p in zip(expected, prefixes))
    identical = sum(e == g for e, g in zip(expected, got))
    assert identical == len(sources), f"{identical} of {len(sources)} forced translations are identical"
    unforced = tfx_translate(model, sources, strategy="greedy")
    assert sum(e != u for e, u in zip(expected, unforced)) >= 10  # the prefixes changed outputs.


def test_beam_translations_agree(run):
    """Beam 4 without length penalty (the two penalties differ). The searches differ in when
    they stop (tfx's when no unfinished hypothesis can beat its 4 finished ones; CTranslate2's
    when the best one has finished, which without a penalty cannot be beaten) and in
    CTranslate2's renormalisation without token 0, which can reorder close hypotheses."""
    model, _, output, sources = run
    translator = ctranslate2.Translator(output, device="cpu", compute_type="float32")
    expected = tfx_translate(model, sources, strategy="beam", beam_size=4, length_penalty=0.0)
    got = ct2_translate(translator, model, sources, beam_size=4)
    agree = sum(e == g for e, g in zip(expected, got))
    assert agree >= 0.95 * len(sources), f"{agree} of {len(sources)} beam translations agree"


def test_scores_match_tfx_scoring(run):
    """CTranslate2's sum of log p (EOS included) equals tfx's to 1e-3 per token; the difference
    is the renormalisation without token 0 (see tfx.export.ctranslate2), so CTranslate2's is never lower."""
    model, _, output, sources = run
    targets = [ids + [EOS_ID] for ids in tfx_translate(model, sources, strategy="greedy")]
    batch = {}
    for name, rows in (("inputs", sources), ("targets", targets)):
        batch[name] = np.zeros((len(rows), max(map(len, rows))), np.int32)
        for row, ids in enumerate(rows):
            batch[name][row, :len(ids)] = ids
    score = steps.make_score_step(model.config, model.graphdef, model.mesh, model.params_shardings)
    log_prob_B, tokens_B = (np.asarray(x) for x in score(model.params, batch))

    processor = model.tokenizer.processor
    translator = ctranslate2.Translator(output, device="cpu", compute_type="float32")
    results = translator.score_batch([[processor.id_to_piece(i) for i in ids[:-1]] for ids in sources],
                                     [[processor.id_to_piece(i) for i in ids[:-1]] for ids in targets])
    got_B = np.array([sum(result.log_probs) for result in results])
    assert [len(result.log_probs) for result in results] == tokens_B.tolist()
    per_token_B = (got_B - log_prob_B) / tokens_B
    assert np.all(per_token_B > -1e-5) and np.max(per_token_B) < 1e-3, per_token_B


def test_the_exported_vocabulary_map_gives_ctranslate2_the_shortlist_tfx_decodes_over(run, tmp_path):
    """A shortlist learned from 3,000 training pairs, with <unk> (which CTranslate2 always allows)
    among the frequent tokens, and shortlist_size the number of tokens listed for the batch:
    CTranslate2 with the export's vmap.txt and tfx decode over the same tokens, so their greedy
    translations are token-identical."""
    model, _, _, sources = run
    with open(f"{DATA}/train.en", encoding="utf-8") as en, open(f"{DATA}/train.de", encoding="utf-8") as de:
        pairs = [(model.tokenizer.encode_source(s)[:-1], model.tokenizer.encode_target(t)[:-1])
                 for s, t, _ in zip(en, de, range(3000))]
    candidates, probs, counts = shortlist_tool.learn(pairs, model.config.model.vocab_size, per_token=5)
    counts[UNK_ID] = counts.max() + 1
    path = str(tmp_path / "shortlist.npz")
    shortlist.save(path, candidates, probs, counts, 20, model.tokenizer.fingerprint)
    table = shortlist.load(path, model.config.model.vocab_size)
    listed = set(shortlist.always_listed(table)) | {
        int(c) for ids in sources for c, p in zip(candidates[ids].ravel(), probs[ids].ravel()) if p > 0}
    assert UNK_ID in listed and len(listed) < model.config.model.vocab_size - 100

    config = model.config.copy_and_resolve_references()
    config.decode.shortlist = path
    output = export.export_ctranslate2(dataclasses.replace(model, config=config), str(tmp_path / "ct2"))
    translator = ctranslate2.Translator(output, device="cpu", compute_type="float32")
    got = ct2_translate(translator, model, sources, beam_size=1, use_vmap=True)
    expected = tfx_translate(model, sources, strategy="greedy", shortlist=path, shortlist_size=len(listed))
    assert {token for ids in got for token in ids} <= listed
    unlisted = ct2_translate(translator, model, sources, beam_size=1)
    assert sum(g != u for g, u in zip(got, unlisted)) >= 2, "the shortlist should change some translations"
    identical = sum(e == g for e, g in zip(expected, got))
    assert identical == len(sources), f"{identical} of {len(sources)} greedy translations are identical"


VARIANTS = {
    "gqa": dict(num_kv_heads=2),  # tiny_config's 4 query heads share 2 key/value heads.
    "learned_positions": dict(positions="learned"),
    "rmsnorm": dict(norm="rmsnorm", norm_epsilon=0.1),  # a large epsilon shows it is honoured.
    "layernorm_epsilon": dict(norm_epsilon=0.1),
    "post_norm": dict(norm_position="post"),
    "swiglu": dict(activation="swiglu"),
    "gelu": dict(activation="gelu"),
    "head_dim": dict(head_dim=16),  # not emb_dim / num_heads = 8.
    "untied_output": dict(logits_via_embedding=False),
    "unshared_embeddings": dict(share_embeddings=False, logits_via_embedding=False),
    "scan_layers": dict(scan_layers=True),
    "low_rank": dict(rank_fraction=0.5, activation="swiglu", scan_layers=True),  # factors multiplied back.
    "swish": dict(activation="swish"),
    "gelu_sigmoid": dict(activation="gelu_sigmoid"),
    "biases": dict(use_bias=True),  # with tiny_config's GQA: kv biases repeated like the weights.
    "output_bias": dict(output_bias=True),
    "embedding_norm": dict(embedding_norm=True),
    "unscaled_embeddings": dict(scale_embeddings=False),
    "zero_start": dict(start_from_zero_embedding=True),
    "marian_post": dict(norm_position="post", activation="swish", use_bias=True, output_bias=True,
                        start_from_zero_embedding=True),
    "marian_pre": dict(activation="gelu_sigmoid", use_bias=True, output_bias=True, embedding_norm=True,
                       start_from_zero_embedding=True, share_embeddings=False, logits_via_embedding=False),
}
PIECES = ["<pad>", "</s>", "<unk>"] + [f"piece{i}" for i in range(3, 50)]


def random_model(config) -> nnx.Module:
    """The config's model with every parameter moved off its initial value (norm scales 1 and
    biases 0 would hide a mix-up)."""
    graphdef, params = nnx.split(EncoderDecoder(config.model, nnx.Rngs(params=0)))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    noisy = [x + 0.2 * jax.random.normal(key, x.shape) for x, key in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, noisy))


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_computes_tfx_log_probs(variant, tiny_config, tmp_path):
    """Per-token log p of teacher-forced targets, tfx's renormalised without token 0 (what the
    export computes by design), on random weights and sentences of different lengths."""
    config = tiny_config(model=VARIANTS[variant])
    model = random_model(config)
    batch = random_batch(0, 5, 9, 7, config.model.vocab_size)
    sources, targets = ([[*row[row > 0].tolist(), EOS_ID] for row in batch[name]]
                        for name in ("inputs", "targets"))
    padded = {}
    for name, rows in (("inputs", sources), ("targets", targets)):
        padded[name] = np.zeros((len(rows), max(map(len, rows))), np.int32)
        for row, ids in enumerate(rows):
            padded[name][row, :len(ids)] = ids
    logits_BxTxV = model(jnp.asarray(padded["inputs"]), jnp.asarray(padded["targets"]))
    log_probs_BxTxV = jax.nn.log_softmax(logits_BxTxV.at[..., 0].set(-jnp.inf))
    expected_BxT = np.take_along_axis(np.asarray(log_probs_BxTxV), padded["targets"][..., None], -1)[..., 0]

    spec = export.ctranslate2_spec(config.model, nnx.state(model), PIECES)
    translator = ctranslate2.Translator(export.write_ctranslate2(spec, str(tmp_path / "model")),
                                        device="cpu", compute_type="float32")
    results = translator.score_batch([[PIECES[i] for i in ids[:-1]] for ids in sources],
                                     [[PIECES[i] for i in ids[:-1]] for ids in targets])
    for row, result in enumerate(results):
        np.testing.assert_allclose(result.log_probs, expected_BxT[row, :len(targets[row])], atol=1e-4)


def test_unrepresentable_configs_are_refused_naming_every_key(tiny_config):
    config = tiny_config(model=dict(activation="squared_relu"))
    params = nnx.to_pure_dict(nnx.state(EncoderDecoder(config.model, nnx.Rngs(params=0))))
    with pytest.raises(ValueError, match=r"config\.model\.activation='squared_relu'.*"
                                         r"config\.model\.vocab_size=50 but the vocabulary has 49"):
        export.ctranslate2_spec(config.model, params, PIECES[:-1])


def test_an_existing_output_is_kept_unless_forced_and_a_failed_export_leaves_nothing(tiny_config, tmp_path):
    config = tiny_config()
    params = nnx.to_pure_dict(nnx.state(EncoderDecoder(config.model, nnx.Rngs(params=0))))
    output = tmp_path / "model"
    output.mkdir()
    (output / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="--force"):
        export.write_ctranslate2(export.ctranslate2_spec(config.model, params, PIECES), str(output))
    broken = export.ctranslate2_spec(config.model, params, PIECES)
    broken.decoder.projection.weight = None  # CTranslate2's validation fails on it.
    with pytest.raises(ValueError, match="projection/weight"):
        export.write_ctranslate2(broken, str(output), force=True)
    assert sorted(os.listdir(tmp_path)) == ["model"] and os.listdir(output) == ["mine.txt"]
    export.write_ctranslate2(export.ctranslate2_spec(config.model, params, PIECES), str(output), force=True)
    assert "mine.txt" not in os.listdir(output) and sorted(os.listdir(tmp_path)) == ["model"]
    ctranslate2.Translator(str(output), device="cpu")


def test_command_writes_an_int8_model_that_translates_like_float32(run, tmp_path):
    """`python -m tfx.export ctranslate2 ...`: a self-contained directory (the SentencePiece
    model included) whose int8 greedy translations mostly equal the float32 ones (loosely: this
    tiny model's distributions are flat enough for int8 rounding to tip many an argmax), and an
    unknown format is a usage error naming the formats."""
    model, workdir, float32_output, sources = run
    output = tmp_path / "int8"
    command = [sys.executable, "-m", "tfx.export", "ctranslate2", f"--workdir={workdir}",
               f"--output={output}", "--quantization=int8"]  # the run's config.json says the rest.
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sentencepiece.model" in os.listdir(output)
    with open(output / "sentencepiece.model", "rb") as copy, open(model.tokenizer.path, "rb") as original:
        assert copy.read() == original.read()

    int8 = ctranslate2.Translator(str(output), device="cpu", compute_type="int8")
    float32 = ctranslate2.Translator(float32_output, device="cpu", compute_type="float32")
    got, expected = (ct2_translate(t, model, sources, beam_size=1) for t in (int8, float32))
    assert len(got) == len(sources) and all(got), "int8 left a sentence untranslated"
    if has_vnni():  # without VNNI (AVX2's 16-bit u8 x s8 sums) int8 agreed on 1 of 64 on a Zen 3.
        agree = sum(g == e for g, e in zip(got, expected))
        assert agree > 0.5 * len(sources), f"int8 agrees with float32 on {agree} of {len(sources)}"

    done = subprocess.run([*command[:3], "onnx", *command[4:]], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode != 0 and "ctranslate2" in done.stderr, done.stderr[-3000:]
