"""ImageNet weights of a timm model (timm or HF-hub file) -> the weights of a timm backbone here.

A timm classification state dict (``model.safetensors`` of a ``timm/...`` HF-hub repository, a
timm ``.pth`` / ``.bin`` file, or the original Swin / ConvNeXt release that timm's own checkpoint
filter understands) becomes the ``backbone.body.*`` weights of ``TimmBackbone``: the top-level
sequential containers are flattened as timm's feature extractor names them (``layers.1`` ->
``layers_1``), and the classifier, the final norm and the stages after the last output index are
dropped. Every weight the backbone needs must be in the file with its shape, so a file of another
model fails with a :class:`CheckpointConversionError` naming the file and the key.
"""

import os
import sys
from collections import OrderedDict

import torch

from .errors import CheckpointConversionError

__all__ = ["convert_timm_checkpoint", "convert_timm_state_dict", "load_timm_state_dict"]

# Config files built around a timm model, by model name (without a pretrained tag).
_CONFIG_FILES = {"swin_tiny_patch4_window7_224": "swin_t.yaml", "convnext_tiny": "convnext_t.yaml"}
_DEFAULT_OUT_INDICES = (1, 2, 3)
# torchvision / timm ImageNet normalisation on [0, 1] RGB: the PIXEL_MEAN / PIXEL_STD of the configs.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_IGNORED_SUFFIXES = ("num_batches_tracked",)
_MAX_LISTED = 6


def _fail(source, message):
    raise CheckpointConversionError(f"{source}: {message}")


def _listing(keys):
    keys = list(keys)
    text = ", ".join(keys[:_MAX_LISTED])
    return text + (f", ... ({len(keys)} in all)" if len(keys) > _MAX_LISTED else "")


def load_timm_state_dict(path, trust_pickle=False):
    """Read the state dict of a timm / HF-hub weights file.

    Args:
        path (str): a ``.safetensors`` file, or a torch file holding a state dict (bare or under
            ``state_dict_ema`` / ``model_ema`` / ``state_dict`` / ``model``, as timm reads them).
        trust_pickle (bool): read torch files with full unpickling instead of ``weights_only``
            (only for files from a trusted source).

    Returns:
        dict[str, Tensor]: the weights, without ``module.`` / ``_orig_mod.`` prefixes.
    """
    if not os.path.isfile(path):
        _fail(path, "no such file")
    from timm.models import load_state_dict

    try:
        state_dict = load_state_dict(path, weights_only=not trust_pickle)
    except Exception as e:  # noqa: BLE001 (any reading failure is reported with the file)
        pickled = not (trust_pickle or path.endswith(".safetensors"))
        hint = "; if you trust the file, retry with --trust-pickle" if pickled else ""
        raise CheckpointConversionError(
            f"{path}: cannot be read as a weights file ({e}){hint}"
        ) from e
    if not isinstance(state_dict, dict) or not state_dict:
        _fail(path, "holds no state dict")
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        _fail(path, f"entry '{bad[0]}' is not a tensor; expected a timm model's state dict")
    return state_dict


def _body_name_to_timm(name, timm_keys):
    """timm classification-model key of a feature-extractor key (``layers_1.x`` -> ``layers.1.x``)."""
    if name in timm_keys:
        return name
    head, _, rest = name.partition(".")
    container, _, index = head.rpartition("_")
    candidate = f"{container}.{index}.{rest}"
    if container and index.isdigit() and candidate in timm_keys:
        return candidate
    raise RuntimeError(f"feature extractor key '{name}' has no counterpart in the timm model")


def _reference_models(model_name, out_indices):
    """The timm classification model and the backbone, on the meta device (shapes only)."""
    import timm

    from ..modeling.timm_backbone import TimmBackbone, timm_model_kwargs

    kwargs = timm_model_kwargs(model_name)
    with torch.device("meta"):
        full = timm.create_model(model_name, pretrained=False, **kwargs)
        body = TimmBackbone(model_name=model_name, out_indices=list(out_indices))
    return full, body


