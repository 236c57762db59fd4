"""Key-rename rules from released Deformable DETR checkpoints to this project's state_dict layout.

Three sources are understood:

* ``official``: the ``{"model": state_dict}`` files of fundamentalvision/Deformable-DETR.
* ``hf``: HF transformers ``DeformableDetrForObjectDetection`` weights, in both naming generations
  (transformers 4.x ``model.backbone.conv_encoder.model.*``, 5.x ``model.backbone.model.*``), with a
  timm or a transformers ResNet backbone. They are first renamed to the official layout.
* ``torchvision``: an ImageNet ResNet state dict, converted to the Detectron2 backbone only.

Every conversion is checked against the shapes the inferred variant implies, so a file that is not
understood fails with a :class:`CheckpointConversionError` naming the file and the key instead of
producing a partial checkpoint.
"""

import argparse
import json
import logging
import os
import re
from collections import OrderedDict

import torch

__all__ = [
    "COCO_CATEGORY_IDS",
    "CheckpointConversionError",
    "convert_checkpoint",
    "convert_hf_state_dict",
    "convert_official_state_dict",
    "convert_torchvision_state_dict",
    "format_conversion_report",
    "hf_to_official_state_dict",
    "load_hf_checkpoint",
    "load_official_checkpoint",
    "save_converted_checkpoint",
]

logger = logging.getLogger(__name__)

# The 80 category ids COCO uses, in id order: row k of an 80-class head is category id k here.
COCO_CATEGORY_IDS = (
    tuple(range(1, 12))
    + tuple(range(13, 26))
    + (27, 28)
    + tuple(range(31, 45))
    + tuple(range(46, 66))
    + (67, 70)
    + tuple(range(72, 83))
    + tuple(range(84, 91))
)
assert len(COCO_CATEGORY_IDS) == 80
# Heads of the released COCO models are indexed by the raw category id (0 and the unused ids are
# rows that never see a positive).
NUM_COCO_RAW_CLASSES = 91

# Defaults of cfg.MODEL.DEFORMABLE_DETR that a converted variant may need to override.
_CFG_DEFAULTS = {
    "NUM_CLASSES": 80,
    "NUM_QUERIES": 300,
    "HIDDEN_DIM": 256,
    "NHEADS": 8,
    "ENC_LAYERS": 6,
    "DEC_LAYERS": 6,
    "DIM_FEEDFORWARD": 1024,
    "ENC_N_POINTS": 4,
    "DEC_N_POINTS": 4,
    "TWO_STAGE_NUM_PROPOSALS": 300,
}
_TWO_STAGE_MODULES = ("enc_output", "enc_output_norm", "pos_trans", "pos_trans_norm")
_FROZEN_BN_BUFFERS = ("weight", "bias", "running_mean", "running_var")
_RESNET_DEPTHS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}


class CheckpointConversionError(ValueError):
    """A checkpoint that the converter does not understand; the message names the file and key."""


def _fail(source, message):
    raise CheckpointConversionError(f"{source}: {message}")


# ----------------------------------------------------------------------------------------------
# ResNet backbone names
# ----------------------------------------------------------------------------------------------

_TV_STEM = re.compile(r"^(conv1|bn1)\.(.+)$")
_TV_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.(conv[123]|bn[123]|downsample\.[01])\.(.+)$")
_HF_RESNET_STEM = re.compile(r"^embedder\.embedder\.(convolution|normalization)\.(.+)$")
_HF_RESNET_BLOCK = re.compile(
    r"^encoder\.stages\.([0-3])\.layers\.(\d+)\.(shortcut|layer\.([0-2]))\."
    r"(convolution|normalization)\.(.+)$"
)


def _torchvision_to_detectron2_name(name):
    """Detectron2 ResNet name of a torchvision ResNet key, ``""`` to drop it, None if unknown."""
    if name.endswith("num_batches_tracked") or name.startswith("fc."):
        return ""
    m = _TV_STEM.match(name)
    if m:
        module, leaf = m.groups()
        return f"stem.conv1.{leaf}" if module == "conv1" else f"stem.conv1.norm.{leaf}"
    m = _TV_BLOCK.match(name)
    if m:
        stage, block, module, leaf = m.groups()
        prefix = f"res{int(stage) + 1}.{block}"
        if module == "downsample.0":
            return f"{prefix}.shortcut.{leaf}"
        if module == "downsample.1":
            return f"{prefix}.shortcut.norm.{leaf}"
        if module.startswith("conv"):
            return f"{prefix}.{module}.{leaf}"
        return f"{prefix}.conv{module[2]}.norm.{leaf}"
    return None


