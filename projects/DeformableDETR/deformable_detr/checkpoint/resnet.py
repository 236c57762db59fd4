"""Rename rules of ResNet backbones: torchvision (and timm) names, transformers ``ResNetBackbone``
names, and Detectron2's; and the conversion of a torchvision ImageNet ResNet."""

import re
from collections import OrderedDict

from .errors import fail

__all__ = [
    "convert_resnet",
    "convert_torchvision_state_dict",
    "hf_resnet_to_torchvision_name",
    "strip_prefix",
    "torchvision_to_detectron2_name",
]

# Bottleneck blocks per stage of the ResNets Detectron2's build_resnet_backbone builds.
_RESNET_DEPTHS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}

_TV_STEM = re.compile(r"^(conv1|bn1)\.(.+)$")
_TV_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.(conv[123]|bn[123]|downsample\.[01])\.(.+)$")
_HF_STEM = re.compile(r"^embedder\.embedder\.(convolution|normalization)\.(.+)$")
_HF_BLOCK = re.compile(
    r"^encoder\.stages\.([0-3])\.layers\.(\d+)\.(shortcut|layer\.([0-2]))\."
    r"(convolution|normalization)\.(.+)$"
)


def strip_prefix(state_dict, prefix):
    """``state_dict`` without ``prefix`` when every key has it (e.g. "module." of DDP)."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return OrderedDict((k[len(prefix) :], v) for k, v in state_dict.items())
    return state_dict


def torchvision_to_detectron2_name(name):
    """Detectron2 ResNet name of a torchvision ResNet key, ``""`` to drop it, None if unknown."""
    if name.endswith("num_batches_tracked") or name.startswith("fc."):
        return ""
    m = _TV_STEM.match(name)
    if m:
        module, leaf = m.groups()
        return f"stem.conv1.{leaf}" if module == "conv1" else f"stem.conv1.norm.{leaf}"
    m = _TV_BLOCK.match(name)
    if m is None:
        return None
    stage, block, module, leaf = m.groups()
    prefix = f"res{int(stage) + 1}.{block}"
    if module == "downsample.0":
        return f"{prefix}.shortcut.{leaf}"
    if module == "downsample.1":
        return f"{prefix}.shortcut.norm.{leaf}"
    if module.startswith("conv"):
        return f"{prefix}.{module}.{leaf}"
    return f"{prefix}.conv{module[2]}.norm.{leaf}"


def hf_resnet_to_torchvision_name(name):
    """torchvision name of a transformers ``ResNetBackbone`` key; timm names pass through."""
    m = _HF_STEM.match(name)
    if m:
        module, leaf = m.groups()
        return f"{'conv1' if module == 'convolution' else 'bn1'}.{leaf}"
    m = _HF_BLOCK.match(name)
    if m is None:
        return name
    stage, block, which, conv_idx, module, leaf = m.groups()
    prefix = f"layer{int(stage) + 1}.{block}"
    if which == "shortcut":
        return f"{prefix}.downsample.{0 if module == 'convolution' else 1}.{leaf}"
    kind = "conv" if module == "convolution" else "bn"
    return f"{prefix}.{kind}{int(conv_idx) + 1}.{leaf}"


def _depth(names, prefix, source):
    """ResNet depth from the number of blocks of res2..res5 among Detectron2-named keys."""
    counts = []
    for stage in range(2, 6):
        blocks = {
            int(n[len(prefix) :].split(".")[1])
            for n in names
            if n.startswith(f"{prefix}res{stage}.")
        }
        if not blocks:
            fail(source, f"no weights for ResNet stage layer{stage - 1} (res{stage}) found")
        counts.append(max(blocks) + 1)
    if tuple(counts) not in _RESNET_DEPTHS:
        fail(source, f"ResNet with {tuple(counts)} blocks per stage is not a ResNet-50/101/152")
    return _RESNET_DEPTHS[tuple(counts)]


def convert_resnet(state_dict, source, out_prefix, key_names=None):
    """Rename a torchvision-named ResNet to Detectron2 names under ``out_prefix``.

    Shapes are checked later, against the model the depth implies.

    Args:
        state_dict (dict[str, Tensor]): torchvision-named weights.
        source (str): name of the file, for messages.
        out_prefix (str): prefix of the Detectron2 names, e.g. "backbone.body.".
        key_names (dict or None): torchvision name -> name in the file, for messages.

    Returns:
        tuple: (OrderedDict of renamed tensors, depth, number of dropped keys, new name -> name
        in the file).
    """
    key_names = key_names or {}
    out, names, dropped = OrderedDict(), {}, 0
    for name, tensor in state_dict.items():
        new = torchvision_to_detectron2_name(name)
        if new is None:
            fail(source, f"unexpected ResNet key '{key_names.get(name, name)}'")
        if new == "":
            dropped += 1
            continue
        out[out_prefix + new] = tensor
        names[out_prefix + new] = key_names.get(name, name)
    return out, _depth(out.keys(), out_prefix, source), dropped, names


def convert_torchvision_state_dict(state_dict, source="<state_dict>"):
    """Convert a torchvision ImageNet ResNet to the Detectron2 backbone of this project.

    Args:
        state_dict (dict[str, Tensor]): a ``torchvision.models.resnet50().state_dict()``-like dict
            (``fc`` and ``num_batches_tracked`` are dropped).
        source (str): name of the file, used in error messages.

    Returns:
        tuple[OrderedDict, dict]: the ``backbone.body.*`` weights and a report
        (see :func:`format_conversion_report`).
    """
    from .variant import check_against_model, variant_config

    state_dict = strip_prefix(state_dict, "module.")
    if not any(k.startswith("layer1.") for k in state_dict):
        fail(source, "no torchvision ResNet keys (conv1, layer1..layer4) found")
    out, depth, dropped, names = convert_resnet(state_dict, source, "backbone.body.")
    variant = {"backbone_depth": depth}
    cfg, config_file, overrides = variant_config(variant, source)
    check_against_model(out, cfg, source, names, prefix="backbone.body.")
    report = {
        "source": "torchvision",
        "counts": OrderedDict([("backbone", len(out))]),
        "variant": variant,
        "config_file": config_file,
        "overrides": overrides,
        "notes": [f"dropped {dropped} keys (fc classifier, num_batches_tracked)"],
    }
    return out, report
