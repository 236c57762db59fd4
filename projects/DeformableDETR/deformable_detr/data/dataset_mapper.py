"""Dataset mapper with the official Deformable DETR augmentation (flip, multi-scale, random crop).

Training: horizontal flip with probability 0.5, then with probability 0.5 a multi-scale resize of
the shorter side (480..800, longer side at most 1333); otherwise a resize of the shorter side to one
of (400, 500, 600), a random crop of 384..600 pixels per side and the same multi-scale resize.
Inference: shorter side 800, longer side at most 1333. Sizes come from the ``cfg.INPUT`` keys.
"""

import copy
import numbers

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from .validation import named_image_errors

__all__ = [
    "DeformableDetrDatasetMapper",
    "RandomSelect",
    "build_deformable_detr_augmentation",
    "check_input_sizes",
]

# Shorter-side sizes of the resize that precedes the random crop in the official recipe. Configs may
# override them with cfg.INPUT.CROP_PRE_RESIZE_SIZES.
DEFAULT_CROP_PRE_RESIZE_SIZES = (400, 500, 600)


class RandomSelect(T.Augmentation):
    """Apply one of two augmentation sequences: the first with probability ``prob``."""

    def __init__(self, first, second, prob=0.5):
        """
        Args:
            first (list[Augmentation or Transform]): applied with probability ``prob``.
            second (list[Augmentation or Transform]): applied otherwise.
            prob (float): probability of ``first``, in [0, 1].
        """
        super().__init__()
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"RandomSelect: prob must be in [0, 1]; got {prob}")
        self.first = T.AugmentationList(first)
        self.second = T.AugmentationList(second)
        self.prob = prob

    def __call__(self, aug_input):
        # Whole sequences are chosen, not single transforms: each one needs the image size the
        # previous one produced, so get_transform cannot describe them.
        chosen = self.first if self._rand_range() < self.prob else self.second
        return chosen(aug_input)

    def __repr__(self):
        return f"RandomSelect(prob={self.prob}, first={self.first}, second={self.second})"

    __str__ = __repr__


def _positive_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def check_input_sizes(cfg, is_train):
    """Check the image sizes of ``cfg.INPUT`` that the augmentation reads.

    Args:
        cfg (CfgNode): the config.
        is_train (bool): check the training keys, else the inference keys.

    Raises:
        ValueError: naming the key, for a size that is not a positive number of pixels (0 is
            allowed for INPUT.MIN_SIZE_TEST: no resize), an empty list of sizes, or a "range"
            that is not (low, high).
    """
    inp = cfg.INPUT
    if not is_train:
        size = inp.MIN_SIZE_TEST
        if not (_positive_int(size) or size == 0):
            raise ValueError(f"INPUT.MIN_SIZE_TEST must be a number of pixels >= 0; got {size!r}")
        if not _positive_int(inp.MAX_SIZE_TEST):
            raise ValueError(
                f"INPUT.MAX_SIZE_TEST must be a positive int; got {inp.MAX_SIZE_TEST!r}"
            )
        return
    sizes = inp.MIN_SIZE_TRAIN
    sizes = [sizes] if isinstance(sizes, numbers.Number) else list(sizes)
    if not sizes or not all(_positive_int(s) for s in sizes):
        raise ValueError(
            f"INPUT.MIN_SIZE_TRAIN must list positive numbers of pixels; got {inp.MIN_SIZE_TRAIN!r}"
        )
    sampling = inp.MIN_SIZE_TRAIN_SAMPLING
    if sampling not in ("choice", "range"):
        raise ValueError(
            f"INPUT.MIN_SIZE_TRAIN_SAMPLING must be 'choice' or 'range'; got {sampling!r}"
        )
    if sampling == "range" and (len(sizes) != 2 or sizes[0] > sizes[1]):
        raise ValueError(
            "INPUT.MIN_SIZE_TRAIN must be (low, high) with INPUT.MIN_SIZE_TRAIN_SAMPLING 'range'; "
            f"got {inp.MIN_SIZE_TRAIN!r}"
        )
    if not _positive_int(inp.MAX_SIZE_TRAIN):
        raise ValueError(f"INPUT.MAX_SIZE_TRAIN must be a positive int; got {inp.MAX_SIZE_TRAIN!r}")
    if not inp.CROP.ENABLED:
        return
    pre_sizes = inp.get("CROP_PRE_RESIZE_SIZES", DEFAULT_CROP_PRE_RESIZE_SIZES)
    if len(pre_sizes) == 0 or not all(_positive_int(s) for s in pre_sizes):
        raise ValueError(
            f"INPUT.CROP_PRE_RESIZE_SIZES must list positive numbers of pixels; got {pre_sizes!r}"
        )
    crop, crop_type = tuple(inp.CROP.SIZE), inp.CROP.TYPE
    if crop_type in ("absolute", "absolute_range"):
        valid = len(crop) == 2 and all(_positive_int(s) for s in crop)
        valid = valid and (crop_type == "absolute" or crop[0] <= crop[1])
    elif crop_type in ("relative", "relative_range"):
        valid = len(crop) == 2 and all(isinstance(s, numbers.Real) and 0 < s <= 1 for s in crop)
    else:
        raise ValueError(
            "INPUT.CROP.TYPE must be 'absolute_range', 'absolute', 'relative' or "
            f"'relative_range'; got {crop_type!r}"
        )
    if not valid:
        raise ValueError(
            f"INPUT.CROP.SIZE {list(crop)} does not suit INPUT.CROP.TYPE {crop_type!r}: two "
            "positive ints (min <= max for 'absolute_range'), or two fractions in (0, 1] for "
            "the relative types"
        )


