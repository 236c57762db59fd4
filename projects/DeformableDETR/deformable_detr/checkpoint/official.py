"""Rename rules from the official release (fundamentalvision/Deformable-DETR) to this project, and
the variant read from an official state dict's keys and shapes.

The official layout differs from this project's in four places: the backbone is a torchvision
ResNet under ``backbone.0.body``, the input projections sit at the top (``input_proj``), heads
shared by all decoder layers are repeated per index (and under ``transformer.decoder`` with
refinement or two-stage), and COCO heads have 91 rows indexed by category id.
"""

import re
from collections import OrderedDict

import torch

from .errors import fail
from .resnet import convert_resnet, strip_prefix
from .variant import COCO_CATEGORY_IDS, check_against_model, default_model_config, variant_config

__all__ = ["convert_official_state_dict", "infer_official_variant"]

# Heads of the released COCO models are indexed by the raw category id (0 and the unused ids are
# rows that never see a positive).
NUM_COCO_RAW_CLASSES = 91
_BACKBONE = "backbone.0.body."
_TWO_STAGE_MODULES = ("enc_output", "enc_output_norm", "pos_trans", "pos_trans_norm")
_HEAD_LEAVES = ("weight", "bias")
# Report groups, in the order they are listed; a key belongs to the group of its longest prefix.
_GROUPS = (
    ("backbone", ("backbone.body.",)),
    ("input_proj", ("backbone.input_proj.",)),
    ("transformer (level_embed, reference_points)", ("transformer.",)),
    ("encoder", ("transformer.encoder.",)),
    ("decoder", ("transformer.decoder.",)),
    ("two_stage", tuple(f"transformer.{m}." for m in _TWO_STAGE_MODULES)),
    ("query_embed", ("query_embed.",)),
    ("heads (class_embed, bbox_embed)", ("",)),
)


def _indices(names, pattern):
    """Sorted integer captures of ``pattern`` (one group) over ``names``."""
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for m in map(regex.match, names) if m})


def _contiguous_layers(names, part, source):
    layers = _indices(names, rf"^transformer\.{part}\.layers\.(\d+)\.")
    if not layers or layers != list(range(len(layers))):
        fail(source, f"{part} layers {layers} missing or not contiguous")
    return len(layers)


def _class_head_key(sd, num_dec, two_stage, source):
    if "class_embed.0.weight" in sd:
        key = "class_embed.0.weight"
    elif "transformer.decoder.class_embed.0.weight" in sd:
        key = "transformer.decoder.class_embed.0.weight"
    else:
        fail(source, "no classification head ('class_embed.0.weight') found")
    proposal_heads = (
        f"class_embed.{num_dec}.weight",
        f"transformer.decoder.class_embed.{num_dec}.weight",
    )
    if two_stage and not any(k in sd for k in proposal_heads):
        fail(
            source,
            "'transformer.enc_output.weight' marks a two-stage model, but there is no encoder "
            f"proposal head 'class_embed.{num_dec}' after the {num_dec} decoder heads",
        )
    return key