def _hf_resnet_to_torchvision_name(name):
    """torchvision name of a transformers ``ResNetBackbone`` key; timm names pass through."""
    m = _HF_RESNET_STEM.match(name)
    if m:
        module, leaf = m.groups()
        return f"{'conv1' if module == 'convolution' else 'bn1'}.{leaf}"
    m = _HF_RESNET_BLOCK.match(name)
    if m:
        stage, block, which, conv_idx, module, leaf = m.groups()
        prefix = f"layer{int(stage) + 1}.{block}"
        if which == "shortcut":
            return f"{prefix}.downsample.{0 if module == 'convolution' else 1}.{leaf}"
        kind = "conv" if module == "convolution" else "bn"
        return f"{prefix}.{kind}{int(conv_idx) + 1}.{leaf}"
    return name


def _expected_resnet_shapes(blocks_per_stage, prefix):
    """Shapes of a bottleneck ResNet (torchvision widths) under Detectron2 names."""
    shapes = {f"{prefix}stem.conv1.weight": (64, 3, 7, 7)}
    shapes.update({f"{prefix}stem.conv1.norm.{b}": (64,) for b in _FROZEN_BN_BUFFERS})
    in_ch = 64
    for stage_idx, num_blocks in enumerate(blocks_per_stage):
        width = 64 * 2**stage_idx
        out_ch = 4 * width
        for block in range(num_blocks):
            p = f"{prefix}res{stage_idx + 2}.{block}."
            convs = {
                "conv1": (width, in_ch, 1, 1),
                "conv2": (width, width, 3, 3),
                "conv3": (out_ch, width, 1, 1),
            }
            if block == 0:
                convs["shortcut"] = (out_ch, in_ch, 1, 1)
            for conv, shape in convs.items():
                shapes[p + conv + ".weight"] = shape
                shapes.update({f"{p}{conv}.norm.{b}": (shape[0],) for b in _FROZEN_BN_BUFFERS})
            in_ch = out_ch
    return shapes


def _resnet_blocks_per_stage(names, prefix, source):
    """Number of blocks of res2..res5 seen among Detectron2-named keys."""
    counts = []
    for stage in range(2, 6):
        blocks = {
            int(n[len(prefix) :].split(".")[1])
            for n in names
            if n.startswith(f"{prefix}res{stage}.")
        }
        if not blocks:
            _fail(source, f"no weights for ResNet stage layer{stage - 1} (res{stage}) found")
        counts.append(max(blocks) + 1)
    return tuple(counts)


def _check_shapes(state_dict, expected, source, group, key_names=None):
    """Fail on a missing, unexpected or wrongly shaped key among ``expected``'s group.

    ``key_names`` maps converted keys back to the names in the source file for the messages.
    """
    key_names = key_names or {}
    for k, shape in expected.items():
        if k not in state_dict:
            _fail(source, f"missing {group} weight '{k}' (expected shape {tuple(shape)})")
        got = tuple(state_dict[k].shape)
        if got != tuple(shape):
            _fail(
                source,
                f"{group} key '{key_names.get(k, k)}' has shape {got}, expected {tuple(shape)}",
            )
    return len(expected)


def _convert_resnet(state_dict, source, out_prefix, key_names=None):
    """Rename a torchvision-named ResNet to Detectron2 names under ``out_prefix``, checking shapes.

    Returns:
        tuple: (OrderedDict of converted tensors, depth, number of dropped keys).
    """
    out = OrderedDict()
    names = {}
    dropped = 0
    for name, tensor in state_dict.items():
        new = _torchvision_to_detectron2_name(name)
        if new is None:
            _fail(source, f"unexpected ResNet key '{(key_names or {}).get(name, name)}'")
        if new == "":
            dropped += 1
            continue
        out[out_prefix + new] = tensor
        names[out_prefix + new] = (key_names or {}).get(name, name)
    blocks = _resnet_blocks_per_stage(out.keys(), out_prefix, source)
    if blocks not in _RESNET_DEPTHS:
        _fail(source, f"ResNet with {blocks} blocks per stage is not a ResNet-50/101/152")
    expected = _expected_resnet_shapes(blocks, out_prefix)
    _check_shapes(out, expected, source, "backbone", names)
    leftover = sorted(set(out) - set(expected))
    if leftover:
        _fail(source, f"unexpected backbone key '{names[leftover[0]]}'")
    return out, _RESNET_DEPTHS[blocks], dropped


# ----------------------------------------------------------------------------------------------
# torchvision ImageNet ResNet
# ----------------------------------------------------------------------------------------------


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
    state_dict = _strip_prefix(state_dict, "module.")
    if not any(k.startswith("layer1.") for k in state_dict):
        _fail(source, "no torchvision ResNet keys (conv1, layer1..layer4) found")
    out, depth, dropped = _convert_resnet(state_dict, source, "backbone.body.")
    report = {
        "source": "torchvision",
        "counts": OrderedDict([("backbone", len(out))]),
        "variant": {"backbone_depth": depth},
        "config_file": "Base-DeformableDETR.yaml",
        "overrides": [] if depth == 50 else [f"MODEL.RESNETS.DEPTH {depth}"],
        "notes": [f"dropped {dropped} keys (fc classifier, num_batches_tracked)"],
    }
    return out, report


