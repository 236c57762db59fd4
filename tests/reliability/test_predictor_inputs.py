"""Unusual inputs to the predictor and to the model: predictable results or a clear error."""

import logging

import numpy as np
import pytest
import torch
from detectron2.engine import DefaultPredictor
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from helpers import tiny_cfg

MIN_SIZE, MAX_SIZE, TOP_K = 32, 48, 7


def _cfg():
    return tiny_cfg(
        "MODEL.BACKBONE.FREEZE_AT", "2",
        "MODEL.DEFORMABLE_DETR.ENC_N_POINTS", "4",
        "MODEL.DEFORMABLE_DETR.DEC_N_POINTS", "4",
        "INPUT.MIN_SIZE_TEST", str(MIN_SIZE),
        "INPUT.MAX_SIZE_TEST", str(MAX_SIZE),
        "TEST.DETECTIONS_PER_IMAGE", str(TOP_K),
    )  # fmt: skip


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    return DefaultPredictor(_cfg())


@pytest.fixture()
def seen_sizes(predictor):
    """The (H, W) of every image batch the backbone adapter receives."""
    sizes = []
    handle = predictor.model.backbone.register_forward_pre_hook(
        lambda module, args: sizes.append(tuple(args[0].tensor.shape[-2:]))
    )
    yield sizes
    handle.remove()


def _check(instances, height, width):
    assert instances.image_size == (height, width) and len(instances) == TOP_K
    boxes = instances.pred_boxes.tensor
    assert torch.isfinite(boxes).all() and torch.isfinite(instances.scores).all()
    assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= width).all()
    assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= height).all()
    assert ((instances.pred_classes >= 0) & (instances.pred_classes < 2)).all()


def test_one_pixel_image(predictor, seen_sizes):
    out = predictor(np.full((1, 1, 3), 128, np.uint8))["instances"]
    _check(out, 1, 1)
    assert seen_sizes == [(MIN_SIZE, MIN_SIZE)]


def test_very_large_image_is_downscaled_before_the_network(predictor, seen_sizes):
    image = np.random.default_rng(0).integers(0, 255, (3000, 4500, 3), dtype=np.uint8)
    out = predictor(image)["instances"]
    _check(out, 3000, 4500)
    # The network only ever sees the test-time size, so its memory does not grow with the input.
    assert seen_sizes == [(MIN_SIZE, MAX_SIZE)]


def test_empty_image(predictor):
    # Detectron2's DefaultPredictor fails in its resize (ResizeShortestEdge divides by the shorter
    # side) before the model runs; the model itself names the empty image (below).
    with pytest.raises(ZeroDivisionError):
        predictor(np.zeros((0, 40, 3), np.uint8))
    with pytest.raises(
        ValueError, match=r"batched_inputs\[0\]\['image'\] is empty: shape \(3, 0, 40\)"
    ):
        predictor.model([{"image": torch.zeros(3, 0, 40, dtype=torch.uint8)}])


def test_unit_range_float_image_warns_once(predictor, caplog):
    model = predictor.model
    model._warned_unit_range = False
    rng = np.random.default_rng(0)
    with caplog.at_level(logging.WARNING, logger="deformable_detr.modeling.meta_arch"):
        predictor(rng.integers(0, 255, (20, 30, 3)).astype(np.float32))
        assert "expects 0..255" not in caplog.text
        for _ in range(2):
            out = predictor(rng.random((20, 30, 3), dtype=np.float32))["instances"]
    assert caplog.text.count("expects 0..255") == 1
    _check(out, 20, 30)


@pytest.mark.parametrize(
    "image, error, message",
    [
        (np.zeros((3, 8, 8), np.uint8), TypeError, "must be a torch.Tensor"),
        (torch.zeros(3, 8, 8, dtype=torch.int64), TypeError, "dtype torch.int64"),
        (torch.zeros(3, 8, 8, dtype=torch.bool), TypeError, "dtype torch.bool"),
        (
            torch.zeros(8, 8, 3, dtype=torch.uint8),
            ValueError,
            r"must be \(3, H, W\), got \(8, 8, 3\)",
        ),
        (torch.zeros(8, 8, dtype=torch.uint8), ValueError, r"must be \(3, H, W\)"),
        (torch.full((3, 8, 8), float("nan")), ValueError, "NaN or infinite"),
    ],
    ids=["numpy", "int64", "bool", "hwc", "2d", "nan"],
)
def test_bad_tensors_passed_to_the_model(predictor, image, error, message):
    inputs = {"image": image, "file_name": "x.jpg", "image_id": 3}
    with pytest.raises(error, match=message) as info:
        predictor.model([inputs])
    assert "'x.jpg'" in str(info.value) and "image_id 3" in str(info.value)


def test_empty_batch_and_float64(predictor):
    assert predictor.model([]) == []
    image = torch.rand(3, 16, 20, dtype=torch.float64) * 255
    _check(predictor.model([{"image": image}])[0]["instances"], 16, 20)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_images_on_another_device_are_moved(predictor):
    image = torch.randint(0, 255, (3, 16, 20), dtype=torch.uint8)
    expected = predictor.model([{"image": image}])[0]["instances"]
    got = predictor.model([{"image": image.cuda()}])[0]["instances"]
    assert torch.allclose(got.scores, expected.scores)


# ------------------------------------------------------------------------------------------------
# Training inputs
# ------------------------------------------------------------------------------------------------


def _training_input(classes, boxes, file_name="img.jpg"):
    instances = Instances((24, 32))
    instances.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
    image = torch.randint(0, 255, (3, 24, 32), dtype=torch.uint8)
    return {"image": image, "instances": instances, "file_name": file_name, "image_id": 5}


def test_training_labels_outside_num_classes_name_the_file(predictor):
    model = predictor.model
    model.train()
    try:
        with EventStorage(0), pytest.raises(ValueError) as info:
            model([_training_input([0, 2], [[1, 1, 9, 9], [2, 2, 8, 8]], "bad.jpg")])
    finally:
        model.eval()
    message = str(info.value)
    assert "'bad.jpg'" in message and "image_id 5" in message and "[0, 2]" in message
    assert "NUM_CLASSES" in message


def test_training_image_without_boxes_gives_finite_losses(predictor):
    model = predictor.model
    model.train()
    try:
        with EventStorage(0):
            losses = model([_training_input([], []), _training_input([1], [[2, 3, 20, 18]])])
    finally:
        model.eval()
    assert losses and all(torch.isfinite(v) for v in losses.values())
