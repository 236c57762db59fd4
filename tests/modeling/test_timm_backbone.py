"""Tests of the timm backbones: the Swin-T and ConvNeXt-T configs, output shapes, per-image
padding (detections independent of the batch), training steps, frozen stages, config errors."""

import math
import os
import sys

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_backbone, build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from deformable_detr import add_deformable_detr_config
from deformable_detr.engine import build_optimizer
from deformable_detr.modeling.timm_backbone import TimmBackbone

timm = pytest.importorskip("timm")

CONFIG_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "projects",
    "DeformableDETR",
    "configs",
)
CONFIGS = ["swin_t.yaml", "convnext_t.yaml"]
# A transformer reduced to the least that keeps every part (refinement, aux losses) running.
SMALL = [
    "MODEL.DEFORMABLE_DETR.ENC_LAYERS",
    "1",
    "MODEL.DEFORMABLE_DETR.DEC_LAYERS",
    "2",
    "MODEL.DEFORMABLE_DETR.HIDDEN_DIM",
    "64",
    "MODEL.DEFORMABLE_DETR.DIM_FEEDFORWARD",
    "64",
    "MODEL.DEFORMABLE_DETR.NUM_QUERIES",
    "20",
    "MODEL.DEFORMABLE_DETR.ENC_N_POINTS",
    "2",
    "MODEL.DEFORMABLE_DETR.DEC_N_POINTS",
    "2",
    "MODEL.DEFORMABLE_DETR.NUM_CLASSES",
    "5",
    "TEST.DETECTIONS_PER_IMAGE",
    "20",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(name, opts=()):
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIG_DIR, name))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""] + list(opts))
    return cfg


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg)


def _image(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g).to(torch.uint8)


def _instances(h, w, boxes, classes):
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    return inst


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_with_timm_model_layout(name):
    cfg = _cfg(name)
    model = build_model(cfg)
    body = model.backbone.body
    assert isinstance(body, TimmBackbone)
    assert body.model_name == cfg.MODEL.TIMM.NAME
    shapes = body.output_shape()
    assert list(shapes) == ["res3", "res4", "res5"] == list(cfg.MODEL.DEFORMABLE_DETR.IN_FEATURES)
    assert [s.stride for s in shapes.values()] == [8, 16, 32]
    assert [s.channels for s in shapes.values()] == [192, 384, 768]
    # The 1x1 input projections read those channels; the extra level reads res5.
    in_channels = [p[0].in_channels for p in model.backbone.input_proj]
    assert in_channels == [192, 384, 768, 768]
    assert cfg.MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE and len(model.backbone.input_proj) == 4
    # The normalisation of the ImageNet weights, in the config's channel order (RGB).
    assert cfg.INPUT.FORMAT == "RGB"
    pretrained = body.model.pretrained_cfg
    assert cfg.MODEL.PIXEL_MEAN == pytest.approx([255 * v for v in pretrained["mean"]], abs=1e-3)
    assert cfg.MODEL.PIXEL_STD == pytest.approx([255 * v for v in pretrained["std"]], abs=1e-3)
    # Nothing is read at build time, and the backbone sits under the lower learning rate.
    assert cfg.MODEL.TIMM.WEIGHTS == ""
    assert cfg.SOLVER.BACKBONE_MULTIPLIER == 0.1


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("size", [(64, 96), (70, 101), (33, 40)])
def test_features_match_output_shape(name, size):
    cfg = _cfg(name)
    torch.manual_seed(0)
    body = build_backbone(cfg).eval()
    shapes = body.output_shape()
    h, w = size
    with torch.no_grad():
        feats = body(torch.randn(2, 3, h, w))
    assert list(feats) == list(shapes)
    for key, f in feats.items():
        s = shapes[key].stride
        assert f.shape == (2, shapes[key].channels, math.ceil(h / s), math.ceil(w / s)), key
        assert torch.isfinite(f).all()
    assert body.size_divisibility == 0 and not body.padding_constraints


def test_swin_features_are_timm_features_on_divisible_input():
    """On an input timm needs no padding for, the backbone is timm's feature extractor in NCHW."""
    torch.manual_seed(0)
    body = TimmBackbone(model_name="swin_tiny_patch4_window7_224", out_indices=[1, 2, 3]).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ours = body(x)
        ref = body.model(x)
    for f, r in zip(ours.values(), ref):
        torch.testing.assert_close(f, r.permute(0, 3, 1, 2), rtol=0, atol=0)


@pytest.mark.parametrize("name", CONFIGS)
def test_detections_do_not_depend_on_the_batch(name):
    """A picture gives the same detections alone and next to a picture of another size."""
    model = _model(_cfg(name, SMALL)).eval()
    # Neither side is a multiple of 32 for the small one: the per-image padding is exercised.
    small, large = _image(70, 101, 1), _image(96, 80, 2)
    with torch.no_grad():
        raw_alone, _ = model.forward_raw([{"image": small}])
        raw_batch, _ = model.forward_raw([{"image": large}, {"image": small}])
        raw_large, _ = model.forward_raw([{"image": large}])
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(raw_batch[key][1], raw_alone[key][0], rtol=0, atol=1e-4)
        torch.testing.assert_close(raw_batch[key][0], raw_large[key][0], rtol=0, atol=1e-4)
    alone = model.inference(raw_alone["pred_logits"], raw_alone["pred_boxes"], [(70, 101)])[0]
    batched = model.inference(
        raw_batch["pred_logits"], raw_batch["pred_boxes"], [(96, 80), (70, 101)]
    )[1]
    assert len(alone) == len(batched) == 20
    torch.testing.assert_close(batched.scores, alone.scores, rtol=0, atol=1e-4)
    assert batched.pred_classes.tolist() == alone.pred_classes.tolist()
    torch.testing.assert_close(
        batched.pred_boxes.tensor, alone.pred_boxes.tensor, rtol=0, atol=1e-2
    )


