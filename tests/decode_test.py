import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from transformer_test import stack_layer_lists

from tfx.core import config as config_lib
from tfx.core import parallel
from tfx.model import decode, layers, shortlist
from tfx.model.decode import EOS
from tfx.model.transformer import EncoderDecoder

# Compiling is most of this file's time: one encoder layer (the decoder is what matters here)
# and one compiled `translate` per configuration, shared by the tests. Attention windows and
# batch halving each multiply what a search compiles, so the tests turn them on only where they
# are the subject (WINDOWS: 2, 4 and 8 steps, so outputs of up to 12 tokens change window), and
# the cached == recompute beam test runs them together, as the library's defaults do.
MODEL = dict(num_encoder_layers=1)
DECODE = dict(max_length_offset=4, top_k=10, top_p=0.9, temperature=0.8)
WINDOWS = dict(cache_window=2)
_compiled = {}


def build(config, seed=2, eos_boost=3.0):
    """(graphdef, params) of a random model whose EOS is likely enough to end some outputs early."""
    model = EncoderDecoder(config.model, nnx.Rngs(params=seed))
    embedding = model.target_embed.embedding
    embedding[...] = embedding[...].at[EOS].multiply(eos_boost)
    return nnx.split(model)


def translate(config, model, inputs, mesh_shape="data:1", rng=None, **overrides):
    graphdef, params = model
    key = (config.to_json(), mesh_shape, decode.Options.from_config(config, **overrides))
    if key not in _compiled:
        mesh = parallel.make_mesh(mesh_shape, jax.devices()[:1] if mesh_shape == "data:1" else None)
        shardings = parallel.state_shardings(params, mesh, config.logical_axis_rules)
        _compiled[key] = decode.make_translate(config, graphdef, mesh, shardings, **overrides)
    return np.asarray(_compiled[key](params, inputs, rng))


def sources(seed, batch, length, vocab):
    """Right-padded sources of 1..length tokens, the longest exactly `length`."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, vocab, (batch, length)).astype(np.int32)
    lengths = rng.integers(1, length + 1, (batch,))
    lengths[0] = length
    tokens[np.arange(length)[None, :] >= lengths[:, None]] = 0
    return tokens


def assert_well_formed(tokens, limit):
    """Each row: tokens > EOS, then EOS, then padding; EOS no later than position limit - 1."""
    assert tokens.shape[1] >= limit
    for row in tokens:
        end = list(row).index(EOS)
        assert end < limit and (row[:end] > EOS).all() and (row[end + 1:] == 0).all(), row


@pytest.mark.parametrize("model_overrides", [
    dict(), dict(num_kv_heads=1), dict(norm_position="post", positions="learned"),
])
def test_cached_greedy_equals_full_recomputation(tiny_config, model_overrides):
    """tiny_config has 4 query heads and 2 key/value heads (GQA); num_kv_heads=1 is MQA."""
    config = tiny_config(model={**MODEL, **model_overrides}, decode=DECODE)
    model, inputs = build(config), sources(0, 8, 8, 50)
    cached = translate(config, model, inputs, strategy="greedy")
    np.testing.assert_array_equal(cached, translate(config, model, inputs, strategy="greedy",
                                                    full_recompute=True))
    assert_well_formed(cached, limit=8 + 4)


def test_cached_beam_search_equals_full_recomputation(tiny_config):
    """Beams reorder at every step, so this checks the cache's ancestor bookkeeping."""
    config = tiny_config(model=MODEL, decode=DECODE)
    model, inputs = build(config), sources(1, 8, 8, 50)
    cached = translate(config, model, inputs, batch_halvings=3, **WINDOWS)
    np.testing.assert_array_equal(cached, translate(config, model, inputs, full_recompute=True))
    assert_well_formed(cached, limit=8 + 4)
    lengths = (cached > 0).sum(axis=1)
    assert len(set(lengths)) > 2, lengths


def test_beam_size_one_equals_greedy(tiny_config):
    config = tiny_config(model=MODEL, decode=DECODE)
    model, inputs = build(config), sources(0, 8, 8, 50)
    np.testing.assert_array_equal(translate(config, model, inputs, beam_size=1),
                                  translate(config, model, inputs, strategy="greedy"))


