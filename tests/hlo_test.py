"""Collectives read from optimized HLO text, as the TPU compiler writes it."""
import pytest

from tfx.tpu import hlo

# A reduce-scatter written as an all-reduce and a slice in an `all-reduce-scatter` fusion; one
# all-gather split into two steps that share its channel; a combined all-reduce of two arrays;
# an async collective-permute; an all-to-all in a loop body; and an all-reduce in a computation
# nothing calls.
MODULE = """HloModule jit_step, entry_computation_layout={(f32[8,4]{1,0})->f32[2,4]{1,0}}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%all-reduce-scatter (input: f32[8,4]) -> f32[2,4] {
  %input = f32[8,4]{1,0:T(8,128)} parameter(0)
  %all-reduce.1 = f32[8,4]{1,0:T(8,128)} all-reduce(%input), channel_id=1, replica_groups={{0,1,2,3}}, to_apply=%add
  %partition-id = u32[] partition-id()
  %zero = u32[] constant(0)
  ROOT %dynamic-slice = f32[2,4]{1,0} dynamic-slice(%all-reduce.1, %partition-id, %zero), dynamic_slice_sizes={2,4}
}

%async_collective_fusion (p0: bf16[2,4]) -> bf16[8,4] {
  %p0 = bf16[2,4]{1,0:T(8,128)(2,1)} parameter(0)
  ROOT %all-gather.1 = bf16[8,4]{1,0} all-gather(%p0), channel_id=2, replica_groups=[1,4]<=[4], dimensions={0}
}

%async_collective_fusion.1 (p1: bf16[2,4]) -> bf16[8,4] {
  %p1 = bf16[2,4]{1,0} parameter(0)
  ROOT %all-gather.2 = bf16[8,4]{1,0} all-gather(%p1), channel_id=2, replica_groups=[1,4]<=[4], dimensions={0}
}

%body (state: (s32[], f32[2,4])) -> (s32[], f32[2,4]) {
  %state = (s32[], f32[2,4]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %v = f32[2,4]{1,0} get-tuple-element(%state), index=1
  %all-to-all = f32[2,4]{1,0} all-to-all(%v), channel_id=5, replica_groups={{0,1}}, dimensions={1}
  ROOT %next = (s32[], f32[2,4]{1,0}) tuple(%i, %all-to-all)
}

%cond (state.1: (s32[], f32[2,4])) -> pred[] {
  %state.1 = (s32[], f32[2,4]{1,0}) parameter(0)
  ROOT %true = pred[] constant(true)
}

%unused (u: f32[64]) -> f32[64] {
  %u = f32[64]{0} parameter(0)
  ROOT %all-reduce.9 = f32[64]{0} all-reduce(%u), channel_id=9, to_apply=%add
}

ENTRY %main.1 (a: f32[8,4], b: bf16[2,4]) -> f32[2,4] {
  %a = f32[8,4]{1,0} parameter(0)
  %b = bf16[2,4]{1,0} parameter(1)
  %fusion = f32[2,4]{1,0} fusion(%a), kind=kCustom, calls=%all-reduce-scatter, backend_config={"collective_algorithm_config":{"emitter":"SingleInputAllReduceScatterFusion"}}
  %fusion.1 = bf16[8,4]{1,0} fusion(%b), kind=kCustom, calls=%async_collective_fusion
  %fusion.2 = bf16[8,4]{1,0} fusion(%b), kind=kCustom, calls=%async_collective_fusion.1
  %all-reduce.2 = (f32[8,4]{1,0}, f32[2,4]{1,0}) all-reduce(%a, %fusion), channel_id=3, replica_groups={{0,1},{2,3}}, to_apply=%add
  %collective-permute-start = (f32[2,4]{1,0}, f32[2,4]{1,0}) collective-permute-start(%fusion), channel_id=4, source_target_pairs={{0,1},{1,0}}
  %collective-permute-done = f32[2,4]{1,0} collective-permute-done(%collective-permute-start)
  %zero.1 = s32[] constant(0)
  %init = (s32[], f32[2,4]{1,0}) tuple(%zero.1, %collective-permute-done)
  %while = (s32[], f32[2,4]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %out = f32[2,4]{1,0} get-tuple-element(%while), index=1
}
"""


def test_collectives_are_counted_once_each_by_kind_with_the_bytes_of_the_whole_array():
    counts, sizes = hlo.collectives(MODULE)
    assert counts == {"all-reduce": 1, "all-gather": 1, "reduce-scatter": 1, "all-to-all": 1,
                      "collective-permute": 1}
    assert sizes == {"all-reduce": 4 * (8 * 4 + 2 * 4),  # both arrays of the combined all-reduce
                     "all-gather": 2 * 8 * 4,  # the gathered bfloat16 array, once for both steps
                     "reduce-scatter": 4 * 8 * 4,  # the operand, before it is scattered
                     "all-to-all": 4 * 2 * 4,
                     "collective-permute": 4 * 2 * 4}  # the output, not the start's tuple


def test_text_without_an_entry_computation_is_refused():
    with pytest.raises(ValueError, match="ENTRY"):
        hlo.collectives("HloModule empty\n")
