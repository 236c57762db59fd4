"""Checks of training records before training starts, and image reads that name their file.

Bad data gets one defined behaviour each (docs/robustness.md lists them):

* a missing image file, a record without "file_name", an annotation (not crowd) without "bbox"
  (e.g. a segmentation only), a category id outside ``[0, MODEL.DEFORMABLE_DETR.NUM_CLASSES)``, a
  box with NaN/inf coordinates, or a dataset with more classes than NUM_CLASSES: an error naming
  the dataset, file and record, before the first iteration (a silent skip would hide a broken
  dataset);
* a box partly outside its image: clipped to the image; a box with no area left (zero or negative
  size, or entirely outside): dropped; both counted in one warning per dataset;
* an image without annotations: kept as a negative example (as in the official recipe);
* an unreadable or truncated image: :func:`named_image_errors` turns the decoder's error into an
  :class:`ImageReadError` naming the file and record, when the image is read.
"""

import contextlib
import copy
import logging
import math
import numbers
import os

from detectron2.data import MetadataCatalog
from detectron2.structures import BoxMode

__all__ = [
    "ImageReadError",
    "MissingImageError",
    "check_num_classes",
    "named_image_errors",
    "validate_dataset_dicts",
]

logger = logging.getLogger(__name__)

# Examples listed in one error or warning; the count says how many there are in all.
_MAX_LISTED = 5
_ABSOLUTE_MODES = (BoxMode.XYXY_ABS, BoxMode.XYWH_ABS)


class ImageReadError(OSError):
    """An image file that cannot be read or decoded; the message names the file and record."""


class MissingImageError(ImageReadError, FileNotFoundError):
    """An image file that does not exist (still a ``FileNotFoundError`` for callers)."""


def _record(d, index):
    parts = [f"record {index}"]
    if "image_id" in d:
        parts.append(f"image_id {d['image_id']!r}")
    if "file_name" in d:
        parts.append(f"file {d['file_name']!r}")
    return ", ".join(parts)


def _listing(items, total):
    text = "; ".join(items[:_MAX_LISTED])
    if total > _MAX_LISTED:
        text += f"; ... ({total} in all)"
    return text


def check_num_classes(dataset_names, num_classes):
    """Compare NUM_CLASSES with the classes the datasets declare in their metadata.

    Args:
        dataset_names (list[str]): registered dataset names (e.g. cfg.DATASETS.TRAIN).
        num_classes (int): MODEL.DEFORMABLE_DETR.NUM_CLASSES.

    Raises:
        ValueError: a dataset declares more classes than the model has.
    """
    for name in dataset_names:
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if classes is None:
            continue
        if len(classes) > num_classes:
            raise ValueError(
                f"dataset {name!r} has {len(classes)} classes but "
                f"MODEL.DEFORMABLE_DETR.NUM_CLASSES is {num_classes}: set it to {len(classes)} "
                "(the classifier is a sigmoid per class, no background class is added)"
            )
        if len(classes) < num_classes:
            logger.warning(
                "Dataset %r has %d classes and MODEL.DEFORMABLE_DETR.NUM_CLASSES is %d: the "
                "extra outputs are never trained as positives.",
                name,
                len(classes),
                num_classes,
            )


def _fix_box(obj, height, width):
    """The clipped box in the annotation's own mode, whether it was clipped, and whether empty.

    Returns None for the box if it has no area left.
    """
    mode = obj.get("bbox_mode", BoxMode.XYWH_ABS)
    x0, y0, x1, y1 = BoxMode.convert(list(obj["bbox"]), mode, BoxMode.XYXY_ABS)
    if height is None or width is None:
        cx0, cy0, cx1, cy1 = x0, y0, x1, y1
    else:
        cx0, cx1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
        cy0, cy1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
    if cx1 - cx0 <= 0 or cy1 - cy0 <= 0:
        return None, False
    clipped = (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1)
    return BoxMode.convert([cx0, cy0, cx1, cy1], BoxMode.XYXY_ABS, mode), clipped


