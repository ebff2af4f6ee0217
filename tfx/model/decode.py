"""Translation: beam search, greedy decoding or sampling, with a key/value cache.

    translate = decode.make_translate(config, graphdef, mesh, params_shardings)
    tokens_BxT = translate(params, inputs_BxS)  # best hypotheses: EOS-terminated, 0 after

`make_translate` jit-compiles `translate(model, inputs_BxS, options, rng)` (traceable) with the
batch sharded over the mesh's data axes (`jit_translate` without placing the arguments, for
ahead-of-time compilation); with `nbest=True` it returns `search`'s hypotheses and scores
instead. `Options.from_config` reads `config.decode`, and `full_recompute=True` (no cache) or
`forced_length=n` (benchmarks) may be added. Token 0 is padding and the decoder's start token,
1 is EOS; 0 is never generated. Outputs have at most (longest source of the batch, in non-pad
tokens) + max_length_offset tokens, and at most max_length (if set) and the model's max_len;
with max_len_a or max_len_b, each sentence's at most max_len_a * its source length +
max_len_b; the last one allowed is EOS.

Guards against runaway outputs (`_Guard`, off by default): no_repeat_ngram_size bans a token
that would repeat an n-gram of its hypothesis, and repetition_penalty penalises the logits of
the tokens a hypothesis holds. Scores are then the log-probabilities of the guarded logits.

A forced target prefix (`prefix_BxP`: token ids, right-padded with 0, no EOS) makes each
hypothesis of sentence b begin with its prefix's tokens (CTranslate2's `target_prefix`): at
step t < len(prefix_b) the only token allowed is prefix_b[t]. Its log-probabilities count in
the score, so forcing a hypothesis' own start finds it again with its score (greedy decoding
exactly). The output may be one token longer than the longest prefix, whatever the source's
length, within max_length and the model's max_len, which cut a prefix too long for them.

Scores are the model's log-probability of a hypothesis (EOS included) divided by the GNMT
length penalty ((5 + length) / 6) ** length_penalty, the order beam search ranks by.

Incremental decoding: the encoder runs once; each decoder layer's cross-attention keys/values
are projected once per sentence; self-attention keys/values (num_kv_heads heads) go into a
cache, both in `Attention`'s decoding layout. The W hypotheses (beams) of a sentence are
decoded as W query positions of one row, so cross-attention reads the sentence's keys/values
without copying them per beam. The self-attention cache of a row has a slot for each (step j,
beam w), at j * W + w, written once: a beam attends to the slots of its ancestors, which a
[B, W, L] table names, so reordering beams gathers that table, never the cache (scoring W-fold
the slots costs less than gathering the cache every step). With `cache_window`, step t reads
only the first slots of the cache, the smallest window of cache_window * 2^i steps above t
(`lax.switch`), so that self-attention costs grow with the output, as CTranslate2's cache does.

With `config.decode.shortlist` (a lexical table, tfx/data/shortlist.py) each batch scores only
its shortlist of `shortlist_size` target tokens, chosen from its sources: the output projection,
softmax and top-k shrink from the vocabulary to those tokens.

Beam search (as fairseq): each step takes the 2W most likely extensions of the W beams; those
ending in EOS among the first W finish, scored with the GNMT length penalty
log p / ((5 + length) / 6) ** length_penalty (length counts EOS), and the best W others go on.
A sentence is done (its finished n-best kept as they are) with `beam_stop="bound"` when no
hypothesis going on can still beat the W-th best finished one (the bound of T5X and the Flax
example: the best going on's log p, which can only fall, over the largest length penalty it
could still reach), so stopping changes nothing against running to the length limit; with
`beam_stop="fairseq"`, as soon as W hypotheses have finished, which can miss a better one.
The loop stops when every sentence is done. With `batch_halvings` (beam search) it runs in
phases: once no more than half of a phase's rows are still searching, the next phase goes on
with those rows only, gathered into a batch of half the rows (finished rows keep their
results), so a batch decodes at the cost of its live sentences, as CTranslate2's does.
Sampling draws from softmax(logits / temperature) within the top_k tokens and the top_p mass.
"""
from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from tfx.core import parallel
from tfx.core.config import DECODE_STRATEGIES, choice_error
from tfx.model import quantize, shortlist
from tfx.model.transformer import EncoderDecoder, attention_mask

PAD, EOS = 0, 1


