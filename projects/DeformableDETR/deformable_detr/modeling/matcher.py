"""Hungarian matching between the predicted queries and the ground-truth boxes of each image.

The matching cost follows the official Deformable DETR: a focal-style classification cost, the L1
distance between normalised (cx, cy, w, h) boxes and the negative generalised IoU, each weighted,
solved per image with ``scipy.optimize.linear_sum_assignment``.
"""

import numpy as np
import torch
from detectron2.config import configurable
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou

from .heads import upcast

__all__ = ["HungarianMatcher", "focal_class_cost"]


def focal_class_cost(prob, labels, alpha=0.25, gamma=2.0):
    """Classification matching cost of the focal loss, for every (query, target) pair.

    The cost of assigning a query to a target of class ``c`` is the focal loss the query's
    probability for ``c`` would pay as a positive, minus what it pays as a negative; the other
    classes do not depend on the assignment and are left out.

    Args:
        prob (Tensor): (Q, K) sigmoid probabilities of the queries.
        labels (Tensor): (T,) int64 class indices of the targets, in [0, K).
        alpha (float): focal loss weight of the positives.
        gamma (float): focal loss focusing exponent.

    Returns:
        Tensor: (Q, T) cost.
    """
    prob = prob[:, labels]
    # The 1e-8 keeps log() finite for saturated probabilities, as in the official code.
    pos = alpha * (1 - prob) ** gamma * (-(prob + 1e-8).log())
    neg = (1 - alpha) * prob**gamma * (-(1 - prob + 1e-8).log())
    return pos - neg


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to ground-truth boxes minimising a weighted cost.

    Every image is matched on its own; queries left unassigned are trained as background.
    """

    @configurable
    def __init__(
        self,
        cost_class=2.0,
        cost_bbox=5.0,
        cost_giou=2.0,
        focal_alpha=0.25,
        focal_gamma=2.0,
    ):
        """
        Args:
            cost_class (float): weight of the focal classification cost.
            cost_bbox (float): weight of the L1 distance between normalised cxcywh boxes.
            cost_giou (float): weight of the negative generalised IoU.
            focal_alpha (float): alpha of the focal classification cost.
            focal_gamma (float): gamma of the focal classification cost.
        """
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: cost_class, cost_bbox and cost_giou are all 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.DEFORMABLE_DETR
        return {
            "cost_class": c.COST_CLASS,
            "cost_bbox": c.COST_BBOX,
            "cost_giou": c.COST_GIOU,
            "focal_alpha": c.FOCAL_ALPHA,
            "focal_gamma": c.FOCAL_GAMMA,
        }

    def extra_repr(self):
        return (
            f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, "
            f"cost_giou={self.cost_giou}, focal_alpha={self.focal_alpha}, "
            f"focal_gamma={self.focal_gamma}"
        )

    def cost_matrix(self, logits, boxes, labels, tgt_boxes):
        """Weighted matching cost of one image.

        Args:
            logits (Tensor): (Q, K) classification logits.
            boxes (Tensor): (Q, 4) predicted boxes, normalised cxcywh.
            labels (Tensor): (T,) int64 target classes.
            tgt_boxes (Tensor): (T, 4) target boxes, normalised cxcywh.

        Returns:
            Tensor: (Q, T) float32 cost.
        """
        # Costs in at least float32 under mixed precision: the assignment is sensitive to ties.
        prob = upcast(logits).sigmoid()
        boxes = upcast(boxes)
        tgt_boxes = tgt_boxes.to(boxes.dtype)
        cost = self.cost_class * focal_class_cost(prob, labels, self.focal_alpha, self.focal_gamma)
        cost = cost + self.cost_bbox * torch.cdist(boxes, tgt_boxes, p=1)
        giou = generalized_box_iou(
            box_convert(boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy")
        )
        return cost - self.cost_giou * giou

    @torch.no_grad()
    def forward(self, outputs, targets):
        """Match the queries of every image to its targets.

        Args:
            outputs (dict): with "pred_logits" (N, Q, K) classification logits and "pred_boxes"
                (N, Q, 4) normalised cxcywh boxes; optionally "padding_mask" (N, Q) bool, True
                for queries that are padding (encoder tokens outside an image), never matched.
            targets (list[dict]): N dicts with "labels" (T,) int64 in [0, K) and "boxes" (T, 4)
                normalised cxcywh.

        Returns:
            list[tuple[Tensor, Tensor]]: per image, (query indices, target indices), int64 on the
            CPU, both of length min(Q, T); query ``src[i]`` is assigned target ``tgt[i]``.
        """
        logits, boxes = _check_outputs(outputs)
        if len(targets) != logits.shape[0]:
            raise ValueError(
                f"HungarianMatcher: got {len(targets)} targets for a batch of {logits.shape[0]}"
            )
        padding = outputs.get("padding_mask")
        indices = []
        for i, target in enumerate(targets):
            labels, tgt_boxes = _check_target(target, i)
            if labels.numel() == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            keep = None if padding is None else (~padding[i]).nonzero().squeeze(1)
            if keep is None:
                cost = self.cost_matrix(logits[i], boxes[i], labels.to(logits.device), tgt_boxes)
            else:
                # Padding tokens are not candidates: the image alone would not have them.
                cost = self.cost_matrix(
                    logits[i, keep], boxes[i, keep], labels.to(logits.device), tgt_boxes
                )
            # Checked on the host copy the solver needs anyway: no extra device sync.
            cost = cost.cpu().numpy()
            if not np.isfinite(cost).all():
                raise FloatingPointError(
                    f"HungarianMatcher: non-finite matching cost for image {i}; check "
                    "pred_logits, pred_boxes and the target boxes for NaN/Inf"
                )
            src, tgt = linear_sum_assignment(cost)
            src = torch.as_tensor(src, dtype=torch.int64)
            if keep is not None:
                src = keep.cpu()[src]
            indices.append((src, torch.as_tensor(tgt, dtype=torch.int64)))
        return indices


def _check_outputs(outputs):
    if "pred_logits" not in outputs or "pred_boxes" not in outputs:
        raise KeyError(
            f"outputs must have 'pred_logits' and 'pred_boxes'; got keys {sorted(outputs)}"
        )
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    if logits.dim() != 3:
        raise ValueError(f"pred_logits must be (N, Q, K); got shape {tuple(logits.shape)}")
    if boxes.shape != (*logits.shape[:2], 4):
        raise ValueError(
            f"pred_boxes must be (N, Q, 4) = {(*logits.shape[:2], 4)}; got {tuple(boxes.shape)}"
        )
    return logits, boxes


def _check_target(target, index):
    if "labels" not in target or "boxes" not in target:
        raise KeyError(f"targets[{index}] must have 'labels' and 'boxes'; got {sorted(target)}")
    labels, boxes = target["labels"], target["boxes"]
    if labels.dim() != 1 or labels.dtype != torch.int64:
        raise ValueError(
            f"targets[{index}]['labels'] must be a 1-d int64 tensor; got {labels.dtype} "
            f"of shape {tuple(labels.shape)}"
        )
    if boxes.shape != (labels.shape[0], 4):
        raise ValueError(
            f"targets[{index}]['boxes'] must be ({labels.shape[0]}, 4); got {tuple(boxes.shape)}"
        )
    return labels, boxes