@pytest.mark.parametrize("strategy", ["beam", "greedy"])
def test_scanned_layers_decode_like_unrolled_layers(tiny_config, strategy):
    """With scan_layers the cached decoder scans over stacked caches; same parameters, same outputs."""
    config = tiny_config(model=MODEL, decode=DECODE)
    scanned_config = tiny_config(model=dict(MODEL, scan_layers=True), decode=DECODE)
    model, inputs = build(config), sources(9, 8, 8, 50)
    graphdef, params = build(scanned_config, seed=3)
    nnx.replace_by_pure_dict(params, stack_layer_lists(nnx.to_pure_dict(model[1])))
    scanned = translate(scanned_config, (graphdef, params), inputs, strategy=strategy)
    np.testing.assert_array_equal(scanned, translate(config, model, inputs, strategy=strategy))
    assert_well_formed(scanned, limit=8 + 4)


def brute_force_best(config, model, inputs, limit, alpha, prefixes=None):
    """The highest-scoring output of each source among all that end in EOS within `limit` tokens
    (and begin with its prefix in `prefixes`), scored with the model's teacher-forced
    log-probabilities and the GNMT length penalty."""
    vocab = config.model.vocab_size
    outputs = [list(body) + [EOS] for n in range(limit)
               for body in itertools.product(range(2, vocab), repeat=n)]
    targets = np.array([o + [0] * (limit - len(o)) for o in outputs], np.int32)
    lengths = np.array([len(o) for o in outputs])
    graphdef, params = model
    forward = jax.jit(lambda params, inputs, targets: nnx.merge(graphdef, params)(inputs, targets))
    logits = forward(params, np.repeat(inputs, len(targets), axis=0), np.tile(targets, (len(inputs), 1)))
    log_probs = jax.nn.log_softmax(logits).reshape(len(inputs), len(targets), limit, -1)
    log_p = (np.take_along_axis(np.asarray(log_probs), targets[None, ..., None], -1)[..., 0]
             * (targets > 0)).sum(axis=-1)
    scores = log_p / ((5 + lengths) / 6) ** alpha
    if prefixes is not None:
        begins = np.array([[o[:len(p)] == list(p) and len(o) > len(p) for o in outputs] for p in prefixes])
        scores = np.where(begins, scores, -np.inf)
    return targets[np.argmax(scores, axis=1)]


def exhaustive_setup(tiny_config, limit=3, beam=0, batch=8):
    """Vocabulary {pad, EOS, 2, 3, 4}, sources of up to `limit` tokens (outputs too), a beam
    wide enough to keep every hypothesis (or `beam`), and a random untied output projection
    scaled up: peaked next-token distributions, so the best output is not always the shortest."""
    beam = beam or sum(3**n for n in range(limit))
    config = tiny_config(model=dict(MODEL, vocab_size=5, share_embeddings=False, logits_via_embedding=False),
                         decode=dict(beam_size=beam, max_length_offset=0))
    graphdef, params = build(config, seed=2, eos_boost=1.0)
    params["logits_projection"][...] = params["logits_projection"][...] * 4.0
    return config, (graphdef, params), sources(2, batch, limit, 5)


def test_beam_search_finds_the_best_output_by_brute_force(tiny_config):
    config, model, inputs = exhaustive_setup(tiny_config)
    got = translate(config, model, inputs, length_penalty=0.6)
    np.testing.assert_array_equal(got[:, :3], brute_force_best(config, model, inputs, 3, 0.6))
    assert len(set((got > 0).sum(axis=1))) == 3


def test_length_penalty_prefers_longer_outputs_as_the_formula_says(tiny_config):
    config, model, inputs = exhaustive_setup(tiny_config)
    lengths = {}
    for alpha in (0.0, 0.6):
        got = translate(config, model, inputs, length_penalty=alpha)
        np.testing.assert_array_equal(got[:, :3], brute_force_best(config, model, inputs, 3, alpha))
        lengths[alpha] = (got > 0).sum(axis=1)
    assert (lengths[0.6] >= lengths[0.0]).all() and (lengths[0.6] > lengths[0.0]).any()