@dataclasses.dataclass(frozen=True)
class Options:
    """`config.decode`, plus two switches for tests and benchmarks."""

    strategy: str  # beam, greedy or sample.
    beam_size: int
    length_penalty: float
    beam_stop: str  # bound or fairseq (the module doc).
    max_length_offset: int
    temperature: float
    top_k: int
    top_p: float
    max_length: int = 0
    max_len_a: float = 0.0  # with max_len_b: each sentence's own output cap (`_sentence_limits`).
    max_len_b: int = 0
    no_repeat_ngram_size: int = 0  # > 0: no n-gram of this size twice in a hypothesis.
    repetition_penalty: float = 1.0  # > 1: the logits of tokens a hypothesis holds, penalised.
    batch_halvings: int = 0  # beam search: how many times a batch may halve (`_beam_search`).
    cache_window: int = 0  # > 0: the smallest self-attention window, in steps (`_cache_windows`).
    shortlist: str = ""  # a lexical shortlist's file (tfx/data/shortlist.py); "": the whole vocabulary.
    shortlist_size: int = 1024  # target tokens a batch decodes over, with `shortlist`.
    forced_length: int = 0  # > 0: exactly this many tokens per hypothesis, EOS forbidden.
    full_recompute: bool = False  # no cache: rerun the decoder over the whole prefix each step.

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, **overrides) -> Options:
        return cls(**{**config.decode.to_dict(), **overrides})


def jit_translate(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, mesh: Mesh,
                  nbest: bool = False, **overrides) -> Callable:
    """jit-compiled `translate(params, inputs_BxS, rng) -> tokens_BxT` on `mesh`, for arguments
    already placed (or described, to compile ahead of time: tfx/aot.py) with their shardings;
    with `nbest`, `-> (tokens_BxWxT, scores_BxW)` (see `search`).

    `overrides` replace fields of `Options.from_config(config)`.
    """
    options = Options.from_config(config, **overrides)
    rules = config.logical_axis_rules
    decode = search if nbest else translate

    @jax.jit
    def run(params, inputs_BxS, rng, prefix_BxP=None):
        with parallel.activation_sharding(mesh, rules), quantize.matmuls(config.quantization):
            return decode(nnx.merge(graphdef, params), inputs_BxS, options, rng, prefix_BxP)

    return run


def make_translate(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef, mesh: Mesh,
                   params_shardings: nnx.State, nbest: bool = False, **overrides) -> Callable:
    """`translate(params, inputs_BxS, rng=None, prefix_BxP=None) -> tokens_BxT` on `mesh` (see
    `jit_translate`, also for `nbest`), which places its arguments. `rng` (a PRNG key) only
    matters for sampling; None means key 0. `prefix_BxP`: forced target prefixes (module doc).
    """
    run = jit_translate(config, graphdef, mesh, nbest, **overrides)
    batch_sharding = parallel.batch_sharding(mesh, config.logical_axis_rules)
    rows_per_shard = parallel.data_parallel_size(mesh, config.logical_axis_rules)

    def translate_batch(params, inputs_BxS, rng=None, prefix_BxP=None):
        if inputs_BxS.shape[0] % rows_per_shard:
            raise ValueError(
                f"a batch of {inputs_BxS.shape[0]} sentences cannot be split over the "
                f"{rows_per_shard}-way data axes of config.mesh_shape={config.mesh_shape!r}; "
                f"make the decoding batch a multiple of {rows_per_shard}.")
        params = jax.device_put(params, params_shardings)
        inputs_BxS = jax.device_put(inputs_BxS, batch_sharding)
        if prefix_BxP is not None:
            prefix_BxP = jax.device_put(prefix_BxP, batch_sharding)
        return run(params, inputs_BxS, jax.random.PRNGKey(0) if rng is None else rng, prefix_BxP)

    return translate_batch


def translate(model: EncoderDecoder, inputs_BxS: jax.Array, options: Options,
              rng: jax.Array | None = None, prefix_BxP: jax.Array | None = None) -> jax.Array:
    """Best translations [B, T] of right-padded sources [B, S] (T: the longest output allowed)."""
    return search(model, inputs_BxS, options, rng, prefix_BxP)[0][:, 0]


def search(model: EncoderDecoder, inputs_BxS: jax.Array, options: Options,
           rng: jax.Array | None = None, prefix_BxP: jax.Array | None = None
           ) -> tuple[jax.Array, jax.Array]:
    """Hypotheses [B, W, T] of right-padded sources [B, S], best first, and their scores [B, W]
    (-inf: no hypothesis). W is the beam size for beam search, else 1. `prefix_BxP`: forced
    target prefixes (module doc)."""
    if options.strategy not in DECODE_STRATEGIES:
        raise choice_error("decode.strategy", options.strategy, DECODE_STRATEGIES)
    segment_BxS = (inputs_BxS > 0).astype(jnp.int32)
    encoded_BxSxD = model.encode(inputs_BxS, segment_BxS)
    length, limit = _output_length(model.max_len, segment_BxS, options, prefix_BxP)
    limit_B = _sentence_limits(segment_BxS, options, limit, prefix_BxP)
    width = options.beam_size if options.strategy == "beam" else 1
    vocab_S = None
    if options.shortlist:
        table = shortlist.load(options.shortlist, model.vocab_size)
        vocab_S = shortlist.vocabulary(table, inputs_BxS, options.shortlist_size, forced=prefix_BxP)
    if options.full_recompute:
        decoder = _full_decoder(model, encoded_BxSxD, segment_BxS, width, length, vocab_S)
    else:
        decoder = _cached_decoder(model, encoded_BxSxD, segment_BxS, width, length, vocab_S,
                                  _cache_windows(length, options.cache_window))
    forced = None if prefix_BxP is None else _Forced.of(prefix_BxP, vocab_S, limit_B)
    guard = _Guard.of(options, model.vocab_size, vocab_S, forced)
    if options.strategy == "beam":
        return _beam_search(decoder, inputs_BxS.shape[0], width, length, limit_B, options, forced, guard)
    if options.strategy == "sample" and rng is None:
        raise ValueError("sampling needs an rng key.")
    return _sample(decoder, inputs_BxS.shape[0], length, limit_B, options, rng, forced, guard)


