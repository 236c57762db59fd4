"""Tests of the Hungarian matcher against an exhaustive search over assignments."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deformable_detr.modeling.matcher import HungarianMatcher, focal_class_cost


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def _giou(a, b):
    """GIoU of two cxcywh boxes, written out with plain floats."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    iw = max(0.0, min(ax1, bx1) - max(ax0, bx0))
    ih = max(0.0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def _pair_cost(logits_q, box_q, label, box_t, w_class, w_bbox, w_giou, alpha=0.25, gamma=2.0):
    p = _sigmoid(float(logits_q[label]))
    pos = alpha * (1 - p) ** gamma * -math.log(p + 1e-8)
    neg = (1 - alpha) * p**gamma * -math.log(1 - p + 1e-8)
    l1 = sum(abs(float(x) - float(y)) for x, y in zip(box_q, box_t))
    giou = _giou([float(v) for v in box_q], [float(v) for v in box_t])
    return w_class * (pos - neg) + w_bbox * l1 - w_giou * giou


def _brute_force_min(logits, boxes, labels, tgt_boxes, weights):
    """Minimum total cost over every injective map of the smaller side into the larger one."""
    q, t = logits.shape[0], labels.shape[0]
    cost = [
        [_pair_cost(logits[i], boxes[i], int(labels[j]), tgt_boxes[j], *weights) for j in range(t)]
        for i in range(q)
    ]
    if t <= q:
        return (
            min(
                sum(cost[perm[j]][j] for j in range(t))
                for perm in itertools.permutations(range(q), t)
            ),
            cost,
        )
    return (
        min(
            sum(cost[i][perm[i]] for i in range(q)) for perm in itertools.permutations(range(t), q)
        ),
        cost,
    )


def _random_boxes(gen, n):
    centre = torch.rand(n, 2, generator=gen) * 0.6 + 0.2
    size = torch.rand(n, 2, generator=gen) * 0.3 + 0.05
    return torch.cat([centre, size], dim=1)


def _check_assignment(matcher, logits, boxes, labels, tgt_boxes, weights):
    outputs = {"pred_logits": logits[None], "pred_boxes": boxes[None]}
    ((src, tgt),) = matcher(outputs, [{"labels": labels, "boxes": tgt_boxes}])
    q, t = logits.shape[0], labels.shape[0]
    assert src.dtype == torch.int64 and tgt.dtype == torch.int64
    assert len(src) == len(tgt) == min(q, t)
    assert len(set(src.tolist())) == len(src) and len(set(tgt.tolist())) == len(tgt)
    best, cost = _brute_force_min(logits, boxes, labels, tgt_boxes, weights)
    chosen = sum(cost[i][j] for i, j in zip(src.tolist(), tgt.tolist()))
    assert chosen == pytest.approx(best, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("num_queries,num_targets", [(5, 3), (4, 4), (3, 5), (6, 1)])
def test_matches_brute_force(num_queries, num_targets):
    gen = torch.Generator().manual_seed(num_queries * 10 + num_targets)
    num_classes = 4
    logits = torch.randn(num_queries, num_classes, generator=gen) * 2
    boxes = _random_boxes(gen, num_queries)
    labels = torch.randint(0, num_classes, (num_targets,), generator=gen)
    tgt_boxes = _random_boxes(gen, num_targets)
    matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)
    _check_assignment(matcher, logits, boxes, labels, tgt_boxes, (2.0, 5.0, 2.0))


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    num_queries=st.integers(1, 5),
    num_targets=st.integers(1, 4),
    weights=st.tuples(st.floats(0.0, 5.0), st.floats(0.0, 5.0), st.floats(0.1, 5.0)),
)
def test_matches_brute_force_fuzzed(seed, num_queries, num_targets, weights):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_queries, 3, generator=gen) * 3
    boxes = _random_boxes(gen, num_queries)
    labels = torch.randint(0, 3, (num_targets,), generator=gen)
    tgt_boxes = _random_boxes(gen, num_targets)
    matcher = HungarianMatcher(cost_class=weights[0], cost_bbox=weights[1], cost_giou=weights[2])
    _check_assignment(matcher, logits, boxes, labels, tgt_boxes, weights)


