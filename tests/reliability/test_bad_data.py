"""Bad training data: each case has one defined behaviour (error naming the record, or a counted
warning and a documented fix)."""

import logging
import os

import numpy as np
import pytest
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.structures import BoxMode
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from deformable_detr.config import add_deformable_detr_config
from deformable_detr.data import DeformableDetrDatasetMapper
from deformable_detr.data.validation import (
    ImageReadError,
    check_num_classes,
    named_image_errors,
    validate_dataset_dicts,
)

H, W = 30, 40


def _image(path, mode="RGB"):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)
    return str(path)


def _record(path, boxes, cats=None, image_id=7):
    cats = cats if cats is not None else [0] * len(boxes)
    return {
        "file_name": str(path),
        "image_id": image_id,
        "height": H,
        "width": W,
        "annotations": [
            {"bbox": list(b), "bbox_mode": BoxMode.XYWH_ABS, "category_id": c, "iscrowd": 0}
            for b, c in zip(boxes, cats)
        ],
    }


def test_valid_records_pass_unchanged(tmp_path):
    records = [_record(_image(tmp_path / "a.png"), [[1, 2, 10, 10]])]
    assert validate_dataset_dicts(records, num_classes=2) == records


def test_missing_image_file_is_an_error_naming_it(tmp_path):
    good = _image(tmp_path / "a.png")
    records = [_record(good, []), _record(tmp_path / "gone.png", [], image_id=3)]
    with pytest.raises(FileNotFoundError, match=r"1 image file\(s\) of 'mine'.*gone\.png"):
        validate_dataset_dicts(records, num_classes=2, dataset_names=["mine"])
    # Remote paths are left to the reader.
    remote = dict(records[1], file_name="s3://bucket/x.jpg")
    assert len(validate_dataset_dicts([remote], num_classes=2)) == 1


def test_category_id_out_of_range_is_an_error_naming_the_record(tmp_path):
    path = _image(tmp_path / "a.png")
    records = [_record(path, [[1, 1, 5, 5], [2, 2, 5, 5]], cats=[1, 2], image_id=42)]
    with pytest.raises(ValueError) as info:
        validate_dataset_dicts(records, num_classes=2)
    message = str(info.value)
    assert "image_id 42" in message and "a.png" in message and "annotation 1" in message
    assert "category_id 2" in message and "NUM_CLASSES = 2" in message
    records[0]["annotations"][1]["category_id"] = -1
    with pytest.raises(ValueError, match="category_id -1"):
        validate_dataset_dicts(records, num_classes=2)


def test_more_dataset_classes_than_num_classes(caplog):
    MetadataCatalog.get("ddetr_reliability_three").thing_classes = ["a", "b", "c"]
    with pytest.raises(
        ValueError, match="has 3 classes but MODEL.DEFORMABLE_DETR.NUM_CLASSES is 2"
    ):
        check_num_classes(["ddetr_reliability_three"], 2)
    with caplog.at_level(logging.WARNING):
        check_num_classes(["ddetr_reliability_three"], 5)
    assert "extra outputs are never trained" in caplog.text


def test_boxes_are_clipped_and_empty_ones_dropped_with_a_count(tmp_path, caplog):
    path = _image(tmp_path / "a.png")
    boxes = [
        [5, 5, 10, 10],  # fine
        [-4, 20, 10, 20],  # crosses the left and bottom borders: clipped
        [3, 3, 0, 8],  # zero width: dropped
        [3, 3, 8, -2],  # negative height: dropped
        [50, 5, 10, 10],  # entirely right of the image: dropped
    ]
    records = [_record(path, boxes)]
    original = [list(a["bbox"]) for a in records[0]["annotations"]]
    with caplog.at_level(logging.WARNING, logger="deformable_detr.data.validation"):
        out = validate_dataset_dicts(records, num_classes=1)
    assert [a["bbox"] for a in out[0]["annotations"]] == [[5, 5, 10, 10], [0, 20, 6, 10]]
    assert "1 box(es) extending outside their image were clipped" in caplog.text
    assert "3 box(es) with no area inside the image" in caplog.text
    # The caller's records are untouched.
    assert [a["bbox"] for a in records[0]["annotations"]] == original

    # XYXY boxes keep their mode.
    xyxy = _record(path, [])
    xyxy["annotations"] = [
        {"bbox": [30, 10, 45, 20], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0}
    ]
    assert validate_dataset_dicts([xyxy], 1)[0]["annotations"][0]["bbox"] == [30, 10, 40, 20]


def test_other_bad_records(tmp_path):
    path = _image(tmp_path / "a.png")
    nan_box = _record(path, [[1, float("nan"), 3, 3]])
    with pytest.raises(ValueError, match="annotation 0: bbox .* is not 4 finite"):
        validate_dataset_dicts([nan_box], 1)
    with pytest.raises(ValueError, match="record 0, image_id 5: no 'file_name'"):
        validate_dataset_dicts([{"image_id": 5}], 1)
    zero = dict(_record(path, []), height=0)
    with pytest.raises(ValueError, match="image size 0x40 is not positive"):
        validate_dataset_dicts([zero], 1)


