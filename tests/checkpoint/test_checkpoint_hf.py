"""HF transformers and official checkpoints give the same detections in this project's model.

For every variant, a randomly initialised and perturbed ``DeformableDetrForObjectDetection`` is
saved with ``save_pretrained``, converted with the converter CLI, loaded with Detectron2's
checkpointer into the model built from the matching YAML, and run on the same image. The same
weights are also written in the official release layout and converted from there.
"""

import argparse
import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402

from deformable_detr.checkpoint import hf_to_official_state_dict, install_strict_loading  # noqa

# The 80 COCO category ids in id order (the column of each contiguous class in a 91-way head).
COCO_IDS = (
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28]
    + [31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54]
    + [55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81]
    + [82, 84, 85, 86, 87, 88, 89, 90]
)
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
HEIGHT, WIDTH = 128, 192

VARIANTS = {
    "r50": ({}, "r50.yaml"),
    "box_refine": ({"with_box_refine": True}, "r50_box_refine.yaml"),
    "two_stage": ({"with_box_refine": True, "two_stage": True}, "r50_two_stage.yaml"),
    "single_scale": ({"num_feature_levels": 1}, "r50_single_scale.yaml"),
    "single_scale_dc5": (
        {"num_feature_levels": 1, "dilation": True},
        "r50_single_scale_dc5.yaml",
    ),
}


def _make_hf(perturb, **kwargs):
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

    config = DeformableDetrConfig(
        use_pretrained_backbone=False, encoder_layers=1, decoder_layers=2, num_labels=91, **kwargs
    )
    torch.manual_seed(0)
    model = DeformableDetrForObjectDetection(config).eval()
    return perturb(model, seed=1, bn_prefixes=("model.backbone",))


def _official_layout(hf_state_dict, num_pred, refine, two_stage):
    """The HF weights as an official release stores them, repeated head entries included."""
    sd, _ = hf_to_official_state_dict(hf_state_dict)
    heads, out = {}, {}
    for k, v in sd.items():
        short = k[len("transformer.decoder.") :] if k.startswith("transformer.decoder.") else k
        if short.startswith(("class_embed.", "bbox_embed.")):
            heads.setdefault(short, v)
        else:
            out[k] = v
    suffixes = {(k.split(".")[0], k.split(".", 2)[2]) for k in heads}
    for kind, suffix in sorted(suffixes):
        for j in range(num_pred):
            # HF stores shared heads once; the official files repeat them under every index.
            value = heads.get(f"{kind}.{j}.{suffix}", heads[f"{kind}.0.{suffix}"])
            out[f"{kind}.{j}.{suffix}"] = value
            if (refine and kind == "bbox_embed") or (two_stage and kind == "class_embed"):
                out[f"transformer.decoder.{kind}.{j}.{suffix}"] = value
    return out


def _image():
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, 256, (3, HEIGHT, WIDTH), generator=g).float()


def _compare(model, hf_out, image, two_stage):
    from transformers import DeformableDetrImageProcessor

    with torch.no_grad():
        ours, _ = model.forward_raw([{"image": image}])
        detections = model([{"image": image, "height": HEIGHT, "width": WIDTH}])[0]["instances"]
    ref_logits = hf_out.logits[..., COCO_IDS]
    torch.testing.assert_close(ours["pred_logits"], ref_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours["pred_boxes"], hf_out.pred_boxes, atol=1e-4, rtol=0)
    if two_stage:
        # The encoder head ranks proposals by its first row (raw row 0 of the 91-way head).
        enc = ours["enc_outputs"]
        torch.testing.assert_close(
            enc["pred_logits"][..., 0], hf_out.enc_outputs_class[..., 0], atol=1e-4, rtol=0
        )
        torch.testing.assert_close(
            enc["pred_boxes"], hf_out.enc_outputs_coord_logits.sigmoid(), atol=1e-4, rtol=0
        )

    ref = DeformableDetrImageProcessor().post_process_object_detection(
        SimpleNamespace(logits=ref_logits, pred_boxes=hf_out.pred_boxes),
        threshold=-1.0,
        target_sizes=[(HEIGHT, WIDTH)],
        top_k=100,
    )[0]
    # Detectron2's detector_postprocess clips the boxes to the image.
    ref_boxes = ref["boxes"].clone()
    ref_boxes[:, 0::2] = ref_boxes[:, 0::2].clamp(0, WIDTH)
    ref_boxes[:, 1::2] = ref_boxes[:, 1::2].clamp(0, HEIGHT)
    assert len(detections) == 100
    assert torch.equal(detections.pred_classes, ref["labels"])
    torch.testing.assert_close(detections.scores, ref["scores"], atol=1e-4, rtol=0)
    torch.testing.assert_close(detections.pred_boxes.tensor, ref_boxes, atol=0.01, rtol=0)


def _check_config_cross_check(tmp_path, converter_cli, capsys):
    """A config.json that disagrees with the weights is an error naming the setting."""
    folder = tmp_path / "hf_bad_config"
    shutil.copytree(tmp_path / "hf", folder)
    config = json.loads((folder / "config.json").read_text())
    config["with_box_refine"] = True
    (folder / "config.json").write_text(json.dumps(config))
    argv = ["--from", "hf", "--input", str(folder), "--output", str(tmp_path / "bad.pth")]
    assert converter_cli(argv) == 1
    err = capsys.readouterr().err
    assert "hf_bad_config" in err and "with_box_refine" in err
    assert not (tmp_path / "bad.pth").exists()
    # A bare weights file is understood without its config.
    bare = tmp_path / "bare.safetensors"
    shutil.copy(tmp_path / "hf" / "model.safetensors", bare)
    assert (
        converter_cli(["--from", "hf", "--input", str(bare), "--output", str(tmp_path / "b.pth")])
        == 0
    )
    assert "matching config: configs/r50.yaml" in capsys.readouterr().out


