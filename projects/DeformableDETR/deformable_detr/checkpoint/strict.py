"""Strict loading of Deformable DETR weights: a checkpoint of another variant is an error.

Detectron2's ``DetectionCheckpointer`` drops keys whose shape differs from the model's and only warns
about missing keys, so two-stage weights loaded into a single-stage config (or a 91-class head into
an 80-class model) would leave randomly initialised heads behind without an error.
:func:`install_strict_loading` adds a ``load_state_dict`` pre-hook to the model that every load goes
through (``DetectionCheckpointer``, ``DefaultPredictor``, ``resume_or_load`` and plain
``load_state_dict``) and raises instead.
"""

import logging

__all__ = ["check_state_dict_compatibility", "install_strict_loading", "is_detector_checkpoint"]

logger = logging.getLogger(__name__)

# Keys that carry no weights: frozen batch norm has no counter, so a stray one is harmless.
_IGNORED_SUFFIXES = ("num_batches_tracked",)
_MAX_LISTED = 8
# Inference with class heads that were never trained is never wanted, so only training may change
# the class count.
_FINE_TUNE_HINT = (
    "Inference, evaluation and export need MODEL.DEFORMABLE_DETR.NUM_CLASSES equal to the "
    "checkpoint's class count; to fine-tune these weights on another set of classes, train with "
    "train_net.py (without --eval-only) and MODEL.WEIGHTS set to this file: the class heads then "
    "start fresh, or from the checkpoint's class of the same name"
)


def is_detector_checkpoint(state_dict):
    """Whether ``state_dict`` holds a full detector (any ``transformer.`` key) or only a backbone."""
    return any(k.startswith("transformer.") for k in state_dict)


def _listing(keys):
    keys = sorted(keys)
    text = ", ".join(keys[:_MAX_LISTED])
    if len(keys) > _MAX_LISTED:
        text += f", ... ({len(keys)} in all)"
    return text


def _diagnose(missing, unexpected, model_shapes, ckpt_shapes):
    """Name the variant mismatch that explains a set of missing / unexpected keys."""
    hints = []
    m_set, u_set = set(missing), set(unexpected)

    def any_with(keys, part):
        return any(part in k for k in keys)

    if any_with(u_set, "transformer.enc_output") and not any_with(m_set, "transformer.enc_output"):
        hints.append(
            "the checkpoint is a two-stage model but the model is not "
            "(MODEL.DEFORMABLE_DETR.TWO_STAGE True, configs/r50_two_stage.yaml)"
        )
    if any_with(m_set, "transformer.enc_output") and not any_with(u_set, "transformer.enc_output"):
        hints.append(
            "the model is two-stage but the checkpoint is not (MODEL.DEFORMABLE_DETR.TWO_STAGE)"
        )
    levels_model = {k.split(".")[2] for k in model_shapes if k.startswith("backbone.input_proj.")}
    levels_ckpt = {k.split(".")[2] for k in ckpt_shapes if k.startswith("backbone.input_proj.")}
    if levels_ckpt and levels_model != levels_ckpt:
        hints.append(
            f"the checkpoint has {len(levels_ckpt)} feature levels and the model "
            f"{len(levels_model)} (MODEL.DEFORMABLE_DETR.NUM_FEATURE_LEVELS, IN_FEATURES)"
        )
    for part, key in (("encoder", "ENC_LAYERS"), ("decoder", "DEC_LAYERS")):
        prefix = f"transformer.{part}.layers."
        n_model = {k.split(".")[3] for k in model_shapes if k.startswith(prefix)}
        n_ckpt = {k.split(".")[3] for k in ckpt_shapes if k.startswith(prefix)}
        if n_ckpt and n_model != n_ckpt:
            hints.append(
                f"the checkpoint has {len(n_ckpt)} {part} layers and the model {len(n_model)} "
                f"(MODEL.DEFORMABLE_DETR.{key})"
            )
    cls = "class_embed.0.weight"
    if cls in model_shapes and cls in ckpt_shapes and model_shapes[cls] != ckpt_shapes[cls]:
        hints.append(
            f"the checkpoint has {ckpt_shapes[cls][0]} classes and the model "
            f"{model_shapes[cls][0]} (MODEL.DEFORMABLE_DETR.NUM_CLASSES; official COCO files have "
            f"91 rows: convert them with tools/convert_checkpoint.py). {_FINE_TUNE_HINT}"
        )
    elif cls in m_set and not (ckpt_shapes.keys() & {"class_embed.1.weight"}):
        hints.append(
            f"no class head of {model_shapes[cls][0]} classes in the checkpoint: either a different "
            "number of classes (MODEL.DEFORMABLE_DETR.NUM_CLASSES; Detectron2's checkpointer drops "
            f"keys whose shape differs) or a file that was not converted. {_FINE_TUNE_HINT}"
        )
    if any_with(u_set, "query_embed") or any_with(m_set, "query_embed"):
        q = "query_embed.weight"
        if q in model_shapes and q in ckpt_shapes and model_shapes[q] != ckpt_shapes[q]:
            hints.append(
                f"the checkpoint has {ckpt_shapes[q][0]} queries and the model {model_shapes[q][0]}"
                " (MODEL.DEFORMABLE_DETR.NUM_QUERIES)"
            )
    if any(k.startswith(("backbone.0.", "input_proj.", "model.")) for k in u_set):
        hints.append(
            "the checkpoint uses official or HF names: convert it with "
            "projects/DeformableDETR/tools/convert_checkpoint.py first"
        )
    return hints


