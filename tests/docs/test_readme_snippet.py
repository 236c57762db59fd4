"""The README's "Use it in your app" snippet runs as written."""

import os
import re

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Instances
from helpers import REPO_ROOT as ROOT

from deformable_detr import add_deformable_detr_config


def _snippet(section):
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    start = text.index(f"## {section}")
    match = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert match, f"no python block in README section {section!r}"
    return match.group(1)


def test_use_it_in_your_app_snippet(tmp_path, monkeypatch):
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", "quickstart.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    model = build_model(cfg)
    os.makedirs(tmp_path / "output" / "quickstart")
    DetectionCheckpointer(model, save_dir=str(tmp_path / "output" / "quickstart")).save(
        "model_final"
    )
    os.symlink(os.path.join(ROOT, "configs"), tmp_path / "configs")
    monkeypatch.chdir(tmp_path)

    namespace = {}
    exec(compile(_snippet("Use it in your app"), "README.md", "exec"), namespace)

    instances = namespace["instances"]
    assert isinstance(instances, Instances)
    assert instances.image_size == (240, 320)
    assert 0 < len(instances) <= cfg.TEST.DETECTIONS_PER_IMAGE
    boxes = instances.pred_boxes.tensor
    assert bool(((boxes[:, 0] >= 0) & (boxes[:, 2] <= 320) & (boxes[:, 3] <= 240)).all())
    assert (tmp_path / "detections.png").stat().st_size > 0