def convert_timm_state_dict(
    state_dict, model_name, *, out_indices=_DEFAULT_OUT_INDICES, source="<state_dict>", prefix=None
):
    """Convert a timm ImageNet state dict of ``model_name`` to the weights of its backbone here.

    Args:
        state_dict (dict[str, Tensor]): the timm classification model's weights (see
            :func:`load_timm_state_dict`).
        model_name (str): the timm model the weights are of (``MODEL.TIMM.NAME``).
        out_indices (list[int]): ``MODEL.TIMM.OUT_INDICES`` of the backbone: stages after the
            last one are not part of it.
        source (str): name of the file, used in error messages.
        prefix (str or None): prefix of the output keys; None gives ``"backbone.body."``, the
            names in the detector (a ``MODEL.WEIGHTS`` file), ``""`` the names in ``TimmBackbone``.

    Returns:
        tuple[OrderedDict, dict]: the weights and a report (see ``format_conversion_report``).
    """
    prefix = "backbone.body." if prefix is None else prefix
    out_indices = [int(i) for i in out_indices]
    try:
        full, body = _reference_models(model_name, out_indices)
    except (ValueError, RuntimeError) as e:
        _fail(source, f"cannot build the timm model {model_name!r}: {e}")
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIXES)}

    # timm's filter of this model family maps its original releases (Microsoft's Swin, Meta's
    # ConvNeXt) to timm names and drops buffers timm recomputes; timm names pass through.
    filter_fn = getattr(sys.modules[type(full).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state_dict = filter_fn(dict(state_dict), full)
        except Exception as e:  # noqa: BLE001 (a foreign file can fail anywhere in the filter)
            _fail(
                source,
                f"timm's checkpoint filter of {model_name!r} rejects the file ({type(e).__name__}: "
                f"{e}); is it a checkpoint of another model?",
            )
    timm_shapes = {k: tuple(v.shape) for k, v in full.state_dict().items()}
    needed = OrderedDict(
        (k, _body_name_to_timm(k, timm_shapes)) for k in body.model.state_dict().keys()
    )
    body_shapes = {k: tuple(v.shape) for k, v in body.model.state_dict().items()}

    present = [k for k in needed.values() if k in state_dict]
    if not present:
        _fail(
            source,
            f"holds none of the {len(needed)} backbone weights of {model_name!r} (e.g. "
            f"'{next(iter(needed.values()))}'); its keys begin with {_listing(sorted(state_dict))}:"
            " is it a checkpoint of another model?",
        )
    unexpected = sorted(k for k in state_dict if k not in timm_shapes)
    if unexpected:
        _fail(
            source,
            f"keys that {model_name!r} does not have: {_listing(unexpected)}; is it a checkpoint "
            "of another model (a deeper or different variant)?",
        )
    missing = [k for k in needed.values() if k not in state_dict]
    if missing:
        _fail(
            source,
            f"missing {len(missing)} weights of {model_name!r}: {_listing(missing)}; is it a "
            "checkpoint of another variant?",
        )
    out = OrderedDict()
    for body_key, timm_key in needed.items():
        got = tuple(state_dict[timm_key].shape)
        if got != body_shapes[body_key]:
            _fail(
                source,
                f"key '{timm_key}' has shape {got}, but {model_name!r} has "
                f"{body_shapes[body_key]}: a checkpoint of another model width?",
            )
        out[prefix + "model." + body_key] = state_dict[timm_key]

    base_name = model_name.split(".")[0]
    overrides = []
    if base_name not in _CONFIG_FILES:
        overrides.append(f"MODEL.TIMM.NAME {model_name}")
    if tuple(out_indices) != _DEFAULT_OUT_INDICES:
        overrides.append(f"MODEL.TIMM.OUT_INDICES {list(out_indices)}")
    mean, std = body.model.pretrained_cfg.get("mean"), body.model.pretrained_cfg.get("std")
    if mean and std and (tuple(mean), tuple(std)) != (_IMAGENET_MEAN, _IMAGENET_STD):
        overrides.append(f"MODEL.PIXEL_MEAN {[round(255 * v, 3) for v in mean]}")
        overrides.append(f"MODEL.PIXEL_STD {[round(255 * v, 3) for v in std]}")
    dropped = len(state_dict) - len(out)
    report = {
        "source": "timm",
        "counts": OrderedDict([("backbone", len(out))]),
        "variant": OrderedDict([("timm_model", model_name), ("out_indices", list(out_indices))]),
        "config_file": _CONFIG_FILES.get(base_name, "swin_t.yaml"),
        "overrides": overrides,
        "notes": [
            f"dropped {dropped} keys the backbone does not use (classifier, final norm, stages "
            "after the last output)"
        ],
    }
    return out, report


def convert_timm_checkpoint(
    path, model_name, *, out_indices=_DEFAULT_OUT_INDICES, trust_pickle=False
):
    """Read and convert a timm / HF-hub weights file into a ``MODEL.WEIGHTS`` checkpoint.

    Args:
        path (str): the weights file (see :func:`load_timm_state_dict`).
        model_name (str): the timm model the file is of (``MODEL.TIMM.NAME``).
        out_indices (list[int]): ``MODEL.TIMM.OUT_INDICES`` of the config that will load it.
        trust_pickle (bool): see :func:`load_timm_state_dict`.

    Returns:
        dict: ``{"model": backbone.body.* weights, "__author__", "deformable_detr_variant",
        "matching_heuristics": False, "conversion_report"}``, as ``convert_checkpoint`` returns
        (``save_converted_checkpoint`` writes it).
    """
    state_dict = load_timm_state_dict(path, trust_pickle)
    model, report = convert_timm_state_dict(
        state_dict, model_name, out_indices=out_indices, source=path
    )
    variant = dict(report["variant"])
    variant["config_file"] = report["config_file"]
    variant["overrides"] = list(report["overrides"])
    return {
        "model": model,
        "__author__": f"deformable_detr.checkpoint (timm {model_name}: {os.path.basename(path)})",
        "deformable_detr_variant": variant,
        "matching_heuristics": False,
        "conversion_report": report,
    }
