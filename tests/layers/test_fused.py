"""Tests of the fused linear layers of CPU inference (layers/fused.py)."""

import pytest
import torch
from torch import nn

from deformable_detr.layers import fused
from deformable_detr.modeling.transformer import DeformableTransformerEncoderLayer

needs_fused = pytest.mark.skipif(
    fused._LINEAR_POINTWISE is None, reason="this PyTorch build has no oneDNN fused linear"
)


def _layers(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(16, 48), nn.Linear(48, 16)


@pytest.fixture
def recorded(monkeypatch):
    """The calls of the fused kernel (unary, binary) while the test runs."""
    calls = []
    real = fused._LINEAR_POINTWISE
    if real is None:
        pytest.skip("this PyTorch build has no oneDNN fused linear")

    class Recording:
        def __call__(self, *args):
            calls.append("relu")
            return real(*args)

        def binary(self, *args):
            calls.append("add")
            return real.binary(*args)

    monkeypatch.setattr(fused, "_LINEAR_POINTWISE", Recording())
    return calls


def _plain(x, lin1, lin2):
    return x + lin2(torch.relu(lin1(x)))


@needs_fused
def test_fused_matches_plain_in_float32_and_under_bfloat16_autocast(recorded):
    lin1, lin2 = _layers()
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        got = fused.linear_add(fused.linear_relu(x, lin1), lin2, x)
        torch.testing.assert_close(got, _plain(x, lin1, lin2), rtol=1e-5, atol=1e-5)
        assert recorded == ["relu", "add"]
        xb = x.bfloat16()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fused.linear_add(fused.linear_relu(xb, lin1), lin2, xb)
            want = _plain(xb, lin1, lin2)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=5e-2)
    assert recorded == ["relu", "add"] * 2


def test_training_and_other_dtypes_take_the_plain_operators(recorded):
    lin1, lin2 = _layers()
    x = torch.randn(3, 16, requires_grad=True)
    out = fused.linear_add(fused.linear_relu(x, lin1), lin2, x)
    out.sum().backward()
    assert x.grad is not None and lin1.weight.grad is not None
    with torch.no_grad():
        # float64, and a residual whose dtype the fused sum would change.
        x64, l1, l2 = x.detach().double(), lin1.double(), lin2.double()
        torch.testing.assert_close(
            fused.linear_add(fused.linear_relu(x64, l1), l2, x64), _plain(x64, l1, l2)
        )
        lin1, lin2 = _layers()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = fused.linear_relu(x.detach(), lin1)
            assert fused.linear_add(h, lin2, x.detach()).dtype == torch.float32
    assert recorded == ["relu"]


def test_encoder_layer_in_eval_uses_the_fused_kernel(recorded):
    torch.manual_seed(0)
    layer = DeformableTransformerEncoderLayer(d_model=32, dim_feedforward=64, num_levels=1, nhead=2)
    layer.eval()
    shapes = torch.tensor([[4, 5]])
    starts = torch.tensor([0])
    src, pos = torch.randn(1, 20, 32), torch.randn(1, 20, 32)
    ref = torch.rand(1, 20, 1, 2)
    with torch.no_grad():
        fast = layer(src, pos, ref, shapes, starts, None)
        assert recorded == ["relu", "add"]
        layer.train()
        for m in layer.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        plain = layer(src, pos, ref, shapes, starts, None)
    assert recorded == ["relu", "add"]
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
