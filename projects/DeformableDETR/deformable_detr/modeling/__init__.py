"""Modeling of Deformable DETR: backbone adapter, heads and the registered meta-architecture."""

from .backbone import DeformableDetrBackbone
from .heads import MLP, build_prediction_heads
from .meta_arch import DeformableDETR

__all__ = ["DeformableDetrBackbone", "DeformableDETR", "MLP", "build_prediction_heads"]
