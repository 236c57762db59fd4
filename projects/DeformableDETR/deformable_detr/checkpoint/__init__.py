"""Checkpoints: conversion of released weights (official, HF transformers, torchvision, timm), strict
weight loading, and atomic, verifiable checkpoint files with a resumable data position."""

from .atomic import atomic_torch_save, atomic_write_text
from .checkpointer import AtomicDetectionCheckpointer
from .data_position import DataPositionHook, ResumableSampler
from .errors import CheckpointConversionError, CheckpointFileError
from .files import (
    convert_checkpoint,
    format_conversion_report,
    load_hf_checkpoint,
    load_official_checkpoint,
    save_converted_checkpoint,
)
from .hf import convert_hf_state_dict, hf_to_official_state_dict
from .integrity import checkpoint_problem, is_complete_checkpoint, verify_checkpoint
from .official import convert_official_state_dict
from .resnet import convert_torchvision_state_dict
from .strict import check_state_dict_compatibility, install_strict_loading, is_detector_checkpoint
from .timm_weights import convert_timm_checkpoint, convert_timm_state_dict, load_timm_state_dict
from .variant import COCO_CATEGORY_IDS, COCO_CATEGORY_NAMES

__all__ = [
    "AtomicDetectionCheckpointer",
    "COCO_CATEGORY_IDS",
    "COCO_CATEGORY_NAMES",
    "CheckpointConversionError",
    "CheckpointFileError",
    "DataPositionHook",
    "ResumableSampler",
    "atomic_torch_save",
    "atomic_write_text",
    "check_state_dict_compatibility",
    "checkpoint_problem",
    "convert_checkpoint",
    "convert_hf_state_dict",
    "convert_official_state_dict",
    "convert_timm_checkpoint",
    "convert_timm_state_dict",
    "convert_torchvision_state_dict",
    "format_conversion_report",
    "hf_to_official_state_dict",
    "install_strict_loading",
    "is_complete_checkpoint",
    "is_detector_checkpoint",
    "load_hf_checkpoint",
    "load_official_checkpoint",
    "load_timm_state_dict",
    "save_converted_checkpoint",
    "verify_checkpoint",
]
