"""Tests of the backbone adapter: levels, input projections, exact padding masks, batch grouping."""

import math

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.structures import ImageList
from torch import nn

from deformable_detr.config import add_deformable_detr_config
from deformable_detr.modeling.backbone import DeformableDetrBackbone


class _TinyTestBackbone(Backbone):
    """Two stride-4 / stride-8 outputs from plain convolutions, with a chosen divisibility."""

    def __init__(self, divisibility=0):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.b = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self._divisibility = divisibility

    def forward(self, x):
        if self._divisibility:
            assert x.shape[-2] % self._divisibility == 0 and x.shape[-1] % self._divisibility == 0
        a = self.a(x)
        return {"t4": a, "t8": self.b(a)}

    def output_shape(self):
        return {"t4": ShapeSpec(channels=8, stride=4), "t8": ShapeSpec(channels=16, stride=8)}

    @property
    def size_divisibility(self):
        return self._divisibility


@BACKBONE_REGISTRY.register()
def build_tiny_test_backbone_for_adapter(cfg, input_shape):
    return _TinyTestBackbone()


def _cfg(depth=18, in_features=("res3", "res4", "res5"), levels=4, hidden=64):
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    if depth in (18, 34):
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    else:
        # A narrow ResNet-50: the layout of the real one at a fraction of the cost.
        cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 16
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 32
        cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 8
    cfg.MODEL.RESNETS.OUT_FEATURES = list(in_features)
    cfg.MODEL.DEFORMABLE_DETR.IN_FEATURES = list(in_features)
    cfg.MODEL.DEFORMABLE_DETR.NUM_FEATURE_LEVELS = levels
    cfg.MODEL.DEFORMABLE_DETR.HIDDEN_DIM = hidden
    return cfg


def _images(*sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=g) for h, w in sizes]


def _ceil_div(x, n):
    return int(math.ceil(x / n))


def test_levels_projections_and_init():
    adapter = DeformableDetrBackbone(_cfg())
    shapes = adapter.output_shape()
    assert [s.stride for s in shapes] == [8, 16, 32, 64]
    assert all(s.channels == 64 for s in shapes)
    assert len(adapter.input_proj) == 4
    # ResNet-18 res3/res4/res5 have 128/256/512 channels; the extra level reads res5 raw.
    expected = [(128, 1, 1), (256, 1, 1), (512, 1, 1), (512, 3, 2)]
    for proj, (cin, k, stride) in zip(adapter.input_proj, expected):
        conv, norm = proj
        assert isinstance(conv, nn.Conv2d) and isinstance(norm, nn.GroupNorm)
        assert (conv.in_channels, conv.kernel_size[0], conv.stride[0]) == (cin, k, stride)
        assert norm.num_groups == 32 and norm.num_channels == 64
        assert torch.count_nonzero(conv.bias) == 0
        # xavier_uniform with gain 1 bounds the weights by sqrt(6 / (fan_in + fan_out)).
        bound = math.sqrt(6.0 / (cin * k * k + 64 * k * k))
        assert conv.weight.abs().max() <= bound
        assert conv.weight.abs().max() > 0.5 * bound
    keys = [k for k in adapter.state_dict() if k.startswith("input_proj.")]
    assert "input_proj.3.0.weight" in keys and "input_proj.3.1.weight" in keys


def test_second_extra_level_reads_previous_level():
    adapter = DeformableDetrBackbone(_cfg(levels=5))
    assert adapter.input_proj[3][0].in_channels == 512
    assert adapter.input_proj[4][0].in_channels == 64
    srcs, masks = adapter(ImageList.from_tensors(_images((70, 90))))
    assert [tuple(s.shape[-2:]) for s in srcs][-2:] == [(2, 2), (1, 1)]


def test_frozen_stem_and_res2():
    cfg = _cfg()
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    adapter = DeformableDetrBackbone(cfg)
    for name, p in adapter.body.named_parameters():
        frozen = name.startswith("stem.") or name.startswith("res2.")
        assert p.requires_grad != frozen, name
    assert all(p.requires_grad for p in adapter.input_proj.parameters())


