"""Deformable DETR for Detectron2.

Importing this package registers the ``DeformableDETR`` meta-architecture and the quickstart
datasets. Typical use::

    from deformable_detr import load_config

    cfg = load_config("configs/r50.yaml", ["MODEL.WEIGHTS", "model.pth"])
"""

from . import config, data, modeling
from .config import add_deformable_detr_config, load_config
from .data import DeformableDetrDatasetMapper
from .modeling import DeformableDETR

__all__ = [
    "add_deformable_detr_config",
    "load_config",
    "DeformableDETR",
    "DeformableDetrDatasetMapper",
]
