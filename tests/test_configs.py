"""Every YAML under configs/ loads and builds; the published variants carry the official recipe."""

import glob
import math
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from helpers import CONFIG_DIR

from deformable_detr import add_deformable_detr_config

ALL_CONFIGS = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))

# Published parameter counts in millions (official README, 91 COCO class ids).
PUBLISHED = {
    "r50.yaml": (40, dict(levels=4, refine=False, two_stage=False, dilation=1)),
    "r50_single_scale.yaml": (34, dict(levels=1, refine=False, two_stage=False, dilation=1)),
    "r50_single_scale_dc5.yaml": (34, dict(levels=1, refine=False, two_stage=False, dilation=2)),
    "r50_box_refine.yaml": (41, dict(levels=4, refine=True, two_stage=False, dilation=1)),
    "r50_two_stage.yaml": (41, dict(levels=4, refine=True, two_stage=True, dilation=1)),
}


def load(path):
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.merge_from_file(path)
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def test_configs_found():
    names = {os.path.basename(p) for p in ALL_CONFIGS}
    assert {"Base-DeformableDETR.yaml", *PUBLISHED} <= names


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=os.path.basename)
def test_config_merges_and_builds(path):
    cfg = load(path)
    name = os.path.basename(path)
    d = cfg.MODEL.DEFORMABLE_DETR
    assert cfg.MODEL.META_ARCHITECTURE == "DeformableDETR"
    assert set(d.IN_FEATURES) <= set(cfg.MODEL.RESNETS.OUT_FEATURES)
    if name in PUBLISHED:
        expect = PUBLISHED[name][1]
        assert d.NUM_FEATURE_LEVELS == expect["levels"]
        assert d.WITH_BOX_REFINE == expect["refine"] and d.TWO_STAGE == expect["two_stage"]
        assert cfg.MODEL.RESNETS.RES5_DILATION == expect["dilation"]
        # The published counts include the 91-way classifiers of the raw COCO ids.
        d.NUM_CLASSES = 91
    # Building does not load weights: MODEL.WEIGHTS is only read by the checkpointer.
    model = build_model(cfg)
    assert len(model.backbone.input_proj) == d.NUM_FEATURE_LEVELS
    assert model.class_embed[0].out_features == d.NUM_CLASSES
    if name in PUBLISHED:
        count = sum(p.numel() for p in model.parameters())
        assert round(count / 1e6) == PUBLISHED[name][0]


def test_base_recipe():
    cfg = load(os.path.join(CONFIG_DIR, "Base-DeformableDETR.yaml"))
    d = cfg.MODEL.DEFORMABLE_DETR
    assert cfg.INPUT.FORMAT == "RGB"
    assert cfg.MODEL.PIXEL_MEAN == pytest.approx([255 * m for m in (0.485, 0.456, 0.406)])
    assert cfg.MODEL.PIXEL_STD == pytest.approx([255 * s for s in (0.229, 0.224, 0.225)])
    assert cfg.MODEL.RESNETS.NORM == "FrozenBN" and not cfg.MODEL.RESNETS.STRIDE_IN_1X1
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 2 and cfg.MODEL.RESNETS.DEPTH == 50
    assert (d.NUM_QUERIES, d.HIDDEN_DIM, d.NHEADS, d.ENC_LAYERS, d.DEC_LAYERS) == (
        300,
        256,
        8,
        6,
        6,
    )
    assert (d.DIM_FEEDFORWARD, d.DROPOUT, d.ENC_N_POINTS, d.DEC_N_POINTS) == (1024, 0.1, 4, 4)
    assert (d.CLASS_WEIGHT, d.BBOX_WEIGHT, d.GIOU_WEIGHT) == (2.0, 5.0, 2.0)
    assert (d.COST_CLASS, d.COST_BBOX, d.COST_GIOU) == (2.0, 5.0, 2.0)

    s = cfg.SOLVER
    assert s.OPTIMIZER == "ADAMW" and s.BASE_LR == 2e-4 and s.WEIGHT_DECAY == 1e-4
    assert s.BACKBONE_MULTIPLIER == 0.1 and s.LINEAR_PROJ_MULTIPLIER == 0.1
    assert list(s.LINEAR_PROJ_NAMES) == ["sampling_offsets", "reference_points"]
    assert s.IMS_PER_BATCH == 32 and s.WARMUP_ITERS == 0
    epoch = 118287 // 32
    assert s.MAX_ITER == 50 * epoch and tuple(s.STEPS) == (40 * epoch,) and s.GAMMA == 0.1
    assert s.CHECKPOINT_PERIOD == epoch and cfg.TEST.EVAL_PERIOD == 5 * epoch
    clip = s.CLIP_GRADIENTS
    assert clip.ENABLED and clip.CLIP_TYPE == "full_model"
    assert (clip.CLIP_VALUE, clip.NORM_TYPE) == (0.1, 2.0)

    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == tuple(range(480, 801, 32))
    assert cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING == "choice" and cfg.INPUT.MAX_SIZE_TRAIN == 1333
    assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (800, 1333)
    assert cfg.INPUT.CROP.ENABLED and cfg.INPUT.CROP.TYPE == "absolute_range"
    assert list(cfg.INPUT.CROP.SIZE) == [384, 600]
    assert list(cfg.INPUT.CROP_PRE_RESIZE_SIZES) == [400, 500, 600]
    assert not cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
    assert cfg.TEST.DETECTIONS_PER_IMAGE == 100
    assert tuple(cfg.DATASETS.TRAIN) == ("coco_2017_train",)
    assert tuple(cfg.DATASETS.TEST) == ("coco_2017_val",)


