"""Tests of the set criterion against losses recomputed by hand from their definitions."""

import math

import pytest
import torch
from detectron2.utils import comm

from deformable_detr.modeling.criterion import SetCriterion
from deformable_detr.modeling.matcher import HungarianMatcher

WEIGHTS = {"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}


class FixedMatcher:
    """Returns a given assignment and records the targets it saw."""

    def __init__(self, indices):
        self.indices = [(torch.tensor(s), torch.tensor(t)) for s, t in indices]
        self.seen_targets = []

    def __call__(self, outputs, targets):
        self.seen_targets.append(targets)
        return self.indices


def _focal(x, t, alpha=0.25, gamma=2.0):
    p = 1.0 / (1.0 + math.exp(-x))
    ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    alpha_t = alpha * t + (1 - alpha) * (1 - t)
    return alpha_t * (1 - p_t) ** gamma * ce


def _xyxy(b):
    return b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2


def _giou(a, b):
    ax0, ay0, ax1, ay1 = _xyxy(a)
    bx0, by0, bx1, by1 = _xyxy(b)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def _expected(logits, boxes, targets, indices, num_boxes, alpha=0.25, gamma=2.0):
    """Unweighted losses written out element by element (official normalisation)."""
    n, q, k = logits.shape
    positive = {}
    for b, (src, tgt) in enumerate(indices):
        for i, j in zip(src, tgt):
            positive[(b, i)] = int(targets[b]["labels"][j])
    focal_sum = 0.0
    for b in range(n):
        for i in range(q):
            for c in range(k):
                t = 1.0 if positive.get((b, i)) == c else 0.0
                focal_sum += _focal(float(logits[b, i, c]), t, alpha, gamma)
    # mean over queries, summed, / num_boxes, * num_queries
    loss_class = focal_sum / q / num_boxes * q
    l1, giou = 0.0, 0.0
    for b, (src, tgt) in enumerate(indices):
        for i, j in zip(src, tgt):
            pb = [float(v) for v in boxes[b, i]]
            tb = [float(v) for v in targets[b]["boxes"][j]]
            l1 += sum(abs(x - y) for x, y in zip(pb, tb))
            giou += 1 - _giou(pb, tb)
    return {"loss_class": loss_class, "loss_bbox": l1 / num_boxes, "loss_giou": giou / num_boxes}


def _example(seed=0, n=2, q=5, k=3):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, q, k, generator=gen) * 2
    boxes = torch.cat(
        [torch.rand(n, q, 2, generator=gen) * 0.6 + 0.2, torch.rand(n, q, 2) * 0.3 + 0.05], -1
    )
    targets = [
        {
            "labels": torch.tensor([2, 0]),
            "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.1], [0.6, 0.5, 0.3, 0.4]]),
        },
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])},
    ]
    return logits, boxes, targets


def test_values_and_weights():
    logits, boxes, targets = _example()
    indices = [([3, 1], [0, 1]), ([4], [0])]
    criterion = SetCriterion(3, FixedMatcher(indices), WEIGHTS)
    losses = criterion({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert set(losses) == {"loss_class", "loss_bbox", "loss_giou"}
    want = _expected(logits, boxes, targets, indices, num_boxes=3)
    for key, value in want.items():
        assert float(losses[key]) == pytest.approx(WEIGHTS[key] * value, rel=1e-5), key


def test_focal_parameters_are_used():
    logits, boxes, targets = _example(seed=3)
    indices = [([0, 2], [1, 0]), ([1], [0])]
    criterion = SetCriterion(3, FixedMatcher(indices), WEIGHTS, focal_alpha=0.4, focal_gamma=1.0)
    losses = criterion({"pred_logits": logits, "pred_boxes": boxes}, targets)
    want = _expected(logits, boxes, targets, indices, num_boxes=3, alpha=0.4, gamma=1.0)
    assert float(losses["loss_class"]) == pytest.approx(2.0 * want["loss_class"], rel=1e-5)


def test_aux_and_encoder_outputs():
    logits, boxes, targets = _example(seed=1)
    aux_logits, aux_boxes, _ = _example(seed=2)
    enc_logits, enc_boxes, _ = _example(seed=4)
    indices = [([0, 4], [1, 0]), ([2], [0])]
    matcher = FixedMatcher(indices)
    weights = dict(WEIGHTS, loss_bbox_0=1.5)
    criterion = SetCriterion(3, matcher, weights)
    outputs = {
        "pred_logits": logits,
        "pred_boxes": boxes,
        "aux_outputs": [
            {"pred_logits": aux_logits, "pred_boxes": aux_boxes},
            {"pred_logits": aux_logits * 0.5, "pred_boxes": aux_boxes},
        ],
        "enc_outputs": {"pred_logits": enc_logits, "pred_boxes": enc_boxes},
    }
    losses = criterion(outputs, targets)
    terms = ("loss_class", "loss_bbox", "loss_giou")
    assert set(losses) == {t + s for t in terms for s in ("", "_0", "_1", "_enc")}

    want0 = _expected(aux_logits, aux_boxes, targets, indices, 3)
    assert float(losses["loss_bbox_0"]) == pytest.approx(1.5 * want0["loss_bbox"], rel=1e-5)
    assert float(losses["loss_class_0"]) == pytest.approx(2.0 * want0["loss_class"], rel=1e-5)
    want1 = _expected(aux_logits * 0.5, aux_boxes, targets, indices, 3)
    assert float(losses["loss_class_1"]) == pytest.approx(2.0 * want1["loss_class"], rel=1e-5)
    assert float(losses["loss_bbox_1"]) == pytest.approx(5.0 * want1["loss_bbox"], rel=1e-5)

    # The encoder is trained class-agnostically: every target becomes class 0.
    binary = [{"labels": torch.zeros_like(t["labels"]), "boxes": t["boxes"]} for t in targets]
    want_enc = _expected(enc_logits, enc_boxes, binary, indices, 3)
    for key in terms:
        assert float(losses[key + "_enc"]) == pytest.approx(WEIGHTS[key] * want_enc[key], rel=1e-5)
    assert [t["labels"].tolist() for t in matcher.seen_targets[-1]] == [[0, 0], [0]]
    # The caller's targets are left alone.
    assert targets[0]["labels"].tolist() == [2, 0]


def test_empty_targets_keep_the_graph():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, generator=gen).requires_grad_()
    boxes = torch.rand(2, 4, 4, generator=gen).mul(0.3).add(0.2).requires_grad_()
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    criterion = SetCriterion(3, HungarianMatcher(), WEIGHTS)
    losses = criterion({"pred_logits": logits, "pred_boxes": boxes}, [empty, dict(empty)])
    # num_boxes is clamped to 1; every query is a negative.
    focal_sum = sum(_focal(float(x), 0.0) for x in logits.detach().flatten())
    assert losses["loss_class"].item() == pytest.approx(2.0 * focal_sum, rel=1e-5)
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0
    sum(losses.values()).backward()
    # Box heads still receive (zero) gradients: DistributedDataParallel needs every parameter used.
    assert boxes.grad is not None and torch.all(boxes.grad == 0)
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_mixed_empty_and_matching_with_real_matcher():
    logits, boxes, targets = _example(seed=5)
    targets[1] = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    matcher = HungarianMatcher()
    indices = matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)
    losses = SetCriterion(3, matcher, WEIGHTS)(
        {"pred_logits": logits, "pred_boxes": boxes}, targets
    )
    want = _expected(logits, boxes, targets, [(s.tolist(), t.tolist()) for s, t in indices], 2)
    for key, value in want.items():
        assert float(losses[key]) == pytest.approx(WEIGHTS[key] * value, rel=1e-5), key


