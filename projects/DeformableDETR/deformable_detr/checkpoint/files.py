"""Reading released checkpoint files, converting them, and writing the result as MODEL.WEIGHTS."""

import argparse
import json
import os
import pickle
from collections import OrderedDict

import torch

from .errors import CheckpointConversionError, fail
from .hf import convert_hf_state_dict
from .integrity import checkpoint_problem
from .official import NUM_COCO_RAW_CLASSES, convert_official_state_dict
from .resnet import convert_torchvision_state_dict
from .variant import COCO_CATEGORY_IDS, COCO_CATEGORY_NAMES

__all__ = [
    "convert_checkpoint",
    "format_conversion_report",
    "load_hf_checkpoint",
    "load_official_checkpoint",
    "save_converted_checkpoint",
]

_CONVERTERS = {
    "official": convert_official_state_dict,
    "hf": convert_hf_state_dict,
    "torchvision": convert_torchvision_state_dict,
}


def _torch_load(path, trust_pickle=False):
    """Load a torch file, by default with ``weights_only`` (official files also hold their
    training arguments as an ``argparse.Namespace``, which is allowed)."""
    problem = checkpoint_problem(path)
    if problem is not None:
        fail(path, problem)
    try:
        if trust_pickle:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (any unpickling failure is reported with the file)
        hint = "" if trust_pickle else "; if you trust the file, retry with --trust-pickle"
        raise CheckpointConversionError(
            f"{path}: cannot be read as a torch checkpoint ({e}){hint}"
        ) from e


def _load_weights_file(path, trust_pickle=False):
    if not path.endswith(".safetensors"):
        return _torch_load(path, trust_pickle)
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001
        raise CheckpointConversionError(f"{path}: cannot be read as safetensors ({e})") from e


def load_official_checkpoint(path, trust_pickle=False):
    """Read an official checkpoint file.

    Args:
        path (str): a ``.pth`` file holding ``{"model": state_dict, ...}`` (or a bare state dict).
        trust_pickle (bool): see :func:`convert_checkpoint`.

    Returns:
        tuple[dict, dict]: the state dict and the training arguments found in the file (may be
        empty).
    """
    data = _torch_load(path, trust_pickle)
    if not isinstance(data, dict):
        fail(path, f"expected a dict, found {type(data).__name__}")
    args = {}
    if "model" in data and isinstance(data["model"], dict):
        a = data.get("args")
        args = vars(a) if isinstance(a, argparse.Namespace) else a if isinstance(a, dict) else {}
        data = data["model"]
    bad = [k for k, v in data.items() if not isinstance(v, torch.Tensor)]
    if bad:
        fail(path, f"entry '{bad[0]}' is not a tensor; expected a state dict under 'model'")
    return data, args


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        fail(path, f"cannot be read as JSON ({e})")


def _hf_weight_files(folder):
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(folder, index_name)
        if os.path.isfile(index):
            shards = sorted(set(_read_json(index)["weight_map"].values()))
            return [os.path.join(folder, s) for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(folder, name)):
            return [os.path.join(folder, name)]
    fail(folder, "no model.safetensors or pytorch_model.bin in this folder")


def load_hf_checkpoint(path, trust_pickle=False):
    """Read HF transformers weights from a ``save_pretrained`` folder or a bare weights file.

    Args:
        path (str): a folder with ``config.json`` and ``model.safetensors`` /
            ``pytorch_model.bin`` (sharded files with their index are read too), or a weights file.
        trust_pickle (bool): see :func:`convert_checkpoint`.

    Returns:
        tuple[dict, dict or None]: the state dict and the parsed ``config.json`` (None when absent).
    """
    if os.path.isdir(path):
        folder, files = path, _hf_weight_files(path)
    elif os.path.isfile(path):
        folder, files = os.path.dirname(path), [path]
    else:
        fail(path, "no such file or folder")
    cfg_path = os.path.join(folder, "config.json")
    config = _read_json(cfg_path) if os.path.isfile(cfg_path) else None
    state_dict = OrderedDict()
    for f in files:
        data = _load_weights_file(f, trust_pickle)
        if "model" in data and isinstance(data["model"], dict):
            data = data["model"]
        state_dict.update(data)
    if config is not None and config.get("model_type") not in (None, "deformable_detr"):
        fail(path, f"config.json has model_type {config.get('model_type')!r}, not deformable_detr")
    return state_dict, config