def beam_search_to_the_limit(model, inputs, width, limit, alpha):
    """An independent beam search (numpy, a full forward pass per step) that never stops
    early: every step to `limit` takes the 2W most likely extensions (EOS alone at the last
    step), those ending in EOS among the first W finish, and the W best others go on. Its W
    best finished (tokens [B, W, limit], scores [B, W]), best first."""
    graphdef, params = model
    forward = jax.jit(lambda inputs, targets: jax.nn.log_softmax(nnx.merge(graphdef, params)(inputs, targets)))
    tokens, scores = np.zeros((len(inputs), width, limit), np.int32), np.full((len(inputs), width), -np.inf)
    for b, source in enumerate(inputs):
        alive, finished = [((), 0.0)], []
        for t in range(limit):
            targets = np.array([list(p) + [2] + [0] * (limit - t - 1) for p, _ in alive], np.int32)
            log_probs = np.asarray(forward(np.repeat(source[None], len(alive), 0), targets))[:, t]
            allowed = [EOS] if t == limit - 1 else range(1, log_probs.shape[-1])
            extensions = sorted(((lp + log_probs[i, token], p + (token,)) for i, (p, lp) in enumerate(alive)
                                 for token in allowed), reverse=True)[:2 * width]
            finished += [(lp / ((5 + t + 1) / 6) ** alpha, p) for rank, (lp, p) in enumerate(extensions)
                         if p[-1] == EOS and rank < width]
            alive = [(p, lp) for lp, p in extensions if p[-1] != EOS][:width]
        for w, (score, p) in enumerate(sorted(finished, reverse=True)[:width]):
            tokens[b, w, :len(p)], scores[b, w] = p, score
    return tokens, scores


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_the_bound_stops_a_beam_only_where_running_on_would_change_nothing(tiny_config, alpha):
    """A narrow beam: beam_stop="bound" gives the n-best (and scores) of a beam search run to
    the length limit; fairseq's stop after W finished misses better hypotheses of some sentences."""
    config, model, inputs = exhaustive_setup(tiny_config, limit=6, beam=2, batch=16)
    graphdef, params = model
    mesh = parallel.make_mesh("data:1", jax.devices()[:1])
    shardings = parallel.state_shardings(params, mesh, config.logical_axis_rules)
    expected_tokens, expected_scores = beam_search_to_the_limit(model, inputs, 2, 6, alpha)
    got = {}
    for stop in ("bound", "fairseq"):
        run = decode.make_translate(config, graphdef, mesh, shardings, nbest=True, length_penalty=alpha,
                                    beam_stop=stop)
        got[stop] = [np.asarray(x) for x in run(params, inputs)]
    np.testing.assert_array_equal(got["bound"][0][..., :6], expected_tokens)
    np.testing.assert_allclose(got["bound"][1], expected_scores, rtol=1e-5)
    assert (got["fairseq"][1][:, 0] < expected_scores[:, 0] - 1e-6).any()


@pytest.mark.parametrize("alpha, reachable", [(1.0, -1 / 2.5), (0.0, -1.0), (-1.0, -1 * 7 / 6)])
def test_the_bound_is_the_best_score_the_best_unfinished_hypothesis_could_reach(alpha, reachable):
    """Step 0 of outputs of up to 10 tokens: a hypothesis at log p -1 could finish with 2 to 10
    tokens; its best score is -1 over the largest GNMT penalty among those lengths."""
    options = decode.Options("beam", 2, alpha, "bound", 0, 1.0, 0, 1.0)
    alive = jnp.array([[-1.0, -3.0]] * 2)
    finished = jnp.array([[-0.1, reachable + 1e-3], [-0.1, reachable - 1e-3]])
    done = decode._done(0, 10, alive, finished, jnp.array([2, 2]), options)
    assert done.tolist() == [True, False]


def test_sampling_only_the_most_likely_token_equals_greedy(tiny_config):
    config = tiny_config(model=MODEL, decode=DECODE)
    model, inputs = build(config), sources(4, 8, 8, 50)
    greedy = translate(config, model, inputs, strategy="greedy")
    for only_the_best in (dict(top_k=1), dict(top_p=1e-4)):
        sampled = translate(config, model, inputs, rng=jax.random.PRNGKey(5), strategy="sample",
                            **only_the_best)
        np.testing.assert_array_equal(sampled, greedy, err_msg=str(only_the_best))