def _output_length(max_len: int, segment_BxS, options: Options, prefix_BxP=None) -> tuple[int, jax.Array]:
    """(static buffer length, dynamic number of steps) of the outputs. The buffer is as short as
    the longest output allowed from the padded source: with max_len_a or max_len_b, that cap;
    the self-attention cache and every step's attention are as long."""
    if options.forced_length:
        if options.forced_length > max_len:
            raise ValueError(f"forced_length={options.forced_length} exceeds config.model.max_len={max_len}.")
        return options.forced_length, jnp.asarray(options.forced_length)
    wanted, steps = segment_BxS.shape[1] + options.max_length_offset, jnp.max(jnp.sum(segment_BxS, axis=1))
    steps = steps + options.max_length_offset
    if options.max_len_a or options.max_len_b:  # no sentence outgrows the padded source's cap.
        wanted = min(wanted, max(1, int(_length_cap(options, np.float32(segment_BxS.shape[1]), np))))
    if prefix_BxP is not None:  # room for the prefix and one token after it.
        wanted = max(wanted, prefix_BxP.shape[1] + 1)
        steps = jnp.maximum(steps, jnp.max(jnp.sum(prefix_BxP != PAD, axis=1)) + 1)
    length = min(wanted, options.max_length or max_len, max_len)
    return length, jnp.clip(steps, 1, length)


def _sentence_limits(segment_BxS, options: Options, limit, prefix_BxP=None) -> jax.Array:
    """Each sentence's number of steps [B]: the batch's `limit`, and with max_len_a or
    max_len_b at most max_len_a * its source length + max_len_b (lengths with EOS; fairseq's
    --max-len-a/b, per sentence), with room for its forced prefix and one token."""
    limit_B = jnp.full(segment_BxS.shape[:1], limit)
    if options.forced_length or not (options.max_len_a or options.max_len_b):
        return limit_B
    cap_B = _length_cap(options, jnp.sum(segment_BxS, axis=1)).astype(jnp.int32)
    if prefix_BxP is not None:
        cap_B = jnp.maximum(cap_B, jnp.sum(prefix_BxP != PAD, axis=1) + 1)
    return jnp.clip(cap_B, 1, limit_B)


def _length_cap(options: Options, source_length, xp=jnp):
    """floor(max_len_a * source_length + max_len_b) in float32, with `xp` jnp (traced lengths)
    or np (a static one), so that the buffer and each sentence's limit agree."""
    return xp.floor(xp.float32(options.max_len_a) * source_length + xp.float32(options.max_len_b))


class _Forced(NamedTuple):
    """Forced prefixes as logit positions [B, P] (0: none), and each sentence's step limit [B]."""
    positions_BxP: jax.Array
    limit: jax.Array

    @classmethod
    def of(cls, prefix_BxP, vocab_V, limit) -> _Forced:
        if vocab_V is not None:  # the shortlist holds the prefix's tokens (shortlist.vocabulary).
            prefix_BxP = jnp.where(prefix_BxP == PAD, PAD, jnp.argmax(prefix_BxP[..., None] == vocab_V[None, None, :], axis=-1))
        return cls(prefix_BxP.astype(jnp.int32), limit)

    def at(self, t) -> tuple[jax.Array, jax.Array]:
        """(whether step t is forced [B], the logit position forced [B]). The last step is
        never forced: it ends the hypothesis."""
        last = self.positions_BxP.shape[1] - 1
        position_B = jax.lax.dynamic_index_in_dim(self.positions_BxP, jnp.minimum(t, last), axis=1,
                                                  keepdims=False)
        return (t <= last) & (position_B != PAD) & (t < self.limit - 1), position_B