def test_num_boxes_averaged_over_workers(monkeypatch):
    # Simulate a second worker holding 5 boxes: num_boxes = (3 + 5) / 2.
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: t.add_(5))
    logits, boxes, targets = _example(seed=6)
    indices = [([3, 1], [0, 1]), ([4], [0])]
    losses = SetCriterion(3, FixedMatcher(indices), WEIGHTS)(
        {"pred_logits": logits, "pred_boxes": boxes}, targets
    )
    want = _expected(logits, boxes, targets, indices, num_boxes=4.0)
    assert float(losses["loss_bbox"]) == pytest.approx(5.0 * want["loss_bbox"], rel=1e-5)
    # A global count below one worker is clamped to 1.
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: t.mul_(0))
    assert SetCriterion(3, FixedMatcher(indices), WEIGHTS).get_num_boxes(targets, "cpu") == 1.0


def test_config_and_errors():
    from detectron2.config import get_cfg

    from deformable_detr.config import add_deformable_detr_config

    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.MODEL.DEFORMABLE_DETR.NUM_CLASSES = 7
    cfg.MODEL.DEFORMABLE_DETR.GIOU_WEIGHT = 3.0
    criterion = SetCriterion(cfg)
    assert criterion.num_classes == 7
    assert criterion.weight_dict == {"loss_class": 2.0, "loss_bbox": 5.0, "loss_giou": 3.0}
    assert isinstance(criterion.matcher, HungarianMatcher)

    with pytest.raises(KeyError, match="loss_giou"):
        SetCriterion(3, HungarianMatcher(), {"loss_class": 1.0, "loss_bbox": 1.0})
    with pytest.raises(ValueError, match="unknown losses"):
        SetCriterion(3, HungarianMatcher(), WEIGHTS, losses=("labels", "masks"))
    logits, boxes, targets = _example()
    with pytest.raises(ValueError, match="num_classes=4"):
        SetCriterion(4, HungarianMatcher(), WEIGHTS)(
            {"pred_logits": logits, "pred_boxes": boxes}, targets
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    logits, boxes, targets = _example(seed=7)
    outputs = {"pred_logits": logits, "pred_boxes": boxes}
    criterion = SetCriterion(3, HungarianMatcher(), WEIGHTS)
    cpu = criterion(outputs, targets)
    cuda_outputs = {k: v.cuda() for k, v in outputs.items()}
    cuda_targets = [{k: v.cuda() for k, v in t.items()} for t in targets]
    gpu = criterion(cuda_outputs, cuda_targets)
    for key, value in cpu.items():
        assert gpu[key].is_cuda
        assert gpu[key].item() == pytest.approx(value.item(), rel=1e-4, abs=1e-6), key
    # Half-precision logits (AMP) are evaluated in float32.
    half = {
        "pred_logits": cuda_outputs["pred_logits"].half(),
        "pred_boxes": cuda_outputs["pred_boxes"],
    }
    assert criterion(half, cuda_targets)["loss_class"].dtype == torch.float32