def test_sampling_is_deterministic_for_a_fixed_rng(tiny_config):
    config = tiny_config(model=MODEL, decode=DECODE)
    model, inputs = build(config), sources(5, 8, 8, 50)
    def sample(seed):
        return translate(config, model, inputs, rng=jax.random.PRNGKey(seed), strategy="sample")

    a = sample(0)
    np.testing.assert_array_equal(a, sample(0))
    assert not np.array_equal(a, sample(1))
    assert_well_formed(a, limit=8 + 4)


@pytest.mark.parametrize("strategy", ["beam", "sample"])
def test_decoding_on_a_data_mesh_equals_one_device(tiny_config, strategy):
    config = tiny_config(model=MODEL, decode=DECODE)
    model, inputs = build(config), sources(6, 8, 8, 50)
    rng = jax.random.PRNGKey(0)
    np.testing.assert_array_equal(translate(config, model, inputs, "data:8", rng, strategy=strategy),
                                  translate(config, model, inputs, "data:1", rng, strategy=strategy))


def test_forced_length_gives_exactly_that_many_tokens(tiny_config):
    config = tiny_config(model=MODEL, decode=DECODE)
    model, inputs = build(config, eos_boost=4.0), sources(7, 8, 8, 50)
    tokens = translate(config, model, inputs, forced_length=6)
    assert tokens.shape == (8, 6) and (tokens > EOS).all()


def test_batch_that_the_data_axes_cannot_split_is_refused(tiny_config):
    config = tiny_config(model=MODEL, decode=DECODE)
    with pytest.raises(ValueError, match="multiple of 8"):
        translate(config, build(config), sources(8, 4, 8, 50), "data:8")


def test_chunked_top_k_equals_lax_top_k():
    x = np.array(jax.random.normal(jax.random.PRNGKey(0), (2, 3, 1000)))
    x[0, 0, :500] = -np.inf
    values, indices = decode._top_k(x, 8, chunk=16)
    expected_values, expected_indices = jax.lax.top_k(x, 8)
    np.testing.assert_array_equal(values, expected_values)
    np.testing.assert_array_equal(indices, expected_indices)


def test_chunks_divide_the_vocabulary_where_they_can():
    x = np.array(jax.random.normal(jax.random.PRNGKey(0), (2, 3, 2000)))  # chunks of 50, no padding
    for got, expected in zip(decode._top_k(x, 8), jax.lax.top_k(x, 8)):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("t, forced_length", [(3, 0), (9, 0), (3, 12)])
