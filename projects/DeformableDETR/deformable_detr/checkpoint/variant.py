"""From an inferred variant to this project's config and model: which YAML of ``configs/`` builds
it, the overrides it needs on top, and the shape check of converted weights against the model
built from them (``build_model(cfg).state_dict()``)."""

import functools
import os

from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

from .errors import fail

__all__ = [
    "CONFIG_DIR",
    "COCO_CATEGORY_IDS",
    "COCO_CATEGORY_NAMES",
    "check_against_model",
    "default_model_config",
    "variant_config",
]

CONFIG_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs"
)

_COCO_THINGS = sorted((c for c in COCO_CATEGORIES if c["isthing"]), key=lambda c: c["id"])
# The 80 category ids COCO uses, in id order: row k of an 80-class head is category id k here.
COCO_CATEGORY_IDS = tuple(c["id"] for c in _COCO_THINGS)
COCO_CATEGORY_NAMES = tuple(c["name"] for c in _COCO_THINGS)

# Variant fields and the config keys they set, in the order overrides are listed.
_VARIANT_KEYS = (
    ("with_box_refine", "MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE"),
    ("backbone_depth", "MODEL.RESNETS.DEPTH"),
    ("num_classes", "MODEL.DEFORMABLE_DETR.NUM_CLASSES"),
    ("hidden_dim", "MODEL.DEFORMABLE_DETR.HIDDEN_DIM"),
    ("nheads", "MODEL.DEFORMABLE_DETR.NHEADS"),
    ("enc_layers", "MODEL.DEFORMABLE_DETR.ENC_LAYERS"),
    ("dec_layers", "MODEL.DEFORMABLE_DETR.DEC_LAYERS"),
    ("dim_feedforward", "MODEL.DEFORMABLE_DETR.DIM_FEEDFORWARD"),
    ("enc_n_points", "MODEL.DEFORMABLE_DETR.ENC_N_POINTS"),
    ("dec_n_points", "MODEL.DEFORMABLE_DETR.DEC_N_POINTS"),
    ("num_queries", "MODEL.DEFORMABLE_DETR.NUM_QUERIES"),
    ("two_stage_num_proposals", "MODEL.DEFORMABLE_DETR.TWO_STAGE_NUM_PROPOSALS"),
    ("num_feature_levels", "MODEL.DEFORMABLE_DETR.NUM_FEATURE_LEVELS"),
)


def _base_cfg(config_file=None):
    from ..config import load_config

    path = None if config_file is None else os.path.join(CONFIG_DIR, config_file)
    if path is not None and not os.path.isfile(path):
        raise FileNotFoundError(f"config {path} not found: the converter reads configs/ there")
    return load_config(path, freeze=False)


@functools.lru_cache(maxsize=None)
def default_model_config():
    """``cfg.MODEL.DEFORMABLE_DETR`` as ``add_deformable_detr_config`` sets it (read-only)."""
    return _base_cfg().MODEL.DEFORMABLE_DETR.clone()


def _config_file(variant):
    if "two_stage" not in variant:
        return "Base-DeformableDETR.yaml"
    if variant["two_stage"]:
        return "r50_two_stage.yaml"
    if variant["with_box_refine"]:
        return "r50_box_refine.yaml"
    if variant["num_feature_levels"] == 1:
        return "r50_single_scale_dc5.yaml" if variant.get("dilation") else "r50_single_scale.yaml"
    return "r50.yaml"


def variant_config(variant, source):
    """The YAML of ``configs/`` that builds ``variant`` and the overrides it needs on top.

    Args:
        variant (dict): fields of :data:`_VARIANT_KEYS` (None or absent: the YAML's value).
        source (str): name of the file, for messages.

    Returns:
        tuple[CfgNode, str, list[str]]: the config (on the CPU, no weights), the YAML's name, and
        the overrides as ``"KEY VALUE"`` strings.
    """
    config_file = _config_file(variant)
    try:
        cfg = _base_cfg(config_file)
    except FileNotFoundError as e:
        fail(source, str(e))
    overrides = []
    for field, key in _VARIANT_KEYS:
        value = variant.get(field)
        node, leaf = key.rsplit(".", 1)
        if value is None or value == getattr(_node(cfg, node), leaf):
            continue
        overrides.append(f"{key} {value}")
    opts = [part for item in overrides for part in item.split(" ", 1)]
    try:
        cfg.merge_from_list(opts + ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    except (KeyError, ValueError) as e:
        fail(source, f"configs/{config_file} with {' '.join(overrides)} cannot be built: {e}")
    return cfg, config_file, overrides


def _node(cfg, dotted):
    """The sub-node of ``cfg`` at ``dotted`` (e.g. "MODEL.RESNETS")."""
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@functools.lru_cache(maxsize=8)
def _model_shapes(cfg_dump):
    from detectron2.config import CfgNode
    from detectron2.modeling import build_model

    cfg = CfgNode.load_cfg(cfg_dump)
    return {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}


def check_against_model(state_dict, cfg, source, key_names=None, prefix=""):
    """Fail on a missing, unexpected or wrongly shaped key, comparing with ``build_model(cfg)``.

    Args:
        state_dict (dict[str, Tensor]): converted weights.
        cfg (CfgNode): the config of the variant (:func:`variant_config`).
        source (str): name of the file, for messages.
        key_names (dict or None): converted key -> name in the file, for messages.
        prefix (str): only keys under this prefix are compared (e.g. "backbone.body.").
    """
    key_names = key_names or {}
    try:
        shapes = _model_shapes(cfg.dump())
    except ValueError as e:
        fail(source, f"the weights describe a model this project cannot build: {e}")
    shapes = {k: v for k, v in shapes.items() if k.startswith(prefix)}
    for k, shape in shapes.items():
        group = "backbone" if k.startswith("backbone.body.") else "detector"
        if k not in state_dict:
            fail(source, f"missing {group} weight '{k}' (expected shape {shape})")
        got = tuple(state_dict[k].shape)
        if got != shape:
            fail(source, f"{group} key '{key_names.get(k, k)}' has shape {got}, expected {shape}")
    for k in state_dict:
        if k.startswith(prefix) and k not in shapes:
            fail(source, f"unexpected key '{key_names.get(k, k)}' for the model of this variant")
