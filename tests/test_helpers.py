"""The shared test helpers do what the tests built on them assume."""

import os

import yaml
from detectron2.data import DatasetCatalog, MetadataCatalog
from helpers import write_cfg

from deformable_detr.config import load_config


def test_written_config_loads_back_unchanged(tiny_cfg, config_dir, tmp_path):
    cfg = tiny_cfg("SOLVER.MAX_ITER", "3", config="r50_two_stage.yaml")
    assert cfg.MODEL.DEFORMABLE_DETR.HIDDEN_DIM == 64 and cfg.SOLVER.MAX_ITER == 3
    assert cfg.MODEL.DEFORMABLE_DETR.TWO_STAGE and not cfg.is_frozen()
    path = write_cfg(cfg, tmp_path / "tiny.yaml")
    assert "_BASE_" not in open(path).read()
    # Compared as data: the YAML text may name repeated lists differently (anchors).
    assert yaml.safe_load(load_config(path).dump()) == yaml.safe_load(cfg.dump())
    assert os.path.isfile(os.path.join(config_dir, "r50_two_stage.yaml"))


def test_tiny_dataset_is_registered(tiny_dataset):
    train, val = DatasetCatalog.get("tiny_train"), DatasetCatalog.get("tiny_val")
    assert [len(r["annotations"]) for r in train] == [1, 2, 0, 1]
    assert [len(r["annotations"]) for r in val] == [1, 2]
    assert all(os.path.isfile(r["file_name"]) for r in train + val)
    assert all(r["file_name"].startswith(tiny_dataset) for r in train + val)
    assert MetadataCatalog.get("tiny_train").thing_classes == ["a", "b"]
    assert {a["category_id"] for r in train for a in r["annotations"]} == {0, 1}