# ----------------------------------------------------------------------------------------------
# Official checkpoints
# ----------------------------------------------------------------------------------------------


def _strip_prefix(state_dict, prefix):
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return OrderedDict((k[len(prefix) :], v) for k, v in state_dict.items())
    return state_dict


def _indices(names, pattern):
    """Sorted integer captures of ``pattern`` (one group) over ``names``."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for m in map(regex.match, names) if m})


def _infer_official_variant(sd, source, args=None):
    """Read the architecture of an official-layout state dict from its keys and shapes."""
    names = list(sd.keys())
    if "transformer.level_embed" not in sd:
        _fail(source, "no 'transformer.level_embed': not a Deformable DETR checkpoint")
    num_levels, d_model = sd["transformer.level_embed"].shape
    proj = _indices(names, r"^input_proj\.(\d+)\.")
    if proj != list(range(int(num_levels))):
        _fail(
            source,
            f"input_proj entries {proj} do not match the {int(num_levels)} rows of "
            "'transformer.level_embed'",
        )
    enc = _indices(names, r"^transformer\.encoder\.layers\.(\d+)\.")
    dec = _indices(names, r"^transformer\.decoder\.layers\.(\d+)\.")
    if not enc or enc != list(range(len(enc))):
        _fail(source, f"encoder layers {enc} missing or not contiguous")
    if not dec or dec != list(range(len(dec))):
        _fail(source, f"decoder layers {dec} missing or not contiguous")
    two_stage = "transformer.enc_output.weight" in sd
    refine = any(k.startswith("transformer.decoder.bbox_embed.") for k in names)
    if "class_embed.0.weight" in sd:
        cls_key = "class_embed.0.weight"
    elif "transformer.decoder.class_embed.0.weight" in sd:
        cls_key = "transformer.decoder.class_embed.0.weight"
    else:
        _fail(source, "no classification head ('class_embed.0.weight') found")
    if two_stage and not any(
        k in sd
        for k in (
            f"class_embed.{len(dec)}.weight",
            f"transformer.decoder.class_embed.{len(dec)}.weight",
        )
    ):
        _fail(
            source,
            "'transformer.enc_output.weight' marks a two-stage model, but there is no encoder "
            f"proposal head 'class_embed.{len(dec)}' after the {len(dec)} decoder heads",
        )
    ffn_key = "transformer.encoder.layers.0.linear1.weight"
    enc_aw = "transformer.encoder.layers.0.self_attn.attention_weights.weight"
    dec_aw = "transformer.decoder.layers.0.cross_attn.attention_weights.weight"
    for k in (ffn_key, enc_aw, dec_aw):
        if k not in sd:
            _fail(source, f"missing key '{k}'")
    args = args or {}
    nheads = int(args.get("nheads", 8))
    enc_hp = sd[enc_aw].shape[0] // int(num_levels)
    dec_hp = sd[dec_aw].shape[0] // int(num_levels)
    if enc_hp % nheads or dec_hp % nheads:
        _fail(source, f"attention_weights rows are not a multiple of {nheads} heads x levels")
    num_queries = int(sd["query_embed.weight"].shape[0]) if "query_embed.weight" in sd else None
    variant = OrderedDict(
        [
            ("two_stage", bool(two_stage)),
            ("with_box_refine", bool(refine)),
            ("num_feature_levels", int(num_levels)),
            ("hidden_dim", int(d_model)),
            ("nheads", nheads),
            ("enc_layers", len(enc)),
            ("dec_layers", len(dec)),
            ("dim_feedforward", int(sd[ffn_key].shape[0])),
            ("enc_n_points", enc_hp // nheads),
            ("dec_n_points", dec_hp // nheads),
            ("num_classes_in_file", int(sd[cls_key].shape[0])),
            ("num_queries", num_queries),
            ("two_stage_num_proposals", int(args.get("num_queries", 300)) if two_stage else None),
            ("dilation", args.get("dilation")),
        ]
    )
    return variant


def _expected_detector_shapes(variant, input_channels, num_classes):
    """Shapes of every non-backbone key of this project's model for ``variant``."""
    d = variant["hidden_dim"]
    levels = variant["num_feature_levels"]
    ffn = variant["dim_feedforward"]
    shapes = OrderedDict()
    for i, (cin, k) in enumerate(input_channels):
        p = f"backbone.input_proj.{i}."
        shapes.update({p + "0.weight": (d, cin, k, k), p + "0.bias": (d,), p + "1.weight": (d,)})
        shapes[p + "1.bias"] = (d,)

    def deform(prefix, points):
        hlp = variant["nheads"] * levels * points
        return {
            prefix + "sampling_offsets.weight": (hlp * 2, d),
            prefix + "sampling_offsets.bias": (hlp * 2,),
            prefix + "attention_weights.weight": (hlp, d),
            prefix + "attention_weights.bias": (hlp,),
            prefix + "value_proj.weight": (d, d),
            prefix + "value_proj.bias": (d,),
            prefix + "output_proj.weight": (d, d),
            prefix + "output_proj.bias": (d,),
        }

    def linear(prefix, cout, cin):
        return {prefix + "weight": (cout, cin), prefix + "bias": (cout,)}

    def norm(prefix, c):
        return {prefix + "weight": (c,), prefix + "bias": (c,)}

    shapes["transformer.level_embed"] = (levels, d)
    for n in range(variant["enc_layers"]):
        p = f"transformer.encoder.layers.{n}."
        shapes.update(deform(p + "self_attn.", variant["enc_n_points"]))
        shapes.update(norm(p + "norm1.", d))
        shapes.update(linear(p + "linear1.", ffn, d))
        shapes.update(linear(p + "linear2.", d, ffn))
        shapes.update(norm(p + "norm2.", d))
    for n in range(variant["dec_layers"]):
        p = f"transformer.decoder.layers.{n}."
        shapes.update(deform(p + "cross_attn.", variant["dec_n_points"]))
        shapes.update(norm(p + "norm1.", d))
        shapes[p + "self_attn.in_proj_weight"] = (3 * d, d)
        shapes[p + "self_attn.in_proj_bias"] = (3 * d,)
        shapes.update(linear(p + "self_attn.out_proj.", d, d))
        shapes.update(norm(p + "norm2.", d))
        shapes.update(linear(p + "linear1.", ffn, d))
        shapes.update(linear(p + "linear2.", d, ffn))
        shapes.update(norm(p + "norm3.", d))
    if variant["two_stage"]:
        shapes.update(linear("transformer.enc_output.", d, d))
        shapes.update(norm("transformer.enc_output_norm.", d))
        shapes.update(linear("transformer.pos_trans.", 2 * d, 2 * d))
        shapes.update(norm("transformer.pos_trans_norm.", 2 * d))
    else:
        shapes.update(linear("transformer.reference_points.", 2, d))
        shapes["query_embed.weight"] = (variant["num_queries"], 2 * d)
    for i in range(variant["dec_layers"] + int(variant["two_stage"])):
        shapes.update(linear(f"class_embed.{i}.", num_classes, d))
        for j, (cout, cin) in enumerate(((d, d), (d, d), (4, d))):
            shapes.update(linear(f"bbox_embed.{i}.layers.{j}.", cout, cin))
    return shapes


