"""Deformable DETR for Detectron2.

Importing this package registers the ``DeformableDETR`` meta-architecture and the quickstart
datasets. Typical use::

    from detectron2.config import get_cfg
    from deformable_detr import add_deformable_detr_config

    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.merge_from_file("configs/r50.yaml")
"""

from . import config, data, modeling
from .config import add_deformable_detr_config
from .data import DeformableDetrDatasetMapper
from .modeling import DeformableDETR

__all__ = ["add_deformable_detr_config", "DeformableDETR", "DeformableDetrDatasetMapper"]
