"""Modeling of Deformable DETR: backbone adapter, heads and the registered meta-architecture."""

from .backbone import DeformableDetrBackbone
from .heads import MLP, build_prediction_heads
from .meta_arch import DeformableDETR
from .resnet import build_basic_resnet_backbone
from .timm_backbone import TimmBackbone, add_timm_backbone_config, build_timm_backbone

__all__ = [
    "DeformableDetrBackbone",
    "DeformableDETR",
    "MLP",
    "build_basic_resnet_backbone",
    "build_prediction_heads",
]
