"""Rename rules from HF transformers ``DeformableDetrForObjectDetection`` to the official layout.

Both naming generations are understood: transformers 5.x (``model.backbone.model.*``, ``mlp.fc1``,
decoder ``self_attn.{q,k,v,o}_proj``) and 4.x with the checkpoints published on the hub with it
(``model.backbone.conv_encoder.model.*``, plain ``fc1``, ``self_attn.out_proj``), with a timm or a
transformers ResNet backbone. The official layout is then converted by
:func:`convert_official_state_dict`.
"""

import re
from collections import OrderedDict

import torch

from .errors import fail
from .official import convert_official_state_dict
from .resnet import hf_resnet_to_torchvision_name

__all__ = ["convert_hf_state_dict", "hf_to_official_state_dict"]

_BACKBONE_PREFIXES = ("model.backbone.conv_encoder.model.", "model.backbone.model.")
_FFN = {"fc1": "linear1", "fc2": "linear2", "mlp.fc1": "linear1", "mlp.fc2": "linear2"}
_ENCODER_LAYER = dict(_FFN, self_attn_layer_norm="norm1", final_layer_norm="norm2")
_DECODER_LAYER = dict(
    _FFN,
    self_attn_layer_norm="norm2",
    encoder_attn_layer_norm="norm1",
    final_layer_norm="norm3",
    **{"self_attn.out_proj": "self_attn.out_proj", "self_attn.o_proj": "self_attn.out_proj"},
)
# Deformable attention modules: same leaves, another name in the decoder.
_DEFORMABLE = {"encoder": ("self_attn.", "self_attn."), "decoder": ("encoder_attn.", "cross_attn.")}
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LAYER = re.compile(r"^model\.(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_IN_PROJ = re.compile(r"^model\.decoder\.layers\.(\d+)\.self_attn\.(in_proj_weight|in_proj_bias)$")
_TOP = {
    "model.level_embed": "transformer.level_embed",
    "model.query_position_embeddings.weight": "query_embed.weight",
}
_TO_TRANSFORMER = tuple(
    f"model.{m}."
    for m in ("enc_output", "enc_output_norm", "pos_trans", "pos_trans_norm", "reference_points")
) + ("model.decoder.bbox_embed.", "model.decoder.class_embed.")


def _top_level_name(k):
    """Official name of an HF key outside the encoder/decoder layers, None for a layer key."""
    bb = next((p for p in _BACKBONE_PREFIXES if k.startswith(p)), None)
    if bb is not None:
        return "backbone.0.body." + hf_resnet_to_torchvision_name(k[len(bb) :])
    if k in _TOP:
        return _TOP[k]
    if k.startswith("model.input_proj."):
        return k[len("model.") :]
    if k.startswith(_TO_TRANSFORMER):
        return "transformer." + k[len("model.") :]
    if k.startswith(("class_embed.", "bbox_embed.")):
        return k
    m = _IN_PROJ.match(k)
    if m is not None:
        # Packed projection of an nn.MultiheadAttention: already the official layout.
        return f"transformer.decoder.layers.{m.group(1)}.self_attn.{m.group(2)}"
    return None


def _layer_name(k, source):
    """Official name of an encoder/decoder layer key; ("qkv", prefix, leaf, part) for q/k/v."""
    m = _LAYER.match(k)
    if m is None:
        fail(source, f"unexpected key '{k}'")
    part, n, module, leaf = m.groups()
    prefix = f"transformer.{part}.layers.{n}."
    hf_attn, attn = _DEFORMABLE[part]
    table = _ENCODER_LAYER if part == "encoder" else _DECODER_LAYER
    if module.startswith(hf_attn):
        return prefix + attn + module[len(hf_attn) :] + "." + leaf
    if module in table:
        return prefix + table[module] + "." + leaf
    if part == "decoder" and module in _QKV:
        return ("qkv", prefix, leaf, module[len("self_attn.")])
    fail(source, f"unexpected {part} key '{k}'")


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
    out, names, qkv = OrderedDict(), {}, {}
    for k, v in state_dict.items():
        new = _top_level_name(k) or _layer_name(k, source)
        if isinstance(new, tuple):
            _, prefix, leaf, which = new
            qkv.setdefault((prefix, leaf), {})[which] = k
            continue
        if new in out:
            fail(source, f"keys '{names[new]}' and '{k}' both map to '{new}'")
        out[new], names[new] = v, k
    for (prefix, leaf), parts in sorted(qkv.items()):
        missing = [c for c in "qkv" if c not in parts]
        if missing:
            fail(source, f"decoder self-attention {prefix} lacks {missing[0]}_proj.{leaf}")
        tensors = [state_dict[parts[c]] for c in "qkv"]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) != 1:
            fail(source, f"q/k/v projections of '{parts['q']}' have different shapes {shapes}")
        new = prefix + "self_attn.in_proj_" + leaf
        if new in out:
            fail(source, f"both in_proj and q/k/v projections found for '{new}'")
        out[new], names[new] = torch.cat(tensors, dim=0), parts["q"]
    return out, names


# config.json fields and the variant fields they must agree with.
_HF_CONFIG_FIELDS = {
    "two_stage": "two_stage",
    "with_box_refine": "with_box_refine",
    "num_feature_levels": "num_feature_levels",
    "encoder_layers": "enc_layers",
    "decoder_layers": "dec_layers",
    "d_model": "hidden_dim",
    "encoder_n_points": "enc_n_points",
    "decoder_n_points": "dec_n_points",
}


def _args_from_hf_config(hf_config, source):
    nheads = int(hf_config.get("encoder_attention_heads", 8))
    if int(hf_config.get("decoder_attention_heads", nheads)) != nheads:
        fail(source, "encoder and decoder attention heads differ; this model has one NHEADS")
    proposals = hf_config.get("two_stage_num_proposals", hf_config.get("num_queries", 300))
    return {
        "nheads": nheads,
        "dilation": bool(hf_config.get("dilation", False)),
        "num_queries": int(proposals),
    }


def _cross_check(hf_config, variant, source):
    for key, field in _HF_CONFIG_FIELDS.items():
        if key in hf_config and hf_config[key] != variant[field]:
            fail(
                source,
                f"config.json says {key}={hf_config[key]!r} but the weights give {variant[field]!r}",
            )
    labels = hf_config.get("id2label")
    if labels is not None and len(labels) != variant["num_classes_in_file"]:
        fail(
            source,
            f"config.json has {len(labels)} labels but class_embed has "
            f"{variant['num_classes_in_file']} rows",
        )


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
    args = _args_from_hf_config(hf_config, source) if hf_config else {}
    out, report = convert_official_state_dict(
        official, keep_all_classes=keep_all_classes, source=source, args=args, key_names=names
    )
    report["source"] = "hf"
    if hf_config:
        _cross_check(hf_config, report["variant"], source)
    return out, report
