"""Checkpoint conversion (official, HF transformers, torchvision) and strict weight loading."""

from .convert import (
    COCO_CATEGORY_IDS,
    CheckpointConversionError,
    convert_checkpoint,
    convert_hf_state_dict,
    convert_official_state_dict,
    convert_torchvision_state_dict,
    format_conversion_report,
    hf_to_official_state_dict,
    load_hf_checkpoint,
    load_official_checkpoint,
    save_converted_checkpoint,
)
from .strict import check_state_dict_compatibility, install_strict_loading, is_detector_checkpoint

__all__ = [
    "COCO_CATEGORY_IDS",
    "CheckpointConversionError",
    "check_state_dict_compatibility",
    "convert_checkpoint",
    "convert_hf_state_dict",
    "convert_official_state_dict",
    "convert_torchvision_state_dict",
    "format_conversion_report",
    "hf_to_official_state_dict",
    "install_strict_loading",
    "is_detector_checkpoint",
    "load_hf_checkpoint",
    "load_official_checkpoint",
    "save_converted_checkpoint",
]
