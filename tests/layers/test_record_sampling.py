"""Tests of ``record_sampling``: the record holds exactly what the attention module passed to the
op, and recording is off outside the context."""

import pytest
import torch
from torch import nn

from deformable_detr.layers import (
    MultiScaleDeformableAttention,
    SamplingRecord,
    ms_deform_attn,
    record_sampling,
)

SHAPES = [(6, 5), (3, 3)]


def _inputs(box, padded, seed=0):
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(SHAPES, dtype=torch.long)
    starts = torch.tensor([0, SHAPES[0][0] * SHAPES[0][1]], dtype=torch.long)
    s = sum(h * w for h, w in SHAPES)
    query = torch.randn(2, 7, 16, generator=g)
    reference = torch.rand(2, 7, len(SHAPES), 4 if box else 2, generator=g)
    value = torch.randn(2, s, 16, generator=g)
    mask = None
    if padded:
        mask = torch.zeros(2, s, dtype=torch.bool)
        mask[1, ::4] = True
    return query, reference, value, spatial_shapes, starts, mask


def _module(seed=0):
    torch.manual_seed(seed)
    m = MultiScaleDeformableAttention(16, num_heads=2, num_levels=len(SHAPES), num_points=3)
    with torch.no_grad():
        # Offsets and weights that depend on the query, unlike the official init.
        nn.init.normal_(m.sampling_offsets.weight, std=0.5)
        nn.init.normal_(m.attention_weights.weight, std=0.5)
    return m


@pytest.fixture
def op_calls(monkeypatch):
    """The arguments of every call of the op from the module, through its own namespace."""
    calls = []
    real = ms_deform_attn.multi_scale_deformable_attention

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(ms_deform_attn, "multi_scale_deformable_attention", spy)
    return calls


@pytest.mark.parametrize("box", [False, True], ids=["points", "boxes"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_record_holds_the_ops_arguments(op_calls, box, padded):
    m = _module()
    query, reference, value, shapes, starts, mask = _inputs(box, padded)
    plain = m(query, reference, value, shapes, starts, mask)
    with record_sampling(m) as record:
        recorded = m(query, reference, value, shapes, starts, mask)
    # Recording changes nothing in the output.
    assert torch.equal(recorded, plain)

    _, op_shapes, _, op_locations, op_weights = op_calls[-1]
    assert record.calls == 1
    assert record.sampling_locations.shape == (2, 7, 2, len(SHAPES), 3, 2)
    assert record.attention_weights.shape == (2, 7, 2, len(SHAPES), 3)
    # The very tensors the op received: same values and same memory, nothing recomputed.
    for kept, given in (
        (record.sampling_locations, op_locations),
        (record.attention_weights, op_weights),
        (record.spatial_shapes, op_shapes),
    ):
        assert torch.equal(kept, given)
        assert kept.data_ptr() == given.data_ptr()
    assert torch.equal(record.reference_points, reference)
    if padded:
        assert torch.equal(record.padding_mask, mask)
    else:
        assert record.padding_mask is None
    torch.testing.assert_close(
        record.attention_weights.sum((-1, -2)), torch.ones(2, 7, 2), rtol=0, atol=1e-6
    )


def test_record_is_detached():
    m = _module()
    query, reference, value, shapes, starts, mask = _inputs(False, False)
    query.requires_grad_(True)
    reference.requires_grad_(True)
    with record_sampling(m) as record:
        m(query, reference, value, shapes, starts, mask).sum().backward()
    assert not record.sampling_locations.requires_grad
    assert not record.attention_weights.requires_grad
    assert not record.reference_points.requires_grad
    assert query.grad is not None


def test_recording_stops_with_the_context(op_calls):
    m = _module()
    args = _inputs(False, True)
    assert m._sampling_record is None
    with record_sampling(m) as record:
        m(*args)
        m(*args)
    assert record.calls == 2
    assert m._sampling_record is None
    kept = record.sampling_locations
    m(*_inputs(False, True, seed=1))
    assert record.calls == 2 and record.sampling_locations is kept


def test_recording_stops_after_an_error():
    m = _module()
    query, reference, value, shapes, starts, mask = _inputs(False, False)
    with pytest.raises(ValueError, match="reference_points"):
        with record_sampling(m):
            m(query, reference[:, :, :1], value, shapes, starts, mask)
    assert m._sampling_record is None
    with pytest.raises(RuntimeError, match="inside"):
        with record_sampling(m):
            raise RuntimeError("inside")
    assert m._sampling_record is None


def test_nested_records_restore_the_outer_one():
    m = _module()
    args = _inputs(True, False)
    with record_sampling(m) as outer:
        with record_sampling(m) as inner:
            m(*args)
        assert m._sampling_record is outer
        m(*args)
    assert (outer.calls, inner.calls) == (1, 1)
    assert m._sampling_record is None


def test_an_empty_record_and_a_wrong_module():
    record = SamplingRecord()
    assert record.calls == 0 and record.sampling_locations is None
    with pytest.raises(TypeError, match="MultiScaleDeformableAttention.*Linear"):
        with record_sampling(nn.Linear(2, 2)):
            pass


@pytest.mark.parametrize("how", ["autocast", "bfloat16 module", "bfloat16 module and references"])
def test_16_bit_value_gets_float32_locations_and_weights(op_calls, how):
    # A bfloat16 location is off by up to a pixel on a 152-wide level: the op, which computes in
    # float32 for 16-bit values, gets float32 locations and weights with a bfloat16 value.
    m = _module()
    query, reference, value, shapes, starts, mask = _inputs(box=False, padded=True)
    if how == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(query, reference, value, shapes, starts, mask)
    else:
        m = m.to(torch.bfloat16)
        if how.endswith("references"):
            reference = reference.bfloat16()
        out = m(query.bfloat16(), reference, value.bfloat16(), shapes, starts, mask)
    op_value, _, _, op_locations, op_weights = op_calls[-1]
    assert op_value.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    assert op_locations.dtype == torch.float32 and op_weights.dtype == torch.float32
    # The float32 references reach the op unrounded: for the module in float32 arithmetic the
    # locations equal the reference plus the (16-bit) offsets, not a bfloat16 rounding of it.
    rounded = op_locations.to(torch.bfloat16).float()
    assert not torch.equal(rounded, op_locations)
    # The softmax writes float32 weights: not a bfloat16 rounding of them, and they sum to 1 over
    # every (query, head) to float32 precision.
    assert not torch.equal(op_weights.to(torch.bfloat16).float(), op_weights)
    torch.testing.assert_close(
        op_weights.sum((-1, -2)), torch.ones(op_weights.shape[:3]), atol=1e-6, rtol=0
    )
