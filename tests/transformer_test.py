import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from tfx.core import config as config_lib
from tfx.core import parallel
from tfx.core.pytree import path_name
from tfx.model import layers
from tfx.model.transformer import EncoderDecoder, attention_mask, count_params, shift_right
from tfx.train import losses


def build(config, seed=0):
    return EncoderDecoder(config.model, nnx.Rngs(params=seed))


# Marian's options (OPUS-MT), all on; swiglu so that the gate's bias is there too.
MARIAN = dict(use_bias=True, output_bias=True, embedding_norm=True, scale_embeddings=False,
              start_from_zero_embedding=True, activation="swiglu")
MARIAN_PARAMS = {"query_bias", "key_bias", "value_bias", "out_bias", "wi_bias", "wi_gate_bias", "wo_bias",
                 "logits_bias", "source_embed_norm", "target_embed_norm"}


def perturbed(model, seed=1):
    """`model` with every parameter moved off its initial value (zero biases, unit norm scales
    would hide a bias or norm that is not applied)."""
    graphdef, params = nnx.split(model)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    noisy = [x + 0.2 * jax.random.normal(key, x.shape) for x, key in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, noisy))


def param_names(model) -> dict[str, np.ndarray]:
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {path_name(path): x for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def test_marian_options_are_off_by_default_and_draw_no_random_numbers(tiny_config):
    """The default builds none of their parameters; with them on, the other parameters are
    those of the default (biases and norms start at constants), the biases have their axes."""
    default = param_names(build(tiny_config(model=dict(activation="swiglu"))))
    marian_model = build(tiny_config(model=MARIAN))
    marian = param_names(marian_model)
    assert not {part for name in default for part in name.split("/")} & MARIAN_PARAMS
    assert {part for name in set(marian) - set(default) for part in name.split("/")} & MARIAN_PARAMS == MARIAN_PARAMS
    for name, value in default.items():
        np.testing.assert_array_equal(marian[name], value, err_msg=name)
    attention = marian_model.decoder_layers[0].self_attention
    assert attention.query_bias.shape == (4, 8) and attention.key_bias.shape == (2, 8)
    assert attention.key_bias.get_metadata()["logical_axes"] == ("kv_heads", "head_dim")
    assert marian_model.logits_bias.get_metadata()["logical_axes"] == ("vocab",)
    assert not np.any(marian["logits_bias"])


def test_base_has_transformer_base_parameter_count():
    config = config_lib.load("configs/wmt_base.py:base")
    model = nnx.eval_shape(lambda: build(config))
    count = count_params(nnx.state(model, nnx.Param))
    # 32k shared embedding (16.4M) + 6 encoder layers (3.15M) + 6 decoder layers (4.2M).
    assert 60e6 <= count <= 65e6, count


def test_big_is_about_three_times_base():
    base = count_params(nnx.state(nnx.eval_shape(lambda: build(config_lib.load("configs/wmt_base.py:base"))), nnx.Param))
    big = count_params(nnx.state(nnx.eval_shape(lambda: build(config_lib.load("configs/wmt_base.py:big"))), nnx.Param))
    assert 3.0 < big / base < 3.6


def test_grouped_query_attention_shrinks_key_value_projections(tiny_config):
    mqa = build(tiny_config(model=dict(num_heads=4, num_kv_heads=1)))
    attention = mqa.encoder_layers[0].attention
    assert attention.query.shape == (32, 4, 8)
    assert attention.key.shape == (32, 1, 8)
    assert attention.value.shape == (32, 1, 8)


def test_gqa_equals_mha_with_repeated_key_value_heads(tiny_config):
    """GQA through jax.nn.dot_product_attention == MHA whose kv heads are copies of the groups."""
    rngs = nnx.Rngs(params=0)
    gqa = layers.Attention(32, 4, 2, 8, 0.0, jnp.float32, rngs)
    mha = layers.Attention(32, 4, 4, 8, 0.0, jnp.float32, rngs)
    mha.query[...], mha.out[...] = gqa.query[...], gqa.out[...]
    mha.key[...] = jnp.repeat(gqa.key[...], 2, axis=1)
    mha.value[...] = jnp.repeat(gqa.value[...], 2, axis=1)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 32))
    mask = jnp.ones((2, 1, 5, 5), bool)
    np.testing.assert_allclose(gqa(x, x, mask), mha(x, x, mask), atol=1e-5)