_GROUPS = (
    "backbone",
    "input_proj",
    "transformer (level_embed, reference_points)",
    "encoder",
    "decoder",
    "two_stage",
    "query_embed",
    "heads (class_embed, bbox_embed)",
)


def _group_of(key):
    """Report group of a key of this project's layout."""
    if key.startswith("backbone.body."):
        return "backbone"
    if key.startswith("backbone.input_proj."):
        return "input_proj"
    if key.startswith("transformer.encoder."):
        return "encoder"
    if key.startswith("transformer.decoder."):
        return "decoder"
    if key.startswith("transformer."):
        if key.split(".")[1] in _TWO_STAGE_MODULES:
            return "two_stage"
        return "transformer (level_embed, reference_points)"
    if key.startswith("query_embed."):
        return "query_embed"
    return "heads (class_embed, bbox_embed)"


def _config_for(variant):
    """Name of the config file under configs/ that builds ``variant``, and the overrides it needs."""
    extra = []
    if variant["two_stage"]:
        name = "r50_two_stage.yaml"
        if not variant["with_box_refine"]:
            extra.append("MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE False")
    elif variant["with_box_refine"]:
        name = "r50_box_refine.yaml"
    elif variant["num_feature_levels"] == 1:
        name = "r50_single_scale_dc5.yaml" if variant.get("dilation") else "r50_single_scale.yaml"
    else:
        name = "r50.yaml"
    values = {
        "NUM_CLASSES": variant["num_classes"],
        "HIDDEN_DIM": variant["hidden_dim"],
        "NHEADS": variant["nheads"],
        "ENC_LAYERS": variant["enc_layers"],
        "DEC_LAYERS": variant["dec_layers"],
        "DIM_FEEDFORWARD": variant["dim_feedforward"],
        "ENC_N_POINTS": variant["enc_n_points"],
        "DEC_N_POINTS": variant["dec_n_points"],
    }
    if variant["two_stage"]:
        if variant.get("two_stage_num_proposals") is not None:
            values["TWO_STAGE_NUM_PROPOSALS"] = variant["two_stage_num_proposals"]
    else:
        values["NUM_QUERIES"] = variant["num_queries"]
    if variant["num_feature_levels"] not in (1, 4):
        values["NUM_FEATURE_LEVELS"] = variant["num_feature_levels"]
    overrides = extra + [
        f"MODEL.DEFORMABLE_DETR.{k} {v}"
        for k, v in values.items()
        if k not in _CFG_DEFAULTS or _CFG_DEFAULTS[k] != v
    ]
    return name, overrides


