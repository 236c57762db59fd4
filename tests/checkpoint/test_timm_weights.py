"""Tests of the timm ImageNet weights converter, on timm state dicts made offline with random weights.

The reference is timm itself: its own loader reads the same local file into its feature
extractor, whose features the converted backbone must reproduce exactly.
"""

import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_backbone, build_model

from deformable_detr import add_deformable_detr_config
from deformable_detr.checkpoint import CheckpointConversionError, save_converted_checkpoint
from deformable_detr.checkpoint.timm_weights import (
    convert_timm_checkpoint,
    convert_timm_state_dict,
    load_timm_state_dict,
)
from deformable_detr.modeling.timm_backbone import timm_model_kwargs

timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

CONFIG_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "projects",
    "DeformableDETR",
    "configs",
)
MODELS = {"swin_t.yaml": "swin_tiny_patch4_window7_224", "convnext_t.yaml": "convnext_tiny"}
SMALL = [
    "MODEL.DEFORMABLE_DETR.ENC_LAYERS",
    "1",
    "MODEL.DEFORMABLE_DETR.DEC_LAYERS",
    "1",
    "MODEL.DEFORMABLE_DETR.HIDDEN_DIM",
    "64",
    "MODEL.DEFORMABLE_DETR.DIM_FEEDFORWARD",
    "64",
]


def _cfg(config_name, opts=()):
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIG_DIR, config_name))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""] + SMALL + list(opts))
    return cfg


_SAVED = {}


def _timm_file(tmp_path_factory, model_name, suffix):
    """A random-weight timm classification model of ``model_name`` saved as safetensors / .pth."""
    key = (model_name, suffix)
    if key not in _SAVED:
        torch.manual_seed(1)
        model = timm.create_model(model_name, pretrained=False)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        path = str(tmp_path_factory.mktemp("timm") / f"{model_name}{suffix}")
        if suffix == ".safetensors":
            safetensors_torch.save_file(state, path)
        else:
            torch.save({"state_dict": state}, path)
        _SAVED[key] = path
    return _SAVED[key]


def _timm_reference_features(model_name, path, x):
    """Features of timm's own extractor with the file loaded by timm (local file, no download)."""
    ref = timm.create_model(
        model_name,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=path),
        features_only=True,
        out_indices=(1, 2, 3),
        **timm_model_kwargs(model_name),
    ).eval()
    with torch.no_grad():
        feats = ref(x)
    if str(ref.output_fmt).endswith("NHWC"):
        feats = [f.permute(0, 3, 1, 2) for f in feats]
    return feats


