"""torchvision ImageNet ResNet-50 -> Detectron2 backbone weights: the same features."""

import pytest
import torch
import torchvision

from deformable_detr.checkpoint import install_strict_loading

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _torchvision_features(net, x):
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    feats = {}
    for i in range(1, 5):
        x = getattr(net, f"layer{i}")(x)
        feats[f"res{i + 1}"] = x
    return feats


def _perturbed_resnet(perturb, **kwargs):
    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None, **kwargs).eval()
    perturb(net, seed=5, bn_prefixes=("",))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                g = torch.Generator().manual_seed(m.num_features)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.4 + 0.1)
                m.bias.normal_(0, 0.1, generator=g)
    return net


def _convert_and_load(net, tmp_path, converter_cli, build_ours, config_file):
    src = tmp_path / "resnet50.pth"
    torch.save(net.state_dict(), src)
    out = str(tmp_path / "R-50.pth")
    assert converter_cli(["--from", "torchvision", "--input", str(src), "--output", out]) == 0
    from detectron2.checkpoint import DetectionCheckpointer

    model, _ = build_ours(
        config_file,
        ["MODEL.DEFORMABLE_DETR.ENC_LAYERS", "1", "MODEL.DEFORMABLE_DETR.DEC_LAYERS", "1"],
    )
    install_strict_loading(model)
    # Backbone-only weights may leave the transformer and heads at their initialisation.
    before = model.transformer.level_embed.clone()
    DetectionCheckpointer(model).load(out)
    assert torch.equal(model.transformer.level_embed, before)
    return model


def _compare(model, net, levels):
    g = torch.Generator().manual_seed(6)
    image = torch.randint(0, 256, (3, 96, 128), generator=g).float()
    with torch.no_grad():
        ours = model.backbone.body(((image - model.pixel_mean) / model.pixel_std)[None])
        ref = _torchvision_features(net, (image[None] / 255.0 - MEAN) / STD)
    for level in levels:
        torch.testing.assert_close(ours[level], ref[level], atol=1e-4, rtol=1e-4)


def test_torchvision_resnet50_features(tmp_path, perturb, converter_cli, build_ours, capsys):
    net = _perturbed_resnet(perturb)
    model = _convert_and_load(net, tmp_path, converter_cli, build_ours, "r50.yaml")
    assert "backbone" in capsys.readouterr().out
    _compare(model, net, ["res3", "res4", "res5"])


def test_torchvision_resnet50_dc5_features(tmp_path, perturb, converter_cli, build_ours):
    net = _perturbed_resnet(perturb, replace_stride_with_dilation=[False, False, True])
    model = _convert_and_load(net, tmp_path, converter_cli, build_ours, "r50_single_scale_dc5.yaml")
    _compare(model, net, ["res5"])


def test_torchvision_rejects_other_files(tmp_path, converter_cli, capsys):
    sd = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(sd, tmp_path / "r18.pth")
    argv = ["--from", "torchvision", "--input", str(tmp_path / "r18.pth")]
    assert converter_cli(argv + ["--output", str(tmp_path / "o.pth")]) == 1
    err = capsys.readouterr().err
    # ResNet-18 has two blocks per stage; the message names the file and what it found.
    assert "r18.pth" in err and "(2, 2, 2, 2)" in err