def check_state_dict_compatibility(model, state_dict, prefix=""):
    """Check that ``state_dict`` fits ``model`` exactly, or is a backbone-only initialisation.

    A detector checkpoint (any ``transformer.`` key) must have exactly the model's keys and shapes.
    A backbone-only checkpoint (e.g. converted ImageNet weights) must cover the whole
    ``backbone.body`` with the right shapes and hold nothing else; the rest of the model keeps its
    initialisation.

    Args:
        model (nn.Module): the model to load into.
        state_dict (dict[str, Tensor]): the weights to load; only keys under ``prefix`` are looked at.
        prefix (str): prefix of the model's keys in ``state_dict`` (for a model nested in another).

    Raises:
        RuntimeError: on any mismatch, with the missing, unexpected and wrongly shaped keys and the
            config keys that likely explain them.
    """
    ckpt_shapes = {
        k[len(prefix) :]: tuple(getattr(v, "shape", ()))
        for k, v in state_dict.items()
        if k.startswith(prefix) and not k.endswith(_IGNORED_SUFFIXES)
    }
    model_shapes = {
        k: tuple(v.shape)
        for k, v in model.state_dict().items()
        if not k.endswith(_IGNORED_SUFFIXES)
    }
    detector = is_detector_checkpoint(ckpt_shapes)
    if detector:
        required = set(model_shapes)
        kind = "detector checkpoint"
    else:
        required = {k for k in model_shapes if k.startswith("backbone.body.")}
        kind = "backbone-only checkpoint"
    missing = sorted(required - set(ckpt_shapes))
    unexpected = sorted(set(ckpt_shapes) - set(model_shapes))
    # Heads without a transformer would load half a detector next to random layers.
    partial = (
        []
        if detector
        else sorted(k for k in ckpt_shapes if k in model_shapes and k not in required)
    )
    wrong = sorted(
        k for k in set(ckpt_shapes) & set(model_shapes) if ckpt_shapes[k] != model_shapes[k]
    )
    if not (missing or unexpected or wrong or partial):
        return
    lines = [f"{kind} does not match {type(model).__name__}:"]
    for hint in _diagnose(missing, unexpected, model_shapes, ckpt_shapes):
        lines.append(f"  likely cause: {hint}")
    if wrong:
        lines.append(
            "  shape mismatch: "
            + _listing(f"{k} (checkpoint {ckpt_shapes[k]}, model {model_shapes[k]})" for k in wrong)
        )
    if missing:
        lines.append(
            "  missing from the checkpoint (keys Detectron2's checkpointer dropped for a shape "
            "mismatch appear here too): " + _listing(missing)
        )
    if unexpected:
        lines.append("  not in the model: " + _listing(unexpected))
    if partial:
        lines.append(
            "  only backbone.body weights may come without the transformer: " + _listing(partial)
        )
    if not state_dict:
        lines.append("  the checkpoint is empty")
    raise RuntimeError("\n".join(lines))


def _strict_pre_hook(module, state_dict, prefix, *args, **kwargs):
    check_state_dict_compatibility(module, state_dict, prefix)


def install_strict_loading(model):
    """Make every ``load_state_dict`` on ``model`` fail on weights of another variant.

    Registers a ``load_state_dict`` pre-hook that runs :func:`check_state_dict_compatibility`
    before anything is copied, so a mismatched file leaves the model untouched. Installing twice
    is a no-op.

    Args:
        model (nn.Module): the DeformableDETR model.

    Returns:
        nn.Module: ``model``.
    """
    if getattr(model, "_deformable_detr_strict_loading", False):
        return model
    model.register_load_state_dict_pre_hook(_strict_pre_hook)
    model._deformable_detr_strict_loading = True
    return model