def test_image_without_annotations_is_kept(tmp_path, caplog):
    path = _image(tmp_path / "a.png")
    records = [
        _record(path, []),
        {k: v for k, v in _record(path, []).items() if k != "annotations"},
    ]
    with caplog.at_level(logging.INFO, logger="deformable_detr.data.validation"):
        assert validate_dataset_dicts(records, 1) == records
    assert "2 of 2 images have no boxes and are kept" in caplog.text

    # The mapper gives it empty instances (the model's loss on them is tested with the model).
    out = _mapper(True)(records[1])
    assert len(out["instances"]) == 0


# ------------------------------------------------------------------------------------------------
# Reading images through the dataset mapper
# ------------------------------------------------------------------------------------------------


def _mapper(is_train, image_format="RGB"):
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.INPUT.FORMAT = image_format
    cfg.INPUT.MIN_SIZE_TRAIN = (H,)
    cfg.INPUT.MAX_SIZE_TRAIN = W
    cfg.INPUT.MIN_SIZE_TEST = H
    cfg.INPUT.MAX_SIZE_TEST = W
    cfg.INPUT.RANDOM_FLIP = "none"
    cfg.INPUT.CROP.ENABLED = False
    return DeformableDetrDatasetMapper(cfg, is_train)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK"])
def test_grayscale_rgba_palette_cmyk_become_rgb(tmp_path, mode):
    suffix = "jpg" if mode == "CMYK" else "png"
    path = _image(tmp_path / f"a.{suffix}", mode)
    expected = np.asarray(Image.open(path).convert("RGB"))
    for image_format, order in (("RGB", [0, 1, 2]), ("BGR", [2, 1, 0])):
        out = _mapper(False, image_format)({"file_name": path, "height": H, "width": W})
        image = out["image"]
        assert image.shape == (3, H, W) and str(image.dtype) == "torch.uint8"
        assert np.array_equal(image.permute(1, 2, 0).numpy(), expected[..., order])
    if mode in ("L", "LA"):
        assert np.array_equal(expected[..., 0], expected[..., 2])


def _truncated(tmp_path):
    path = _image(tmp_path / "t.png")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    return path


def test_named_image_errors(tmp_path):
    from detectron2.data.detection_utils import read_image

    path = _truncated(tmp_path)
    with pytest.raises(ImageReadError, match=r"cannot read image '.*t\.png' \(image_id 9\)"):
        with named_image_errors({"file_name": path, "image_id": 9}):
            read_image(path, format="RGB")


@pytest.mark.parametrize("case", ["truncated", "not_an_image", "missing"])
def test_unreadable_image_in_the_mapper_names_the_file(tmp_path, case):
    if case == "truncated":
        path = _truncated(tmp_path)
    elif case == "not_an_image":
        path = str(tmp_path / "text.jpg")
        with open(path, "w") as f:
            f.write("not an image")
    else:
        path = str(tmp_path / "missing.png")
    record = {"file_name": path, "image_id": 11, "height": H, "width": W, "annotations": []}
    with pytest.raises(ImageReadError) as info:
        _mapper(True)(record)
    assert os.path.basename(path) in str(info.value) and "image_id 11" in str(info.value)
    # A missing file is still a FileNotFoundError for callers that catch that.
    assert isinstance(info.value, FileNotFoundError) == (case == "missing")


@settings(max_examples=60, deadline=None)
@given(
    size=st.tuples(st.integers(1, 50), st.integers(1, 50)),
    boxes=st.lists(
        st.tuples(*[st.floats(-60, 60, allow_nan=False, width=32) for _ in range(4)]), max_size=6
    ),
)
def test_fixed_boxes_are_inside_their_image_and_not_empty(size, boxes):
    height, width = size
    record = {
        "file_name": "x.png",
        "height": height,
        "width": width,
        "annotations": [
            {"bbox": list(b), "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0} for b in boxes
        ],
    }
    out = validate_dataset_dicts([record], 1, check_files=False)[0]["annotations"]
    # The far corner as Detectron2's BoxMode.convert computes it, in float32: a width below half a
    # unit in the last place of x leaves no area.
    f32 = np.float32
    kept = [b for b in boxes if min(f32(b[0]) + f32(b[2]), width) > max(b[0], 0)]
    kept = [b for b in kept if min(f32(b[1]) + f32(b[3]), height) > max(b[1], 0)]
    assert len(out) == len(kept)
    for obj in out:
        x, y, w, h = obj["bbox"]
        assert 0 <= x and 0 <= y and w > 0 and h > 0
        # Detectron2's BoxMode.convert works in float32: allow its rounding, not more.
        assert x + w <= width + 1e-4 and y + h <= height + 1e-4


def test_annotation_without_a_box_is_an_error_naming_the_record(tmp_path):
    path = _image(tmp_path / "a.png")
    record = _record(path, [[1, 1, 5, 5], [2, 2, 5, 5]], image_id=12)
    # A segmentation-only annotation, as a COCO file without "bbox" gives it.
    segmentation_only = record["annotations"][1]
    del segmentation_only["bbox"]
    segmentation_only["segmentation"] = [[2, 2, 7, 2, 7, 7]]
    with pytest.raises(ValueError) as info:
        validate_dataset_dicts([record], num_classes=1, dataset_names=["mine"])
    message = str(info.value)
    assert "1 annotation(s) of 'mine' have no 'bbox'" in message
    assert "image_id 12" in message and "a.png" in message and "annotation 1" in message
    # A crowd region without a box is not trained on, so it is not an error.
    segmentation_only["iscrowd"] = 1
    assert len(validate_dataset_dicts([record], num_classes=1)[0]["annotations"]) == 2