def build_deformable_detr_augmentation(cfg, is_train):
    """The official augmentation as Detectron2 augmentations.

    Keys read: INPUT.{MIN,MAX}_SIZE_{TRAIN,TEST}, INPUT.MIN_SIZE_TRAIN_SAMPLING, INPUT.RANDOM_FLIP,
    INPUT.CROP.{ENABLED,TYPE,SIZE} and, if present, INPUT.CROP_PRE_RESIZE_SIZES.

    Args:
        cfg (CfgNode): the config.
        is_train (bool): training augmentation (random) or inference resize.

    Returns:
        list[Augmentation]

    Raises:
        ValueError: sizes that :func:`check_input_sizes` refuses, or an unknown INPUT.RANDOM_FLIP.
    """
    check_input_sizes(cfg, is_train)
    if not is_train:
        return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")]

    augs = []
    flip = cfg.INPUT.RANDOM_FLIP
    if flip not in ("horizontal", "vertical", "none"):
        raise ValueError(
            f"cfg.INPUT.RANDOM_FLIP must be 'horizontal', 'vertical' or 'none'; got {flip!r}"
        )
    if flip != "none":
        augs.append(T.RandomFlip(horizontal=flip == "horizontal", vertical=flip == "vertical"))

    resize = T.ResizeShortestEdge(
        cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
    )
    if not cfg.INPUT.CROP.ENABLED:
        augs.append(resize)
        return augs

    pre_sizes = cfg.INPUT.get("CROP_PRE_RESIZE_SIZES", DEFAULT_CROP_PRE_RESIZE_SIZES)
    crop_branch = [
        # The official pre-crop resize has no limit on the longer side.
        T.ResizeShortestEdge(tuple(pre_sizes), sample_style="choice"),
        T.RandomCrop(cfg.INPUT.CROP.TYPE, tuple(cfg.INPUT.CROP.SIZE)),
        resize,
    ]
    augs.append(RandomSelect([resize], crop_branch, prob=0.5))
    return augs


class DeformableDetrDatasetMapper:
    """Map a Detectron2 dataset dict to what :class:`DeformableDETR` takes.

    Steps:

    1. Read the image from "file_name" in ``image_format`` (decoded from ``image_cache`` when one
       is given, without opening the file).
    2. Apply the augmentation (see :func:`build_deformable_detr_augmentation`).
    3. Store the image as a (C, H, W) uint8 tensor under "image".
    4. Training: drop crowd annotations, transform the boxes with the same transforms (clipped to
       the image), build "instances" (gt_boxes, gt_classes) and drop boxes left with no area, e.g.
       those outside the crop. Images without boxes keep empty instances.
       Inference: drop the annotations.
    """

    @configurable
    def __init__(self, is_train=True, *, augmentations, image_format, image_cache=None):
        """
        Args:
            is_train (bool): whether the mapper feeds training (keeps annotations).
            augmentations (list[Augmentation or Transform]): applied in order.
            image_format (str): format of the image tensor, as in ``cfg.INPUT.FORMAT``.
            image_cache (ImageCache or None): encoded images to decode instead of reading the
                files (see :mod:`deformable_detr.data.image_cache`); every image mapped must be
                in it.
        """
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.image_cache = image_cache

    @classmethod
    def from_config(cls, cfg, is_train=True):
        return {
            "is_train": is_train,
            "augmentations": build_deformable_detr_augmentation(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
        }

    def __repr__(self):
        mode = "training" if self.is_train else "inference"
        cache = "" if self.image_cache is None else f", image_cache={self.image_cache}"
        return (
            f"DeformableDetrDatasetMapper({mode}, image_format={self.image_format!r}, "
            f"augmentations={self.augmentations}{cache})"
        )

    def _transform_annotations(self, dataset_dict, transforms, image_shape):
        annos = []
        for obj in dataset_dict.pop("annotations"):
            if obj.get("iscrowd", 0) != 0:
                continue
            # Boxes only: masks and keypoints would be transformed for nothing.
            obj.pop("segmentation", None)
            obj.pop("keypoints", None)
            annos.append(utils.transform_instance_annotations(obj, transforms, image_shape))
        instances = utils.annotations_to_instances(annos, image_shape)
        dataset_dict["instances"] = utils.filter_empty_instances(instances)

    def __call__(self, dataset_dict):
        """
        Args:
            dataset_dict (dict): metadata of one image in Detectron2 Dataset format.

        Returns:
            dict: the input dict with "image" and, in training, "instances".
        """
        dataset_dict = copy.deepcopy(dataset_dict)
        if "file_name" not in dataset_dict:
            raise KeyError(
                f"DeformableDetrDatasetMapper: dataset dict has no 'file_name'; keys: "
                f"{sorted(dataset_dict)}"
            )
        # Decoders name neither the file nor the record of a truncated or corrupt image.
        with named_image_errors(dataset_dict):
            if self.image_cache is not None:
                image = self.image_cache.read_image(dataset_dict["file_name"], self.image_format)
            else:
                image = utils.read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)

        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]
        # Tensors travel between data-loader workers through shared memory, unlike arrays.
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))

        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict
        # A training image with no "annotations" key is a negative: empty instances.
        dataset_dict.setdefault("annotations", [])
        self._transform_annotations(dataset_dict, transforms, image_shape)
        return dataset_dict