def convert_official_state_dict(
    state_dict, *, keep_all_classes=False, source="<state_dict>", args=None, key_names=None
):
    """Convert an official Deformable DETR state dict to this project's layout.

    Args:
        state_dict (dict[str, Tensor]): the ``"model"`` entry of an official checkpoint.
        keep_all_classes (bool): keep every class row; by default a 91-row COCO head keeps the rows
            of the 80 used category ids (:data:`COCO_CATEGORY_IDS`), in id order.
        source (str): name of the file, used in error messages.
        args (dict or None): the official training arguments when the file has them (``nheads``,
            ``dilation``, ``num_queries``); without them 8 heads are assumed.
        key_names (dict or None): official name -> name in the source file, for messages.

    Returns:
        tuple[OrderedDict, dict]: the converted state dict and a report
        (see :func:`format_conversion_report`).
    """
    sd = _strip_prefix(OrderedDict(state_dict), "module.")
    key_names = key_names or {}
    variant = _infer_official_variant(sd, source, args)
    notes = []

    backbone = OrderedDict(
        (k[len("backbone.0.body.") :], v) for k, v in sd.items() if k.startswith("backbone.0.body.")
    )
    if not backbone:
        _fail(source, "no backbone weights ('backbone.0.body.*') found")
    bb_names = {
        k[len("backbone.0.body.") :]: key_names.get(k, k)
        for k in sd
        if k.startswith("backbone.0.body.")
    }
    out, depth, dropped = _convert_resnet(backbone, source, "backbone.body.", bb_names)
    variant["backbone_depth"] = depth
    if dropped:
        notes.append(f"dropped {dropped} backbone num_batches_tracked/fc keys")

    num_pred = variant["dec_layers"] + int(variant["two_stage"])
    # Every copy of each head key: official name without the decoder prefix -> source keys.
    heads = {}
    for k, v in sd.items():
        if k.startswith("backbone.0.body."):
            continue
        if k.startswith("input_proj."):
            out["backbone." + k] = v
        elif k.startswith(("transformer.decoder.class_embed.", "transformer.decoder.bbox_embed.")):
            heads.setdefault(k[len("transformer.decoder.") :], []).append(k)
        elif k.startswith(("class_embed.", "bbox_embed.")):
            heads.setdefault(k, []).append(k)
        elif k.startswith("transformer.") or k == "query_embed.weight":
            out[k] = v
        else:
            _fail(source, f"unexpected key '{key_names.get(k, k)}'")

    # Heads: the top-level copy is the one the model uses; the decoder keeps references to the same
    # modules (refinement, two-stage), and heads shared across layers may be stored only once.
    repeated = 0
    filled = []
    for k in sorted(heads):
        copies = heads[k]
        for other in copies[1:]:
            if not torch.equal(sd[copies[0]], sd[other]):
                _fail(
                    source,
                    f"'{key_names.get(other, other)}' differs from "
                    f"'{key_names.get(copies[0], copies[0])}' although both hold head '{k}'",
                )
            repeated += 1
    head_leaves = ["weight", "bias"]
    for i in range(num_pred):
        for leaf in [f"class_embed.{i}.{x}" for x in head_leaves] + [
            f"bbox_embed.{i}.layers.{j}.{x}" for j in range(3) for x in head_leaves
        ]:
            if leaf in heads:
                out[leaf] = sd[heads[leaf][0]]
                continue
            # Missing index i of a shared head: the shared module is the one at index 0.
            base = re.sub(r"^(class_embed|bbox_embed)\.\d+\.", r"\1.0.", leaf)
            if variant["with_box_refine"] and leaf.startswith("bbox_embed."):
                _fail(source, f"missing refinement head '{leaf}'")
            if base not in heads:
                _fail(source, f"missing head weight '{leaf}'")
            out[leaf] = sd[heads[base][0]]
            filled.append(leaf)
    extra_heads = sorted(k for k in heads if int(k.split(".")[1]) >= num_pred)
    if extra_heads:
        _fail(
            source,
            f"head '{key_names.get(heads[extra_heads[0]][0], extra_heads[0])}' beyond the "
            f"{num_pred} prediction heads of {variant['dec_layers']} decoder layers",
        )
    if repeated:
        notes.append(
            f"dropped {repeated} repeated head keys (decoder references to the same heads)"
        )
    if filled:
        notes.append(f"filled {len(filled)} keys of shared heads from index 0")

    num_raw = variant["num_classes_in_file"]
    if num_raw == NUM_COCO_RAW_CLASSES and not keep_all_classes:
        enc_head = variant["dec_layers"] if variant["two_stage"] else None
        if enc_head is not None and not variant["with_box_refine"]:
            _fail(
                source,
                "two-stage heads shared with the decoder cannot be reduced to 80 classes: the "
                "proposal score is raw row 0, which the decoder heads drop; use keep_all_classes "
                "(--keep-all-classes) and MODEL.DEFORMABLE_DETR.NUM_CLASSES 91",
            )
        for i in range(num_pred):
            rows = torch.tensor(COCO_CATEGORY_IDS)
            if i == enc_head:
                # Two-stage ranks proposals by row 0 of the encoder head (trained with every target
                # labelled 0), so that row stays first; the others are never positives.
                rows = torch.tensor((0,) + COCO_CATEGORY_IDS[1:])
            for x in head_leaves:
                out[f"class_embed.{i}.{x}"] = out[f"class_embed.{i}.{x}"][rows].clone()
        variant["num_classes"] = len(COCO_CATEGORY_IDS)
        notes.append("kept the class rows of the 80 COCO category ids (of 91), in id order")
        if enc_head is not None:
            notes.append(
                f"encoder proposal head class_embed.{enc_head}: raw row 0 (the proposal score) "
                "kept as row 0, followed by the rows of category ids 2..90"
            )
    else:
        variant["num_classes"] = num_raw

    input_channels = []
    for i in range(variant["num_feature_levels"]):
        k = f"backbone.input_proj.{i}.0.weight"
        if k not in out or out[k].dim() != 4:
            _fail(source, f"missing or malformed 'input_proj.{i}.0.weight'")
        input_channels.append((int(out[k].shape[1]), int(out[k].shape[2])))
    expected = _expected_detector_shapes(variant, input_channels, variant["num_classes"])
    names = {
        ("backbone." + k if k.startswith("input_proj.") else k): key_names.get(k, k) for k in sd
    }
    _check_shapes(out, expected, source, "detector", names)
    leftover = [k for k in out if not k.startswith("backbone.body.") and k not in expected]
    if leftover:
        _fail(
            source,
            f"unexpected key '{names.get(leftover[0], leftover[0])}' for a "
            f"{'two-stage' if variant['two_stage'] else 'single-stage'} model",
        )
    out = OrderedDict(sorted(out.items(), key=lambda kv: _sort_key(kv[0])))
    counts = OrderedDict((g, 0) for g in _GROUPS)
    for k in out:
        counts[_group_of(k)] += 1
    counts = OrderedDict((g, n) for g, n in counts.items() if n)
    config_file, overrides = _config_for(variant)
    if variant["num_feature_levels"] == 1 and variant.get("dilation") is None:
        notes.append(
            "single-scale: DC5 cannot be seen from the keys; use r50_single_scale_dc5.yaml for the "
            "DC5 model"
        )
    report = {
        "source": "official",
        "counts": counts,
        "variant": variant,
        "config_file": config_file,
        "overrides": overrides,
        "notes": notes,
    }
    return out, report


