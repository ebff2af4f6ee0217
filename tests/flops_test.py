"""Model FLOPs against a count by hand."""
import ml_collections

from tfx.model import flops


def small_model(**overrides) -> ml_collections.ConfigDict:
    """d 4, 2 query heads and 1 key/value head of width 2, MLP 8, 1+1 layers, vocabulary 10."""
    return ml_collections.ConfigDict({**dict(
        emb_dim=4, num_heads=2, num_kv_heads=1, head_dim=0, mlp_dim=8, num_encoder_layers=1,
        num_decoder_layers=1, vocab_size=10, activation="relu", rank_fraction=0.0), **overrides})


# Multiply-adds per token with each weight matrix of small_model(), counted from its shapes.
QUERY = OUT = 4 * 2 * 2  # [d, heads, head_dim] and [heads, head_dim, d]
KEY = VALUE = 4 * 1 * 2  # [d, kv_heads, head_dim]
MLP = 4 * 8 + 8 * 4  # [d, mlp] and [mlp, d]
LOGITS = 4 * 10  # the tied embedding [vocab, d]
PER_SOURCE_TOKEN = (QUERY + KEY + VALUE + OUT + MLP) + (KEY + VALUE)  # encoder; cross-attention k/v
PER_TARGET_TOKEN = (QUERY + KEY + VALUE + OUT) + (QUERY + OUT) + MLP + LOGITS
SCORE_AND_VALUE = 2 * 2 * 2 * 2  # 2 products x 2 FLOPs x 2 heads x head_dim 2, per attended pair.


def test_forward_and_train_flops_match_a_count_by_hand():
    assert (PER_SOURCE_TOKEN, PER_TARGET_TOKEN) == (128, 184)
    source, target = 3, 2
    attended = source * source + (1 + 2) + target * source  # encoder, causal decoder, cross
    forward = 2 * (PER_SOURCE_TOKEN * source + PER_TARGET_TOKEN * target) + SCORE_AND_VALUE * attended
    assert forward == 1792
    assert flops.forward_flops(small_model(), [(source, target)]) == forward
    assert flops.train_flops(small_model(), [(source, target)]) == 3 * forward
    assert flops.forward_flops(small_model(), [(3, 2), (3, 2)]) == 2 * forward


def test_swiglu_adds_the_gate_projection():
    gate = 4 * 8  # [d, mlp], once in the encoder layer and once in the decoder layer.
    assert (flops.forward_flops(small_model(activation="swiglu"), [(3, 2)])
            - flops.forward_flops(small_model(), [(3, 2)])) == 2 * gate * (3 + 2)


def test_low_rank_projections_count_their_factors():
    """rank_fraction 0.25: query/out [4, 4] and the MLP's [4, 8] get rank 1, key/value [4, 2]
    round to rank 0, raised to 1; each factorized weight costs rank x (fan-in + fan-out)."""
    query = out = 1 * (4 + 4)
    key = value = 1 * (4 + 2)
    mlp = 2 * 1 * (4 + 8)
    per_source = (query + key + value + out + mlp) + (key + value)
    per_target = (query + key + value + out) + (query + out) + mlp + LOGITS
    attended = 3 * 3 + (1 + 2) + 2 * 3
    forward = 2 * (per_source * 3 + per_target * 2) + SCORE_AND_VALUE * attended
    assert forward == 1104
    assert flops.forward_flops(small_model(rank_fraction=0.25), [(3, 2)]) == forward


def test_decode_flops_match_a_count_by_hand():
    source, steps, beams = 3, 2, 2
    encoder = 2 * PER_SOURCE_TOKEN * source + SCORE_AND_VALUE * source * source
    # Each beam: 2 steps through the decoder, attending to 1 then 2 outputs and to the source.
    per_beam = 2 * PER_TARGET_TOKEN * steps + SCORE_AND_VALUE * ((1 + 2) + steps * source)
    assert flops.decode_flops(small_model(), 1, beams, source, steps) == encoder + beams * per_beam == 2672
    assert flops.decode_flops(small_model(), 5, beams, source, steps) == 5 * 2672
