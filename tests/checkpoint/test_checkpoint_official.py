"""Official-layout checkpoints: rename rules, 91 -> 80 class rows, variants, and clear failures."""

import argparse
import re
import struct
import zipfile

import pytest
import torch

from deformable_detr.checkpoint import (
    convert_official_state_dict,
    install_strict_loading,
)

# The 80 COCO category ids in id order, as listed in the COCO annotations.
COCO_IDS = (
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28]
    + [31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54]
    + [55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81]
    + [82, 84, 85, 86, 87, 88, 89, 90]
)

VARIANTS = ["r50.yaml", "r50_box_refine.yaml", "r50_two_stage.yaml", "r50_single_scale.yaml"]


def _detectron2_to_torchvision(name):
    """Inverse of the backbone rename, written independently of the converter."""
    name = name.replace("stem.conv1.norm.", "bn1.").replace("stem.conv1.", "conv1.")
    m = re.match(r"res(\d)\.(\d+)\.(.+)$", name)
    if m is None:
        return name
    stage, block, rest = m.groups()
    rest = re.sub(r"^conv(\d)\.norm\.", r"bn\1.", rest)
    rest = rest.replace("shortcut.norm.", "downsample.1.").replace("shortcut.", "downsample.0.")
    return f"layer{int(stage) - 1}.{block}.{rest}"


def _to_official(model, refine, two_stage, dec_layers=2):
    """Our model's weights in the layout of an official release (91-way COCO heads)."""
    g = torch.Generator().manual_seed(3)
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("backbone.body."):
            out["backbone.0.body." + _detectron2_to_torchvision(k[len("backbone.body.") :])] = v
        elif k.startswith("backbone.input_proj."):
            out[k[len("backbone.") :]] = v
        elif k.startswith("class_embed."):
            index = int(k.split(".")[1])
            rows = torch.randn((91,) + tuple(v.shape[1:]), generator=g)
            if two_stage and index == dec_layers:
                rows[0] = v[0]
                rows[COCO_IDS[1:]] = v[1:]
            else:
                rows[COCO_IDS] = v
            out[k] = rows
        else:
            out[k] = v
    if not refine:
        for k in list(out):
            # One shared module: every index holds the same tensors.
            if k.startswith(("class_embed.", "bbox_embed.")):
                out[k] = out[re.sub(r"^(\w+)\.\d+\.", r"\1.0.", k)]
    for k in list(out):
        if (refine and k.startswith("bbox_embed.")) or (two_stage and k.startswith("class_embed.")):
            out["transformer.decoder." + k] = out[k]
    return out


@pytest.fixture
def official_file(tmp_path, build_ours, perturb, small_layers):
    def make(config_file, extra_opts=(), args=None):
        model, cfg = build_ours(config_file, small_layers + list(extra_opts))
        perturb(model, seed=4)
        refine = cfg.MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE
        two_stage = cfg.MODEL.DEFORMABLE_DETR.TWO_STAGE
        sd = _to_official(model, refine, two_stage)
        path = tmp_path / f"official_{config_file.replace('.yaml', '')}.pth"
        data = {"model": sd}
        if args is not None:
            data["args"] = args
        torch.save(data, path)
        return model, sd, str(path)

    return make


@pytest.mark.parametrize("config_file", VARIANTS)
def test_official_round_trip(
    config_file, official_file, converter_cli, build_ours, small_layers, tmp_path
):
    from detectron2.checkpoint import DetectionCheckpointer

    source, official, path = official_file(config_file)
    out = str(tmp_path / "converted.pth")
    assert converter_cli(["--from", "official", "--input", path, "--output", out]) == 0
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["matching_heuristics"] is False
    assert ckpt["deformable_detr_variant"]["config_file"] == config_file
    assert ckpt["deformable_detr_variant"]["num_classes"] == 80
    expected = source.state_dict()
    assert set(ckpt["model"]) == set(expected)
    for k, v in expected.items():
        assert torch.equal(ckpt["model"][k], v), k

    # Through Detectron2's checkpointer into a fresh model of the same config.
    fresh, _ = build_ours(config_file, small_layers)
    install_strict_loading(fresh)
    DetectionCheckpointer(fresh).load(out)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_coco_rows_follow_category_ids(official_file):
    _, official, _ = official_file("r50_two_stage.yaml")
    sd, report = convert_official_state_dict(official)
    raw = official["class_embed.0.weight"]
    # contiguous class 0 is "person" (id 1), 11 is "stop sign" (id 13), 79 "toothbrush" (id 90)
    for contiguous, category_id in ((0, 1), (11, 13), (25, 28), (79, 90)):
        assert torch.equal(sd["class_embed.0.weight"][contiguous], raw[category_id])
    # The two-stage proposal head keeps raw row 0, the score proposals are ranked by.
    assert torch.equal(sd["class_embed.2.weight"][0], official["class_embed.2.weight"][0])
    assert torch.equal(sd["class_embed.2.bias"][1], official["class_embed.2.bias"][2])
    assert report["variant"]["two_stage"] and report["variant"]["with_box_refine"]

    kept, report = convert_official_state_dict(official, keep_all_classes=True)
    assert torch.equal(kept["class_embed.1.weight"], official["class_embed.1.weight"])
    assert "MODEL.DEFORMABLE_DETR.NUM_CLASSES 91" in report["overrides"]