@pytest.mark.parametrize(
    "name",
    [
        "r50",
        "box_refine",
        "two_stage",
        "single_scale",
        "single_scale_dc5",
    ],
)
def test_hf_and_official_checkpoints_match(
    name, tmp_path, perturb, build_ours, converter_cli, small_layers, capsys
):
    hf_kwargs, config_file = VARIANTS[name]
    two_stage = hf_kwargs.get("two_stage", False)
    refine = hf_kwargs.get("with_box_refine", False)
    hf = _make_hf(perturb, **hf_kwargs)
    hf.save_pretrained(tmp_path / "hf")
    image = _image()
    pixel_values = ((image / 255.0 - IMAGENET_MEAN) / IMAGENET_STD)[None]
    with torch.no_grad():
        hf_out = hf(pixel_values=pixel_values)

    out_hf = str(tmp_path / "from_hf.pth")
    assert converter_cli(["--from", "hf", "--input", str(tmp_path / "hf"), "--output", out_hf]) == 0
    printed = capsys.readouterr().out
    assert f"matching config: configs/{config_file}" in printed
    assert (
        "config overrides needed: "
        + " ".join(f"{k} {v}" for k, v in zip(small_layers[::2], small_layers[1::2]))
        in printed
    )

    if name == "r50":
        _check_config_cross_check(tmp_path, converter_cli, capsys)

    model, _ = build_ours(config_file, small_layers)
    install_strict_loading(model)
    DetectionCheckpointer(model).load(out_hf)
    _compare(model, hf_out, image, two_stage)

    # The same weights in the official release layout, with the training args the files carry.
    num_pred = 2 + int(two_stage)
    official = _official_layout(hf.state_dict(), num_pred, refine, two_stage)
    args = argparse.Namespace(
        nheads=8, num_queries=300, dilation=hf_kwargs.get("dilation", False), two_stage=two_stage
    )
    torch.save({"model": official, "args": args, "epoch": 49}, tmp_path / "official.pth")
    out_official = str(tmp_path / "from_official.pth")
    argv = ["--from", "official", "--input", str(tmp_path / "official.pth")]
    assert converter_cli(argv + ["--output", out_official]) == 0
    assert f"matching config: configs/{config_file}" in capsys.readouterr().out
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    DetectionCheckpointer(model).load(out_official)
    _compare(model, hf_out, image, two_stage)
    assert os.path.getsize(out_official) > 0


def test_hf_naming_generations_agree(perturb):
    from deformable_detr.checkpoint import convert_hf_state_dict

    hf = _make_hf(perturb, with_box_refine=True, two_stage=True)
    v5 = hf.state_dict()
    converted, report = convert_hf_state_dict(v5)
    assert report["variant"]["two_stage"] and report["variant"]["with_box_refine"]

    # transformers 4.x names, as in the checkpoints published on the hub with it.
    v4 = {}
    for k, v in v5.items():
        k = k.replace("model.backbone.model.", "model.backbone.conv_encoder.model.")
        k = k.replace(".mlp.fc1.", ".fc1.").replace(".mlp.fc2.", ".fc2.")
        v4[k.replace(".self_attn.o_proj.", ".self_attn.out_proj.")] = v
    # ... and a packed nn.MultiheadAttention projection in one decoder layer.
    p = "model.decoder.layers.1.self_attn."
    for leaf in ("weight", "bias"):
        parts = [v4.pop(f"{p}{c}_proj.{leaf}") for c in "qkv"]
        v4[f"{p}in_proj_{leaf}"] = torch.cat(parts)
    other, _ = convert_hf_state_dict(v4)
    assert set(other) == set(converted)
    for k, v in converted.items():
        assert torch.equal(other[k], v), k
    # The decoder self-attention projections land in nn.MultiheadAttention's row order q, k, v.
    q = v5["model.decoder.layers.0.self_attn.q_proj.weight"]
    k_ = v5["model.decoder.layers.0.self_attn.k_proj.weight"]
    packed = converted["transformer.decoder.layers.0.self_attn.in_proj_weight"]
    assert torch.equal(packed[:256], q) and torch.equal(packed[256:512], k_)


def test_hf_resnet_backbone_names(perturb):
    """A transformers ResNet backbone (not timm) maps onto torchvision's ResNet-50 exactly."""
    import torchvision
    from transformers import ResNetBackbone, ResNetConfig

    torch.manual_seed(0)
    backbone = ResNetBackbone(ResNetConfig(out_features=["stage2", "stage3", "stage4"])).eval()
    perturb(backbone, seed=7, bn_prefixes=("",))
    hf_names = {"model.backbone.model." + k: v for k, v in backbone.state_dict().items()}
    official, _ = hf_to_official_state_dict(hf_names)
    body = {k[len("backbone.0.body.") :]: v for k, v in official.items()}
    net = torchvision.models.resnet50(weights=None).eval()
    missing, unexpected = net.load_state_dict(body, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        feats = backbone(x).feature_maps
        y = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        y = net.layer1(y)
        for layer, ref in zip((net.layer2, net.layer3, net.layer4), feats):
            y = layer(y)
            torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
