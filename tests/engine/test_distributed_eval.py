"""Evaluation with several workers: ``train_net.py --eval-only`` on two gloo workers gives the same
detections and the same COCO AP as on one worker."""

import json
import math
import os

import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, launch
from detectron2.utils import comm
from helpers import register_coco_dataset, write_coco_dataset
from test_train_net import _load_train_net, _write_tiny_config

from deformable_detr.config import add_deformable_detr_config
from deformable_detr.engine import Trainer

VAL_NAME = "ddetr_dist_eval_val"
# The box centres the model below predicts, one per query (the tiny config has 10 queries), all
# with half the image's width and height.
QUERY_CENTRES = [(x, y) for y in (0.25, 0.5, 0.75) for x in (0.25, 0.5, 0.75)] + [(0.4, 0.6)]
# Five images of different sizes (an odd number: the workers get 3 and 2); objects as (index into
# QUERY_CENTRES, category id).
VAL_IMAGES = [
    ((48, 64), [(0, 1)]),
    ((64, 48), [(4, 2), (8, 1)]),
    ((40, 56), [(9, 1)]),
    ((56, 56), [(1, 2), (5, 2), (6, 1)]),
    ((48, 40), [(2, 1)]),
]


def _box(height, width, centre):
    cx, cy = QUERY_CENTRES[centre]
    return [(cx - 0.25) * width, (cy - 0.25) * height, 0.5 * width, 0.5 * height]


def _write_val_set(root):
    pictures = [(size, [(_box(*size, c), k) for c, k in objects]) for size, objects in VAL_IMAGES]
    write_coco_dataset(root, {"val": pictures}, seed=1)


def _register_val_set(root):
    register_coco_dataset(VAL_NAME, root, "val")


def _eval_args(config_file, weights, output_dir):
    return default_argument_parser().parse_args(
        [
            "--config-file",
            str(config_file),
            "--eval-only",
            "MODEL.WEIGHTS",
            weights,
            "OUTPUT_DIR",
            output_dir,
            "DATASETS.TEST",
            f'("{VAL_NAME}",)',
            # Every (query, class) pair: every object is found, the AP measures the ranking.
            "TEST.DETECTIONS_PER_IMAGE",
            str(2 * len(QUERY_CENTRES)),
        ]
    )


def _eval_worker(args, dataset_root, result_file):
    torch.set_num_threads(1)
    _register_val_set(dataset_root)
    results = _load_train_net().main(args)
    if comm.is_main_process():
        with open(result_file, "w") as f:
            json.dump({"results": results, "world_size": comm.get_world_size()}, f)


def _detections(output_dir):
    with open(os.path.join(output_dir, "inference", "coco_instances_results.json")) as f:
        detections = json.load(f)
    return sorted(detections, key=lambda d: (d["image_id"], -d["score"], d["category_id"]))


def test_two_workers_give_the_same_ap(tmp_path):
    dataset_root = str(tmp_path / "data")
    _write_val_set(dataset_root)
    _register_val_set(dataset_root)
    config_file = tmp_path / "tiny.yaml"
    _write_tiny_config(config_file)

    # A random model whose queries predict the boxes of QUERY_CENTRES (reference points from the
    # first two query-position features, box head zero: width and height sigmoid(0) = 0.5), so
    # the AP depends on the scores and is neither 0 nor 1. Saved once, loaded by both runs.
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.merge_from_file(str(config_file))
    assert cfg.MODEL.DEFORMABLE_DETR.NUM_QUERIES == len(QUERY_CENTRES)
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    with torch.no_grad():
        model.query_embed.weight[:, :2] = torch.logit(torch.tensor(QUERY_CENTRES))
        reference_points = model.transformer.reference_points
        reference_points.weight.zero_()
        reference_points.bias.zero_()
        reference_points.weight[0, 0] = reference_points.weight[1, 1] = 1.0
        for head in model.bbox_embed:
            head.layers[-1].weight.zero_()
            head.layers[-1].bias.zero_()
    weights = str(tmp_path / "model.pth")
    torch.save({"model": model.state_dict()}, weights)

    torch.set_num_threads(1)
    single_dir = str(tmp_path / "one_worker")
    single = _load_train_net().main(_eval_args(config_file, weights, single_dir))

    two_dir = str(tmp_path / "two_workers")
    result_file = str(tmp_path / "two_workers.json")
    args = _eval_args(config_file, weights, two_dir)
    launch(_eval_worker, 2, dist_url="auto", args=(args, dataset_root, result_file))
    with open(result_file) as f:
        record = json.load(f)
    assert record["world_size"] == 2

    # Every image is evaluated exactly once, with the same detections.
    one, two = _detections(single_dir), _detections(two_dir)
    assert {d["image_id"] for d in one} == set(range(1, len(VAL_IMAGES) + 1))
    assert len(one) == len(two) == len(VAL_IMAGES) * 2 * len(QUERY_CENTRES)
    for a, b in zip(one, two):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        np.testing.assert_allclose(a["bbox"], b["bbox"], atol=1e-3)
        np.testing.assert_allclose(a["score"], b["score"], atol=1e-6)

    ap_one, ap_two = single["bbox"], record["results"]["bbox"]
    assert set(ap_one) == set(ap_two) and {"AP", "AP50", "AP75"} <= set(ap_one)
    assert 1.0 < ap_one["AP"] < 99.0
    for key in ap_one:
        if math.isnan(ap_one[key]):
            assert math.isnan(ap_two[key]), key
        else:
            assert ap_two[key] == ap_one[key], key
