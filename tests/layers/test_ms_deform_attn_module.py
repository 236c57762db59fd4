"""Tests of the MultiScaleDeformableAttention module: init, sampling geometry, masking, errors."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deformable_detr.layers import MultiScaleDeformableAttention, ms_deform_attn_reference


def _levels(shapes, device="cpu"):
    spatial_shapes = torch.tensor(shapes, dtype=torch.long, device=device)
    sizes = [h * w for h, w in shapes]
    starts = torch.tensor([0] + list(np.cumsum(sizes)[:-1]), dtype=torch.long, device=device)
    return spatial_shapes, starts, sum(sizes)


def _set_identity_projections(module):
    with torch.no_grad():
        for lin in (module.value_proj, module.output_proj):
            lin.weight.copy_(torch.eye(module.embed_dim))
            lin.bias.zero_()


def test_init_matches_official_recipe():
    heads, levels, points = 8, 3, 4
    m = MultiScaleDeformableAttention(32, heads, levels, points)
    assert torch.count_nonzero(m.sampling_offsets.weight) == 0
    assert torch.count_nonzero(m.attention_weights.weight) == 0
    assert torch.count_nonzero(m.attention_weights.bias) == 0
    assert torch.count_nonzero(m.value_proj.bias) == 0
    assert torch.count_nonzero(m.output_proj.bias) == 0
    bound = math.sqrt(6.0 / (32 + 32))
    assert m.value_proj.weight.abs().max() <= bound
    assert m.output_proj.weight.abs().max() <= bound
    assert m.value_proj.weight.std() > bound / 4  # really initialised, not left at zero

    bias = m.sampling_offsets.bias.detach().double().view(heads, levels, points, 2).numpy()
    for k in range(heads):
        t = 2 * math.pi * k / heads
        direction = np.array([math.cos(t), math.sin(t)])
        direction /= np.abs(direction).max()
        for lvl in range(levels):
            for p in range(points):
                np.testing.assert_allclose(bias[k, lvl, p], direction * (p + 1), atol=1e-5)
    assert m.sampling_offsets.weight.shape == (heads * levels * points * 2, 32)
    assert m.attention_weights.weight.shape == (heads * levels * points, 32)


def _one_cell_right_module():
    """One head looking one cell to the right (its init direction), one level, one point."""
    m = MultiScaleDeformableAttention(4, num_heads=1, num_levels=1, num_points=1)
    _set_identity_projections(m)
    return m


@pytest.mark.parametrize("box", [False, True])
def test_sampling_lands_one_cell_right(box):
    # At init head 0 points along +x by one cell (2-d references) or by half the box width
    # divided by the points (4-d references): sampling at a cell centre returns that cell exactly.
    h, w = 3, 5
    m = _one_cell_right_module()
    torch.manual_seed(0)
    feat = torch.randn(1, h, w, 4)
    value = feat.view(1, h * w, 4)
    spatial_shapes, starts, _ = _levels([(h, w)])
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w - 1), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    ref = torch.stack([(xs + 0.5) / w, (ys + 0.5) / h], -1)
    if box:
        # width 2 cells: half of it is one cell.
        ref = torch.cat(
            [ref, torch.full_like(ref[:, :1], 2.0 / w), torch.rand_like(ref[:, :1])], -1
        )
    query = torch.randn(1, len(ys), 4)
    out = m(query, ref[None, :, None], value, spatial_shapes, starts)
    expected = feat[0, ys, xs + 1]
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=1e-5)


def test_padded_values_are_zeroed():
    h, w = 3, 5
    m = _one_cell_right_module()
    value = torch.randn(1, h * w, 4) + 3.0
    spatial_shapes, starts, _ = _levels([(h, w)])
    # The query at (1, 2) samples (1, 3); marking (1, 3) as padding must yield zero.
    ref = torch.tensor([[(2.5 / w, 1.5 / h)]])[:, :, None]
    mask = torch.zeros(1, h * w, dtype=torch.bool)
    mask[0, 1 * w + 3] = True
    out_masked = m(torch.randn(1, 1, 4), ref, value, spatial_shapes, starts, mask)
    out = m(torch.randn(1, 1, 4), ref, value, spatial_shapes, starts, None)
    assert out_masked.abs().max() == 0
    torch.testing.assert_close(out[0, 0], value[0, 1 * w + 3])


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_matches_direct_computation_with_reference_op(ref_dim):
    torch.manual_seed(1)
    heads, points, dim = 2, 3, 8
    shapes = [(4, 6), (2, 3)]
    m = MultiScaleDeformableAttention(dim, heads, len(shapes), points).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    spatial_shapes, starts, s = _levels(shapes)
    n, lq = 2, 5
    query = torch.randn(n, lq, dim, dtype=torch.float64)
    x = torch.randn(n, s, dim, dtype=torch.float64)
    ref = torch.rand(n, lq, len(shapes), ref_dim, dtype=torch.float64)
    mask = torch.rand(n, s) > 0.7

    out = m(query, ref, x, spatial_shapes, starts, mask)

    v = F.linear(x, m.value_proj.weight, m.value_proj.bias)
    v = torch.where(mask[..., None], torch.zeros_like(v), v).view(n, s, heads, dim // heads)
    off = F.linear(query, m.sampling_offsets.weight, m.sampling_offsets.bias)
    off = off.view(n, lq, heads, len(shapes), points, 2)
    logits = F.linear(query, m.attention_weights.weight, m.attention_weights.bias)
    attn = logits.view(n, lq, heads, -1).softmax(-1).view(n, lq, heads, len(shapes), points)
    loc = torch.empty_like(off)
    for lvl, (h, w) in enumerate(shapes):
        r = ref[:, :, None, lvl, None]  # (n, lq, 1, 1, ref_dim)
        if ref_dim == 2:
            loc[:, :, :, lvl, :, 0] = r[..., 0] + off[:, :, :, lvl, :, 0] / w
            loc[:, :, :, lvl, :, 1] = r[..., 1] + off[:, :, :, lvl, :, 1] / h
        else:
            for c in range(2):
                step = off[:, :, :, lvl, :, c] / points * r[..., 2 + c] * 0.5
                loc[:, :, :, lvl, :, c] = r[..., c] + step
    sampled = ms_deform_attn_reference(v, spatial_shapes, starts, loc, attn)
    expected = F.linear(sampled, m.output_proj.weight, m.output_proj.bias)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)


def test_gradients_reach_every_parameter_and_input():
    torch.manual_seed(2)
    shapes = [(4, 4), (2, 2)]
    m = MultiScaleDeformableAttention(16, 2, 2, 2)
    spatial_shapes, starts, s = _levels(shapes)
    query = torch.randn(2, 3, 16, requires_grad=True)
    value = torch.randn(2, s, 16, requires_grad=True)
    ref = torch.rand(2, 3, 2, 2).mul(0.6).add(0.2).requires_grad_()
    m(query, ref, value, spatial_shapes, starts).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for t in (query, value, ref):
        assert t.grad is not None and torch.isfinite(t.grad).all()


def test_autocast_bfloat16_runs_in_value_dtype():
    torch.manual_seed(3)
    shapes = [(4, 4)]
    m = MultiScaleDeformableAttention(16, 2, 1, 2)
    spatial_shapes, starts, s = _levels(shapes)
    query, value = torch.randn(1, 3, 16), torch.randn(1, s, 16)
    ref = torch.rand(1, 3, 1, 2)
    ref_out = m(query, ref, value, spatial_shapes, starts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(query, ref, value, spatial_shapes, starts)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref_out, atol=0.1, rtol=0.05)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="divisible"):
        MultiScaleDeformableAttention(30, 8)
    with pytest.raises(ValueError, match="num_points"):
        MultiScaleDeformableAttention(32, 8, 4, 0)
    m = MultiScaleDeformableAttention(16, 2, 2, 2)
    spatial_shapes, starts, s = _levels([(4, 4), (2, 2)])
    q, v = torch.randn(1, 3, 16), torch.randn(1, s, 16)
    # Reference points of the wrong shape would broadcast silently: the module names them.
    with pytest.raises(ValueError, match="reference_points.*2 .points. or 4"):
        m(q, torch.rand(1, 3, 2, 3), v, spatial_shapes, starts)
    with pytest.raises(ValueError, match="reference_points"):
        m(q, torch.rand(1, 3, 1, 2), v, spatial_shapes, starts)
    # The level layout is checked once, where the tensors enter the op: the compiled kernel
    # raises a RuntimeError, the reference path a ValueError, both naming the culprit.
    with pytest.raises((ValueError, RuntimeError), match="sum\\(H \\* W\\)"):
        m(q, torch.rand(1, 3, 2, 2), v[:, :-1], spatial_shapes, starts)
    with pytest.raises(ValueError, match="level_start_index"):
        m(q, torch.rand(1, 3, 2, 2), v, spatial_shapes[:1], starts)


def test_moves_with_to_and_has_no_buffers():
    m = MultiScaleDeformableAttention(16, 2, 2, 2)
    assert len(list(m.buffers())) == 0
    assert isinstance(m.sampling_offsets, nn.Linear)
    m = m.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in m.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    torch.manual_seed(4)
    shapes = [(6, 5), (3, 3)]
    m = MultiScaleDeformableAttention(32, 4, 2, 3)
    spatial_shapes, starts, s = _levels(shapes)
    args = (torch.randn(2, 7, 32), torch.rand(2, 7, 2, 4), torch.randn(2, s, 32))
    mask = torch.rand(2, s) > 0.8
    out = m(*args, spatial_shapes, starts, mask)
    out_cuda = m.cuda()(
        *(a.cuda() for a in args), spatial_shapes.cuda(), starts.cuda(), mask.cuda()
    )
    torch.testing.assert_close(out_cuda.cpu(), out, atol=1e-4, rtol=1e-4)
