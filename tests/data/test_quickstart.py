"""Tests of the synthetic quickstart dataset: determinism, COCO validity, caching, registration."""

import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, BoxMode, Instances
from PIL import Image
from pycocotools.coco import COCO

from deformable_detr.data import quickstart as qs


def _tree(root):
    """Relative path -> bytes of every file under ``root``."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("qs") / "quickstart")
    qs.ensure_quickstart_dataset(root, num_train=30, num_val=6)
    return root


def test_generation_is_deterministic(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    qs.generate_quickstart_dataset(a, num_train=4, num_val=2, seed=3)
    qs.generate_quickstart_dataset(b, num_train=4, num_val=2, seed=3)
    tree_a, tree_b = _tree(a), _tree(b)
    assert sorted(tree_a) == sorted(tree_b)
    assert len([k for k in tree_a if k.endswith(".jpg")]) == 6
    for key in tree_a:
        assert tree_a[key] == tree_b[key], key

    # Another seed gives other pictures; fewer pictures give the same first ones.
    c, d = str(tmp_path / "c"), str(tmp_path / "d")
    qs.generate_quickstart_dataset(c, num_train=2, num_val=0, seed=4)
    qs.generate_quickstart_dataset(d, num_train=2, num_val=0, seed=3)
    tree_c, tree_d = _tree(c), _tree(d)
    assert tree_c["train/000000.jpg"] != tree_a["train/000000.jpg"]
    assert tree_d["train/000001.jpg"] == tree_a["train/000001.jpg"]


def test_coco_json_is_valid(small_dataset):
    for split, count in (("train", 30), ("val", 6)):
        api = COCO(os.path.join(small_dataset, "annotations", f"{split}.json"))
        assert len(api.getImgIds()) == count
        assert [c["name"] for c in api.loadCats(api.getCatIds())] == qs.QUICKSTART_CLASSES
        for img in api.loadImgs(api.getImgIds()):
            pixels = np.asarray(Image.open(os.path.join(small_dataset, split, img["file_name"])))
            assert pixels.shape == (img["height"], img["width"], 3)
            assert min(qs._IMAGE_SIDES) <= img["height"] <= max(qs._IMAGE_SIDES)
            assert min(qs._IMAGE_SIDES) <= img["width"] <= max(qs._IMAGE_SIDES)
            # Cluttered, not flat: the background varies.
            assert pixels.std() > 10
            anns = api.loadAnns(api.getAnnIds(imgIds=[img["id"]]))
            assert 1 <= len(anns) <= max(qs._NUM_OBJECTS)
            for ann in anns:
                x, y, w, h = ann["bbox"]
                assert w > 0 and h > 0
                assert x >= 0 and y >= 0
                assert x + w <= img["width"] and y + h <= img["height"]
                assert 0 < ann["area"] <= w * h
                assert ann["iscrowd"] == 0
                assert 1 <= ann["category_id"] <= len(qs.QUICKSTART_CLASSES)

    api = COCO(os.path.join(small_dataset, "annotations", "train.json"))
    anns = api.loadAnns(api.getAnnIds())
    assert {a["category_id"] for a in anns} == set(range(1, len(qs.QUICKSTART_CLASSES) + 1))
    areas = np.array([a["area"] for a in anns])
    # COCO's size ranges: small < 32^2 <= medium < 96^2 <= large.
    assert (areas < 32**2).any() and ((areas >= 32**2) & (areas < 96**2)).any()
    sides = np.array([a["bbox"][2:] for a in anns])
    ratios = sides[:, 0] / sides[:, 1]
    assert ratios.min() < 0.75 and ratios.max() > 1.33


def test_ensure_reuses_and_regenerates(tmp_path, monkeypatch):
    root = str(tmp_path / "quickstart")
    assert qs.ensure_quickstart_dataset(root, num_train=2, num_val=1) == root
    before = _tree(root)

    def fail(*args, **kwargs):
        raise AssertionError("regenerated a complete dataset")

    with monkeypatch.context() as m:
        m.setattr(qs, "generate_quickstart_dataset", fail)
        qs.ensure_quickstart_dataset(root, num_train=2, num_val=1)

    # A missing picture, or a manifest from another generator version, means regeneration.
    os.remove(os.path.join(root, "train", "000001.jpg"))
    qs.ensure_quickstart_dataset(root, num_train=2, num_val=1)
    assert _tree(root) == before
    monkeypatch.setattr(qs, "GENERATOR_VERSION", qs.GENERATOR_VERSION + 1)
    qs.ensure_quickstart_dataset(root, num_train=2, num_val=1)
    assert _tree(root).keys() == before.keys()
    assert _tree(root)["MANIFEST.json"] != before["MANIFEST.json"]
    # Other counts also mean regeneration.
    qs.ensure_quickstart_dataset(root, num_train=3, num_val=1)
    assert len(os.listdir(os.path.join(root, "train"))) == 3
    assert sorted(os.listdir(tmp_path)) == ["quickstart"]


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    root = str(tmp_path / "quickstart")
    real_write = qs._write_split

    def write_then_die(out_dir, split, num_images, seed):
        real_write(out_dir, split, num_images, seed)
        raise KeyboardInterrupt

    monkeypatch.setattr(qs, "_write_split", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        qs.ensure_quickstart_dataset(root, num_train=1, num_val=1)
    assert os.listdir(tmp_path) == []


def test_bad_counts_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="num_train"):
        qs.generate_quickstart_dataset(str(tmp_path), num_train=-1)


def test_default_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DEFORMABLE_DETR_DATASETS", str(tmp_path))
    assert qs.default_quickstart_root() == os.path.join(str(tmp_path), "quickstart")
    monkeypatch.delenv("DEFORMABLE_DETR_DATASETS")
    assert qs.default_quickstart_root() == os.path.abspath(os.path.join("datasets", "quickstart"))


def test_import_registers_quickstart():
    import deformable_detr  # noqa: F401

    for name in ("quickstart_train", "quickstart_val"):
        assert name in DatasetCatalog.list()
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == qs.QUICKSTART_CLASSES
        assert meta.evaluator_type == "coco"


@pytest.fixture
def tmp_registration(tmp_path):
    root = str(tmp_path / "quickstart")
    qs.register_quickstart_datasets(root, num_train=3, num_val=2)
    yield root
    # Back to the default registration, for other tests in the session.
    qs.register_quickstart_datasets()


def test_registration_is_lazy_and_loads(tmp_registration):
    root = tmp_registration
    meta = MetadataCatalog.get("quickstart_val")
    assert meta.thing_classes == qs.QUICKSTART_CLASSES
    assert len(meta.thing_colors) == len(qs.QUICKSTART_CLASSES)
    assert meta.evaluator_type == "coco"
    assert meta.json_file == os.path.join(root, "annotations", "val.json")
    assert meta.image_root == os.path.join(root, "val")
    # Registration alone generates nothing.
    assert not os.path.exists(root)

    dicts = DatasetCatalog.get("quickstart_val")
    assert os.path.isfile(os.path.join(root, "MANIFEST.json"))
    assert len(dicts) == 2
    assert len(DatasetCatalog.get("quickstart_train")) == 3
    for d in dicts:
        assert os.path.isfile(d["file_name"])
        for ann in d["annotations"]:
            assert ann["bbox_mode"] == BoxMode.XYWH_ABS
            assert 0 <= ann["category_id"] < len(qs.QUICKSTART_CLASSES)


def _evaluate(dataset_name, dicts, class_shift):
    """COCO AP of predictions equal to the ground truth boxes, with classes shifted by one."""
    num_classes = len(qs.QUICKSTART_CLASSES)
    evaluator = COCOEvaluator(dataset_name, output_dir=None, tasks=("bbox",))
    evaluator.reset()
    for d in dicts:
        annos = d["annotations"]
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annos]
        inst = Instances((d["height"], d["width"]))
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        inst.scores = torch.ones(len(annos))
        inst.pred_classes = torch.tensor(
            [(a["category_id"] + class_shift) % num_classes for a in annos], dtype=torch.int64
        )
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": inst}])
    return evaluator.evaluate()["bbox"]["AP"]


def test_coco_evaluator_scores_ground_truth_perfectly(tmp_registration):
    dicts = DatasetCatalog.get("quickstart_val")
    assert _evaluate("quickstart_val", dicts, class_shift=0) == pytest.approx(100.0)
    # Wrong classes score nothing: the mapping between contiguous and COCO ids is really checked.
    assert _evaluate("quickstart_val", dicts, class_shift=1) == pytest.approx(0.0)