@pytest.mark.parametrize("name", CONFIGS)
def test_two_training_steps(name):
    # FREEZE_AT 2: stem and res2 frozen, the rest of the backbone trains at its lower rate.
    cfg = _cfg(name, SMALL + ["MODEL.TIMM.FREEZE_AT", "2", "SOLVER.BASE_LR", "1e-3"])
    model = _model(cfg)
    model.train()
    optimizer = build_optimizer(cfg, model)
    batch = [
        {
            "image": _image(64, 80, 3),
            "instances": _instances(64, 80, [[4, 6, 40, 40], [30, 10, 78, 60]], [1, 4]),
        },
        {"image": _image(72, 50, 4), "instances": _instances(72, 50, [[10, 10, 30, 50]], [0])},
    ]
    body = model.backbone.body
    frozen = {n: p.detach().clone() for n, p in body.named_parameters() if not p.requires_grad}
    stage3 = [p for n, p in body.named_parameters() if n.startswith("model.") and p.requires_grad]
    before = [p.detach().clone() for p in stage3]
    assert frozen and stage3
    for it in range(2):
        with EventStorage(it):
            losses = model(batch)
        assert all(torch.isfinite(v) for v in losses.values()), losses
        optimizer.zero_grad()
        sum(losses.values()).backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, missing
        optimizer.step()
    for n, p in body.named_parameters():
        if n in frozen:
            assert p.grad is None and torch.equal(p, frozen[n]), n
    assert any(not torch.equal(a, b) for a, b in zip(stage3, before))


@pytest.mark.parametrize(
    "freeze_at, frozen_prefixes",
    [
        (0, ()),
        (1, ("patch_embed.",)),
        (2, ("patch_embed.", "layers_0.")),
        (4, ("patch_embed.", "layers_0.", "layers_1.", "layers_2.")),
    ],
)
def test_frozen_stages_have_no_gradient(freeze_at, frozen_prefixes):
    torch.manual_seed(0)
    body = TimmBackbone(
        model_name="swin_tiny_patch4_window7_224",
        out_indices=[1, 2, 3],
        freeze_at=freeze_at,
        drop_path_rate=0.5,
    ).train()
    feats = body(torch.randn(1, 3, 64, 64))
    sum(f.square().mean() for f in feats.values()).backward()
    for n, p in body.model.named_parameters():
        if n.startswith(frozen_prefixes):
            assert not p.requires_grad and p.grad is None, n
        else:
            assert p.requires_grad and p.grad is not None, n
    # Frozen stages run in eval mode, so stochastic depth leaves them alone in training.
    for name, module in body.model.named_children():
        assert module.training == (not (name + ".").startswith(frozen_prefixes)), name


def test_batch_norm_of_timm_models_is_frozen():
    from detectron2.layers import FrozenBatchNorm2d

    body = TimmBackbone(model_name="resnet18", out_indices=[2, 3, 4], freeze_at=1)
    assert list(body.output_shape()) == ["res3", "res4", "res5"]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in body.modules())
    # FREEZE_AT 1 is the stem: everything before the stride-4 stage (bn1 holds buffers only).
    frozen = {n.split(".")[0] for n, p in body.model.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1"} and isinstance(body.model.bn1, FrozenBatchNorm2d)


@pytest.mark.parametrize(
    "opts, match",
    [
        (["MODEL.TIMM.NAME", ""], r"MODEL\.TIMM\.NAME is empty"),
        (["MODEL.TIMM.NAME", "no_such_model_xyz"], r"MODEL\.TIMM\.NAME = 'no_such_model_xyz'"),
        (["MODEL.TIMM.NAME", "vit_tiny_patch16_224"], r"MODEL\.TIMM\.NAME .*fixed size"),
        (["MODEL.TIMM.OUT_INDICES", "[3, 1]"], r"MODEL\.TIMM\.OUT_INDICES = \[3, 1\]"),
        (["MODEL.TIMM.OUT_INDICES", "[1, 7]"], r"MODEL\.TIMM\.OUT_INDICES = \[1, 7\]"),
        (["MODEL.TIMM.FREEZE_AT", "6"], r"MODEL\.TIMM\.FREEZE_AT = 6"),
        (["MODEL.TIMM.FREEZE_AT", "-1"], r"MODEL\.TIMM\.FREEZE_AT = -1"),
        (["MODEL.TIMM.DROP_PATH_RATE", "1.5"], r"MODEL\.TIMM\.DROP_PATH_RATE"),
    ],
)
def test_bad_config_names_the_key(opts, match):
    with pytest.raises(ValueError, match=match):
        build_backbone(_cfg("swin_t.yaml", opts))


def test_in_features_not_produced_are_named():
    cfg = _cfg("convnext_t.yaml", ["MODEL.DEFORMABLE_DETR.IN_FEATURES", "['res2', 'res3', 'res4']"])
    with pytest.raises(ValueError, match=r"\['res2'\] are not produced"):
        build_model(cfg)


def test_missing_timm_names_the_key(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match=r"build_timm_backbone.*MODEL\.TIMM\.NAME.*pip install"):
        build_backbone(_cfg("swin_t.yaml"))


def test_dynamic_export_is_refused_with_the_reason():
    from deformable_detr.export import DeformableDetrExportWrapper, export_program

    model = build_model(_cfg("convnext_t.yaml")).eval()
    with pytest.raises(ValueError, match="dynamic image size cannot be exported.*fixed size"):
        wrapper = DeformableDetrExportWrapper(model).eval()
        export_program(wrapper, torch.zeros(3, 64, 64), dynamic=True)
