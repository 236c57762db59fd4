"""Loading weights of another variant is an error, through every path a load can take."""

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer

from deformable_detr.checkpoint import check_state_dict_compatibility, install_strict_loading

ONE_LAYER = ["MODEL.DEFORMABLE_DETR.ENC_LAYERS", "1", "MODEL.DEFORMABLE_DETR.DEC_LAYERS", "1"]


@pytest.fixture(scope="module")
def models(build_ours):
    return {
        "r50": build_ours("r50.yaml", ONE_LAYER)[0],
        "two_stage": build_ours("r50_two_stage.yaml", ONE_LAYER)[0],
        "single_scale": build_ours("r50_single_scale.yaml", ONE_LAYER)[0],
        "r50_91": build_ours("r50.yaml", ONE_LAYER + ["MODEL.DEFORMABLE_DETR.NUM_CLASSES", "91"])[
            0
        ],
    }


def _save(tmp_path, model, name):
    path = str(tmp_path / f"{name}.pth")
    torch.save({"model": model.state_dict(), "matching_heuristics": False}, path)
    return path


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, snapshot):
    return all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "source, target, message",
    [
        ("two_stage", "r50", "the checkpoint is a two-stage model but the model is not"),
        ("r50", "two_stage", "the model is two-stage but the checkpoint is not"),
        ("single_scale", "r50", "the checkpoint has 1 feature levels and the model 4"),
        ("r50_91", "r50", "NUM_CLASSES"),
        ("r50", "r50_91", "NUM_CLASSES"),
    ],
)
def test_wrong_variant_through_checkpointer(models, tmp_path, source, target, message):
    model = install_strict_loading(models[target])
    path = _save(tmp_path, models[source], source)
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match=message):
        DetectionCheckpointer(model).load(path)
    assert _unchanged(model, before)


def test_shape_mismatch_named_with_plain_load_state_dict(models):
    model = install_strict_loading(models["r50"])
    with pytest.raises(RuntimeError) as info:
        model.load_state_dict(models["r50_91"].state_dict())
    text = str(info.value)
    assert "class_embed.0.weight (checkpoint (91, 256), model (80, 256))" in text
    assert "the checkpoint has 91 classes and the model 80" in text


def test_matching_and_backbone_only_checkpoints_load(models, tmp_path):
    model = install_strict_loading(models["r50"])
    install_strict_loading(model)  # a second install is a no-op
    assert len(model._load_state_dict_pre_hooks) == 1
    source = models["r50"].state_dict()
    model.load_state_dict(source)
    backbone = {k: v + 1 for k, v in source.items() if k.startswith("backbone.body.")}
    path = str(tmp_path / "backbone.pth")
    torch.save({"model": backbone}, path)
    DetectionCheckpointer(model).load(path)
    assert torch.equal(
        model.state_dict()["backbone.body.res5.2.conv3.weight"],
        backbone["backbone.body.res5.2.conv3.weight"],
    )

    # A backbone checkpoint with a missing or stray key is refused as well.
    partial = dict(backbone)
    partial.pop("backbone.body.res4.0.shortcut.weight")
    with pytest.raises(RuntimeError, match="backbone.body.res4.0.shortcut.weight"):
        check_state_dict_compatibility(model, partial)
    with pytest.raises(RuntimeError, match="without the transformer: class_embed.0.bias"):
        check_state_dict_compatibility(
            model, dict(backbone, **{k: v for k, v in source.items() if "class_embed.0" in k})
        )
    with pytest.raises(RuntimeError, match="convert it with"):
        check_state_dict_compatibility(model, {"backbone.0.body.conv1.weight": torch.zeros(1)})


def test_unconverted_official_file_is_refused(models, tmp_path):
    model = install_strict_loading(models["r50"])
    renamed = {
        ("transformer." + k[len("transformer.") :] if k.startswith("transformer.") else k): v
        for k, v in models["r50"].state_dict().items()
    }
    renamed = {k.replace("backbone.input_proj.", "input_proj."): v for k, v in renamed.items()}
    with pytest.raises(RuntimeError, match="not in the model: input_proj.0.0.bias"):
        model.load_state_dict(renamed)


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_converted_file_formats_load(models, tmp_path, suffix):
    from deformable_detr.checkpoint import save_converted_checkpoint

    source = {k: v + 0.5 for k, v in models["two_stage"].state_dict().items()}
    path = str(tmp_path / f"converted{suffix}")
    marker = {"two_stage": True, "config_file": "r50_two_stage.yaml"}
    save_converted_checkpoint(
        {"model": source, "__author__": "test", "deformable_detr_variant": marker}, path
    )
    model = install_strict_loading(models["two_stage"])
    DetectionCheckpointer(model).load(path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, source[k]), k
