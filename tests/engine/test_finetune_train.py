"""Fine-tuning through train_net.py: official COCO weights on a 3-class COCO-format dataset named in
DATASETS.REGISTER_COCO, class transfer by name, the inference paths that refuse a class mismatch,
the moving average of the weights, freezing, and every REGISTER_COCO error."""

import importlib.util
import json
import logging
import os
import re

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import DefaultPredictor, default_argument_parser
from PIL import Image

from deformable_detr.checkpoint import COCO_CATEGORY_NAMES
from deformable_detr.config import ConfigError, load_config
from deformable_detr.engine import freeze_parts

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONFIGS = os.path.join(REPO, "projects", "DeformableDETR", "configs")
CLASSES = ["person", "widget", "Dog"]
SMALL = [
    "MODEL.DEFORMABLE_DETR.ENC_LAYERS",
    "1",
    "MODEL.DEFORMABLE_DETR.DEC_LAYERS",
    "2",
    "INPUT.MIN_SIZE_TRAIN",
    "(64,)",
    "INPUT.MAX_SIZE_TRAIN",
    "96",
    "INPUT.MIN_SIZE_TEST",
    "64",
    "INPUT.MAX_SIZE_TEST",
    "96",
    "INPUT.CROP.ENABLED",
    "False",
    "SOLVER.IMS_PER_BATCH",
    "2",
    "DATALOADER.NUM_WORKERS",
    "0",
    "MODEL.DEVICE",
    "cpu",
    "SEED",
    "3",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _load_script(name):
    spec = importlib.util.spec_from_file_location(f"ddetr_{name}", os.path.join(REPO, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_coco(root, classes=CLASSES, num_images=4):
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(num_images):
        Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(
            images_dir / f"{i}.jpg"
        )
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "height": 64, "width": 80})
        for j in range(2):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": (i + j) % len(classes) + 1,
                    "bbox": [5.0 + 20 * j, 6.0, 20.0, 25.0],
                    "area": 500.0,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": k + 1, "name": n} for k, n in enumerate(classes)]
    path = root / "train.json"
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return str(path), str(images_dir)


def _register_opts(name, json_file, image_root):
    return [
        "DATASETS.REGISTER_COCO",
        repr(((name, json_file, image_root),)),
        "DATASETS.TRAIN",
        repr((name,)),
        "DATASETS.TEST",
        repr((name,)),
    ]


def _args(config_file, opts, eval_only=False, resume=False):
    argv = ["--config-file", config_file] + (["--eval-only"] if eval_only else [])
    argv += ["--resume"] if resume else []
    return default_argument_parser().parse_args(argv + list(opts))


@pytest.fixture(scope="module")
def coco_weights(tmp_path_factory):
    """An official-format COCO release (91-row heads) of a small box-refine model, converted."""
    from detectron2.modeling import build_model

    _to_official = _load_script(
        os.path.join("tests", "checkpoint", "test_checkpoint_official.py")
    )._to_official

    tmp = tmp_path_factory.mktemp("coco")
    cfg = load_config(
        os.path.join(CONFIGS, "r50_box_refine.yaml"),
        ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *SMALL[:4]],
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    official = tmp / "official.pth"
    torch.save({"model": _to_official(model, refine=True, two_stage=False)}, official)
    converted = str(tmp / "coco.pth")
    tool = _load_script(
        os.path.join("projects", "DeformableDETR", "tools", "convert_checkpoint.py")
    )
    assert tool.main(["--from", "official", "--input", str(official), "--output", converted]) == 0
    return converted


def test_official_coco_weights_fine_tune_on_three_classes(coco_weights, tmp_path, caplog):
    ckpt = torch.load(coco_weights, weights_only=True)
    assert ckpt["thing_classes"] == list(COCO_CATEGORY_NAMES)
    json_file, image_root = _write_coco(tmp_path / "data")
    out = tmp_path / "out"
    opts = SMALL + _register_opts("ft_three", json_file, image_root)
    opts += ["MODEL.WEIGHTS", coco_weights, "MODEL.DEFORMABLE_DETR.NUM_CLASSES", "3"]
    # A learning rate of 0 keeps the loaded weights, which model_final.pth then shows.
    opts += ["SOLVER.BASE_LR", "0.0", "SOLVER.MAX_ITER", "1", "SOLVER.CHECKPOINT_PERIOD", "1"]
    opts += ["TEST.EVAL_PERIOD", "0"]
    config_file = os.path.join(CONFIGS, "r50_box_refine.yaml")
    train_net = _load_script("train_net.py")
    with caplog.at_level(logging.INFO, logger="deformable_detr"):
        train_net.main(_args(config_file, opts + ["OUTPUT_DIR", str(out)]))
    table = re.search(r"Fine-tuning from .*", caplog.text).group(0)
    assert "80 classes -> 3; 2 class(es) transferred by name, 1 fresh" in table
    assert "from checkpoint row 16 ('dog')" in caplog.text

    final = torch.load(out / "model_final.pth", weights_only=True)
    assert final["thing_classes"] == CLASSES
    person, dog = 0, COCO_CATEGORY_NAMES.index("dog")
    prior = -torch.log(torch.tensor(99.0))
    for k, v in final["model"].items():
        if not k.startswith("class_embed."):
            assert torch.equal(v, ckpt["model"][k]), k
        elif k.endswith("bias"):
            assert v[0] == ckpt["model"][k][person] and v[2] == ckpt["model"][k][dog], k
            assert torch.isclose(v[1], prior), k
        else:
            assert torch.equal(v[0], ckpt["model"][k][person]), k
            assert torch.equal(v[2], ckpt["model"][k][dog]), k
            assert not any(torch.equal(v[1], row) for row in ckpt["model"][k]), k

    # Evaluation, the predictor and export with the 80-class file and 3 classes are refused.
    eval_opts = opts + ["OUTPUT_DIR", str(tmp_path / "eval")]
    with pytest.raises(RuntimeError, match=r"(?s)MODEL\.DEFORMABLE_DETR\.NUM_CLASSES.*fine-tune"):
        train_net.main(_args(config_file, eval_opts, eval_only=True))
    cfg = load_config(config_file, opts)
    with pytest.raises(RuntimeError, match=r"(?s)MODEL\.DEFORMABLE_DETR\.NUM_CLASSES.*fine-tune"):
        DefaultPredictor(cfg)
    export = _load_script(os.path.join("projects", "DeformableDETR", "tools", "export_model.py"))
    with pytest.raises(RuntimeError, match=r"(?s)MODEL\.DEFORMABLE_DETR\.NUM_CLASSES.*fine-tune"):
        export.build_detector(cfg)

    # Without transfer by name every row starts fresh.
    caplog.clear()
    opts_fresh = opts + ["MODEL.DEFORMABLE_DETR.TRANSFER_CLASSES_BY_NAME", "False"]
    opts_fresh += ["OUTPUT_DIR", str(tmp_path / "fresh")]
    with caplog.at_level(logging.INFO, logger="deformable_detr"):
        train_net.main(_args(config_file, opts_fresh))
    assert "0 class(es) transferred by name, 3 fresh" in caplog.text
    final = torch.load(tmp_path / "fresh" / "model_final.pth", weights_only=True)
    assert torch.allclose(final["model"]["class_embed.0.bias"], prior.expand(3))


def _quickstart_opts(tmp_path, name):
    json_file, image_root = _write_coco(tmp_path / "data", classes=["circle", "square"])
    return (
        SMALL
        + _register_opts(name, json_file, image_root)
        + ["MODEL.DEFORMABLE_DETR.NUM_CLASSES", "2", "SOLVER.EMA.ENABLED", "True"]
        + ["SOLVER.EMA.DECAY", "0.5", "SOLVER.EMA.WARMUP", "False", "TEST.EVAL_PERIOD", "0"]
        + ["SOLVER.WARMUP_ITERS", "0"]
    )


def test_ema_is_saved_resumed_exactly_and_evaluated(tmp_path):
    train_net = _load_script("train_net.py")
    config_file = os.path.join(CONFIGS, "quickstart.yaml")
    opts = _quickstart_opts(tmp_path, "ft_ema")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = opts + ["SOLVER.MAX_ITER", "6"]
    train_net.main(_args(config_file, common + ["OUTPUT_DIR", str(straight)]))
    # The same run stopped after 2 iterations and resumed.
    half = common + ["SOLVER.CHECKPOINT_PERIOD", "2", "OUTPUT_DIR", str(resumed)]
    from deformable_detr.engine import Trainer

    class Stop(Exception):
        pass

    original = Trainer.run_step

    def run_step_until_2(self):
        # Iterations 0-2 run; the last checkpoint is after iteration 1.
        if self.iter == 3:
            raise Stop
        return original(self)

    Trainer.run_step = run_step_until_2
    try:
        with pytest.raises(Stop):
            train_net.main(_args(config_file, half))
    finally:
        Trainer.run_step = original
    ckpt = torch.load(resumed / "model_0000001.pth", weights_only=True)
    assert set(ckpt["ema"]) == set(ckpt["model"])
    assert any(not torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in ckpt["model"])
    # Resuming restores the average as saved (not restarted at the model's weights).
    cfg_resumed = load_config(config_file, half)
    trainer = Trainer(cfg_resumed)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 2 and trainer.ema.restored
    for k, v in trainer.ema.state_dict().items():
        assert torch.equal(v, ckpt["ema"][k]), k
    train_net.main(_args(config_file, half, resume=True))
    a = torch.load(straight / "model_final.pth", weights_only=True)
    b = torch.load(resumed / "model_final.pth", weights_only=True)
    assert set(a["ema"]) == set(b["ema"]) and a["iteration"] == b["iteration"] == 5

    # --eval-only evaluates the average; the evaluation hook of training too.
    cfg = load_config(config_file, common + ["OUTPUT_DIR", str(tmp_path / "e")])
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    seen = {}

    def fake_test(cfg, model):
        seen["weights"] = {k: v.clone() for k, v in model.state_dict().items()}
        return {}

    Trainer.test, saved_test = (
        classmethod(lambda cls, cfg, model: fake_test(cfg, model)),
        Trainer.test,
    )
    try:
        eval_opts = common + ["OUTPUT_DIR", str(tmp_path / "e"), "MODEL.WEIGHTS"]
        train_net.main(
            _args(config_file, eval_opts + [str(straight / "model_final.pth")], eval_only=True)
        )
        for k, v in a["ema"].items():
            assert torch.equal(seen["weights"][k], v), k
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer._test_ema()
        for k, v in trainer.ema.module.state_dict().items():
            assert torch.equal(seen["weights"][k], v), k
    finally:
        Trainer.test = saved_test


def test_freeze_parts():
    from detectron2.modeling import build_model

    cfg = load_config(os.path.join(CONFIGS, "quickstart.yaml"), SMALL[:4])
    model = build_model(cfg)
    assert freeze_parts(model, "") == 0
    assert freeze_parts(model, "backbone") > 0
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("backbone.body.") for n in frozen)
    freeze_parts(model, "backbone+encoder")
    for name, p in model.named_parameters():
        fixed = name.startswith(("backbone.", "transformer.encoder.", "transformer.level_embed"))
        assert p.requires_grad != fixed, name
    bad = load_config(
        os.path.join(CONFIGS, "quickstart.yaml"), ["MODEL.DEFORMABLE_DETR.FREEZE", "x"]
    )
    with pytest.raises(ValueError, match="MODEL.DEFORMABLE_DETR.FREEZE"):
        build_model(bad)


