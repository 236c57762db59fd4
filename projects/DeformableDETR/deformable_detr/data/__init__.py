"""Data of Deformable DETR: the dataset mapper with the official augmentation, and the synthetic
quickstart dataset, registered as ``quickstart_train`` / ``quickstart_val`` on import (and the
fine-tuning example's ``shapes_finetune_train`` / ``shapes_finetune_val``); ``DATASETS.REGISTER_COCO``
registers COCO-format datasets from the config."""

from .dataset_mapper import (
    DeformableDetrDatasetMapper,
    RandomSelect,
    build_deformable_detr_augmentation,
)
from .quickstart import SHAPES_FINETUNE, register_quickstart_datasets, register_shapes_datasets

register_quickstart_datasets()
register_shapes_datasets(SHAPES_FINETUNE)

__all__ = [
    "DeformableDetrDatasetMapper",
    "RandomSelect",
    "build_deformable_detr_augmentation",
    "register_quickstart_datasets",
]
