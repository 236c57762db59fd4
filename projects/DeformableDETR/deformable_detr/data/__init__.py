"""Data of Deformable DETR: the dataset mapper with the official augmentation, and the synthetic
quickstart dataset, registered as ``quickstart_train`` / ``quickstart_val`` on import."""

from .dataset_mapper import (
    DeformableDetrDatasetMapper,
    RandomSelect,
    build_deformable_detr_augmentation,
)
from .quickstart import register_quickstart_datasets

register_quickstart_datasets()

__all__ = [
    "DeformableDetrDatasetMapper",
    "RandomSelect",
    "build_deformable_detr_augmentation",
    "register_quickstart_datasets",
]