def test_variant_inference_from_keys(official_file):
    _, plain, _ = official_file("r50.yaml")
    _, single, _ = official_file("r50_single_scale.yaml")
    _, refine, _ = official_file("r50_box_refine.yaml")
    found = {}
    for name, sd in (("plain", plain), ("single", single), ("refine", refine)):
        _, report = convert_official_state_dict(sd)
        found[name] = (report["config_file"], report["variant"]["num_feature_levels"])
    assert found == {
        "plain": ("r50.yaml", 4),
        "single": ("r50_single_scale.yaml", 1),
        "refine": ("r50_box_refine.yaml", 4),
    }
    # DC5 is invisible in the keys but recorded in the training args of a release.
    _, report = convert_official_state_dict(single, args={"dilation": True, "nheads": 8})
    assert report["config_file"] == "r50_single_scale_dc5.yaml"


def test_namespace_args_in_file(official_file, converter_cli, tmp_path, capsys):
    args = argparse.Namespace(dilation=True, nheads=8, num_queries=300, lr=2e-4)
    _, _, path = official_file("r50_single_scale.yaml", args=args)
    argv = ["--from", "official", "--input", path, "--output", str(tmp_path / "o.pth")]
    assert converter_cli(argv + ["--verify"]) == 0
    printed = capsys.readouterr().out
    assert "verified: the weights match the model of configs/r50_single_scale_dc5.yaml" in printed
    assert "matching config: configs/r50_single_scale_dc5.yaml" in printed
    for group in ("backbone", "input_proj", "encoder", "decoder", "heads"):
        assert re.search(rf"^\s+{group}\S*.*\s\d+$", printed, re.M), group


def _cli_error(converter_cli, capsys, argv):
    assert converter_cli(argv) == 1
    return capsys.readouterr().err


def test_converter_fails_clearly(official_file, converter_cli, tmp_path, capsys):
    _, official, path = official_file("r50.yaml")
    out = str(tmp_path / "never.pth")

    def broken(change):
        sd = dict(official)
        change(sd)
        p = tmp_path / "broken.pth"
        torch.save({"model": sd}, p)
        return ["--from", "official", "--input", str(p), "--output", out]

    err = _cli_error(
        converter_cli, capsys, broken(lambda sd: sd.update({"foo.weight": torch.zeros(1)}))
    )
    assert "broken.pth" in err and "'foo.weight'" in err
    key = "transformer.decoder.layers.1.norm3.weight"
    err = _cli_error(converter_cli, capsys, broken(lambda sd: sd.pop(key)))
    assert key in err
    key = "transformer.encoder.layers.0.linear2.weight"
    err = _cli_error(
        converter_cli, capsys, broken(lambda sd: sd.update({key: torch.zeros(256, 7)}))
    )
    assert key in err and "(256, 7)" in err
    err = _cli_error(
        converter_cli,
        capsys,
        broken(lambda sd: sd.update({"transformer.enc_output.weight": torch.zeros(256, 256)})),
    )
    assert "enc_output" in err
    err = _cli_error(
        converter_cli, capsys, broken(lambda sd: sd.pop("backbone.0.body.layer3.2.bn2.running_var"))
    )
    assert "res4.2.conv2.norm.running_var" in err
    # A file of another kind.
    tv = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tv)
    err = _cli_error(
        converter_cli, capsys, ["--from", "official", "--input", str(tv), "--output", out]
    )
    assert "resnet.pth" in err and "not a Deformable DETR checkpoint" in err
    err = _cli_error(
        converter_cli, capsys, ["--from", "hf", "--input", str(tmp_path / "nope"), "--output", out]
    )
    assert "nope" in err
    assert not (tmp_path / "never.pth").exists()


@pytest.mark.parametrize("kind", ["empty", "text", "truncated", "corrupt"])
def test_converter_names_an_unreadable_input(kind, official_file, converter_cli, tmp_path, capsys):
    _, _, good = official_file("r50.yaml")
    path = tmp_path / f"{kind}.pth"
    data = open(good, "rb").read()
    if kind == "empty":
        path.write_bytes(b"")
        reason = "empty"
    elif kind == "text":
        path.write_text("this is not a checkpoint\n")
        reason = "not a"
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
        reason = "trunc"
    else:
        # Half of the bytes of the first tensor zeroed: only the zip CRCs can tell.
        path.write_bytes(data)
        with zipfile.ZipFile(path) as archive:
            info = next(i for i in archive.infolist() if i.filename.endswith("data/0"))
        with open(path, "r+b") as f:
            f.seek(info.header_offset)
            name_len, extra_len = struct.unpack("<HH", f.read(30)[26:30])
            f.seek(info.header_offset + 30 + name_len + extra_len)
            f.write(b"\x00" * (info.file_size // 2))
        reason = "corrupt"
    out = tmp_path / "never.pth"
    err = _cli_error(
        converter_cli, capsys, ["--from", "official", "--input", str(path), "--output", str(out)]
    )
    assert str(path) in err and reason in err, err
    assert not out.exists()
