import json
import os
import subprocess
import sys

import decode_test
import jax
import numpy as np
import pytest
from flax import nnx

from tfx.compress import lowrank
from tfx.infer import trained as trained_lib
from tfx.model import flops
from tfx.model.transformer import EncoderDecoder, count_params

from runs import MULTI30K, ROOT, TINY, flags_for

ATTENTION = ("query", "key", "value", "out")
KINDS = ({f"encoder attention.{w}" for w in ATTENTION}
         | {f"decoder {a}.{w}" for a in ("self_attention", "cross_attention") for w in ATTENTION}
         | {f"{side} mlp.{w}" for side in ("encoder", "decoder") for w in ("wi", "wo")})


def with_rank(config, rank_fraction):
    config = config.copy_and_resolve_references()
    config.model.rank_fraction = rank_fraction
    return config


def logits_fn(graphdef):
    """jit-compiled teacher-forced logits of (params, inputs, targets)."""
    return jax.jit(lambda params, inputs, targets: nnx.merge(graphdef, params)(inputs, targets))


def test_truncated_svd_is_the_best_rank_r_approximation():
    """W = U diag(4, 3, 2, 1) V^T: its rank-2 factors give U_2 diag(4, 3) V_2^T, missing W by
    |(2, 1)| = sqrt(5) (Eckart-Young), and carry sqrt(S) each: a^T a = b b^T = diag(4, 3)."""
    rng = np.random.default_rng(0)
    u_6x4, _ = np.linalg.qr(rng.normal(size=(6, 4)))
    v_5x4, _ = np.linalg.qr(rng.normal(size=(5, 4)))
    w_6x5 = u_6x4 @ np.diag([4.0, 3.0, 2.0, 1.0]) @ v_5x4.T
    a_6x2, b_2x5 = lowrank.truncated_svd(w_6x5, 2)
    best_6x5 = u_6x4[:, :2] @ np.diag([4.0, 3.0]) @ v_5x4[:, :2].T
    np.testing.assert_allclose(a_6x2 @ b_2x5, best_6x5, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(w_6x5 - a_6x2 @ b_2x5), np.sqrt(5.0), rtol=1e-12)
    np.testing.assert_allclose(a_6x2.T @ a_6x2, np.diag([4.0, 3.0]), atol=1e-12)
    np.testing.assert_allclose(b_2x5 @ b_2x5.T, np.diag([4.0, 3.0]), atol=1e-12)
    a_2x6x2, b_2x2x5 = lowrank.truncated_svd(np.stack([w_6x5, 2 * w_6x5]), 2)  # stacked layers.
    np.testing.assert_allclose(a_2x6x2[1] @ b_2x2x5[1], 2 * a_6x2 @ b_2x5, atol=1e-12)


def test_parameter_count_matches_the_formula(tiny_config):
    """tiny_config at rank fraction 0.25 (D 32, 4 query and 2 key/value heads of 8, MLP 64):
    query and out [32, 32] get rank 8 (512 parameters, not 1024), key and value [32, 16]
    rank 4 (192, not 512), wi and wo [32, 64] rank 8 (768, not 2048). The embedding is whole."""
    per_attention, per_mlp = 2 * (1024 - 512) + 2 * (512 - 192), 2 * (2048 - 768)
    saved = 2 * (per_attention + per_mlp) + 2 * (2 * per_attention + per_mlp)  # 2 + 2 layers.
    config = tiny_config()
    full, low = (nnx.eval_shape(lambda c=c: EncoderDecoder(c.model, nnx.Rngs(0)))
                 for c in (config, with_rank(config, 0.25)))
    assert count_params(nnx.state(full)) - count_params(nnx.state(low)) == saved == 20224
    key = low.decoder_layers[0].cross_attention.key
    assert (key.a.shape, key.b.shape, key.shape) == ((32, 4), (4, 2, 8), (32, 2, 8))
    assert low.source_embed.embedding.shape == (50, 32)


@pytest.mark.parametrize("model", [dict(), dict(activation="swiglu", scan_layers=True, num_kv_heads=1)])
def test_full_rank_factorization_reproduces_the_logits(tiny_config, make_batch, model):
    """At rank fraction 1 the SVD is exact, so every factorized projection (encoder and decoder
    self-attention, cross-attention, MLP with its gate) gives the full model's logits."""
    config = tiny_config(model=dict(num_encoder_layers=1, num_decoder_layers=1, **model))
    full = EncoderDecoder(config.model, nnx.Rngs(params=0))
    low_rank = with_rank(config, 1.0)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: EncoderDecoder(low_rank.model, nnx.Rngs(0))))
    params, errors = lowrank.factorize(nnx.to_pure_dict(nnx.state(full)),
                                       nnx.merge(graphdef, abstract))
    gates = {"encoder mlp.wi_gate", "decoder mlp.wi_gate"} if model else set()
    assert set(errors) == KINDS | gates
    assert max(max(e) for e in errors.values()) < 1e-6
    nnx.replace_by_pure_dict(abstract, params)
    batch = make_batch(0, 4, 7, 6, config.model.vocab_size)
    full_graphdef, full_params = nnx.split(full)
    logits = [logits_fn(g)(p, batch["inputs"], batch["targets"])
              for g, p in ((graphdef, abstract), (full_graphdef, full_params))]
    np.testing.assert_allclose(*logits, atol=1e-4)


