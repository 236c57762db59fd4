"""Tests of the sine position encoding against an element-by-element computation of the formula."""

import math

import numpy as np
import pytest
import torch

from deformable_detr.modeling.position_encoding import PositionEmbeddingSine


def _expected(mask, num_pos_feats, temperature, scale, normalize):
    """Loops over every pixel: the position counts valid pixels up to and including it."""
    n, h, w = mask.shape
    valid = ~mask
    out = np.zeros((n, 2 * num_pos_feats, h, w))
    for b in range(n):
        for y in range(h):
            for x in range(w):
                py = float(valid[b, : y + 1, x].sum())
                px = float(valid[b, y, : x + 1].sum())
                if normalize:
                    py = (py - 0.5) / (float(valid[b, :, x].sum()) + 1e-6) * scale
                    px = (px - 0.5) / (float(valid[b, y, :].sum()) + 1e-6) * scale
                for i in range(num_pos_feats):
                    freq = temperature ** (2 * (i // 2) / num_pos_feats)
                    trig = math.sin if i % 2 == 0 else math.cos
                    out[b, i, y, x] = trig(py / freq)
                    out[b, num_pos_feats + i, y, x] = trig(px / freq)
    return out


def _mask(sizes, h, w):
    mask = torch.ones(len(sizes), h, w, dtype=torch.bool)
    for b, (vh, vw) in enumerate(sizes):
        mask[b, :vh, :vw] = False
    return mask


@pytest.mark.parametrize("normalize", [True, False])
def test_matches_formula_at_valid_pixels(normalize):
    sizes = [(5, 7), (3, 4)]
    mask = _mask(sizes, 5, 7)
    pe = PositionEmbeddingSine(num_pos_feats=8, temperature=20, normalize=normalize)
    out = pe(mask)
    assert out.shape == (2, 16, 5, 7) and out.dtype == torch.float32
    expected = _expected(mask.numpy(), 8, 20, 2 * math.pi, normalize)
    for b, (vh, vw) in enumerate(sizes):
        np.testing.assert_allclose(
            out[b, :, :vh, :vw].numpy(), expected[b, :, :vh, :vw], atol=2e-5, rtol=0
        )
    assert torch.isfinite(out).all()


def test_default_is_the_detr_setting():
    pe = PositionEmbeddingSine()
    assert (pe.num_pos_feats, pe.temperature, pe.normalize) == (128, 10000, True)
    assert pe.scale == pytest.approx(2 * math.pi)
    mask = _mask([(3, 2)], 3, 2)
    expected = _expected(mask.numpy(), 128, 10000, 2 * math.pi, True)
    np.testing.assert_allclose(pe(mask).numpy(), expected, atol=2e-5, rtol=0)


def test_padding_does_not_change_valid_pixels():
    small = _mask([(4, 6)], 4, 6)
    padded = _mask([(4, 6)], 7, 9)
    pe = PositionEmbeddingSine(num_pos_feats=16)
    torch.testing.assert_close(pe(padded)[..., :4, :6], pe(small), atol=0, rtol=0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_pos_feats"):
        PositionEmbeddingSine(num_pos_feats=7)
    with pytest.raises(ValueError, match="mask"):
        PositionEmbeddingSine(8)(torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match="mask"):
        PositionEmbeddingSine(8)(torch.zeros(3, 3, dtype=torch.bool))


def test_from_config_uses_half_the_hidden_dim():
    from detectron2.config import CfgNode as CN

    cfg = CN({"MODEL": {"DEFORMABLE_DETR": {"HIDDEN_DIM": 64}}})
    assert PositionEmbeddingSine(cfg).num_pos_feats == 32