def test_every_key_has_a_comment():
    """Each key added by add_deformable_detr_config is documented where it is set."""
    import inspect

    import deformable_detr.config as config_module

    source = inspect.getsource(config_module.add_deformable_detr_config).splitlines()
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    for key in cfg.MODEL.DEFORMABLE_DETR:
        line = next(i for i, text in enumerate(source) if f"_C.{key} =" in text)
        # The comment sits above the key, possibly above a group of related keys.
        above = source[max(0, line - 4) : line]
        assert any(t.strip().startswith("#") for t in above), key


def test_defaults_match_contract():
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    d = cfg.MODEL.DEFORMABLE_DETR
    assert d.NUM_CLASSES == 80 and d.NUM_QUERIES == 300
    assert list(d.IN_FEATURES) == ["res3", "res4", "res5"] and d.NUM_FEATURE_LEVELS == 4
    assert not d.WITH_BOX_REFINE and not d.TWO_STAGE and d.TWO_STAGE_NUM_PROPOSALS == 300
    assert d.AUX_LOSS and d.FOCAL_ALPHA == 0.25 and d.FOCAL_GAMMA == 2.0
    assert math.isclose(cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE, 0.1)


def _leaves(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _get(cfg, dotted):
    for part in dotted.split("."):
        cfg = cfg[part]
    return list(cfg) if isinstance(cfg, (list, tuple)) else cfg


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=os.path.basename)
def test_yaml_states_only_what_differs(path):
    """Defaults live in add_deformable_detr_config (and Detectron2): the base file sets only what
    differs from them, and each variant only what differs from its base."""
    import yaml

    with open(path) as f:
        raw = yaml.safe_load(f)
    if "_BASE_" in raw:
        parent = load(os.path.join(os.path.dirname(path), raw.pop("_BASE_")))
    else:
        parent = get_cfg()
        add_deformable_detr_config(parent)
    cfg = load(path)
    restated = [
        key
        for key, _ in _leaves(raw)
        if key not in ("VERSION", "MODEL.DEVICE") and _get(cfg, key) == _get(parent, key)
    ]
    assert not restated, f"{os.path.basename(path)} restates inherited values: {restated}"


# Values the YAML files inherit instead of stating them; pinned so that the defaults cannot
# change a published or documented config unnoticed.
INHERITED = {
    "quickstart.yaml": {
        "MODEL.RESNETS.OUT_FEATURES": ["res3", "res4", "res5"],
        "MODEL.DEFORMABLE_DETR.IN_FEATURES": ["res3", "res4", "res5"],
        "MODEL.DEFORMABLE_DETR.NUM_FEATURE_LEVELS": 4,
        "MODEL.DEFORMABLE_DETR.ENC_N_POINTS": 4,
        "MODEL.DEFORMABLE_DETR.DEC_N_POINTS": 4,
        "SOLVER.OPTIMIZER": "ADAMW",
        "SOLVER.WEIGHT_DECAY": 1e-4,
        "SOLVER.CLIP_GRADIENTS.CLIP_TYPE": "full_model",
        "SOLVER.CLIP_GRADIENTS.CLIP_VALUE": 0.1,
        "INPUT.RANDOM_FLIP": "horizontal",
        "INPUT.MIN_SIZE_TRAIN_SAMPLING": "choice",
        "TEST.DETECTIONS_PER_IMAGE": 100,
    },
    "r50_two_stage.yaml": {"MODEL.DEFORMABLE_DETR.TWO_STAGE_NUM_PROPOSALS": 300},
    "Base-DeformableDETR.yaml": {
        "MODEL.BACKBONE.NAME": "build_resnet_backbone",
        "INPUT.RANDOM_FLIP": "horizontal",
        "MODEL.DEFORMABLE_DETR.NUM_CLASSES": 80,
        "MODEL.DEFORMABLE_DETR.AUX_LOSS": True,
        "MODEL.DEFORMABLE_DETR.FOCAL_ALPHA": 0.25,
        "VERSION": 2,
    },
}


@pytest.mark.parametrize("name", sorted(INHERITED))
def test_inherited_values(name):
    cfg = load(os.path.join(CONFIG_DIR, name))
    for key, value in INHERITED[name].items():
        assert _get(cfg, key) == value, key


def test_load_config_names_what_is_wrong(tmp_path):
    from deformable_detr.config import ConfigError, load_config

    r50 = os.path.join(CONFIG_DIR, "r50.yaml")
    cfg = load_config(r50, ["MODEL.DEFORMABLE_DETR.NUM_CLASSES", "3"])
    assert cfg.is_frozen() and cfg.MODEL.DEFORMABLE_DETR.NUM_CLASSES == 3
    assert not load_config(freeze=False).is_frozen()
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="override MODEL.DEFORMABLE_DETR.NUM_CLASES"):
        load_config(r50, ["MODEL.DEFORMABLE_DETR.NUM_CLASES", "3"])
    with pytest.raises(ConfigError, match="override SOLVER.MAX_ITER 'ten'"):
        load_config(r50, ["SOLVER.MAX_ITER", "ten"])
    with pytest.raises(ConfigError, match="'SOLVER.MAX_ITER' has no value"):
        load_config(r50, ["SOLVER.MAX_ITER"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  DEFORMABLE_DETR:\n    NUM_QUERIS: 10\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*NUM_QUERIS"):
        load_config(str(bad))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_model_on_a_missing_gpu_fails_naming_the_key():
    from detectron2.engine import DefaultPredictor

    from deformable_detr.config import ConfigError, load_config

    cfg = load_config(os.path.join(CONFIG_DIR, "r50.yaml"), ["MODEL.DEVICE", "cuda"])
    with pytest.raises(ConfigError, match="MODEL.DEVICE is 'cuda'.*set MODEL.DEVICE cpu"):
        DefaultPredictor(cfg)
