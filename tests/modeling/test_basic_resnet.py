"""Tests of build_basic_resnet_backbone: ResNet-18/34 at any width."""

import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from helpers import CONFIG_DIR

from deformable_detr.config import add_deformable_detr_config

QUICKSTART = os.path.join(CONFIG_DIR, "quickstart.yaml")


def _cfg(**resnets):
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_basic_resnet_backbone"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.NORM = "GN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    for key, value in resnets.items():
        setattr(cfg.MODEL.RESNETS, key, value)
    return cfg


@pytest.mark.parametrize("depth", [18, 34])
def test_width_64_is_detectron2_resnet(depth):
    cfg = _cfg(DEPTH=depth, STEM_OUT_CHANNELS=64, RES2_OUT_CHANNELS=64)
    ours = build_backbone(cfg)
    theirs = build_resnet_backbone(cfg, ShapeSpec(channels=3))
    # Same parameter names and shapes: Detectron2's weights load one to one.
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(1, 3, 96, 128)
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    for name in ("res3", "res4", "res5"):
        torch.testing.assert_close(a[name], b[name])


def test_half_width_shapes_and_cost():
    cfg = _cfg(STEM_OUT_CHANNELS=32, RES2_OUT_CHANNELS=32)
    body = build_backbone(cfg)
    shapes = body.output_shape()
    assert {k: (s.channels, s.stride) for k, s in shapes.items()} == {
        "res3": (64, 8),
        "res4": (128, 16),
        "res5": (256, 32),
    }
    out = body(torch.randn(2, 3, 64, 96))
    assert tuple(out["res3"].shape) == (2, 64, 8, 12)
    assert tuple(out["res5"].shape) == (2, 256, 2, 3)
    full = build_backbone(_cfg(STEM_OUT_CHANNELS=64, RES2_OUT_CHANNELS=64))
    n_half = sum(p.numel() for p in body.parameters())
    n_full = sum(p.numel() for p in full.parameters())
    assert 0.2 < n_half / n_full < 0.3


def test_quickstart_model_builds_with_it():
    from detectron2.modeling import build_model

    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.merge_from_file(QUICKSTART)
    model = build_model(cfg)
    assert type(model.backbone.body).__name__ == "ResNet"
    assert model.backbone.body.stem.conv1.out_channels == cfg.MODEL.RESNETS.STEM_OUT_CHANNELS


@pytest.mark.parametrize(
    "resnets, culprit",
    [
        ({"DEPTH": 50}, "MODEL.RESNETS.DEPTH"),
        ({"RES2_OUT_CHANNELS": 48}, "MODEL.RESNETS.RES2_OUT_CHANNELS"),
        ({"STEM_OUT_CHANNELS": 40}, "MODEL.RESNETS.STEM_OUT_CHANNELS"),
        ({"RES5_DILATION": 2}, "MODEL.RESNETS.RES5_DILATION"),
        ({"NUM_GROUPS": 2}, "MODEL.RESNETS.NUM_GROUPS"),
        ({"DEFORM_ON_PER_STAGE": [False, True, False, False]}, "DEFORM_ON_PER_STAGE"),
    ],
)
def test_bad_settings_name_the_key(resnets, culprit):
    base = {"STEM_OUT_CHANNELS": 32, "RES2_OUT_CHANNELS": 32}
    base.update(resnets)
    with pytest.raises(ValueError, match=culprit):
        build_backbone(_cfg(**base))


def test_width_not_multiple_of_32_is_fine_without_groupnorm():
    cfg = _cfg(NORM="BN", STEM_OUT_CHANNELS=24, RES2_OUT_CHANNELS=24)
    body = build_backbone(cfg)
    assert body.output_shape()["res5"].channels == 192
