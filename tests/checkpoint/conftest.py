"""Shared helpers of the checkpoint tests: model building, weight perturbation, the converter CLI."""

import importlib.util
import os

import pytest
import torch
from helpers import CONFIG_DIR, TOOLS_DIR

TOOL = os.path.join(TOOLS_DIR, "convert_checkpoint.py")

# Encoder and decoder depth of every test model (both sides reduced equally); two decoder layers
# keep the difference between shared and per-layer heads visible.
SMALL_LAYERS = ["MODEL.DEFORMABLE_DETR.ENC_LAYERS", "1", "MODEL.DEFORMABLE_DETR.DEC_LAYERS", "2"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _build(config_file, opts=()):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from deformable_detr import add_deformable_detr_config

    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIG_DIR, config_file))
    cfg.merge_from_list(list(opts) + ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    torch.manual_seed(0)
    return build_model(cfg).eval(), cfg


@pytest.fixture(scope="session")
def build_ours():
    """``build_ours(config_file, opts) -> (model, cfg)`` from a YAML of configs/."""
    return _build


def _perturb(module, seed, bn_prefixes=("backbone",)):
    """Move every parameter away from its initialisation and give frozen BN real statistics.

    Frozen batch norm keeps weight, bias, running_mean and running_var as buffers: all four get
    random values (a zero-initialised last BN would otherwise hide whole residual branches).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            # A wider spread for the class heads keeps the top-100 scores well apart.
            scale = 0.2 if "class_embed" in name else 0.02
            p.add_(torch.randn(p.shape, generator=g) * scale)
        for name, b in module.named_buffers():
            if not name.startswith(bn_prefixes) or not b.is_floating_point():
                continue
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
            elif name.endswith("weight"):
                b.copy_(torch.rand(b.shape, generator=g) * 0.4 + 0.1)
            elif name.endswith("bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return module


@pytest.fixture
def perturb():
    """``perturb(module, seed, bn_prefixes)``: see ``_perturb``."""
    return _perturb


@pytest.fixture(scope="session")
def converter_cli():
    """The ``main(argv) -> exit status`` of tools/convert_checkpoint.py, imported in process."""
    spec = importlib.util.spec_from_file_location("convert_checkpoint_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture
def small_layers():
    return list(SMALL_LAYERS)