def test_explicit_softmax_path_equals_fused_attention(tiny_config):
    """The path used for attention dropout computes the same attention as the fused one."""
    attention = layers.Attention(32, 4, 2, 8, 0.0, jnp.float32, nnx.Rngs(params=0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 32))
    segments = jnp.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    mask = attention_mask(segments, segments, causal=True)
    k, v = attention.project_kv(x)
    q = jnp.einsum("btd,dnh->btnh", x, attention.query[...])
    explicit = attention._attend_with_dropout(q, k, v, mask, rngs=None)
    fused = jax.nn.dot_product_attention(q, k, v, mask=mask)
    valid = np.asarray(segments > 0)
    np.testing.assert_allclose(np.asarray(explicit)[valid], np.asarray(fused)[valid], atol=1e-5)


def test_masks_honour_segments_padding_and_causality():
    segments = jnp.array([[1, 1, 2, 0]])
    full = np.asarray(attention_mask(segments, segments, causal=False))[0, 0]
    np.testing.assert_array_equal(full, [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    # A padding query (segment 0) attends to nothing; its output is masked out of the loss.
    causal = np.asarray(attention_mask(segments, segments, causal=True))[0, 0]
    np.testing.assert_array_equal(causal, [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])


def test_shift_right_restarts_in_each_segment():
    targets = jnp.array([[5, 6, 7, 8, 9, 0]])
    segments = jnp.array([[1, 1, 1, 2, 2, 0]])
    np.testing.assert_array_equal(shift_right(targets, segments), [[0, 5, 6, 0, 8, 0]])


def test_decoder_is_causal(tiny_config):
    model = build(tiny_config())
    inputs = jnp.array([[3, 4, 5, 6]])
    a = model(inputs, jnp.array([[7, 8, 9, 10, 11]]))
    b = model(inputs, jnp.array([[7, 8, 9, 30, 31]]))
    # Position t predicts targets[t] from targets[:t]; changing targets[3:] leaves 0..3 alone.
    np.testing.assert_allclose(a[:, :4], b[:, :4], atol=1e-5)
    assert not np.allclose(a[:, 4], b[:, 4])


def pack(batch):
    """Packs each pair of rows of an unpacked batch into one row (segments 1 and 2)."""
    packed = {}
    for name in ("inputs", "targets"):
        rows, segs, poss = [], [], []
        tokens = batch[name]
        for i in range(0, len(tokens), 2):
            row, seg, pos = [], [], []
            for j, s in ((i, 1), (i + 1, 2)):
                t = tokens[j][tokens[j] > 0]
                row += list(t); seg += [s] * len(t); pos += list(range(len(t)))
            width = 2 * tokens.shape[1]
            rows.append(row + [0] * (width - len(row)))
            segs.append(seg + [0] * (width - len(seg)))
            poss.append(pos + [0] * (width - len(pos)))
        packed[name] = np.array(rows, np.int32)
        packed[f"{name}_segment_ids"] = np.array(segs, np.int32)
        packed[f"{name}_positions"] = np.array(poss, np.int32)
    return packed


@pytest.mark.parametrize("positions", ["sinusoidal", "learned"])
def test_packed_rows_give_the_same_per_token_logits_as_unpacked(tiny_config, make_batch, positions):
    model = build(tiny_config(model=dict(positions=positions)))
    batch = make_batch(0, 4, 6, 7, 50)
    unpacked = np.asarray(model(batch["inputs"], batch["targets"]))
    packed_batch = pack(batch)
    packed = np.asarray(model(**packed_batch))
    for i in range(4):
        n = int((batch["targets"][i] > 0).sum())
        row, seg = packed[i // 2], packed_batch["targets_segment_ids"][i // 2]
        np.testing.assert_allclose(row[seg == 1 + i % 2], unpacked[i, :n], atol=2e-5)


@pytest.mark.parametrize("model_overrides", [
    dict(activation="gelu"), dict(activation="swiglu"), dict(activation="squared_relu"),
    dict(activation="swish"), dict(activation="gelu_sigmoid"), dict(MARIAN, dtype="bfloat16"),
    dict(norm="rmsnorm"), dict(norm_position="post"), dict(num_kv_heads=1),
    dict(share_embeddings=False, logits_via_embedding=False), dict(dtype="bfloat16"),
])
def test_every_architecture_option_gives_finite_float32_logits(tiny_config, make_batch, model_overrides):
    model = build(tiny_config(model=model_overrides))
    batch = make_batch(1, 2, 5, 6, 50)
    logits = model(batch["inputs"], batch["targets"], rngs=nnx.Rngs(dropout=0))
    assert logits.shape == (2, 6, 50) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()


def test_swish_and_gelu_sigmoid_are_marians_activations():
    x = np.linspace(-6, 6, 25, dtype=np.float32)
    np.testing.assert_allclose(layers._activation("swish", jnp.asarray(x)), x / (1 + np.exp(-x)), rtol=1e-6)
    np.testing.assert_allclose(layers._activation("gelu_sigmoid", jnp.asarray(x)), x / (1 + np.exp(-1.702 * x)),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("zero_start", [False, True])
def test_start_from_zero_embedding_ignores_the_start_tokens_embedding(tiny_config, zero_start):
    """With the option, the decoder's start token (0) embeds as zeros, so its embedding row
    changes no logit; without it, it changes every position's."""
    config = tiny_config(model=dict(start_from_zero_embedding=zero_start, share_embeddings=False,
                                    logits_via_embedding=False))
    model = build(config)
    inputs, targets = jnp.array([[3, 4, 5, 6]]), jnp.array([[7, 8, 9, 10, 11]])
    before = np.asarray(model(inputs, targets))
    row_D = jax.random.normal(jax.random.PRNGKey(1), (32,))  # not a constant, which layer norms remove.
    model.target_embed.embedding[...] = model.target_embed.embedding[...].at[0].set(row_D)
    after = np.asarray(model(inputs, targets))
    if zero_start:
        np.testing.assert_array_equal(after, before)
    else:
        assert not np.allclose(after[:, 0], before[:, 0], atol=1e-3)


@pytest.mark.parametrize("model_overrides", [dict(), MARIAN, dict(MARIAN, norm_position="post", scan_layers=True)])
def test_incremental_decoding_equals_teacher_forcing(tiny_config, make_batch, model_overrides):
    """One position at a time with key/value caches (as tfx/model/decode.py decodes), the
    logits are the teacher-forced ones at every position; with a shortlist, those of its tokens."""
    model = perturbed(build(tiny_config(model=model_overrides)))
    batch = make_batch(7, 2, 7, 6, 50)
    inputs, targets = jnp.asarray(batch["inputs"]), jnp.asarray(batch["targets"])
    expected_BxTxV = np.asarray(model(inputs, targets))
    decoder_inputs_BxT = shift_right(targets, (targets > 0).astype(jnp.int32))
    (b, t), vocab_S = targets.shape, jnp.array([1, 7, 3, 42])
    cross_kv = model.cross_kv(model.encode(inputs), for_decoding=True)
    cross_mask = attention_mask(jnp.ones((b, 1), jnp.int32), (inputs > 0).astype(jnp.int32), causal=False)
    caches = model.empty_cache(b, t)
    for step in range(t):
        self_mask = jnp.broadcast_to(jnp.arange(t) <= step, (b, 1, 1, t))
        y_Bx1xD, caches = model.decoder_states(decoder_inputs_BxT[:, step:step + 1], jnp.full((b, 1), step),
                                               cross_kv, self_mask, cross_mask, caches=caches, index=step)
        logits_BxV = np.asarray(model.logits(y_Bx1xD))[:, 0]
        valid_B = np.asarray(targets[:, step] > 0)
        np.testing.assert_allclose(logits_BxV[valid_B], expected_BxTxV[valid_B, step], atol=1e-4)
        np.testing.assert_allclose(model.logits(y_Bx1xD, vocab_S)[:, 0], logits_BxV[:, vocab_S], atol=1e-5)


def test_bfloat16_computes_in_bfloat16_but_keeps_float32_params(tiny_config, make_batch):
    config = tiny_config(model=dict(dtype="bfloat16"))
    model = build(config)
    assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("float32")}
    reference = build(tiny_config())
    batch = make_batch(2, 2, 5, 6, 50)
    low = model(batch["inputs"], batch["targets"])
    high = reference(batch["inputs"], batch["targets"])
    assert not np.array_equal(low, high)
    np.testing.assert_allclose(low, high, atol=0.1)


@pytest.mark.parametrize("tied", [True, False])
def test_bfloat16_logits_are_float32_products_of_the_final_states(tiny_config, tied):
    """With float32_logits, the final norm and the output projection of bfloat16 decoder states
    are computed in float32 (numpy: layer norm, then a float64 product); without, the logits
    are rounded to bfloat16."""
    model_overrides = dict(dtype="bfloat16", share_embeddings=tied, logits_via_embedding=tied)
    states = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (2, 5, 32)), jnp.bfloat16)
    for float32_logits in (True, False):
        model = build(tiny_config(model=dict(model_overrides, float32_logits=float32_logits)))
        model.decoder_norm.scale[...] = jax.random.uniform(jax.random.PRNGKey(2), (32,)) + 0.5
        logits = np.asarray(model.logits(jnp.asarray(states)))
        x = states.astype(np.float64)
        x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
        x = x * np.asarray(model.decoder_norm.scale[...]) + np.asarray(model.decoder_norm.bias[...])
        weights = (np.asarray(model.target_embed.embedding[...]).T if tied
                   else np.asarray(model.logits_projection[...]))
        expected = x @ weights
        rounded = np.asarray(jnp.asarray(logits).astype(jnp.bfloat16).astype(jnp.float32))
        if float32_logits:
            np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
            assert not np.array_equal(logits, rounded)
        else:
            np.testing.assert_array_equal(logits, rounded)
            assert np.abs(logits - expected).max() > 1e-3


def test_dropout_is_active_only_with_rngs(tiny_config, make_batch):
    model = build(tiny_config(model=dict(dropout_rate=0.3, attention_dropout_rate=0.3,
                                         activation_dropout_rate=0.3)))
    batch = make_batch(3, 2, 5, 6, 50)
    eval_a = model(batch["inputs"], batch["targets"])
    eval_b = model(batch["inputs"], batch["targets"])
    train = model(batch["inputs"], batch["targets"], rngs=nnx.Rngs(dropout=0))
    np.testing.assert_array_equal(eval_a, eval_b)
    assert not np.allclose(eval_a, train)


@pytest.mark.parametrize("key, value, message", [
    ("activation", "tanh", "config.model.activation='tanh' is not one of"),
    ("num_kv_heads", 3, "config.model.num_heads=4 must be a multiple of config.model.num_kv_heads=3"),
    ("norm", "batchnorm", "config.model.norm"),
])
def test_bad_model_config_names_the_key(tiny_config, key, value, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(model={key: value})


def test_dropout_keeps_the_expected_fraction_and_mean():
    x = jnp.ones((200, 501))
    y = np.asarray(layers.dropout(x, 0.1, nnx.Rngs(dropout=0)))
    kept = y > 0
    assert abs(kept.mean() - 0.9) < 0.005
    np.testing.assert_allclose(y[kept], 1 / (1 - 6554 / 65536), rtol=1e-6)
    assert abs(y.mean() - 1.0) < 0.01


@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 1e-5), (jnp.bfloat16, 0.05)])
@pytest.mark.parametrize("spec, x_shape, w_shape", [
    ("btd,dnh->btnh", (2, 3, 8), (8, 2, 4)),
    ("btnh,nhd->btd", (2, 3, 2, 4), (2, 4, 8)),
    ("bld,vd->blv", (2, 3, 8), (11, 8)),
])
def test_projection_gradients_match_autodiff_of_the_float32_einsum(spec, x_shape, w_shape, dtype, rtol):
    """The custom VJP of `project` gives plain autodiff's gradients: to float32 rounding in
    float32, to bf16 precision in bfloat16 (with float32 gradients either way)."""
    x = jax.random.normal(jax.random.PRNGKey(0), x_shape)
    w = jax.random.normal(jax.random.PRNGKey(1), w_shape)
    probe = jax.random.normal(jax.random.PRNGKey(2), jnp.einsum(spec, x, w).shape)

    def loss(x, w):
        return jnp.sum(layers.project(spec, x, nnx.Param(w), dtype).astype(jnp.float32) * probe)

    def reference(x, w):
        return jnp.sum(jnp.einsum(spec, x, w) * probe)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    expected = jax.grad(reference, argnums=(0, 1))(x, w)
    assert grads[0].dtype == jnp.float32 and grads[1].dtype == jnp.float32
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * float(jnp.abs(want).max()))