class _Decoder(NamedTuple):
    """Next-token logits of W hypotheses per sentence, step by step.

    `step(state, tokens_BxWxL, t) -> (logits_BxWxV, state)` scores position t of hypotheses
    whose tokens before t are given; `reorder(state, parents_BxW)` makes beam w continue beam
    parents[:, w]; `select(state, rows_R)` keeps the state of those rows (batch entries) only,
    None where the state cannot shrink. With a shortlist `vocab_V` [V], logit i is token
    vocab_V[i]'s (PAD and EOS keep their ids as positions); None: logit i is token i's.
    """
    state: Any
    step: Callable
    reorder: Callable
    vocab_V: jax.Array | None
    select: Callable | None = None

    def tokens(self, positions):
        """Token ids of logit positions."""
        return positions if self.vocab_V is None else self.vocab_V[positions]


class _CachedState(NamedTuple):
    caches: Any  # each decoder layer's self-attention cache (batch on axis `layer_batch_axis`).
    ancestors_BxWxL: jax.Array
    cross_kv: Any  # each decoder layer's cross-attention keys and values, likewise.
    cross_mask_Bx1xWxS: jax.Array


def _cache_windows(length: int, first: int) -> tuple[int, ...]:
    """The step counts the self-attention of cached decoding may read: `first`, doubling while
    below `length`, then `length`; () for `first` 0 (the whole cache at every step)."""
    windows = []
    while 0 < first < length:
        windows.append(first)
        first *= 2
    return (*windows, length) if windows else ()


def _cached_decoder(model, encoded_BxSxD, source_segment_BxS, width, length, vocab_S,
                    windows: tuple[int, ...] = ()) -> _Decoder:
    """Incremental decoding: W beams per row, a self-attention cache of length * W slots, of
    which step t reads the first `windows[i]` * W, the smallest window above t (none: all)."""
    batch = encoded_BxSxD.shape[0]
    beams_W = jnp.arange(width)
    layer_batch_axis = 1 if model.scan_layers else 0  # scanned layers stack on a leading axis.
    slot_windows = tuple(steps * width for steps in windows)
    state = _CachedState(
        model.empty_cache(batch, length * width),
        jnp.broadcast_to(beams_W[None, :, None], (batch, width, length)),
        model.cross_kv(encoded_BxSxD, for_decoding=True),
        attention_mask(jnp.ones((batch, width), jnp.int32), source_segment_BxS, causal=False))

    def step(state: _CachedState, tokens_BxWxL, t):
        rows = tokens_BxWxL.shape[0]
        ancestors_BxWxL = jax.lax.dynamic_update_slice_in_dim(
            state.ancestors_BxWxL, jnp.broadcast_to(beams_W[None, :, None], (rows, width, 1)), t, axis=2)
        # Beam w sees slot (j, u) if j <= t and u is its ancestor at step j.
        visible_BxWxLxW = ((ancestors_BxWxL[..., None] == beams_W[None, None, None, :])
                           & (jnp.arange(length) <= t)[None, None, :, None])
        self_mask = visible_BxWxLxW.reshape(rows, 1, width, length * width)
        previous_BxWx1 = jax.lax.dynamic_slice_in_dim(tokens_BxWxL, jnp.maximum(t - 1, 0), 1, axis=2)
        inputs_BxW = jnp.where(t == 0, PAD, previous_BxWx1[..., 0])
        y_BxWxD, caches = model.decoder_states(inputs_BxW, jnp.full((rows, width), t), state.cross_kv,
                                               self_mask, state.cross_mask_Bx1xWxS, caches=state.caches,
                                               index=t * width, windows=slot_windows)
        return model.logits(y_BxWxD, vocab_S), state._replace(caches=caches, ancestors_BxWxL=ancestors_BxWxL)

    def reorder(state: _CachedState, parents_BxW):
        return state._replace(ancestors_BxWxL=jnp.take_along_axis(
            state.ancestors_BxWxL, parents_BxW[..., None], axis=1))

    def select(state: _CachedState, rows_R):
        per_layer = functools.partial(jax.tree.map, lambda x: jnp.take(x, rows_R, axis=layer_batch_axis))
        return _CachedState(per_layer(state.caches), state.ancestors_BxWxL[rows_R],
                            per_layer(state.cross_kv), state.cross_mask_Bx1xWxS[rows_R])

    return _Decoder(state, step, reorder, vocab_S, select)


def _full_decoder(model, encoded_BxSxD, source_segment_BxS, width, length, vocab_S) -> _Decoder:
    """No cache: each step reruns the decoder (and its cross-attention projections) on the prefix."""
    batch = encoded_BxSxD.shape[0]
    encoded_RxSxD = jnp.repeat(encoded_BxSxD, width, axis=0)
    segment_RxL = jnp.ones((batch * width, length), jnp.int32)
    self_mask = attention_mask(segment_RxL, segment_RxL, causal=True)
    cross_mask = attention_mask(segment_RxL, jnp.repeat(source_segment_BxS, width, axis=0), causal=False)
    positions_RxL = jnp.broadcast_to(jnp.arange(length), (batch * width, length))

    def step(state, tokens_BxWxL, t):
        inputs_RxL = jnp.pad(tokens_BxWxL.reshape(batch * width, length), ((0, 0), (1, 0)))[:, :-1]
        y_RxLxD, _ = model.decoder_states(inputs_RxL, positions_RxL, model.cross_kv(encoded_RxSxD),
                                          self_mask, cross_mask)
        logits_Rx1xV = model.logits(jax.lax.dynamic_slice_in_dim(y_RxLxD, t, 1, axis=1), vocab_S)
        return logits_Rx1xV.reshape(batch, width, -1), state

    return _Decoder((), step, lambda state, parents_BxW: state, vocab_S)