def _sort_key(key):
    order = (
        "backbone.body.",
        "backbone.input_proj.",
        "transformer.",
        "query_embed.",
        "class_embed.",
    )
    for i, p in enumerate(order):
        if key.startswith(p):
            return (i, key)
    return (len(order), key)


# ----------------------------------------------------------------------------------------------
# HF transformers checkpoints
# ----------------------------------------------------------------------------------------------

_HF_BACKBONE_PREFIXES = ("model.backbone.conv_encoder.model.", "model.backbone.model.")
_HF_ENCODER_LAYER = {
    "self_attn_layer_norm": "norm1",
    "fc1": "linear1",
    "fc2": "linear2",
    "mlp.fc1": "linear1",
    "mlp.fc2": "linear2",
    "final_layer_norm": "norm2",
}
_HF_DECODER_LAYER = {
    "self_attn_layer_norm": "norm2",
    "encoder_attn_layer_norm": "norm1",
    "fc1": "linear1",
    "fc2": "linear2",
    "mlp.fc1": "linear1",
    "mlp.fc2": "linear2",
    "final_layer_norm": "norm3",
    "self_attn.out_proj": "self_attn.out_proj",
    "self_attn.o_proj": "self_attn.out_proj",
}
_HF_LAYER = re.compile(r"^model\.(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_HF_IN_PROJ = re.compile(
    r"^model\.decoder\.layers\.(\d+)\.self_attn\.(in_proj_weight|in_proj_bias)$"
)
_HF_TOP = {
    "model.level_embed": "transformer.level_embed",
    "model.query_position_embeddings.weight": "query_embed.weight",
}