def validate_dataset_dicts(dataset_dicts, num_classes, *, dataset_names=(), check_files=True):
    """Check training records and fix their boxes, before training starts.

    Args:
        dataset_dicts (list[dict]): records in Detectron2's dataset format, with contiguous
            category ids (as ``get_detection_dataset_dicts`` returns them).
        num_classes (int): MODEL.DEFORMABLE_DETR.NUM_CLASSES.
        dataset_names (list[str]): names used in messages and for :func:`check_num_classes`.
        check_files (bool): check that every local image file exists (one ``stat`` each).

    Returns:
        list[dict]: the records, with boxes clipped to their image and empty boxes dropped (the
        input list and dicts are not modified).

    Raises:
        FileNotFoundError: image files are missing.
        ValueError: records without "file_name", annotations without "bbox", category ids
            outside [0, num_classes), boxes with non-finite coordinates or image sizes that are
            not positive.
    """
    names = ", ".join(repr(n) for n in dataset_names) or "the training data"
    if dataset_names:
        check_num_classes(dataset_names, num_classes)
    errors, missing, bad_ids, no_box = [], [], [], []
    clipped, dropped, images_without_boxes = [], [], 0
    out = []
    for index, d in enumerate(dataset_dicts):
        where = _record(d, index)
        file_name = d.get("file_name")
        if not file_name:
            errors.append(f"{where}: no 'file_name'")
            continue
        if check_files and "://" not in file_name and not os.path.isfile(file_name):
            missing.append(file_name)
        height, width = d.get("height"), d.get("width")
        if (height is not None and height <= 0) or (width is not None and width <= 0):
            errors.append(f"{where}: image size {height}x{width} is not positive")
            continue
        annotations = []
        changed = False
        for j, obj in enumerate(d.get("annotations", [])):
            cat = obj.get("category_id")
            if not isinstance(cat, numbers.Integral) or not 0 <= cat < num_classes:
                bad_ids.append(f"{where}, annotation {j}: category_id {cat!r}")
                continue
            if "bbox" not in obj:
                # Crowd regions are not trained on: the mapper drops them before reading boxes.
                if obj.get("iscrowd", 0):
                    annotations.append(obj)
                else:
                    no_box.append(f"{where}, annotation {j}")
                continue
            if len(obj["bbox"]) != 4 or not all(math.isfinite(float(v)) for v in obj["bbox"]):
                errors.append(f"{where}, annotation {j}: bbox {list(obj['bbox'])} is not 4 finite")
                continue
            if obj.get("bbox_mode", BoxMode.XYWH_ABS) not in _ABSOLUTE_MODES:
                annotations.append(obj)
                continue
            box, was_clipped = _fix_box(obj, height, width)
            if box is None:
                dropped.append(f"{where}, annotation {j}: bbox {list(obj['bbox'])}")
                changed = True
                continue
            if was_clipped:
                clipped.append(f"{where}, annotation {j}: bbox {list(obj['bbox'])}")
                obj = dict(obj, bbox=box)
                changed = True
            annotations.append(obj)
        if not any(a.get("iscrowd", 0) == 0 for a in annotations):
            images_without_boxes += 1
        if changed:
            d = copy.copy(d)
            d["annotations"] = annotations
        out.append(d)

    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image file(s) of {names} do not exist: "
            + _listing([repr(m) for m in missing], len(missing))
        )
    if bad_ids:
        raise ValueError(
            f"{len(bad_ids)} annotation(s) of {names} have a category id outside "
            f"[0, {num_classes}) (MODEL.DEFORMABLE_DETR.NUM_CLASSES = {num_classes}; ids must be "
            "contiguous dataset ids, no background class): " + _listing(bad_ids, len(bad_ids))
        )
    if no_box:
        raise ValueError(
            f"{len(no_box)} annotation(s) of {names} have no 'bbox' (e.g. a segmentation only); "
            "Deformable DETR learns from boxes: give every annotation its box (a segmentation's "
            "bounding box will do) or remove it: " + _listing(no_box, len(no_box))
        )
    if errors:
        raise ValueError(f"bad records in {names}: " + _listing(errors, len(errors)))
    if clipped or dropped:
        logger.warning(
            "%s: %d box(es) extending outside their image were clipped to it, %d box(es) with no "
            "area inside the image (zero or negative size, or outside) were dropped. Clipped: %s. "
            "Dropped: %s.",
            names,
            len(clipped),
            len(dropped),
            _listing(clipped, len(clipped)) or "none",
            _listing(dropped, len(dropped)) or "none",
        )
    if images_without_boxes:
        logger.info(
            "%s: %d of %d images have no boxes and are kept as negative examples",
            names,
            images_without_boxes,
            len(out),
        )
    return out


@contextlib.contextmanager
def named_image_errors(dataset_dict):
    """Re-raise any error of the image read inside as :class:`ImageReadError` naming the file.

    Decoders report truncated or corrupt files without their name ("image file is truncated"),
    and in a data-loader worker the failing record is otherwise lost. A missing file raises
    :class:`MissingImageError`, which is also a ``FileNotFoundError``. Usage::

        with named_image_errors(dataset_dict):
            image = utils.read_image(dataset_dict["file_name"], format="RGB")

    Args:
        dataset_dict (dict): the record being read ("file_name", optionally "image_id").
    """
    try:
        yield
    except ImageReadError:
        raise
    except Exception as e:
        parts = [f"{k} {dataset_dict[k]!r}" for k in ("image_id",) if k in dataset_dict]
        extra = f" ({', '.join(parts)})" if parts else ""
        error = MissingImageError if isinstance(e, FileNotFoundError) else ImageReadError
        raise error(
            f"cannot read image {dataset_dict.get('file_name')!r}{extra}: "
            f"{type(e).__name__}: {e}"
        ) from e