def test_best_extensions_equal_a_top_k_over_the_allowed_logits(t, forced_length):
    options = decode.Options.from_config(config_lib.default_config(), forced_length=forced_length)
    logits_BxWxV = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 3000)) * 4
    logits_BxWxV = logits_BxWxV.at[:, :2, decode.PAD].set(50.0).at[:, 1:3, decode.EOS].set(40.0)
    log_probs_BxW = jnp.array([[0.0, -1.0, -2.0, -jnp.inf], [-0.5, -0.7, -3.0, -4.0]])
    limit_B = jnp.array([10, 4])  # each sentence's last step (9, 3): EOS only.
    log_probs, parents, tokens = decode._best_extensions(log_probs_BxW, logits_BxWxV, 8, t, limit_B, options, None)
    allowed_BxWxV = decode._allowed(logits_BxWxV, t, limit_B, options)
    candidates_BxWV = (log_probs_BxW[..., None] + jax.nn.log_softmax(logits_BxWxV)
                       + jnp.where(jnp.isfinite(allowed_BxWxV), 0.0, -jnp.inf)).reshape(2, -1)
    expected_log_probs, expected = jax.lax.top_k(candidates_BxWV, 8)
    np.testing.assert_allclose(log_probs, expected_log_probs, rtol=1e-6)
    finite = np.isfinite(np.asarray(expected_log_probs))
    np.testing.assert_array_equal(np.asarray(parents)[finite], (expected // 3000)[finite])
    np.testing.assert_array_equal(np.asarray(tokens)[finite], (expected % 3000)[finite])
    assert not np.isin(np.asarray(tokens)[finite], decode._banned(options)).any()
    last = (t == np.asarray(limit_B) - 1) & (not forced_length)
    assert last.any() != bool(forced_length)
    assert (np.asarray(tokens)[last][finite[last]] == decode.EOS).all()
    assert (np.asarray(tokens)[~last][finite[~last]] != decode.EOS).any()


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_attention_in_the_decoding_layout_equals_attend(num_kv_heads):
    attention = layers.Attention(32, 4, num_kv_heads, 8, 0.0, np.float32, nnx.Rngs(params=0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 32))
    source = jax.random.normal(jax.random.PRNGKey(2), (2, 7, 32))
    mask = jax.random.bernoulli(jax.random.PRNGKey(3), 0.6, (2, 1, 3, 7)).at[..., 0].set(True)

    @nnx.jit
    def both(attention, x, source, mask):
        return (attention.attend(x, *attention.project_kv(source), mask, None),
                attention.attend_few(x, *attention.project_kv(source, for_decoding=True), mask))

    expected, got = both(attention, x, source, mask)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_cached_attention_reads_only_the_window_that_holds_the_new_slots():
    """Slots past the window are NaN: read, they would poison the output even where masked."""
    attention = layers.Attention(32, 4, 2, 8, 0.0, np.float32, nnx.Rngs(params=0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 32))
    keys, values = (jax.random.normal(jax.random.PRNGKey(seed), shape) for seed, shape in
                    ((2, (2, 2, 8, 16)), (3, (2, 2, 16, 8))))
    mask = jax.random.bernoulli(jax.random.PRNGKey(4), 0.6, (2, 1, 3, 16)).at[..., 0].set(True)

    @nnx.jit
    def attend(attention, x, keys, values, mask, index):
        return attention.attend_cached(x, (keys, values), index, mask, windows=(4, 8, 16))[0]

    for index, window in ((0, 4), (1, 4), (2, 8), (5, 8), (6, 16)):  # slots index..index+2 written.
        mask_w = mask & (jnp.arange(16) < window)[None, None, None, :]
        poisoned = (keys.at[..., window:].set(jnp.nan), values.at[:, :, window:].set(jnp.nan))
        got = attend(attention, x, *poisoned, mask_w, index)
        expected = attend(attention, x, keys, values, mask_w, index)
        assert np.isfinite(got).all(), (index, window)
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_cache_windows_double_up_to_the_cache():
    assert decode._cache_windows(128, 16) == (16, 32, 64, 128)
    assert decode._cache_windows(53, 16) == (16, 32, 53)
    assert decode._cache_windows(12, 16) == decode._cache_windows(128, 0) == ()


@pytest.mark.parametrize("strategy", ["beam", "greedy"])
def test_attention_windows_change_no_hypothesis(tiny_config, strategy):
    config = tiny_config(model=MODEL, decode=DECODE)
    model, inputs = build(config, eos_boost=2.0), sources(5, 8, 8, 50)
    windowed = search(config, model, inputs, strategy=strategy, **WINDOWS)
    whole = search(config, model, inputs, strategy=strategy)
    np.testing.assert_array_equal(windowed[0], whole[0])
    np.testing.assert_allclose(windowed[1], whole[1], rtol=1e-5)
    assert (windowed[0][:, 0] > 0).sum(axis=1).max() > 8  # past the windows of 2, 4 and 8 steps.


def teacher_forced_log_probs(model, inputs, hypotheses):
    """Each hypothesis' summed token log-probabilities (EOS included) from the full model's logits."""
    graphdef, params = model
    logits = np.asarray(nnx.merge(graphdef, params)(inputs, hypotheses), np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    taken = np.take_along_axis(log_probs, hypotheses[..., None], axis=-1)[..., 0]
    return (taken * (hypotheses > 0)).sum(-1)


@pytest.mark.parametrize("strategy", ["beam", "greedy"])
def test_nbest_scores_are_the_penalised_log_probabilities_of_their_hypotheses(tiny_config, strategy):
    config = tiny_config(model=MODEL, decode=DECODE)
    model, inputs = build(config), sources(9, 8, 8, 50)
    graphdef, params = model
    mesh = parallel.make_mesh("data:1", jax.devices()[:1])
    shardings = parallel.state_shardings(params, mesh, config.logical_axis_rules)
    run = decode.make_translate(config, graphdef, mesh, shardings, nbest=True, strategy=strategy,
                                length_penalty=0.6)
    tokens, scores = (np.asarray(x) for x in run(params, inputs))
    width = config.decode.beam_size if strategy == "beam" else 1
    assert tokens.shape[:2] == scores.shape == (8, width)
    np.testing.assert_array_equal(tokens[:, 0], translate(config, model, inputs, strategy=strategy,
                                                          length_penalty=0.6))
    assert (np.diff(scores, axis=1) <= 0).all()  # best first.
    for w in range(width):
        lengths = (tokens[:, w] > 0).sum(-1)
        expected = teacher_forced_log_probs(model, inputs, tokens[:, w]) / ((5 + lengths) / 6) ** 0.6
        np.testing.assert_allclose(scores[:, w], expected, rtol=1e-4, atol=1e-4)
        assert_well_formed(tokens[:, w], limit=8 + 4)


def test_max_length_caps_the_outputs(tiny_config):
    config = tiny_config(model=MODEL, decode=DECODE)
    model, inputs = build(config, eos_boost=0.0), sources(10, 8, 8, 50)
    tokens = translate(config, model, inputs, strategy="greedy", max_length=5)
    assert tokens.shape == (8, 5)
    assert_well_formed(tokens, limit=5)
    assert (tokens[:, 4] == EOS).any()


def shortlist_file(tmp_path, vocab, seed=0, per_token=3):
    """A random lexical table over `vocab` tokens (tfx/data/shortlist.py's format)."""
    rng = np.random.default_rng(seed)
    candidates = rng.integers(2, vocab, (vocab, per_token)).astype(np.int32)
    probs = np.sort(rng.random((vocab, per_token)), axis=1)[:, ::-1].astype(np.float32)
    path = str(tmp_path / "shortlist.npz")
    shortlist.save(path, candidates, probs, rng.integers(0, 100, vocab), 4, "unused fingerprint")
    return path


def test_a_shortlist_of_the_whole_vocabulary_decodes_as_without(tiny_config, tmp_path):
    config = tiny_config(model=MODEL, decode=DECODE)
    model, inputs = build(config), sources(11, 8, 8, 50)
    np.testing.assert_array_equal(
        translate(config, model, inputs, shortlist=shortlist_file(tmp_path, 50), shortlist_size=50),
        translate(config, model, inputs))


@pytest.mark.parametrize("strategy", ["beam", "greedy"])
def test_shortlist_decoding_scores_with_the_softmax_over_the_batch_shortlist(tiny_config, tmp_path, strategy):
    """The independent answer: teacher-forced logits of the whole vocabulary, cut to the
    batch's shortlist (from `shortlist.vocabulary`), then normalised."""
    config = tiny_config(model=MODEL, decode=DECODE)
    model, inputs = build(config), sources(12, 8, 8, 50)
    graphdef, params = model
    path = shortlist_file(tmp_path, 50)
    mesh = parallel.make_mesh("data:1", jax.devices()[:1])
    shardings = parallel.state_shardings(params, mesh, config.logical_axis_rules)
    tokens, scores = (np.asarray(x) for x in decode.make_translate(
        config, graphdef, mesh, shardings, nbest=True, strategy=strategy, length_penalty=0.6,
        shortlist=path, shortlist_size=16)(params, inputs))
    vocab_S = np.asarray(shortlist.vocabulary(shortlist.load(path, 50), inputs, 16))
    assert set(np.unique(tokens)) <= set(vocab_S) and len(set(vocab_S)) == 16
    logits = np.asarray(nnx.merge(graphdef, params)(inputs, tokens[:, 0]), np.float64)
    out_of_shortlist = ~np.isin(np.arange(50), vocab_S)
    logits[..., out_of_shortlist] = -np.inf
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    taken = np.take_along_axis(log_probs, tokens[:, 0, :, None], axis=-1)[..., 0]
    lengths = (tokens[:, 0] > 0).sum(-1)
    expected = (taken * (tokens[:, 0] > 0)).sum(-1) / ((5 + lengths) / 6) ** 0.6
    np.testing.assert_allclose(scores[:, 0], expected, rtol=1e-4, atol=1e-4)
    assert_well_formed(tokens[:, 0], limit=8 + 4)
    if strategy == "greedy":  # the cache-free decoder takes the shortlist too.
        np.testing.assert_array_equal(tokens[:, 0], translate(
            config, model, inputs, strategy=strategy, length_penalty=0.6, shortlist=path,
            shortlist_size=16, full_recompute=True))


def test_shortlist_decoding_on_a_data_and_tensor_mesh_equals_one_device(tiny_config, tmp_path):
    """The batch's shortlist gathers sources from every data shard and output rows split over
    the tensor axis."""
    config = tiny_config(model=MODEL, decode=DECODE)
    model, inputs = build(config), sources(13, 8, 8, 50)
    options = dict(shortlist=shortlist_file(tmp_path, 50), shortlist_size=16)
    np.testing.assert_array_equal(translate(config, model, inputs, "data:2,tensor:4", **options),
                                  translate(config, model, inputs, **options))


def search(config, model, inputs, prefix=None, mesh_shape="data:1", rng=None, **overrides):
    """(tokens [B, W, T], scores [B, W]) of `decode.search`, with forced prefixes [B, P]."""
    graphdef, params = model
    mesh = parallel.make_mesh(mesh_shape, jax.devices()[:1] if mesh_shape == "data:1" else None)
    shardings = parallel.state_shardings(params, mesh, config.logical_axis_rules)
    run = decode.make_translate(config, graphdef, mesh, shardings, nbest=True, **overrides)
    return tuple(np.asarray(x) for x in run(params, inputs, rng, prefix))


def prefixes_of(tokens_BxT, lengths) -> np.ndarray:
    """The first lengths[b] tokens of each row, right-padded to [B, max(lengths)]."""
    prefix = np.zeros((len(tokens_BxT), max(lengths)), np.int32)
    for b, n in enumerate(lengths):
        prefix[b, :n] = tokens_BxT[b, :n]
    return prefix


@pytest.mark.parametrize("strategy", ["greedy", "sample"])
def test_forcing_a_hypothesis_own_start_finds_it_again_with_its_score(tiny_config, strategy):
    config = tiny_config(model=MODEL, decode=DECODE)
    model, inputs, rng = build(config), sources(14, 8, 8, 50), jax.random.PRNGKey(3)
    tokens, scores = search(config, model, inputs, rng=rng, strategy=strategy)
    ends = [list(row).index(EOS) for row in tokens[:, 0]]
    lengths = [min(b % 4, end) for b, end in enumerate(ends)]  # 0 to 3 tokens, none of them EOS.
    assert max(lengths) > 0
    forced_tokens, forced_scores = search(config, model, inputs, prefixes_of(tokens[:, 0], lengths),
                                          rng=rng, strategy=strategy)
    np.testing.assert_array_equal(forced_tokens, tokens)
    np.testing.assert_allclose(forced_scores, scores, rtol=1e-5)


def test_forced_beam_search_finds_the_best_output_with_that_prefix_by_brute_force(tiny_config):
    config, model, inputs = exhaustive_setup(tiny_config)
    prefixes = [[], [2], [3], [4], [2, 3], [4, 4], [3, 2], [2]]
    prefix = np.zeros((8, 2), np.int32)
    for b, p in enumerate(prefixes):
        prefix[b, :len(p)] = p
    tokens, _ = search(config, model, inputs, prefix, length_penalty=0.6)
    expected = brute_force_best(config, model, inputs, 3, 0.6, prefixes)
    np.testing.assert_array_equal(tokens[:, 0, :3], expected)
    assert (expected != brute_force_best(config, model, inputs, 3, 0.6)).any()  # forcing mattered.


def test_forced_beam_hypotheses_begin_with_the_prefix_and_score_it(tiny_config):
    config = tiny_config(model=MODEL, decode=DECODE)
    model, inputs = build(config), sources(15, 8, 8, 50)
    prefix = np.random.default_rng(0).integers(2, 50, (8, 10)).astype(np.int32)
    prefix[np.arange(10)[None, :] >= np.array([10, 0, 1, 2, 3, 5, 8, 9])[:, None]] = 0
    # Without the sentences' own caps, which would leave room for one hypothesis only.
    tokens, scores = search(config, model, inputs, prefix, length_penalty=0.6, max_len_a=0.0, max_len_b=0)
    width = config.decode.beam_size
    for w in range(width):
        for b, row in enumerate(prefix):
            n = int((row > 0).sum())
            np.testing.assert_array_equal(tokens[b, w, :n], row[:n])
        lengths = (tokens[:, w] > 0).sum(-1)
        expected = teacher_forced_log_probs(model, inputs, tokens[:, w]) / ((5 + lengths) / 6) ** 0.6
        np.testing.assert_allclose(scores[:, w], expected, rtol=1e-4, atol=1e-4)
    assert tokens.shape[2] >= 11  # a 10-token prefix and EOS fit, though the sources have 8.
    sharded = search(config, model, inputs, prefix, "data:2,tensor:4", length_penalty=0.6, max_len_a=0.0,
                     max_len_b=0)
    np.testing.assert_array_equal(sharded[0], tokens)


def test_a_forced_prefix_outside_the_shortlist_joins_it(tiny_config, tmp_path):
    config = tiny_config(model=MODEL, decode=DECODE)
    model, inputs = build(config), sources(16, 8, 8, 50)
    path = shortlist_file(tmp_path, 50)
    listed = set(np.asarray(shortlist.vocabulary(shortlist.load(path, 50), inputs, 16)).tolist())
    outside = [t for t in range(2, 50) if t not in listed][:3]
    prefix = np.tile(np.array(outside, np.int32), (8, 1))
    for strategy in ("beam", "greedy"):
        tokens, scores = search(config, model, inputs, prefix, strategy=strategy, shortlist=path,
                                shortlist_size=16)
        np.testing.assert_array_equal(tokens[:, 0, :3], prefix)
        assert np.isfinite(scores[:, 0]).all()


@pytest.mark.parametrize("extra", [dict(), dict(no_repeat_ngram_size=2, with_prefix=True)])
def test_halving_the_batch_as_sentences_finish_changes_no_hypothesis(tiny_config, extra):
    """Rows of very different lengths finish at different steps, so the halved phases run."""
    extra = dict(extra)
    with_prefix = extra.pop("with_prefix", False)
    config = tiny_config(model=MODEL, decode=DECODE)
    model, inputs = build(config, eos_boost=4.0), sources(11, 16, 12, 50)
    forced = np.random.default_rng(3).integers(2, 50, (16, 2)).astype(np.int32)
    prefix = prefixes_of(forced, np.arange(16) % 3) if with_prefix else None
    halved = search(config, model, inputs, prefix, batch_halvings=3, **WINDOWS, **extra)
    whole = search(config, model, inputs, prefix, **extra)
    np.testing.assert_array_equal(halved[0], whole[0])
    np.testing.assert_allclose(halved[1], whole[1], rtol=1e-5)
    graphdef, params = model
    searches = jax.make_jaxpr(lambda p, x: decode.search(nnx.merge(graphdef, p), x, decode.Options.from_config(
        config, batch_halvings=3)))(params, inputs)
    assert str(searches).count("while[") == 4  # one loop per phase: 16, 8, 4 and 2 rows.


def test_halving_a_batch_sharded_over_a_data_mesh_equals_one_device(tiny_config):
    """32 rows over 8 devices halve to 16 and 8 (then stop: 4 would not split evenly)."""
    config = tiny_config(model=MODEL, decode=DECODE)
    model, inputs = build(config, eos_boost=4.0), sources(12, 32, 12, 50)
    sharded = search(config, model, inputs, mesh_shape="data:8", batch_halvings=3)
    whole = search(config, model, inputs)
    np.testing.assert_array_equal(sharded[0], whole[0])
    np.testing.assert_allclose(sharded[1], whole[1], rtol=1e-5)
