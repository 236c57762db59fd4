"""What many test modules share: the repository's paths, the tiny model config and tiny COCO-format
datasets.

Test modules import it by name (``from helpers import tiny_cfg``): without an ``__init__.py`` in
``tests/``, pytest's default "prepend" import mode puts ``tests/`` on ``sys.path`` when it loads
``tests/conftest.py``, before any test module is collected. Workers spawned by a test inherit that
``sys.path``. ``tests/conftest.py`` offers the same things as fixtures.
"""

import json
import os

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from PIL import Image

from deformable_detr.config import load_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT_DIR = os.path.join(REPO_ROOT, "projects", "DeformableDETR")
CONFIG_DIR = os.path.join(PROJECT_DIR, "configs")
TOOLS_DIR = os.path.join(PROJECT_DIR, "tools")
BASE_CONFIG = os.path.join(CONFIG_DIR, "Base-DeformableDETR.yaml")
TRAIN_NET = os.path.join(REPO_ROOT, "train_net.py")

# The tiny model: every part of the published architecture, small enough for many builds and
# training steps per test on one CPU thread. A ResNet-18 with GroupNorm and nothing frozen trains
# from random weights (tests download no checkpoint); two decoder layers keep the auxiliary losses
# in play. Tests that need other sizes pass them as overrides after these.
TINY_MODEL = [
    "MODEL.WEIGHTS", "",
    "MODEL.DEVICE", "cpu",
    "MODEL.BACKBONE.FREEZE_AT", "0",
    "MODEL.RESNETS.DEPTH", "18",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "32",
    "MODEL.RESNETS.NORM", "GN",
    "MODEL.DEFORMABLE_DETR.NUM_CLASSES", "2",
    "MODEL.DEFORMABLE_DETR.NUM_QUERIES", "10",
    "MODEL.DEFORMABLE_DETR.HIDDEN_DIM", "64",
    "MODEL.DEFORMABLE_DETR.NHEADS", "2",
    "MODEL.DEFORMABLE_DETR.ENC_LAYERS", "1",
    "MODEL.DEFORMABLE_DETR.DEC_LAYERS", "2",
    "MODEL.DEFORMABLE_DETR.DIM_FEEDFORWARD", "64",
    "MODEL.DEFORMABLE_DETR.ENC_N_POINTS", "2",
    "MODEL.DEFORMABLE_DETR.DEC_N_POINTS", "2",
]  # fmt: skip

# Pictures of a few dozen pixels (see TINY_DATASET), and a training run that stays in the process.
TINY_RUN = [
    "INPUT.MIN_SIZE_TRAIN", "(48, 64)",
    "INPUT.MAX_SIZE_TRAIN", "80",
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "80",
    "INPUT.CROP_PRE_RESIZE_SIZES", "[64, 72]",
    "INPUT.CROP.SIZE", "[32, 60]",
    "SOLVER.BASE_LR", "0.0001",
    "DATALOADER.NUM_WORKERS", "0",
    "DATASETS.TEST", "()",
    "TEST.EVAL_PERIOD", "0",
]  # fmt: skip

# Overrides for a tiny model whose backbone is built as in the published configs: Detectron2's
# frozen batch norm and stem width, stem and res2 frozen.
PUBLISHED_BACKBONE = [
    "MODEL.BACKBONE.FREEZE_AT", "2",
    "MODEL.RESNETS.STEM_OUT_CHANNELS", "64",
    "MODEL.RESNETS.NORM", "FrozenBN",
]  # fmt: skip


def tiny_cfg(*opts, config="Base-DeformableDETR.yaml"):
    """A config of ``configs/`` on the tiny model, built as every entry point builds its config.

    Args:
        *opts (str): overrides as alternating keys and values, applied after the tiny settings.
        config (str): a file name in ``configs/``, or a path.

    Returns:
        CfgNode: unfrozen, so that a test may still change it.
    """
    return load_config(
        os.path.join(CONFIG_DIR, config), TINY_MODEL + TINY_RUN + list(opts), freeze=False
    )


def write_cfg(cfg, path):
    """Write ``cfg`` as a complete YAML file (no ``_BASE_``) that ``load_config`` reads back.

    Returns:
        str: ``path``, for a ``--config-file`` argument.
    """
    with open(path, "w") as f:
        f.write(cfg.dump())
    return str(path)


# The engine tests' dataset: two categories, four training pictures (one without boxes, one with a
# box on the border) and two validation pictures. Per picture ((height, width), [(COCO box
# [x, y, w, h], category id), ...]).
TINY_DATASET = {
    "train": [
        ((48, 64), [([4, 6, 30, 20], 1)]),
        ((48, 64), [([10, 10, 20, 30], 1), ([40, 5, 16, 16], 2)]),
        ((48, 64), []),
        ((48, 64), [([0, 0, 56, 40], 1)]),
    ],
    "val": [
        ((48, 64), [([8, 8, 24, 24], 1)]),
        ((48, 64), [([30, 12, 20, 20], 1), ([2, 30, 14, 10], 2)]),
    ],
}


def write_coco_dataset(root, splits, seed=0, categories=("a", "b")):
    """Write random pictures and their boxes in COCO format.

    Each split gets ``root/<split>/<i>.png`` and ``root/<split>.json``. The pixels come from one
    generator, split after split in the order of ``splits``, so a dataset is the same on every run.

    Args:
        root (str): the dataset's folder, created if needed.
        splits (dict[str, list]): per split, one ``((height, width), objects)`` per picture, with
            ``objects`` a list of ``(box, category_id)``, the box in COCO ``[x, y, w, h]`` pixels.
        seed (int): seed of the pixel generator.
        categories (tuple[str]): category names; their ids are 1, 2, ...
    """
    rng = np.random.default_rng(seed)
    for split, pictures in splits.items():
        os.makedirs(os.path.join(root, split), exist_ok=True)
        images, annotations = [], []
        for i, ((height, width), objects) in enumerate(pictures):
            name = f"{i}.png"
            pixels = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, split, name))
            images.append({"id": i + 1, "file_name": name, "height": height, "width": width})
            for box, category_id in objects:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": i + 1,
                        "category_id": category_id,
                        "bbox": list(box),
                        "area": float(box[2] * box[3]),
                        "iscrowd": 0,
                    }
                )
        coco = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(categories)],
        }
        with open(os.path.join(root, f"{split}.json"), "w") as f:
            json.dump(coco, f)


def register_coco_dataset(name, root, split):
    """Register ``root/<split>.json`` with the pictures of ``root/<split>/`` as dataset ``name``.

    A dataset of that name registered before (by another test, for another folder) is replaced.
    """
    unregister_datasets(name)
    register_coco_instances(
        name, {}, os.path.join(root, f"{split}.json"), os.path.join(root, split)
    )


def unregister_datasets(*names):
    """Remove ``names`` from Detectron2's dataset and metadata catalogs, where they are."""
    for name in names:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)