def test_flops_saved_by_factorizing_are_those_xla_counts(tiny_config):
    """XLA's count of a forward pass includes what tfx.model.flops leaves out (norms, softmax, the
    masked half of causal attention), but that is the same with and without factors, so the
    difference between a full and a low-rank model is the projections' alone, as flops counts
    them. Rows without padding, where flops' real tokens are the tokens computed."""
    def xla_flops(config):
        graphdef, params = nnx.split(nnx.eval_shape(lambda: EncoderDecoder(config.model, nnx.Rngs(0))))
        inputs, targets = jax.ShapeDtypeStruct((2, 7), np.int32), jax.ShapeDtypeStruct((2, 5), np.int32)
        cost = logits_fn(graphdef).lower(params, inputs, targets).compile().cost_analysis()
        return (cost if isinstance(cost, dict) else cost[0])["flops"]

    full = tiny_config(model=dict(activation="swiglu"))
    low = with_rank(full, 0.25)
    saved = flops.forward_flops(full.model, [(7, 5)] * 2) - flops.forward_flops(low.model, [(7, 5)] * 2)
    assert saved > 0
    assert xla_flops(full) - xla_flops(low) == saved


def test_cached_decoding_equals_full_recomputation(tiny_config):
    config = with_rank(tiny_config(model=decode_test.MODEL, decode=decode_test.DECODE), 0.5)
    model, inputs = decode_test.build(config), decode_test.sources(0, 8, 8, 50)
    cached = decode_test.translate(config, model, inputs)
    recomputed = decode_test.translate(config, model, inputs, full_recompute=True)
    np.testing.assert_array_equal(cached, recomputed)
    decode_test.assert_well_formed(cached, limit=8 + 4)


def test_factorized_run_at_full_rank_translates_like_the_source(trained, tmp_path, make_batch):
    """The written workdir restores under the low-rank config (config.json says which), gives
    the source's logits at rank fraction 1, and is not overwritten by a second run."""
    config, workdir = trained
    output = str(tmp_path / "rank100")
    done = lowrank.factorize_run(config, workdir, "latest", 1.0, output)
    assert done.label == "step6" and set(done.errors) == KINDS and max(done.errors.values()) < 1e-6
    with open(os.path.join(output, "config.json")) as f:
        assert json.load(f)["model"]["rank_fraction"] == 1.0
    source, factorized = trained_lib.load(config, workdir), trained_lib.load(done.config, output)
    assert factorized.label == "step0"
    assert factorized.tokenizer.path == os.path.join(output, "tokenizer.model")
    assert done.params_before == count_params(source.params)
    assert done.params_after == count_params(factorized.params)
    batch = make_batch(0, 8, 9, 7, config.model.vocab_size)
    logits = [logits_fn(model.graphdef)(model.params, batch["inputs"], batch["targets"])
              for model in (factorized, source)]
    np.testing.assert_allclose(*logits, atol=1e-4)
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        lowrank.factorize_run(config, workdir, "latest", 0.5, output)
    with pytest.raises(ValueError, match=r"config\.model\.rank_fraction=1\.0: give the config"):
        lowrank.factorize_run(done.config, output, "latest", 0.5, str(tmp_path / "again"))
    with pytest.raises(ValueError, match=r"--rank_fraction=0\.0 must be in \(0, 1\]"):
        lowrank.factorize_run(config, workdir, "latest", 0.0, str(tmp_path / "again"))


def test_command_prints_the_counts_errors_and_how_to_use_the_output(trained, tmp_path):
    """The tiny run (D 32, 2 heads of 16, MLP 64, 1 + 1 layers) at rank fraction 0.25: the
    four [32, 32] attention projections get rank 8 (512 parameters saved each), the two MLP
    matrices [32, 64] rank 8 (1280 saved each): 4608 saved in the encoder layer, 6656 in the
    decoder layer (two attentions), 11,264 of 52,928. The output is a run of its own, which
    eval.py reads with --workdir alone; the fine-tune repeats the overrides. (--rank-fraction:
    the old spelling of --rank_fraction.)"""
    config, workdir = trained
    output = str(tmp_path / "rank25")
    overrides = {**{f"model.{key}": value for key, value in TINY.items()},
                 "data.data_dir": config.data.data_dir}
    out = subprocess.run([sys.executable, "-m", "tfx.compress.lowrank", f"--config={MULTI30K}",
                          *flags_for(overrides), f"--workdir={workdir}", "--rank-fraction=0.25",
                          f"--output={output}"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == (f"factorized {workdir} (step6) at rank fraction 0.25 into {output}: "
                        "52,928 -> 41,664 parameters")
    assert len([line for line in lines if line.startswith(("  encoder ", "  decoder "))]) == 16
    assert lines[-2] == f"evaluate:  python eval.py --workdir {output}"
    assert lines[-1].startswith(f"fine-tune: python train.py --config {MULTI30K} "
                                "--config.model.vocab_size=1000 ")
    assert lines[-1].endswith(f" --config.model.rank_fraction=0.25 --config.init_from={output} "
                              f"--workdir {output}-ft")