def _banned(options: Options) -> tuple[int, ...]:
    """Tokens never generated: PAD, and EOS too with `forced_length`."""
    return (PAD, EOS) if options.forced_length else (PAD,)


def _allowed(logits_BxWxV, t, limit_B, options: Options) -> jax.Array:
    """Logits, -inf where a token is not allowed: the `_banned` ones always, and every one but
    EOS at a sentence's last step (without `forced_length`)."""
    vocab_V = jnp.arange(logits_BxWxV.shape[-1])
    banned_1x1xV = functools.reduce(operator.or_, (vocab_V == token for token in _banned(options)))[None, None, :]
    if not options.forced_length:
        banned_1x1xV = banned_1x1xV | ((t == limit_B - 1)[:, None, None] & (vocab_V != EOS)[None, None, :])
    return jnp.where(banned_1x1xV, -jnp.inf, logits_BxWxV)


class _Guard(NamedTuple):
    """The repetition guards on a step's logits (`__call__`): no_repeat_ngram_size's repeats
    banned, and repetition_penalty's (CTRL's, Keskar et al., 2019) on the tokens a hypothesis
    holds: a positive logit divided by it, a negative one multiplied. Not on a forced step.
    Token ids map to logit positions through a shortlist's `vocab_V`."""
    options: Options
    vocab_size: int
    vocab_V: jax.Array | None
    forced: _Forced | None

    @classmethod
    def of(cls, options: Options, vocab_size: int, vocab_V, forced) -> _Guard | None:
        if not options.no_repeat_ngram_size and options.repetition_penalty == 1.0:
            return None
        return cls(options, vocab_size, vocab_V, forced)

    def __call__(self, logits_BxWxV, tokens_BxWxL, t) -> jax.Array:
        """Guarded logits at step t of hypotheses whose tokens before t are `tokens_BxWxL`."""
        guarded_BxWxV = logits_BxWxV
        if self.options.repetition_penalty != 1.0:
            penalty = self.options.repetition_penalty
            penalised_BxWxV = jnp.where(logits_BxWxV > 0, logits_BxWxV / penalty, logits_BxWxV * penalty)
            held_BxWxL = jnp.where(jnp.arange(tokens_BxWxL.shape[-1]) < t, tokens_BxWxL, PAD)
            guarded_BxWxV = jnp.where(self._marked(held_BxWxL), penalised_BxWxV, guarded_BxWxV)
        if self.options.no_repeat_ngram_size:
            repeats_BxWxL = _ngram_repeats(tokens_BxWxL, t, self.options.no_repeat_ngram_size)
            guarded_BxWxV = jnp.where(self._marked(repeats_BxWxL), -jnp.inf, guarded_BxWxV)
        if self.forced is not None:
            guarded_BxWxV = jnp.where(self.forced.at(t)[0][:, None, None], logits_BxWxV, guarded_BxWxV)
        return guarded_BxWxV

    def _marked(self, tokens_BxWxL) -> jax.Array:
        """[B, W, logits] whether each logit's token is among the hypothesis' `tokens_BxWxL`
        (PAD: none)."""
        batch, width, _ = tokens_BxWxL.shape
        marked_BxWxV = jnp.zeros((batch, width, self.vocab_size), bool).at[
            jnp.arange(batch)[:, None, None], jnp.arange(width)[None, :, None], tokens_BxWxL].set(True)
        marked_BxWxV = marked_BxWxV.at[..., PAD].set(False)
        return marked_BxWxV if self.vocab_V is None else marked_BxWxV[..., self.vocab_V]


def _ngram_repeats(tokens_BxWxL, t, n: int) -> jax.Array:
    """[B, W, L] the tokens that would repeat an n-gram of a hypothesis at step t (PAD: none):
    each token that followed an earlier occurrence of its last n - 1 tokens."""
    length = tokens_BxWxL.shape[-1]
    starts_L = jnp.arange(length)
    match_BxWxL = jnp.broadcast_to(starts_L + n - 1 < t, tokens_BxWxL.shape)  # n-grams before t.
    for k in range(n - 1):
        window_BxWxL = jnp.pad(tokens_BxWxL[..., k:], ((0, 0), (0, 0), (0, k)))
        last_BxWx1 = jax.lax.dynamic_slice_in_dim(tokens_BxWxL, jnp.maximum(t - n + 1 + k, 0), 1, axis=2)
        match_BxWxL = match_BxWxL & (window_BxWxL == last_BxWx1)
    following_BxWxL = jnp.pad(tokens_BxWxL[..., n - 1:], ((0, 0), (0, 0), (0, n - 1)))
    return jnp.where(match_BxWxL, following_BxWxL, PAD)


