"""Tests of the dataset mapper and the official augmentation on a small synthetic image."""

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from helpers import BASE_CONFIG
from PIL import Image

from deformable_detr.config import add_deformable_detr_config
from deformable_detr.data import (
    DeformableDetrDatasetMapper,
    RandomSelect,
    build_deformable_detr_augmentation,
)

HEIGHT, WIDTH = 60, 90


@pytest.fixture
def image_file(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
    path = tmp_path / "img.png"
    Image.fromarray(pixels).save(path)
    return str(path), pixels


def _cfg():
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.MIN_SIZE_TRAIN = tuple(range(480, 801, 32))
    cfg.INPUT.MAX_SIZE_TRAIN = 1333
    cfg.INPUT.MIN_SIZE_TEST = 800
    cfg.INPUT.MAX_SIZE_TEST = 1333
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute_range"
    cfg.INPUT.CROP.SIZE = [384, 600]
    return cfg


def _record(file_name, annotations):
    return {
        "file_name": file_name,
        "height": HEIGHT,
        "width": WIDTH,
        "image_id": 1,
        "annotations": annotations,
    }


def _anno(x0, y0, x1, y1, category=1, **extra):
    return {
        "bbox": [x0, y0, x1, y1],
        "bbox_mode": BoxMode.XYXY_ABS,
        "category_id": category,
        **extra,
    }


def test_augmentation_structure():
    cfg = _cfg()
    augs = build_deformable_detr_augmentation(cfg, is_train=True)
    assert isinstance(augs[0], T.RandomFlip) and augs[0].prob == 0.5 and augs[0].horizontal
    select = augs[1]
    assert isinstance(select, RandomSelect) and select.prob == 0.5
    (resize,) = select.first.augs
    assert isinstance(resize, T.ResizeShortestEdge)
    assert tuple(resize.short_edge_length) == tuple(range(480, 801, 32))
    assert resize.max_size == 1333 and resize.sample_style == "choice"
    pre, crop, post = select.second.augs
    assert tuple(pre.short_edge_length) == (400, 500, 600) and pre.sample_style == "choice"
    assert pre.max_size > 10**6  # no limit on the longer side before the crop
    assert isinstance(crop, T.RandomCrop)
    assert crop.crop_type == "absolute_range" and tuple(crop.crop_size) == (384, 600)
    assert post is resize

    cfg.INPUT.CROP_PRE_RESIZE_SIZES = (100, 200)
    pre = build_deformable_detr_augmentation(cfg, is_train=True)[1].second.augs[0]
    assert tuple(pre.short_edge_length) == (100, 200)

    cfg.INPUT.CROP.ENABLED = False
    flip, resize = build_deformable_detr_augmentation(cfg, is_train=True)
    assert isinstance(resize, T.ResizeShortestEdge)

    (test_resize,) = build_deformable_detr_augmentation(cfg, is_train=False)
    assert tuple(test_resize.short_edge_length) == (800, 800) and test_resize.max_size == 1333


def test_base_config_gives_the_official_recipe():
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.merge_from_file(BASE_CONFIG)
    flip, select = build_deformable_detr_augmentation(cfg, is_train=True)
    assert isinstance(flip, T.RandomFlip) and flip.horizontal and flip.prob == 0.5
    (resize,) = select.first.augs
    assert tuple(resize.short_edge_length) == tuple(range(480, 801, 32)) and resize.max_size == 1333
    pre, crop, post = select.second.augs
    assert tuple(pre.short_edge_length) == (400, 500, 600)
    assert crop.crop_type == "absolute_range" and tuple(crop.crop_size) == (384, 600)
    assert post is resize
    (test_resize,) = build_deformable_detr_augmentation(cfg, is_train=False)
    assert tuple(test_resize.short_edge_length) == (800, 800) and test_resize.max_size == 1333
    assert cfg.INPUT.FORMAT == "RGB"


def test_random_select_probability():
    seen = []

    class Mark(T.Augmentation):
        def __init__(self, name):
            self.name = name

        def get_transform(self, image):
            seen.append(self.name)
            return T.NoOpTransform()

    aug_input = T.AugInput(np.zeros((4, 4, 3), dtype=np.uint8))
    RandomSelect([Mark("a")], [Mark("b")], prob=1.0)(aug_input)
    RandomSelect([Mark("a")], [Mark("b")], prob=0.0)(aug_input)
    assert seen == ["a", "b"]
    seen.clear()
    np.random.seed(0)
    select = RandomSelect([Mark("a")], [Mark("b")], prob=0.5)
    for _ in range(200):
        select(aug_input)
    assert 70 < seen.count("a") < 130
    with pytest.raises(ValueError, match="prob"):
        RandomSelect([], [], prob=1.5)


def test_flip(image_file):
    path, pixels = image_file
    mapper = DeformableDetrDatasetMapper(
        True, augmentations=[T.HFlipTransform(WIDTH)], image_format="RGB"
    )
    out = mapper(_record(path, [_anno(10, 5, 30, 25, category=2)]))
    assert torch.equal(out["image"], torch.from_numpy(pixels[:, ::-1].copy()).permute(2, 0, 1))
    assert out["instances"].gt_boxes.tensor.tolist() == [[WIDTH - 30, 5, WIDTH - 10, 25]]
    assert out["instances"].gt_classes.tolist() == [2]


def test_crop_keeps_only_valid_boxes(image_file):
    path, _ = image_file
    # The crop branch of RandomSelect with a fixed crop: x in [20, 70), y in [10, 50).
    mapper = DeformableDetrDatasetMapper(
        True,
        augmentations=[
            RandomSelect([], [T.CropTransform(20, 10, 50, 40)], prob=0.0),
        ],
        image_format="RGB",
    )
    annos = [
        _anno(30, 20, 40, 30, category=0),  # inside
        _anno(10, 0, 30, 20, category=1),  # partly inside: clipped
        _anno(0, 0, 15, 8, category=2),  # outside: removed
        _anno(75, 20, 85, 40, category=3),  # outside on the right: removed
        _anno(25, 15, 35, 25, category=4, iscrowd=1),  # crowd: removed
    ]
    out = mapper(_record(path, annos))
    assert tuple(out["image"].shape) == (3, 40, 50)
    inst = out["instances"]
    assert inst.image_size == (40, 50)
    assert inst.gt_classes.tolist() == [0, 1]
    assert inst.gt_boxes.tensor.tolist() == [[10, 10, 20, 20], [0, 0, 10, 10]]


def test_official_train_augmentation_invariants(image_file):
    path, _ = image_file
    mapper = DeformableDetrDatasetMapper(_cfg(), is_train=True)
    annos = [_anno(10, 5, 30, 25), _anno(50, 30, 85, 55, category=3), _anno(0, 0, 90, 60)]
    scales = set(range(480, 801, 32))
    np.random.seed(0)
    for _ in range(12):
        out = mapper(_record(path, annos))
        _, h, w = out["image"].shape
        # The last step is always the multi-scale resize (aspect ratio 1.5 here stays below
        # 1333 / 800, so the shorter side is one of the scales, up to rounding after a crop).
        assert min(h, w) in scales or any(abs(min(h, w) - s) <= 1 for s in scales)
        assert max(h, w) <= 1333
        boxes = out["instances"].gt_boxes.tensor
        assert len(boxes) >= 1  # the full-image box survives every crop
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert (boxes >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()


def test_test_resize_drops_annotations(image_file):
    path, _ = image_file
    mapper = DeformableDetrDatasetMapper(_cfg(), is_train=False)
    out = mapper(_record(path, [_anno(10, 5, 30, 25)]))
    # Shorter side 60 -> 800, longer side 90 -> 1200 (under 1333).
    assert tuple(out["image"].shape) == (3, 800, 1200)
    assert out["image"].dtype == torch.uint8
    assert "annotations" not in out and "instances" not in out

    wide = np.zeros((40, 100, 3), dtype=np.uint8)
    wide_path = path.replace("img.png", "wide.png")
    Image.fromarray(wide).save(wide_path)
    out = mapper({"file_name": wide_path, "height": 40, "width": 100, "image_id": 2})
    # 800 would make the longer side 2000 > 1333: the longer side is capped instead.
    assert tuple(out["image"].shape) == (3, 533, 1333)


def test_empty_annotations_stay(image_file):
    path, _ = image_file
    mapper = DeformableDetrDatasetMapper(_cfg(), is_train=True)
    for record in (
        _record(path, []),
        {k: v for k, v in _record(path, []).items() if k != "annotations"},
    ):
        out = mapper(record)
        assert len(out["instances"]) == 0
        assert tuple(out["instances"].gt_boxes.tensor.shape) == (0, 4)
        assert out["instances"].gt_classes.dtype == torch.int64


def test_errors(image_file):
    path, _ = image_file
    cfg = _cfg()
    cfg.INPUT.RANDOM_FLIP = "diagonal"
    with pytest.raises(ValueError, match="RANDOM_FLIP"):
        DeformableDetrDatasetMapper(cfg, is_train=True)
    mapper = DeformableDetrDatasetMapper(_cfg(), is_train=False)
    with pytest.raises(KeyError, match="file_name"):
        mapper({"height": HEIGHT, "width": WIDTH})


@pytest.mark.parametrize(
    "changes, is_train, message",
    [
        ({"MIN_SIZE_TRAIN": ()}, True, r"INPUT.MIN_SIZE_TRAIN must list positive .* got \(\)"),
        ({"MIN_SIZE_TRAIN": (480, -1)}, True, "INPUT.MIN_SIZE_TRAIN must list positive"),
        (
            {"MIN_SIZE_TRAIN": (480, 512, 544), "MIN_SIZE_TRAIN_SAMPLING": "range"},
            True,
            r"INPUT.MIN_SIZE_TRAIN must be \(low, high\)",
        ),
        ({"MIN_SIZE_TRAIN_SAMPLING": "uniform"}, True, "INPUT.MIN_SIZE_TRAIN_SAMPLING must be"),
        ({"MAX_SIZE_TRAIN": 0}, True, "INPUT.MAX_SIZE_TRAIN must be a positive int"),
        ({"CROP_PRE_RESIZE_SIZES": []}, True, "INPUT.CROP_PRE_RESIZE_SIZES must list positive"),
        ({"CROP.SIZE": [600, 384]}, True, r"INPUT.CROP.SIZE \[600, 384\] does not suit"),
        ({"CROP.SIZE": [384]}, True, r"INPUT.CROP.SIZE \[384\] does not suit"),
        ({"CROP.TYPE": "relative", "CROP.SIZE": [0.5, 1.5]}, True, "does not suit"),
        ({"CROP.TYPE": "square"}, True, "INPUT.CROP.TYPE must be"),
        ({"MIN_SIZE_TEST": -1}, False, "INPUT.MIN_SIZE_TEST must be a number of pixels >= 0"),
        ({"MAX_SIZE_TEST": 0}, False, "INPUT.MAX_SIZE_TEST must be a positive int"),
    ],
)
def test_bad_input_sizes_are_named(changes, is_train, message):
    cfg = _cfg()
    for key, value in changes.items():
        node = cfg.INPUT
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    with pytest.raises(ValueError, match=message):
        build_deformable_detr_augmentation(cfg, is_train)


def test_test_size_zero_keeps_the_image_size(image_file):
    cfg = _cfg()
    cfg.INPUT.MIN_SIZE_TEST = 0
    path, pixels = image_file
    out = DeformableDetrDatasetMapper(cfg, False)(_record(path, []))
    assert tuple(out["image"].shape) == (3, HEIGHT, WIDTH)