def hf_to_official_state_dict(state_dict, source="<state_dict>"):
    """Rename HF transformers ``DeformableDetrForObjectDetection`` weights to the official layout.

    The decoder self-attention's separate q/k/v projections are concatenated into the
    ``in_proj_weight``/``in_proj_bias`` of ``nn.MultiheadAttention`` (rows: q, k, v).

    Args:
        state_dict (dict[str, Tensor]): HF weights (either naming generation).
        source (str): name of the file, used in error messages.

    Returns:
        tuple[OrderedDict, dict]: official-layout state dict, and official name -> HF name.
    """
    out = OrderedDict()
    names = {}
    qkv = {}

    def put(new, old):
        if new in out:
            _fail(source, f"keys '{names[new]}' and '{old}' both map to '{new}'")
        out[new] = state_dict[old]
        names[new] = old

    for k in state_dict:
        bb = next((p for p in _HF_BACKBONE_PREFIXES if k.startswith(p)), None)
        if bb is not None:
            put("backbone.0.body." + _hf_resnet_to_torchvision_name(k[len(bb) :]), k)
            continue
        if k in _HF_TOP:
            put(_HF_TOP[k], k)
            continue
        if k.startswith("model.input_proj."):
            put(k[len("model.") :], k)
            continue
        top = k[len("model.") :].split(".")[0] if k.startswith("model.") else None
        if top in _TWO_STAGE_MODULES + ("reference_points",):
            put("transformer." + k[len("model.") :], k)
            continue
        if k.startswith(("model.decoder.bbox_embed.", "model.decoder.class_embed.")):
            put("transformer." + k[len("model.") :], k)
            continue
        if k.startswith(("class_embed.", "bbox_embed.")):
            put(k, k)
            continue
        m = _HF_IN_PROJ.match(k)
        if m is not None:
            # Packed projection of an nn.MultiheadAttention: already the official layout.
            put(f"transformer.decoder.layers.{m.group(1)}.self_attn.{m.group(2)}", k)
            continue
        m = _HF_LAYER.match(k)
        if m is None:
            _fail(source, f"unexpected key '{k}'")
        part, n, module, leaf = m.groups()
        prefix = f"transformer.{part}.layers.{n}."
        if part == "encoder":
            if module.startswith("self_attn."):
                put(prefix + module + "." + leaf, k)
            elif module in _HF_ENCODER_LAYER:
                put(prefix + _HF_ENCODER_LAYER[module] + "." + leaf, k)
            else:
                _fail(source, f"unexpected encoder key '{k}'")
            continue
        if module.startswith("encoder_attn."):
            put(prefix + "cross_attn." + module[len("encoder_attn.") :] + "." + leaf, k)
        elif module in _HF_DECODER_LAYER:
            put(prefix + _HF_DECODER_LAYER[module] + "." + leaf, k)
        elif module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((prefix, leaf), {})[module[len("self_attn.") :][0]] = k
        else:
            _fail(source, f"unexpected decoder key '{k}'")

    for (prefix, leaf), parts in sorted(qkv.items()):
        if sorted(parts) != ["k", "q", "v"]:
            missing = sorted({"q", "k", "v"} - set(parts))
            _fail(source, f"decoder self-attention {prefix} lacks {missing[0]}_proj.{leaf}")
        tensors = [state_dict[parts[c]] for c in "qkv"]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) != 1:
            _fail(source, f"q/k/v projections of '{parts['q']}' have different shapes {shapes}")
        new = prefix + "self_attn.in_proj_" + leaf
        if new in out:
            _fail(source, f"both in_proj and q/k/v projections found for '{new}'")
        out[new] = torch.cat(tensors, dim=0)
        names[new] = parts["q"]
    return out, names


def convert_hf_state_dict(state_dict, hf_config=None, *, keep_all_classes=False, source="<hf>"):
    """Convert HF transformers ``DeformableDetrForObjectDetection`` weights to this project.

    Args:
        state_dict (dict[str, Tensor]): the HF weights.
        hf_config (dict or None): the model's ``config.json``; when given, its architecture is
            cross-checked with the weights and gives the number of heads, DC5 and the proposals.
        keep_all_classes (bool): see :func:`convert_official_state_dict`. A head with 91 labels is
            taken as COCO (HF labels are COCO category ids).
        source (str): name of the file, used in error messages.

    Returns:
        tuple[OrderedDict, dict]: the converted state dict and a report.
    """
    official, names = hf_to_official_state_dict(state_dict, source)
    args = {}
    if hf_config:
        args["nheads"] = int(hf_config.get("encoder_attention_heads", 8))
        if int(hf_config.get("decoder_attention_heads", args["nheads"])) != args["nheads"]:
            _fail(source, "encoder and decoder attention heads differ; this model has one NHEADS")
        args["dilation"] = bool(hf_config.get("dilation", False))
        args["num_queries"] = int(
            hf_config.get("two_stage_num_proposals", hf_config.get("num_queries", 300))
        )
    out, report = convert_official_state_dict(
        official, keep_all_classes=keep_all_classes, source=source, args=args, key_names=names
    )
    report["source"] = "hf"
    if hf_config:
        v = report["variant"]
        checks = {
            "two_stage": v["two_stage"],
            "with_box_refine": v["with_box_refine"],
            "num_feature_levels": v["num_feature_levels"],
            "encoder_layers": v["enc_layers"],
            "decoder_layers": v["dec_layers"],
            "d_model": v["hidden_dim"],
            "encoder_n_points": v["enc_n_points"],
            "decoder_n_points": v["dec_n_points"],
        }
        for key, value in checks.items():
            if key in hf_config and hf_config[key] != value:
                _fail(
                    source,
                    f"config.json says {key}={hf_config[key]!r} but the weights give {value!r}",
                )
        if "id2label" in hf_config and len(hf_config["id2label"]) != v["num_classes_in_file"]:
            _fail(
                source,
                f"config.json has {len(hf_config['id2label'])} labels but class_embed has "
                f"{v['num_classes_in_file']} rows",
            )
    return out, report


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def _torch_load(path, trust_pickle=False):
    """Load a torch file, by default with ``weights_only`` (official files also hold their
    training arguments as an ``argparse.Namespace``, which is allowed)."""
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
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:  # noqa: BLE001
            raise CheckpointConversionError(f"{path}: cannot be read as safetensors ({e})") from e
    return _torch_load(path, trust_pickle)