def _penalty(length, options: Options):
    """The GNMT length penalty of hypotheses of `length` tokens (EOS included)."""
    return ((5.0 + length) / 6.0) ** options.length_penalty


def _sample(decoder: _Decoder, batch, length, limit_B, options: Options, rng, forced: _Forced | None,
            guard: _Guard | None):
    """Greedy decoding, or sampling: one hypothesis per sentence, until EOS or its `limit_B`
    tokens; ([B, 1, T] tokens, [B, 1] scores)."""

    def body(carry):
        t, tokens_BxL, log_prob_B, done_B, state = carry
        logits_Bx1xV, state = decoder.step(state, tokens_BxL[:, None, :], t)
        if guard is not None:
            logits_Bx1xV = guard(logits_Bx1xV, tokens_BxL[:, None, :], t)
        logits_BxV = _allowed(logits_Bx1xV, t, limit_B, options)[:, 0]
        if options.strategy == "greedy":
            token_B = jnp.argmax(logits_BxV, axis=-1)
        else:
            token_B = jax.random.categorical(jax.random.fold_in(rng, t), _filtered(logits_BxV, options))
        if forced is not None:
            forcing_B, position_B = forced.at(t)
            token_B = jnp.where(forcing_B, position_B, token_B)
        token_B = jnp.where(done_B, PAD, token_B).astype(jnp.int32)  # a position among the logits.
        token_log_prob_B = jnp.take_along_axis(jax.nn.log_softmax(logits_Bx1xV[:, 0]), token_B[:, None],
                                               axis=1)[:, 0]
        token_B = decoder.tokens(token_B)
        log_prob_B = log_prob_B + jnp.where(done_B, 0.0, token_log_prob_B)
        tokens_BxL = jax.lax.dynamic_update_slice_in_dim(tokens_BxL, token_B[:, None], t, axis=1)
        return t + 1, tokens_BxL, log_prob_B, done_B | (token_B == EOS), state

    def cond(carry):
        t, _, _, done_B, _ = carry
        return (t < jnp.max(limit_B)) & ~jnp.all(done_B)

    init = (jnp.asarray(0), jnp.zeros((batch, length), jnp.int32), jnp.zeros((batch,), jnp.float32),
            jnp.zeros((batch,), bool), decoder.state)
    _, tokens_BxL, log_prob_B, _, _ = jax.lax.while_loop(cond, body, init)
    score_B = log_prob_B / _penalty(jnp.sum(tokens_BxL != PAD, axis=1), options)
    return tokens_BxL[:, None], score_B[:, None]


def _filtered(logits_BxV, options: Options) -> jax.Array:
    """Sampling logits: scaled by 1 / temperature, -inf outside the top_k and the top_p mass."""
    logits_BxV = logits_BxV / options.temperature
    if options.top_k:
        kth_Bx1 = jax.lax.top_k(logits_BxV, options.top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    if options.top_p < 1.0:
        sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        # The smallest set of most likely tokens whose mass reaches top_p.
        keep_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV < options.top_p
        cutoff_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
        logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)
    return logits_BxV


def _best_extensions(log_probs_BxW, logits_BxWxV, k, t, limit_B, options: Options, forced: _Forced | None):
    """The k most likely extensions of W hypotheses to tokens `_allowed` at step t: (log p,
    parent, token), each [B, k]. Only the best k of each hypothesis can be among them: taken
    from its top k + len(banned) logits less the banned tokens (or EOS alone at the last step,
    or the forced token alone), which spares XLA a masked copy of the [B, W, V] logits."""
    batch, _, vocab = logits_BxWxV.shape
    banned = _banned(options)
    per_beam = min(k, vocab - len(banned))
    top_logits_BxWxN, tokens_BxWxN = _top_k(logits_BxWxV, per_beam + len(banned))
    is_banned_BxWxN = functools.reduce(operator.or_, (tokens_BxWxN == token for token in banned))
    top_logits_BxWxK, i_BxWxK = jax.lax.top_k(jnp.where(is_banned_BxWxN, -jnp.inf, top_logits_BxWxN),
                                              per_beam)
    tokens_BxWxK = jnp.take_along_axis(tokens_BxWxN, i_BxWxK, axis=-1)
    if forced is not None:
        forcing_B, position_B = forced.at(t)
        forced_logit_BxWx1 = logits_BxWxV[jnp.arange(batch), :, position_B][..., None]
        only_BxWxK = jnp.where(jnp.arange(per_beam) == 0, forced_logit_BxWx1, -jnp.inf)
        top_logits_BxWxK = jnp.where(forcing_B[:, None, None], only_BxWxK, top_logits_BxWxK)
        tokens_BxWxK = jnp.where(forcing_B[:, None, None], position_B[:, None, None], tokens_BxWxK)
    if not options.forced_length:
        last = (t == limit_B - 1)[:, None, None]
        eos_only_BxWxK = jnp.where(jnp.arange(per_beam) == 0, logits_BxWxV[..., EOS:EOS + 1], -jnp.inf)
        top_logits_BxWxK = jnp.where(last, eos_only_BxWxK, top_logits_BxWxK)
        tokens_BxWxK = jnp.where(last, EOS, tokens_BxWxK)
    log_norm_BxW = jax.nn.logsumexp(logits_BxWxV, axis=-1)
    log_probs_BxWxK = log_probs_BxW[..., None] + top_logits_BxWxK - log_norm_BxW[..., None]
    top_log_probs_BxK, top_BxK = jax.lax.top_k(log_probs_BxWxK.reshape(batch, -1), k)
    return (top_log_probs_BxK, top_BxK // per_beam,
            jnp.take_along_axis(tokens_BxWxK.reshape(batch, -1), top_BxK, axis=1))