@pytest.mark.parametrize("config_name", sorted(MODELS))
def test_converted_file_loads_as_model_weights(config_name, tmp_path_factory, tmp_path):
    model_name = MODELS[config_name]
    path = _timm_file(tmp_path_factory, model_name, ".safetensors")
    checkpoint = convert_timm_checkpoint(path, model_name)
    report = checkpoint["conversion_report"]
    assert report["source"] == "timm" and report["config_file"] == config_name
    assert report["overrides"] == []
    assert all(k.startswith("backbone.body.model.") for k in checkpoint["model"])
    out = str(tmp_path / "backbone.pth")
    save_converted_checkpoint(checkpoint, out)

    cfg = _cfg(config_name)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    # The project's strict loading accepts a backbone-only file that covers the whole body.
    DetectionCheckpointer(model).load(out)
    x = torch.randn(1, 3, 64, 96)  # multiples of 32: timm needs no padding either
    with torch.no_grad():
        ours = model.backbone.body(x)
    for got, want in zip(ours.values(), _timm_reference_features(model_name, path, x)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_weights_key_loads_at_build_and_pth_equals_safetensors(tmp_path_factory):
    model_name = MODELS["swin_t.yaml"]
    st = _timm_file(tmp_path_factory, model_name, ".safetensors")
    pth = _timm_file(tmp_path_factory, model_name, ".pth")
    a = build_backbone(_cfg("swin_t.yaml", ["MODEL.TIMM.WEIGHTS", st])).state_dict()
    b = build_backbone(_cfg("swin_t.yaml", ["MODEL.TIMM.WEIGHTS", pth])).state_dict()
    source = load_timm_state_dict(st)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    torch.testing.assert_close(
        a["model.layers_2.blocks.5.mlp.fc2.weight"], source["layers.2.blocks.5.mlp.fc2.weight"]
    )


def test_fewer_output_stages_drop_the_later_ones(tmp_path_factory):
    model_name = MODELS["convnext_t.yaml"]
    state = load_timm_state_dict(_timm_file(tmp_path_factory, model_name, ".safetensors"))
    out, report = convert_timm_state_dict(state, model_name, out_indices=[0, 1, 2])
    assert not any(k.startswith("backbone.body.model.stages_3.") for k in out)
    assert any(k.startswith("backbone.body.model.stages_2.") for k in out)
    assert "MODEL.TIMM.OUT_INDICES [0, 1, 2]" in report["overrides"]


def test_original_swin_release_buffers_are_accepted(tmp_path_factory):
    """Microsoft's Swin files also hold the buffers timm recomputes; timm's filter drops them."""
    model_name = MODELS["swin_t.yaml"]
    state = dict(load_timm_state_dict(_timm_file(tmp_path_factory, model_name, ".safetensors")))
    state["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    state["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)
    out, _ = convert_timm_state_dict(state, model_name)
    assert not any("relative_position_index" in k or "attn_mask" in k for k in out)


def test_file_of_another_model_is_named(tmp_path_factory):
    path = _timm_file(tmp_path_factory, MODELS["convnext_t.yaml"], ".safetensors")
    name = os.path.basename(path)
    with pytest.raises(CheckpointConversionError, match=rf"{name}: .*another model"):
        convert_timm_checkpoint(path, MODELS["swin_t.yaml"])


@pytest.mark.parametrize(
    "edit, match",
    [
        ("drop", r"missing 1 weights of 'swin_tiny_patch4_window7_224': layers\.1\.blocks\.0"),
        ("extra", r"does not have: layers\.2\.blocks\.6\.norm1\.weight"),
        ("shape", r"key 'patch_embed\.proj\.weight' has shape \(128, 3, 4, 4\)"),
    ],
)
def test_wrong_variant_names_file_and_key(tmp_path_factory, edit, match):
    model_name = MODELS["swin_t.yaml"]
    state = dict(load_timm_state_dict(_timm_file(tmp_path_factory, model_name, ".safetensors")))
    if edit == "drop":
        del state["layers.1.blocks.0.norm1.weight"]
    elif edit == "extra":
        # A deeper third stage (Swin-S has 18 blocks there).
        state["layers.2.blocks.6.norm1.weight"] = torch.ones(384)
    else:
        # A wider model (Swin-B starts at 128 channels).
        state["patch_embed.proj.weight"] = torch.zeros(128, 3, 4, 4)
    with pytest.raises(CheckpointConversionError, match=rf"my_file\.safetensors: .*{match}"):
        convert_timm_state_dict(state, model_name, source="my_file.safetensors")


def test_unreadable_files_are_named(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointConversionError, match=r"notes\.pth: cannot be read"):
        load_timm_state_dict(str(text))
    with pytest.raises(CheckpointConversionError, match=r"absent\.safetensors: no such file"):
        load_timm_state_dict(str(tmp_path / "absent.safetensors"))
    odd = tmp_path / "odd.pth"
    torch.save({"weights": [1, 2, 3]}, str(odd))
    with pytest.raises(CheckpointConversionError, match=r"odd\.pth: entry 'weights' is not"):
        load_timm_state_dict(str(odd))


def test_converter_cli_from_timm(tmp_path_factory, tmp_path, converter_cli, capsys):
    source = _timm_file(tmp_path_factory, "convnext_tiny", ".safetensors")
    out = str(tmp_path / "convnext_tiny-timm.pth")
    args = ["--from", "timm", "--input", source, "--output", out]
    assert converter_cli(args + ["--timm-model", "convnext_tiny", "--verify"]) == 0
    assert "verified: the weights match the model of configs/convnext_t.yaml" in (
        capsys.readouterr().out
    )
    model = torch.load(out, map_location="cpu", weights_only=False)["model"]
    assert model and all(k.startswith("backbone.body.") for k in model)
    # The model name is needed, and naming the wrong one fails with the file named.
    assert converter_cli(args) == 2
    assert converter_cli(args + ["--timm-model", "swin_tiny_patch4_window7_224"]) == 1
    assert source in capsys.readouterr().err