def load_official_checkpoint(path, trust_pickle=False):
    """Read an official checkpoint file.

    Args:
        path (str): a ``.pth`` file holding ``{"model": state_dict, ...}`` (or a bare state dict).

    Returns:
        tuple[dict, dict]: the state dict and the training arguments found in the file (may be
        empty).
    """
    data = _torch_load(path, trust_pickle)
    if not isinstance(data, dict):
        _fail(path, f"expected a dict, found {type(data).__name__}")
    args = {}
    if "model" in data and isinstance(data["model"], dict):
        a = data.get("args")
        if isinstance(a, argparse.Namespace):
            args = vars(a)
        elif isinstance(a, dict):
            args = a
        data = data["model"]
    bad = [k for k, v in data.items() if not isinstance(v, torch.Tensor)]
    if bad:
        _fail(path, f"entry '{bad[0]}' is not a tensor; expected a state dict under 'model'")
    return data, args


def load_hf_checkpoint(path, trust_pickle=False):
    """Read HF transformers weights from a ``save_pretrained`` folder or a bare weights file.

    Args:
        path (str): a folder with ``config.json`` and ``model.safetensors`` /
            ``pytorch_model.bin`` (sharded files with their index are read too), or a weights file.

    Returns:
        tuple[dict, dict or None]: the state dict and the parsed ``config.json`` (None when absent).
    """
    config = None
    if os.path.isdir(path):
        cfg_path = os.path.join(path, "config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                config = json.load(f)
        files = []
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = os.path.join(path, index_name)
            if os.path.isfile(index):
                with open(index) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
                files = [os.path.join(path, s) for s in shards]
                break
        if not files:
            for name in ("model.safetensors", "pytorch_model.bin"):
                if os.path.isfile(os.path.join(path, name)):
                    files = [os.path.join(path, name)]
                    break
        if not files:
            _fail(path, "no model.safetensors or pytorch_model.bin in this folder")
    elif os.path.isfile(path):
        files = [path]
        cfg_path = os.path.join(os.path.dirname(path), "config.json")
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                config = json.load(f)
    else:
        _fail(path, "no such file or folder")
    state_dict = OrderedDict()
    for f in files:
        data = _load_weights_file(f, trust_pickle)
        if "model" in data and isinstance(data["model"], dict):
            data = data["model"]
        state_dict.update(data)
    if config is not None and config.get("model_type") not in (None, "deformable_detr"):
        _fail(path, f"config.json has model_type {config.get('model_type')!r}, not deformable_detr")
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
        "deformable_detr_variant": ..., "matching_heuristics": False}`` and its report under
        ``"conversion_report"``.
    """
    if kind == "official":
        sd, args = load_official_checkpoint(path, trust_pickle)
        model, report = convert_official_state_dict(
            sd, keep_all_classes=keep_all_classes, source=path, args=args
        )
    elif kind == "hf":
        sd, config = load_hf_checkpoint(path, trust_pickle)
        model, report = convert_hf_state_dict(
            sd, config, keep_all_classes=keep_all_classes, source=path
        )
    elif kind == "torchvision":
        sd, _ = load_official_checkpoint(path, trust_pickle)
        model, report = convert_torchvision_state_dict(sd, source=path)
    else:
        raise ValueError(f"kind must be 'official', 'hf' or 'torchvision', got {kind!r}")
    variant = dict(report["variant"])
    variant["config_file"] = report["config_file"]
    variant["overrides"] = list(report["overrides"])
    return {
        "model": model,
        "__author__": f"deformable_detr.checkpoint ({kind}: {os.path.basename(path.rstrip('/'))})",
        "deformable_detr_variant": variant,
        "matching_heuristics": False,
        "conversion_report": report,
    }


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
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if path.endswith(".pkl"):
        import pickle

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
    for k, v in report["variant"].items():
        if v is not None:
            lines.append(f"  {k}: {v}")
    lines.append(f"matching config: configs/{report['config_file']}")
    if report["overrides"]:
        lines.append("config overrides needed: " + " ".join(report["overrides"]))
    for note in report["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)