def _top_k(x_BxWxV, k: int, chunk: int = 0) -> tuple[jax.Array, jax.Array]:
    """`lax.top_k` over the last axis; for a large one, within the k chunks of `chunk` values
    with the largest maxima, which hold the k largest values: a max over all values and a top-k
    over k * chunk of them, which XLA:CPU runs faster than a top-k over all. `chunk` 0: a
    divisor of the axis in [32, 64] where one exists (no padding copy), else 64, the fastest
    size timed on 8,000- and 32,000-token vocabularies."""
    batch, width, v = x_BxWxV.shape
    chunk = chunk or next((c for c in range(64, 31, -1) if v % c == 0), 64)
    if k * chunk >= v:
        return jax.lax.top_k(x_BxWxV, k)
    padded = jnp.pad(x_BxWxV, ((0, 0), (0, 0), (0, -v % chunk)), constant_values=-jnp.inf)
    chunks_BxWxCxZ = padded.reshape(batch, width, -1, chunk)
    _, best_BxWxK = jax.lax.top_k(jnp.max(chunks_BxWxCxZ, axis=-1), k)
    candidates_BxWxKxZ = jnp.take_along_axis(chunks_BxWxCxZ, best_BxWxK[..., None], axis=2)
    values_BxWxK, i_BxWxK = jax.lax.top_k(candidates_BxWxKxZ.reshape(batch, width, -1), k)
    return values_BxWxK, jnp.take_along_axis(best_BxWxK, i_BxWxK // chunk, axis=-1) * chunk + i_BxWxK % chunk


class _Beams(NamedTuple):
    t: jax.Array
    alive_BxWxL: jax.Array  # tokens of the hypotheses going on, best first.
    alive_log_probs_BxW: jax.Array
    finished_BxWxL: jax.Array  # the best finished hypotheses, best first.
    finished_scores_BxW: jax.Array  # length-penalised log p; -inf: empty.
    num_finished_B: jax.Array
    done_B: jax.Array  # sentences whose finished hypotheses are final (`_done`).
    state: Any


def _beam_search(decoder: _Decoder, batch, width, length, limit_B, options: Options, forced: _Forced | None,
                 guard: _Guard | None):
    """([B, W, T] finished hypotheses, best first, [B, W] their scores).

    With `options.batch_halvings` the search runs in phases: a phase ends when no more than
    half of its rows are still searching, and the next one goes on with those rows only (the
    finished ones keep their results), as CTranslate2 drops finished batch entries. The halved
    row counts stay multiples of the data-parallel size, so the shards stay even."""
    first_W = jnp.where(jnp.arange(width) == 0, 0.0, -jnp.inf)  # one start hypothesis.
    empty_BxWxL = jnp.zeros((batch, width, length), jnp.int32)
    beams = _Beams(jnp.asarray(0), empty_BxWxL, jnp.broadcast_to(first_W, (batch, width)), empty_BxWxL,
                   jnp.full((batch, width), -jnp.inf), jnp.zeros((batch,), jnp.int32),
                   jnp.zeros((batch,), bool), decoder.state)
    finished_BxWxL, scores_BxW = empty_BxWxL, jnp.full((batch, width), -jnp.inf)
    rows_R = jnp.arange(batch)  # the batch row of each row searching.
    for phase in range(options.batch_halvings + 1):
        half = beams.done_B.shape[0] // 2
        last = (phase == options.batch_halvings or decoder.select is None or half == 0
                or half % parallel.active_data_parallel_size())
        beams = _beam_phase(beams, decoder, width, limit_B, options, forced, guard, 0 if last else half)
        finished_BxWxL = finished_BxWxL.at[rows_R].set(beams.finished_BxWxL)
        scores_BxW = scores_BxW.at[rows_R].set(beams.finished_scores_BxW)
        if last:
            break
        keep_H = jnp.argsort(beams.done_B, stable=True)[:half]  # the rows still searching first.
        rows_R, limit_B = rows_R[keep_H], limit_B[keep_H]
        beams = jax.tree.map(lambda x: x[keep_H], beams._replace(t=None, state=None))._replace(
            t=beams.t, state=decoder.select(beams.state, keep_H))
        if forced is not None:
            forced = _Forced(forced.positions_BxP[keep_H], forced.limit[keep_H])
            guard = None if guard is None else guard._replace(forced=forced)
    return finished_BxWxL, scores_BxW


def _beam_phase(beams: _Beams, decoder: _Decoder, width, limit_B, options: Options, forced: _Forced | None,
                guard: _Guard | None, until_rows: int) -> _Beams:
    """Beam search steps until every row is done or at its limit, or (`until_rows` > 0) until
    no more than `until_rows` rows are still searching."""
    def body(b: _Beams) -> _Beams:
        logits_BxWxV, state = decoder.step(b.state, b.alive_BxWxL, b.t)
        if guard is not None:
            logits_BxWxV = guard(logits_BxWxV, b.alive_BxWxL, b.t)
        top_log_probs_Bx2W, parents_Bx2W, positions_Bx2W = _best_extensions(
            b.alive_log_probs_BxW, logits_BxWxV, 2 * width, b.t, limit_B, options, forced)
        tokens_Bx2W = decoder.tokens(positions_Bx2W)
        candidates_Bx2WxL = jax.lax.dynamic_update_slice_in_dim(
            jnp.take_along_axis(b.alive_BxWxL, parents_Bx2W[..., None], axis=1),
            tokens_Bx2W[..., None], b.t, axis=2)
        ends_Bx2W = (tokens_Bx2W == EOS) | (b.t == limit_B - 1)[:, None]

        ranked_in_top_W_1x2W = (jnp.arange(2 * width) < width)[None, :]
        finishing_Bx2W = ends_Bx2W & ranked_in_top_W_1x2W & jnp.isfinite(top_log_probs_Bx2W)
        scores_Bx2W = jnp.where(finishing_Bx2W, top_log_probs_Bx2W / _penalty(b.t + 1, options), -jnp.inf)
        finished_scores_BxW, best_Bx3W = jax.lax.top_k(
            jnp.concatenate([b.finished_scores_BxW, scores_Bx2W], axis=1), width)
        finished_BxWxL = jnp.take_along_axis(
            jnp.concatenate([b.finished_BxWxL, candidates_Bx2WxL], axis=1), best_Bx3W[..., None], axis=1)
        num_finished_B = b.num_finished_B + jnp.sum(finishing_Bx2W, axis=1)

        going_on_Bx2W = jnp.where(ends_Bx2W, -jnp.inf, top_log_probs_Bx2W)
        alive_log_probs_BxW, keep_BxW = jax.lax.top_k(going_on_Bx2W, width)
        alive_BxWxL = jnp.take_along_axis(candidates_Bx2WxL, keep_BxW[..., None], axis=1)
        state = decoder.reorder(state, jnp.take_along_axis(parents_Bx2W, keep_BxW, axis=1))

        done_B = b.done_B  # done sentences keep their hypotheses.
        finished_scores_BxW = jnp.where(done_B[:, None], b.finished_scores_BxW, finished_scores_BxW)
        num_finished_B = jnp.where(done_B, b.num_finished_B, num_finished_B)
        return _Beams(
            b.t + 1, alive_BxWxL, alive_log_probs_BxW,
            jnp.where(done_B[:, None, None], b.finished_BxWxL, finished_BxWxL), finished_scores_BxW,
            num_finished_B, done_B | _done(b.t, limit_B, alive_log_probs_BxW, finished_scores_BxW,
                                             num_finished_B, options), state)

    def cond(b: _Beams):
        going = (b.t < jnp.max(limit_B)) & ~jnp.all(b.done_B)
        return going & (jnp.sum(~b.done_B) > until_rows) if until_rows else going

    return jax.lax.while_loop(cond, body, beams)


def _done(t, limit_B, alive_log_probs_BxW, finished_scores_BxW, num_finished_B, options: Options):
    """Whether each sentence's finished hypotheses are final after step t (`beam_stop`, module
    doc): past its last step, or by the rule. The hypotheses going on have t + 1 tokens and
    would finish with t + 2 to `limit_B` tokens."""
    width = finished_scores_BxW.shape[1]
    if options.beam_stop == "fairseq":
        return (num_finished_B >= width) | (t + 1 >= limit_B)
    largest_penalty = jnp.maximum(_penalty(t + 2, options), _penalty(limit_B, options))
    best_possible_B = alive_log_probs_BxW[:, 0] / largest_penalty  # log p <= 0 only falls.
    return best_possible_B <= finished_scores_BxW[:, -1]