def test_single_image_sizes_and_masks():
    adapter = DeformableDetrBackbone(_cfg()).eval()
    h, w = 70, 90
    with torch.no_grad():
        srcs, masks = adapter(ImageList.from_tensors(_images((h, w))))
    # Each stride-2 stage maps a side s to ceil(s / 2).
    for lvl, (src, mask) in enumerate(zip(srcs, masks)):
        stride = 8 * 2**lvl
        assert tuple(src.shape) == (1, 64, _ceil_div(h, stride), _ceil_div(w, stride))
        assert mask.dtype == torch.bool and not mask.any()


def test_batch_matches_images_alone():
    adapter = DeformableDetrBackbone(_cfg()).eval()
    sizes = [(70, 90), (100, 64), (70, 90)]
    images = _images(*sizes)
    with torch.no_grad():
        srcs, masks = adapter(ImageList.from_tensors(images))
        alone = [adapter(ImageList.from_tensors([im])) for im in images]
    for i in range(len(images)):
        for lvl in range(4):
            own = alone[i][0][lvl][0]
            h, w = own.shape[-2:]
            torch.testing.assert_close(srcs[lvl][i, :, :h, :w], own, rtol=1e-5, atol=1e-5)
            assert srcs[lvl][i, :, h:].abs().sum() == 0
            assert srcs[lvl][i, :, :, w:].abs().sum() == 0
            assert not masks[lvl][i, :h, :w].any()
            assert masks[lvl][i].sum() == masks[lvl].shape[1] * masks[lvl].shape[2] - h * w


def test_same_size_batch_has_no_padding():
    adapter = DeformableDetrBackbone(_cfg()).eval()
    with torch.no_grad():
        srcs, masks = adapter(ImageList.from_tensors(_images((64, 64), (64, 64))))
    assert all(s.shape[0] == 2 for s in srcs)
    assert not any(m.any() for m in masks)


def test_padding_in_imagelist_is_ignored():
    """Extra padding of the ImageList (size divisibility) never reaches the backbone."""
    adapter = DeformableDetrBackbone(_cfg()).eval()
    images = _images((70, 90))
    with torch.no_grad():
        plain, _ = adapter(ImageList.from_tensors(images))
        padded, masks = adapter(ImageList.from_tensors(images, size_divisibility=64))
    for a, b, m in zip(plain, padded, masks):
        torch.testing.assert_close(a, b)
        assert not m.any()


def test_gradients_flow_through_grouped_batch():
    adapter = DeformableDetrBackbone(_cfg())
    srcs, _ = adapter(ImageList.from_tensors(_images((64, 80), (80, 64))))
    sum(s.sum() for s in srcs).backward()
    assert all(p.grad is not None for p in adapter.input_proj.parameters())


def test_single_scale_dc5_resnet50():
    cfg = _cfg(depth=50, in_features=("res5",), levels=1)
    cfg.MODEL.RESNETS.RES5_DILATION = 2
    adapter = DeformableDetrBackbone(cfg).eval()
    assert [s.stride for s in adapter.output_shape()] == [16]
    assert len(adapter.input_proj) == 1
    assert adapter.input_proj[0][0].in_channels == 32 * 8
    assert adapter.input_proj[0][0].kernel_size == (1, 1)
    with torch.no_grad():
        srcs, masks = adapter(ImageList.from_tensors(_images((64, 96))))
    assert tuple(srcs[0].shape) == (1, 64, 4, 6)


def test_custom_registered_backbone():
    cfg = _cfg(in_features=("t4", "t8"), levels=3)
    cfg.MODEL.BACKBONE.NAME = "build_tiny_test_backbone_for_adapter"
    adapter = DeformableDetrBackbone(cfg).eval()
    assert [s.stride for s in adapter.output_shape()] == [4, 8, 16]
    assert [p[0].in_channels for p in adapter.input_proj] == [8, 16, 16]
    with torch.no_grad():
        srcs, masks = adapter(ImageList.from_tensors(_images((32, 40), (24, 24))))
    assert [tuple(s.shape[-2:]) for s in srcs] == [(8, 10), (4, 5), (2, 3)]
    assert [int((~m[1]).sum()) for m in masks] == [36, 9, 4]


