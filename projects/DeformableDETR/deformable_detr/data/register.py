"""COCO-format datasets named in the config (``DATASETS.REGISTER_COCO``), registered and checked
when the config is built, so that a custom dataset needs no Python code."""

import json
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

__all__ = ["coco_category_names", "register_coco_datasets", "register_coco_from_config"]

_KEY = "DATASETS.REGISTER_COCO"


def _config_error(message):
    from ..config import ConfigError

    return ConfigError(message)


def _fail(index, entry, problem):
    raise _config_error(f"{_KEY}[{index}] {tuple(entry)!r}: {problem}")


def coco_category_names(coco, where="the json"):
    """Class names of a COCO instances dict, in the order Detectron2 gives them contiguous ids.

    ``load_coco_json`` numbers the categories by sorted id; the same order is used here so that
    the names are known before the annotations are loaded.

    Args:
        coco (dict): a parsed COCO instances file.
        where (str): the file, for messages.

    Returns:
        tuple[list[str], dict[int, int]]: the names and the category id -> contiguous id map.

    Raises:
        ValueError: ``coco`` is not a COCO instances dict.
    """
    if not isinstance(coco, dict):
        raise ValueError(f"{where} holds a {type(coco).__name__}, not a COCO instances dict")
    missing = [k for k in ("images", "annotations", "categories") if k not in coco]
    if missing:
        raise ValueError(
            f"{where} is not in COCO instances format: no {', '.join(repr(k) for k in missing)}"
        )
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco[key], list):
            raise ValueError(f"{where}: {key!r} must be a list, not {type(coco[key]).__name__}")
    categories = coco["categories"]
    if not categories:
        raise ValueError(f"{where} has no categories")
    for c in categories:
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or "name" not in c:
            raise ValueError(f"{where}: category {c!r} needs an integer 'id' and a 'name'")
    ids = sorted(c["id"] for c in categories)
    if len(set(ids)) != len(ids):
        raise ValueError(f"{where}: category ids {ids} repeat")
    by_id = {c["id"]: c["name"] for c in categories}
    return [by_id[i] for i in ids], {cid: i for i, cid in enumerate(ids)}


def _same_path(a, b):
    return bool(a) and bool(b) and os.path.realpath(a) == os.path.realpath(b)


def register_coco_datasets(entries):
    """Register COCO instances datasets given as ``(name, json_file, image_root)`` triples.

    Each is checked first: the json must exist and hold COCO instances (images, annotations,
    categories), the image folder must exist, and a name already registered must be the same
    files (registering again is then a no-op, as in every launch worker). The class names are set
    in the metadata at once, as ``load_coco_json`` would set them, so that fine-tuning and the demo
    know them before any annotation is read.

    Args:
        entries (list[tuple[str, str, str]]): the datasets.

    Raises:
        ConfigError: naming the ``DATASETS.REGISTER_COCO`` entry at fault.
    """
    seen = {}
    for index, entry in enumerate(entries):
        if (
            not isinstance(entry, (list, tuple))
            or len(entry) != 3
            or not all(isinstance(x, str) and x for x in entry)
        ):
            raise _config_error(
                f"{_KEY}[{index}] {entry!r}: expected a (name, json_file, image_root) triple of "
                "non-empty strings"
            )
        name, json_file, image_root = entry
        json_file, image_root = os.path.abspath(json_file), os.path.abspath(image_root)
        if name in seen and seen[name] != (json_file, image_root):
            _fail(index, entry, f"the name {name!r} is given twice, with other files")
        seen[name] = (json_file, image_root)
        if not os.path.isfile(json_file):
            _fail(index, entry, f"json file {json_file!r} does not exist")
        if not os.path.isdir(image_root):
            _fail(index, entry, f"image folder {image_root!r} does not exist")
        try:
            with open(json_file) as f:
                coco = json.load(f)
        except (OSError, ValueError) as e:
            _fail(index, entry, f"{json_file!r} cannot be read as JSON ({e})")
        try:
            classes, id_map = coco_category_names(coco, repr(json_file))
        except ValueError as e:
            _fail(index, entry, str(e))
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            known = (meta.get("json_file", None), meta.get("image_root", None))
            if _same_path(known[0], json_file) and _same_path(known[1], image_root):
                continue
            _fail(
                index,
                entry,
                f"a dataset named {name!r} is already registered with json_file {known[0]!r} and "
                f"image_root {known[1]!r}: choose another name",
            )
        register_coco_instances(name, {}, json_file, image_root)
        MetadataCatalog.get(name).set(
            thing_classes=classes, thing_dataset_id_to_contiguous_id=id_map
        )


def register_coco_from_config(cfg):
    """Register the datasets of ``cfg.DATASETS.REGISTER_COCO`` (see
    :func:`register_coco_datasets`)."""
    entries = cfg.DATASETS.get("REGISTER_COCO", ())
    if isinstance(entries, str) or not isinstance(entries, (list, tuple)):
        raise _config_error(
            f"{_KEY} must be a list of (name, json_file, image_root) triples; got {entries!r}"
        )
    register_coco_datasets(entries)