def test_register_coco(tmp_path):
    json_file, image_root = _write_coco(tmp_path / "data")
    cfg = load_config(None, _register_opts("ft_reg_ok", json_file, image_root))
    assert MetadataCatalog.get("ft_reg_ok").thing_classes == CLASSES
    assert len(DatasetCatalog.get("ft_reg_ok")) == 4
    # Registering the same files again (every launch worker does) is a no-op.
    load_config(None, _register_opts("ft_reg_ok", json_file, image_root))
    assert cfg.DATASETS.TRAIN == ("ft_reg_ok",)

    bad_json = tmp_path / "bad.json"
    bad_json.write_text(json.dumps({"images": []}))
    not_json = tmp_path / "not.json"
    not_json.write_text("{")
    other_json = tmp_path / "other.json"
    other_json.write_text(open(json_file).read())
    cases = [
        (("ft_reg_1", str(tmp_path / "missing.json"), image_root), "does not exist"),
        (("ft_reg_2", json_file, str(tmp_path / "nofolder")), "image folder"),
        (("ft_reg_3", str(bad_json), image_root), "not in COCO instances format"),
        (("ft_reg_4", str(not_json), image_root), "cannot be read as JSON"),
        (("ft_reg_ok", str(other_json), image_root), "already registered"),
        (("quickstart_train", json_file, image_root), "already registered"),
    ]
    for entry, message in cases:
        with pytest.raises(
            ConfigError, match=rf"DATASETS\.REGISTER_COCO\[0\].*{entry[0]}.*{message}"
        ):
            load_config(None, ["DATASETS.REGISTER_COCO", repr((entry,))])
    with pytest.raises(ConfigError, match=r"DATASETS\.REGISTER_COCO\[1\].*given twice"):
        load_config(
            None,
            [
                "DATASETS.REGISTER_COCO",
                repr((("ft_reg_5", json_file, image_root), ("ft_reg_5", json_file, str(tmp_path)))),
            ],
        )
    with pytest.raises(ConfigError, match=r"DATASETS\.REGISTER_COCO\[0\].*triple"):
        load_config(None, ["DATASETS.REGISTER_COCO", repr((("ft_reg_6", json_file),))])
    assert "ft_reg_1" not in DatasetCatalog.list()