@pytest.mark.parametrize("mesh_shape", [None, "data:2,fsdp:2,tensor:2", "fsdp:8"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_embedding_lookup_gradient_is_the_scatter_add_of_autodiff(dtype, mesh_shape):
    """`lookup`'s table gradient equals autodiff of the gather, also when its rows' gradients
    are resharded onto the table's shards (repeated tokens add up)."""
    table = jax.random.normal(jax.random.PRNGKey(0), (48, 16))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (8, 6), 0, 12)  # many repeats
    probe = jax.random.normal(jax.random.PRNGKey(2), (8, 6, 16)).astype(dtype)

    def loss(table):
        return jnp.sum(layers.lookup(table, tokens, 4.0, dtype) * probe).astype(jnp.float32)

    def reference(table):
        return jnp.sum((jnp.take(table, tokens, axis=0) * 4.0).astype(dtype) * probe).astype(jnp.float32)

    expected = jax.grad(reference)(table)
    if mesh_shape is None:
        got = jax.jit(jax.grad(loss))(table)
    else:
        config = config_lib.default_config()
        mesh = parallel.make_mesh(mesh_shape)

        @jax.jit
        def sharded_grad(table):
            with parallel.activation_sharding(mesh, config.logical_axis_rules):
                return jax.grad(loss)(table)
        got = sharded_grad(table)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-5)