def test_class_cost_by_hand():
    logits = torch.tensor([[-3.0, 0.0, 2.5], [1.0, -1.0, 0.3]])
    labels = torch.tensor([2, 0, 2])
    got = focal_class_cost(logits.sigmoid(), labels, alpha=0.3, gamma=1.5)
    for i in range(2):
        for j in range(3):
            p = _sigmoid(float(logits[i, labels[j]]))
            want = 0.3 * (1 - p) ** 1.5 * -math.log(p + 1e-8) - 0.7 * p**1.5 * -math.log(
                1 - p + 1e-8
            )
            assert float(got[i, j]) == pytest.approx(want, rel=1e-5)


def test_obvious_assignment_and_batch():
    # Each target coincides with exactly one query; the second image has no targets.
    boxes = torch.tensor(
        [[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2], [0.8, 0.7, 0.1, 0.3], [0.3, 0.8, 0.2, 0.1]]
    )
    logits = torch.zeros(2, 4, 3)
    outputs = {"pred_logits": logits, "pred_boxes": torch.stack([boxes, boxes])}
    targets = [
        {"labels": torch.tensor([1, 0, 2]), "boxes": boxes[[3, 0, 2]]},
        {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
    ]
    (src, tgt), (src_empty, tgt_empty) = HungarianMatcher()(outputs, targets)
    assert dict(zip(tgt.tolist(), src.tolist())) == {0: 3, 1: 0, 2: 2}
    assert src_empty.numel() == 0 and tgt_empty.numel() == 0
    assert src_empty.dtype == torch.int64


def test_from_config_and_errors():
    from detectron2.config import get_cfg

    from deformable_detr.config import add_deformable_detr_config

    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.MODEL.DEFORMABLE_DETR.COST_BBOX = 3.0
    matcher = HungarianMatcher(cfg)
    assert (matcher.cost_class, matcher.cost_bbox, matcher.cost_giou) == (2.0, 3.0, 2.0)

    with pytest.raises(ValueError, match="all 0"):
        HungarianMatcher(cost_class=0, cost_bbox=0, cost_giou=0)
    outputs = {"pred_logits": torch.zeros(1, 3, 2), "pred_boxes": torch.full((1, 3, 4), 0.5)}
    with pytest.raises(ValueError, match="2 targets for a batch of 1"):
        HungarianMatcher()(outputs, [{"labels": torch.tensor([0]), "boxes": torch.rand(1, 4)}] * 2)
    with pytest.raises(ValueError, match="pred_boxes"):
        HungarianMatcher()(
            {"pred_logits": torch.zeros(1, 3, 2), "pred_boxes": torch.zeros(1, 3)}, []
        )
    bad = {"pred_logits": torch.full((1, 3, 2), float("nan")), "pred_boxes": outputs["pred_boxes"]}
    with pytest.raises(FloatingPointError, match="non-finite"):
        HungarianMatcher()(bad, [{"labels": torch.tensor([0]), "boxes": torch.rand(1, 4)}])


def test_padding_queries_are_never_matched():
    """With a padding mask the assignment is the one of the valid queries alone, mapped back."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 7, 2, generator=gen)
    boxes = torch.rand(1, 7, 4, generator=gen) * 0.5 + 0.25
    targets = [{"labels": torch.tensor([0, 1, 1]), "boxes": torch.rand(3, 4, generator=gen) * 0.5}]
    padding = torch.tensor([[False, True, False, True, True, False, False]])
    valid = (~padding[0]).nonzero().squeeze(1)
    matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)
    # Make the padded queries the best candidates: they must still be skipped.
    boxes[0, padding[0]] = targets[0]["boxes"][0]
    ((src, tgt),) = matcher(
        {"pred_logits": logits, "pred_boxes": boxes, "padding_mask": padding}, targets
    )
    ((src_alone, tgt_alone),) = matcher(
        {"pred_logits": logits[:, valid], "pred_boxes": boxes[:, valid]}, targets
    )
    assert not padding[0, src].any()
    assert torch.equal(src, valid[src_alone]) and torch.equal(tgt, tgt_alone)