def infer_official_variant(sd, source, args=None):
    """Read the architecture of an official-layout state dict from its keys and shapes.

    Args:
        sd (dict[str, Tensor]): official-layout weights.
        source (str): name of the file, for messages.
        args (dict or None): the official training arguments (``nheads``, ``dilation``,
            ``num_queries``); what is absent comes from the config defaults.

    Returns:
        OrderedDict: the variant (see :func:`variant_config`).
    """
    if "transformer.level_embed" not in sd:
        fail(source, "no 'transformer.level_embed': not a Deformable DETR checkpoint")
    num_levels, d_model = (int(n) for n in sd["transformer.level_embed"].shape)
    proj = _indices(sd, r"^input_proj\.(\d+)\.")
    if proj != list(range(num_levels)):
        fail(
            source,
            f"input_proj entries {proj} do not match the {num_levels} rows of "
            "'transformer.level_embed'",
        )
    enc, dec = _contiguous_layers(sd, "encoder", source), _contiguous_layers(sd, "decoder", source)
    two_stage = "transformer.enc_output.weight" in sd
    cls_key = _class_head_key(sd, dec, two_stage, source)
    ffn_key = "transformer.encoder.layers.0.linear1.weight"
    enc_aw = "transformer.encoder.layers.0.self_attn.attention_weights.weight"
    dec_aw = "transformer.decoder.layers.0.cross_attn.attention_weights.weight"
    for k in (ffn_key, enc_aw, dec_aw):
        if k not in sd:
            fail(source, f"missing key '{k}'")
    defaults = default_model_config()
    args = args or {}
    nheads = int(args.get("nheads", defaults.NHEADS))
    enc_hp, dec_hp = sd[enc_aw].shape[0] // num_levels, sd[dec_aw].shape[0] // num_levels
    if enc_hp % nheads or dec_hp % nheads:
        fail(source, f"attention_weights rows are not a multiple of {nheads} heads x levels")
    proposals = int(args.get("num_queries", defaults.TWO_STAGE_NUM_PROPOSALS))
    return OrderedDict(
        [
            ("two_stage", two_stage),
            ("with_box_refine", any(k.startswith("transformer.decoder.bbox_embed.") for k in sd)),
            ("num_feature_levels", num_levels),
            ("hidden_dim", d_model),
            ("nheads", nheads),
            ("enc_layers", enc),
            ("dec_layers", dec),
            ("dim_feedforward", int(sd[ffn_key].shape[0])),
            ("enc_n_points", enc_hp // nheads),
            ("dec_n_points", dec_hp // nheads),
            ("num_classes_in_file", int(sd[cls_key].shape[0])),
            (
                "num_queries",
                int(sd["query_embed.weight"].shape[0]) if "query_embed.weight" in sd else None,
            ),
            ("two_stage_num_proposals", proposals if two_stage else None),
            ("dilation", args.get("dilation")),
        ]
    )


def _split(sd, source, key_names):
    """Rename the non-backbone keys; heads are returned separately with all their copies."""
    out, heads = OrderedDict(), {}
    for k, v in sd.items():
        if k.startswith(_BACKBONE):
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
            fail(source, f"unexpected key '{key_names.get(k, k)}'")
    return out, heads


def _heads(sd, heads, variant, source, key_names, notes):
    """One tensor per head key of this project, from the copies the official layout repeats.

    The top-level copy is the one the model uses; the decoder keeps references to the same
    modules (refinement, two-stage), and heads shared across layers may be stored only once.
    """

    def name(k):
        return key_names.get(k, k)

    repeated = 0
    for k in sorted(heads):
        first, *others = heads[k]
        for other in others:
            if not torch.equal(sd[first], sd[other]):
                fail(
                    source,
                    f"'{name(other)}' differs from '{name(first)}' although both hold head '{k}'",
                )
            repeated += 1
    num_pred = variant["dec_layers"] + int(variant["two_stage"])
    out, filled = OrderedDict(), 0
    for i in range(num_pred):
        leaves = [f"class_embed.{i}.{x}" for x in _HEAD_LEAVES]
        leaves += [f"bbox_embed.{i}.layers.{j}.{x}" for j in range(3) for x in _HEAD_LEAVES]
        for leaf in leaves:
            if leaf in heads:
                out[leaf] = sd[heads[leaf][0]]
                continue
            # Missing index i of a shared head: the shared module is the one at index 0.
            if variant["with_box_refine"] and leaf.startswith("bbox_embed."):
                fail(source, f"missing refinement head '{leaf}'")
            base = re.sub(r"^(class_embed|bbox_embed)\.\d+\.", r"\1.0.", leaf)
            if base not in heads:
                fail(source, f"missing head weight '{leaf}'")
            out[leaf] = sd[heads[base][0]]
            filled += 1
    beyond = sorted(k for k in heads if int(k.split(".")[1]) >= num_pred)
    if beyond:
        fail(
            source,
            f"head '{name(heads[beyond[0]][0])}' beyond the {num_pred} prediction heads of "
            f"{variant['dec_layers']} decoder layers",
        )
    if repeated:
        notes.append(
            f"dropped {repeated} repeated head keys (decoder references to the same heads)"
        )
    if filled:
        notes.append(f"filled {filled} keys of shared heads from index 0")
    return out


def _coco_rows(out, variant, source, notes):
    """Keep the class rows of the 80 COCO category ids, in id order, in every class head."""
    enc_head = variant["dec_layers"] if variant["two_stage"] else None
    if enc_head is not None and not variant["with_box_refine"]:
        fail(
            source,
            "two-stage heads shared with the decoder cannot be reduced to 80 classes: the "
            "proposal score is raw row 0, which the decoder heads drop; use keep_all_classes "
            "(--keep-all-classes) and MODEL.DEFORMABLE_DETR.NUM_CLASSES 91",
        )
    for i in range(variant["dec_layers"] + int(variant["two_stage"])):
        rows = COCO_CATEGORY_IDS
        if i == enc_head:
            # Two-stage ranks proposals by row 0 of the encoder head (trained with every target
            # labelled 0), so that row stays first; the others are never positives.
            rows = (0,) + COCO_CATEGORY_IDS[1:]
        for x in _HEAD_LEAVES:
            out[f"class_embed.{i}.{x}"] = out[f"class_embed.{i}.{x}"][torch.tensor(rows)].clone()
    notes.append("kept the class rows of the 80 COCO category ids (of 91), in id order")
    if enc_head is not None:
        notes.append(
            f"encoder proposal head class_embed.{enc_head}: raw row 0 (the proposal score) "
            "kept as row 0, followed by the rows of category ids 2..90"
        )
    return len(COCO_CATEGORY_IDS)


def _group_counts(keys):
    counts = OrderedDict((g, 0) for g, _ in _GROUPS)
    for k in keys:
        matches = [(len(p), g) for g, prefixes in _GROUPS for p in prefixes if k.startswith(p)]
        counts[max(matches)[1]] += 1
    return OrderedDict((g, n) for g, n in counts.items() if n)


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
            ``dilation``, ``num_queries``); without them the config defaults are assumed.
        key_names (dict or None): official name -> name in the source file, for messages.

    Returns:
        tuple[OrderedDict, dict]: the converted state dict and a report
        (see :func:`format_conversion_report`).
    """
    sd = strip_prefix(OrderedDict(state_dict), "module.")
    key_names = key_names or {}
    variant = infer_official_variant(sd, source, args)
    notes = []
    backbone = OrderedDict(
        (k[len(_BACKBONE) :], v) for k, v in sd.items() if k.startswith(_BACKBONE)
    )
    if not backbone:
        fail(source, "no backbone weights ('backbone.0.body.*') found")
    bb_names = {k[len(_BACKBONE) :]: key_names.get(k, k) for k in sd if k.startswith(_BACKBONE)}
    out, variant["backbone_depth"], dropped, names = convert_resnet(
        backbone, source, "backbone.body.", bb_names
    )
    if dropped:
        notes.append(f"dropped {dropped} backbone num_batches_tracked/fc keys")
    rest, heads = _split(sd, source, key_names)
    out.update(rest)
    out.update(_heads(sd, heads, variant, source, key_names, notes))
    if variant["num_classes_in_file"] == NUM_COCO_RAW_CLASSES and not keep_all_classes:
        variant["num_classes"] = _coco_rows(out, variant, source, notes)
    else:
        variant["num_classes"] = variant["num_classes_in_file"]

    cfg, config_file, overrides = variant_config(variant, source)
    names.update(
        {("backbone." + k if k.startswith("input_proj.") else k): key_names.get(k, k) for k in sd}
    )
    check_against_model(out, cfg, source, names)
    if variant["num_feature_levels"] == 1 and variant.get("dilation") is None:
        notes.append(
            "single-scale: DC5 cannot be seen from the keys; use r50_single_scale_dc5.yaml for the "
            "DC5 model"
        )
    out = OrderedDict(sorted(out.items(), key=lambda kv: _sort_key(kv[0])))
    report = {
        "source": "official",
        "counts": _group_counts(out),
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
    return next((i, key) for i, p in enumerate(order + ("",)) if key.startswith(p))