def test_backbone_with_size_divisibility():
    body = _TinyTestBackbone(divisibility=16)
    adapter = DeformableDetrBackbone(
        body=body, in_features=["t4", "t8"], num_feature_levels=2, hidden_dim=32
    ).eval()
    with torch.no_grad():
        srcs, masks = adapter(ImageList.from_tensors(_images((20, 36), (40, 24))))
    # Inputs are padded to 32x48 and 48x32; the valid part is what the image itself covers.
    assert [tuple(s.shape[-2:]) for s in srcs] == [(12, 12), (6, 6)]
    assert int((~masks[0][0]).sum()) == 5 * 9
    assert int((~masks[1][1]).sum()) == 5 * 3


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(levels=2), "NUM_FEATURE_LEVELS"),
        (dict(in_features=("res3", "res4", "res6")), "IN_FEATURES"),
        (dict(hidden=48), "HIDDEN_DIM"),
    ],
)
def test_config_errors_name_the_key(change, key):
    cfg = _cfg(**change)
    if "in_features" in change:
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    with pytest.raises(ValueError, match=f"MODEL.DEFORMABLE_DETR.{key}"):
        DeformableDetrBackbone(cfg)


def test_feature_missing_from_backbone_outputs():
    cfg = _cfg()
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res4", "res5"]
    with pytest.raises(ValueError, match=r"IN_FEATURES.*\['res3'\]"):
        DeformableDetrBackbone(cfg)


def test_padded_training_batch_runs_the_body_once_with_the_same_masks():
    cfg = _cfg()
    cfg.MODEL.DEFORMABLE_DETR.PADDED_TRAINING_BATCH = True
    torch.manual_seed(0)
    padded = DeformableDetrBackbone(cfg)
    cfg.MODEL.DEFORMABLE_DETR.PADDED_TRAINING_BATCH = False
    grouped = DeformableDetrBackbone(cfg)
    grouped.load_state_dict(padded.state_dict())
    calls = []
    padded.body.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    sizes = [(70, 90), (100, 64), (70, 90)]
    images = ImageList.from_tensors(_images(*sizes))
    srcs, masks = padded(images)
    assert calls == [(3, 3, 100, 90)]
    sum(s.sum() for s in srcs).backward()
    assert all(p.grad is not None for p in padded.parameters() if p.requires_grad)
    ref_srcs, ref_masks = grouped(images)
    for src, ref, mask, ref_mask in zip(srcs, ref_srcs, masks, ref_masks):
        assert src.shape == ref.shape
        assert torch.equal(mask, ref_mask)
    # The features of a padded image depend on the padding (GroupNorm of the projections)...
    assert not torch.allclose(srcs[0][1], ref_srcs[0][1])
    # ... and inference runs each size on its own whatever the key says.
    calls.clear()
    with torch.no_grad():
        eval_srcs, eval_masks = padded.eval()(images)
        ref_srcs, ref_masks = grouped.eval()(images)
    assert len(calls) == 2
    for src, ref, mask, ref_mask in zip(eval_srcs, ref_srcs, eval_masks, ref_masks):
        torch.testing.assert_close(src, ref)
        assert torch.equal(mask, ref_mask)


def test_padded_training_batch_pads_to_the_body_divisibility():
    body = _TinyTestBackbone(divisibility=16)
    adapter = DeformableDetrBackbone(
        body=body,
        in_features=["t4", "t8"],
        num_feature_levels=2,
        hidden_dim=32,
        padded_training_batch=True,
    ).train()
    srcs, masks = adapter(ImageList.from_tensors(_images((20, 36), (40, 24))))
    # One pass on the batch padded to 48x48 (the body asserts the divisibility).
    assert [tuple(s.shape[-2:]) for s in srcs] == [(12, 12), (6, 6)]
    assert int((~masks[0][0]).sum()) == 5 * 9
    assert int((~masks[1][1]).sum()) == 5 * 3