def test_fusion_barrier_is_the_identity_with_identity_gradient():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4))
    np.testing.assert_array_equal(jax.jit(layers.fusion_barrier)(x), x)
    grad = jax.grad(lambda v: jnp.sum(layers.fusion_barrier(v) * 3.0))(x)
    np.testing.assert_array_equal(grad, jnp.full_like(x, 3.0))
    poisoned = x.at[0, 0, 0].set(jnp.nan)
    assert np.isnan(np.asarray(layers.fusion_barrier(poisoned))).all()


def stack_layer_lists(params: dict) -> dict:
    """An unrolled model's parameters (or gradients), as a pure dict, in the scan_layers layout.

    Also used by decode_test.py and steps_test.py.
    """
    for name in ("encoder_layers", "decoder_layers"):
        params[name] = jax.tree.map(lambda *xs: np.stack(xs), *params[name].values())
    return params


def to_scanned(config, model):
    """A scan_layers model holding `model`'s parameters."""
    config = config.copy_and_resolve_references()
    config.model.scan_layers = True
    scanned = build(config, seed=1)
    state = nnx.state(scanned, nnx.Param)
    nnx.replace_by_pure_dict(state, stack_layer_lists(nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    nnx.update(scanned, state)
    return scanned


def loss_and_grads(model, batch, dropout_seed=None):
    def loss(model):
        rngs = None if dropout_seed is None else nnx.Rngs(dropout=dropout_seed)
        logits = model(batch["inputs"], batch["targets"], rngs=rngs)
        return losses.metric_sums(logits, batch["targets"], batch["targets"] > 0, 0.1, 0.0)["loss"]
    return nnx.jit(nnx.value_and_grad(loss))(model)  # jitted: op by op, remat compiles slowly.


def assert_trees_close(actual, expected):
    """Equal to float32 rounding, relative to each array's largest entry. Key biases are left
    out: softmax ignores a shift shared by all keys, so their gradient is 0 but for rounding."""
    def check(path, a, b):
        if not path_name(path).endswith("key_bias"):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max(), err_msg=path_name(path))
    jax.tree_util.tree_map_with_path(check, actual, expected)


DROPOUT = dict(dropout_rate=0.2, attention_dropout_rate=0.2, activation_dropout_rate=0.2)


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_the_same_loss_and_gradients(tiny_config, make_batch, remat, scan_layers):
    batch = make_batch(4, 2, 7, 6, 50)
    results = []
    for policy in ("none", remat):
        model = build(tiny_config(model=dict(DROPOUT, remat=policy, scan_layers=scan_layers)))
        results.append(loss_and_grads(model, batch, dropout_seed=0))
    (loss, grads), (remat_loss, remat_grads) = results
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
    assert_trees_close(remat_grads, grads)


def test_remat_saves_fewer_residuals_for_the_backward_pass(tiny_config, make_batch, capsys):
    """Counts what autodiff keeps from the forward pass: full < dots (matmul outputs too) < none."""
    batch = make_batch(5, 2, 7, 6, 50)
    counts = {}
    for remat in ("none", "dots", "full"):
        graphdef, params = nnx.split(build(tiny_config(model=dict(remat=remat))))
        print_saved_residuals(
            lambda p, g=graphdef: jnp.sum(nnx.merge(g, p)(batch["inputs"], batch["targets"])), params)
        counts[remat] = len(capsys.readouterr().out.splitlines())
    assert counts["full"] < counts["dots"] < counts["none"], counts


def test_scanned_layers_stack_the_parameters_with_a_layers_axis(tiny_config):
    model = build(tiny_config(model=dict(scan_layers=True, num_encoder_layers=3)))
    query = model.encoder_layers.attention.query
    assert query.shape == (3, 32, 4, 8)
    assert query.get_metadata()["logical_axes"] == ("layers", "embed", "heads", "head_dim")
    assert model.decoder_layers.mlp_norm.scale.shape == (2, 32)
    # The same seed gives the same parameters in both layouts.
    unrolled = build(tiny_config(model=dict(num_encoder_layers=3)))
    np.testing.assert_array_equal(query[2], unrolled.encoder_layers[2].attention.query[...])


@pytest.mark.parametrize("model_overrides", [dict(), dict(norm_position="post", remat="dots"), MARIAN])
def test_scanned_layers_equal_unrolled_layers_with_the_same_parameters(tiny_config, make_batch,
                                                                       model_overrides):
    config = tiny_config(model=model_overrides)
    model = perturbed(build(config))
    scanned = to_scanned(config, model)
    batch = make_batch(6, 2, 7, 6, 50)
    np.testing.assert_allclose(scanned(batch["inputs"], batch["targets"]),
                               model(batch["inputs"], batch["targets"]), atol=1e-5)
    loss, grads = loss_and_grads(model, batch)
    scanned_loss, scanned_grads = loss_and_grads(scanned, batch)
    np.testing.assert_allclose(scanned_loss, loss, rtol=1e-5)
    assert_trees_close(nnx.to_pure_dict(scanned_grads), stack_layer_lists(nnx.to_pure_dict(grads)))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_each_layer_draws_its_own_dropout_mask(tiny_config, scan_layers):
    model = build(tiny_config(model=dict(scan_layers=scan_layers)))

    def mask_of_layer(layer, x, _, rngs):
        return x, layers.dropout(jnp.ones((64,)), 0.5, rngs)

    _, masks = model._run_layers(model.encoder_layers, mask_of_layer, jnp.zeros(()), (), nnx.Rngs(dropout=0))
    assert not np.array_equal(masks[0], masks[1])
