"""Loading detector weights trained on another class set, for fine-tuning.

Only the class heads (``class_embed.{i}``: one per decoder layer, and the encoder's proposal head in
two-stage mode) may have another row count than the model; every other weight still has to fit
exactly, which the strict loading checks afterwards. :func:`adapt_class_heads` gives the heads the
model's shape: each model row starts as the freshly built model's row (the focal prior bias and the
weight initialisation, taken from the model itself before anything is loaded), and, with transfer
by name, a class whose name is also a class of the checkpoint takes that class's row in every head.
:func:`format_fine_tune_table` is the table logged when training starts.
"""

import re

import torch
from tabulate import tabulate

__all__ = ["adapt_class_heads", "class_head_keys", "format_fine_tune_table"]

_CLASS_HEAD = re.compile(r"^class_embed\.(\d+)\.(weight|bias)$")


def class_head_keys(keys):
    """The class-head keys among ``keys`` (``class_embed.{i}.weight`` / ``.bias``)."""
    return [k for k in keys if _CLASS_HEAD.match(k)]


def _normalised(name):
    return str(name).strip().casefold() if name is not None else ""


def _row_sources(file_classes, model_classes, num_model_rows, num_file_rows):
    """For every model row, the checkpoint row with the same class name, or None."""
    first = {}
    for i, name in enumerate(list(file_classes or ())[:num_file_rows]):
        key = _normalised(name)
        if key and key not in first:
            first[key] = i
    names = list(model_classes or ())
    return [
        first.get(_normalised(names[j])) if j < len(names) else None for j in range(num_model_rows)
    ]


def _num_rows(shapes):
    counts = {shape[0] for shape in shapes if len(shape) >= 1}
    return counts.pop() if len(counts) == 1 else None


def adapt_class_heads(model, state_dict, file_classes, model_classes, transfer_by_name=True):
    """Give the class heads of ``state_dict`` the model's class count, for fine-tuning.

    Nothing changes unless every class-head key of the checkpoint differs from the model's in its
    row count alone (same input width, one row count throughout); any other difference is left
    for the strict loading to report.

    Args:
        model (nn.Module): the freshly built DeformableDETR (not yet loaded): its class heads are
            the fresh rows.
        state_dict (dict[str, Tensor]): the checkpoint's weights, with this project's names.
        file_classes (list[str] or None): class names of the checkpoint's rows, if it has them.
        model_classes (list[str] or None): class names of the model's rows (the training
            dataset's ``thing_classes``).
        transfer_by_name (bool): copy the row of a checkpoint class with the same name
            (case-insensitive); the encoder proposal head of a two-stage model also keeps its
            row 0, the class-agnostic proposal score.

    Returns:
        tuple[dict, dict or None]: the state dict to load (a new dict when heads were changed) and
        a report for :func:`format_fine_tune_table` (None when no head was changed).
    """
    model_sd = model.state_dict()
    heads = class_head_keys(model_sd)
    if not heads or not all(k in state_dict for k in heads):
        return state_dict, None
    file_shapes = {k: tuple(getattr(state_dict[k], "shape", ())) for k in heads}
    model_shapes = {k: tuple(model_sd[k].shape) for k in heads}
    if all(file_shapes[k] == model_shapes[k] for k in heads):
        return state_dict, None
    num_file = _num_rows(file_shapes.values())
    if num_file is None or any(
        len(file_shapes[k]) != len(model_shapes[k]) or file_shapes[k][1:] != model_shapes[k][1:]
        for k in heads
    ):
        return state_dict, None
    num_model = model_shapes[heads[0]][0]
    sources = (
        _row_sources(file_classes, model_classes, num_model, num_file)
        if transfer_by_name
        else [None] * num_model
    )
    proposal_head = len(model.class_embed) - 1 if getattr(model, "two_stage", False) else None
    adapted = dict(state_dict)
    for key in heads:
        index = int(_CLASS_HEAD.match(key).group(1))
        old = torch.as_tensor(state_dict[key])
        new = model_sd[key].detach().clone()
        rows = list(enumerate(sources))
        if index == proposal_head:
            # The encoder head is trained with every object labelled 0: its row 0 scores
            # proposals for any class, and row 0 of the checkpoint is that score, not a class.
            rows = [(0, 0 if transfer_by_name else None)] + [
                (j, i if i else None) for j, i in rows[1:]
            ]
        for j, i in rows:
            if i is not None:
                new[j] = old[i].to(new.dtype)
        adapted[key] = new
    names = list(model_classes or ())
    file_names = list(file_classes or ())
    report = {
        "num_file_classes": num_file,
        "num_model_classes": num_model,
        "head_keys": heads,
        "num_heads": len({int(_CLASS_HEAD.match(k).group(1)) for k in heads}),
        "num_exact": sum(1 for k in state_dict if k not in heads),
        "transfer_by_name": transfer_by_name,
        "file_has_names": bool(file_names),
        "two_stage": proposal_head is not None,
        "rows": [
            (
                j,
                names[j] if j < len(names) else "",
                i,
                file_names[i] if i is not None and i < len(file_names) else "",
            )
            for j, i in enumerate(sources)
        ],
    }
    return adapted, report


def format_fine_tune_table(report, source=""):
    """The log table of a fine-tuning load: what was loaded, transferred by name, and fresh.

    Args:
        report (dict): from :func:`adapt_class_heads`.
        source (str): the weights file, for the title.

    Returns:
        str
    """
    transferred = sum(1 for *_, i, _ in report["rows"] if i is not None)
    fresh = report["num_model_classes"] - transferred
    if not report["transfer_by_name"]:
        why = " (MODEL.DEFORMABLE_DETR.TRANSFER_CLASSES_BY_NAME is False)"
    elif not report["file_has_names"]:
        why = " (the checkpoint has no class names)"
    else:
        why = ""
    title = (
        f"Fine-tuning from {source or 'MODEL.WEIGHTS'}: class heads of "
        f"{report['num_file_classes']} classes -> {report['num_model_classes']}; "
        f"{transferred} class(es) transferred by name, {fresh} fresh{why}"
    )
    summary = [
        ["everything but the class heads", report["num_exact"], "loaded exactly"],
        [
            f"class heads ({report['num_heads']} distinct)",
            len(report["head_keys"]),
            "rebuilt: rows below",
        ],
    ]
    lines = [title, tabulate(summary, headers=["weights", "tensors", "how"], tablefmt="pipe")]
    rows = []
    for j, name, i, file_name in report["rows"]:
        how = (
            f"from checkpoint row {i} ({file_name!r})"
            if i is not None
            else "fresh (focal prior init)"
        )
        rows.append([j, name, how])
    if report["two_stage"]:
        rows.append(
            [
                "-",
                "(encoder proposal score)",
                (
                    "row 0 of the encoder head, from the checkpoint"
                    if report["transfer_by_name"]
                    else "fresh (focal prior init)"
                ),
            ]
        )
    lines.append(tabulate(rows, headers=["row", "class", "every class head"], tablefmt="pipe"))
    return "\n".join(lines)