def convert_checkpoint(kind, path, *, keep_all_classes=False, trust_pickle=False):
    """Read and convert a checkpoint file.

    Args:
        kind (str): ``"official"``, ``"hf"`` or ``"torchvision"``.
        path (str): the input file (or HF folder).
        keep_all_classes (bool): see :func:`convert_official_state_dict`.
        trust_pickle (bool): read torch files with full unpickling instead of ``weights_only``
            (only for files from a trusted source).

    Returns:
        dict: a Detectron2 checkpoint ``{"model": state_dict, "__author__": ...,
        "deformable_detr_variant": ..., "matching_heuristics": False}``, the names of the kept
        classes under ``"thing_classes"`` when known (COCO heads, HF ``id2label``), and the report
        under ``"conversion_report"``.
    """
    if kind not in _CONVERTERS:
        raise ValueError(f"kind must be one of {sorted(_CONVERTERS)}, got {kind!r}")
    if kind == "hf":
        sd, config = load_hf_checkpoint(path, trust_pickle)
        options = {"hf_config": config, "keep_all_classes": keep_all_classes}
    else:
        sd, args = load_official_checkpoint(path, trust_pickle)
        options = {"keep_all_classes": keep_all_classes, "args": args} if kind == "official" else {}
    model, report = _CONVERTERS[kind](sd, source=path, **options)
    variant = dict(report["variant"])
    variant["config_file"] = report["config_file"]
    variant["overrides"] = list(report["overrides"])
    checkpoint = {
        "model": model,
        "__author__": f"deformable_detr.checkpoint ({kind}: {os.path.basename(path.rstrip('/'))})",
        "deformable_detr_variant": variant,
        "matching_heuristics": False,
        "conversion_report": report,
    }
    names = _class_names(kind, variant, options.get("hf_config"))
    if names is not None:
        # Fine-tuning transfers the rows of these classes to classes of the same name.
        checkpoint["thing_classes"] = names
        report["notes"].append(f"class names stored with the weights ({len(names)})")
    return checkpoint


def _class_names(kind, variant, hf_config):
    """Names of the class rows the converted heads keep, or None when the file has none.

    COCO heads (91 raw rows) are named by COCO category; with ``keep_all_classes`` the rows of
    unused ids get the name "". Other HF heads are named by ``id2label``.
    """
    if kind == "torchvision":
        return None
    num_classes = variant.get("num_classes")
    in_file = variant.get("num_classes_in_file")
    if in_file == NUM_COCO_RAW_CLASSES:
        if num_classes == len(COCO_CATEGORY_NAMES):
            return list(COCO_CATEGORY_NAMES)
        by_id = dict(zip(COCO_CATEGORY_IDS, COCO_CATEGORY_NAMES))
        return [by_id.get(i, "") for i in range(num_classes)]
    labels = (hf_config or {}).get("id2label") if kind == "hf" else None
    if not labels:
        return None
    labels = {int(k): str(v) for k, v in labels.items()}
    return [labels.get(i, "") for i in range(num_classes)]


def save_converted_checkpoint(checkpoint, path):
    """Write a converted checkpoint that ``DetectionCheckpointer`` (MODEL.WEIGHTS) reads as is.

    Args:
        checkpoint (dict): the output of :func:`convert_checkpoint`.
        path (str): ``.pth`` (torch.save) or ``.pkl`` (pickle of numpy arrays, Detectron2's format).
    """
    data = {k: v for k, v in checkpoint.items() if k != "conversion_report"}
    data["model"] = OrderedDict(
        (k, v.detach().cpu().contiguous()) for k, v in data["model"].items()
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".pkl"):
        data["model"] = OrderedDict((k, v.numpy()) for k, v in data["model"].items())
        with open(path, "wb") as f:
            pickle.dump(data, f)
    else:
        torch.save(data, path)


def format_conversion_report(report):
    """Human-readable summary of a conversion: counts per group, variant, config to use."""
    lines = [f"source format: {report['source']}", "converted keys per group:"]
    for group, n in report["counts"].items():
        lines.append(f"  {group:<45s} {n:6d}")
    lines.append(f"  {'total':<45s} {sum(report['counts'].values()):6d}")
    lines.append("variant:")
    lines.extend(f"  {k}: {v}" for k, v in report["variant"].items() if v is not None)
    lines.append(f"matching config: configs/{report['config_file']}")
    if report["overrides"]:
        lines.append("config overrides needed: " + " ".join(report["overrides"]))
    lines.extend(f"note: {note}" for note in report["notes"])
    return "\n".join(lines)
