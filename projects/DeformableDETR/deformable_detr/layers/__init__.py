"""Layers of Deformable DETR: the multi-scale deformable attention op and its module."""

from .ms_deform_attn import MultiScaleDeformableAttention, SamplingRecord, record_sampling
from .ms_deform_attn_func import ms_deform_attn_reference, multi_scale_deformable_attention

__all__ = [
    "multi_scale_deformable_attention",
    "ms_deform_attn_reference",
    "MultiScaleDeformableAttention",
    "SamplingRecord",
    "record_sampling",
]
