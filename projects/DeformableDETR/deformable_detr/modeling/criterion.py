"""Set-prediction losses of Deformable DETR, after Hungarian matching.

``SetCriterion`` matches every decoder layer's predictions to the targets and returns the weighted
sigmoid focal classification loss and the L1 and GIoU box losses of the final layer, of every
intermediate layer (suffix ``_{i}``) and, in two-stage mode, of the encoder proposals (suffix
``_enc``, with every target relabelled as class 0: the encoder only scores foreground).
"""

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.utils import comm
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

from .heads import upcast
from .matcher import HungarianMatcher

__all__ = ["SetCriterion"]

# The loss terms each loss type produces; the weight of every term must be in weight_dict.
_LOSS_TERMS = {"labels": ("loss_class",), "boxes": ("loss_bbox", "loss_giou")}


class SetCriterion(nn.Module):
    """Matching losses of the final decoder layer, the auxiliary layers and the encoder."""

    @configurable
    def __init__(
        self,
        num_classes,
        matcher,
        weight_dict,
        losses=("labels", "boxes"),
        focal_alpha=0.25,
        focal_gamma=2.0,
    ):
        """
        Args:
            num_classes (int): number of object classes (no background class: the classifier is
                a sigmoid per class).
            matcher (nn.Module): returns, per image, (query indices, target indices); see
                :class:`HungarianMatcher`.
            weight_dict (dict[str, float]): weight of every loss term: "loss_class", "loss_bbox",
                "loss_giou". Suffixed terms ("loss_bbox_0", "loss_giou_enc") use their own entry
                when present and the base term's weight otherwise.
            losses (tuple[str]): loss types to compute, among "labels" and "boxes".
            focal_alpha (float): alpha of the sigmoid focal loss.
            focal_gamma (float): gamma of the sigmoid focal loss.
        """
        super().__init__()
        unknown = [name for name in losses if name not in _LOSS_TERMS]
        if unknown:
            raise ValueError(
                f"SetCriterion: unknown losses {unknown}; available: {sorted(_LOSS_TERMS)}"
            )
        missing = [t for name in losses for t in _LOSS_TERMS[name] if t not in weight_dict]
        if missing:
            raise KeyError(f"SetCriterion: weight_dict has no weight for {missing}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.losses = tuple(losses)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.DEFORMABLE_DETR
        return {
            "num_classes": c.NUM_CLASSES,
            "matcher": HungarianMatcher(cfg),
            "weight_dict": {
                "loss_class": c.CLASS_WEIGHT,
                "loss_bbox": c.BBOX_WEIGHT,
                "loss_giou": c.GIOU_WEIGHT,
            },
            "focal_alpha": c.FOCAL_ALPHA,
            "focal_gamma": c.FOCAL_GAMMA,
        }

    def extra_repr(self):
        return (
            f"num_classes={self.num_classes}, losses={self.losses}, weight_dict={self.weight_dict}, "
            f"focal_alpha={self.focal_alpha}, focal_gamma={self.focal_gamma}"
        )

    @staticmethod
    def _matched_queries(indices):
        """(batch index, query index) of every matched query, in target order."""
        batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        query = torch.cat([src for src, _ in indices])
        return batch, query

    def loss_labels(self, outputs, targets, indices, num_boxes):
        """Sigmoid focal loss on the one-hot classes of all queries (unmatched ones: all zero).

        The official normalisation: mean over queries, sum over the batch and the classes,
        divided by the number of boxes, times the number of queries.
        """
        logits = outputs["pred_logits"]
        batch, query = self._matched_queries(indices)
        labels = torch.cat([t["labels"][tgt] for t, (_, tgt) in zip(targets, indices)])
        logits = upcast(logits)
        onehot = torch.zeros_like(logits)
        onehot[batch.to(logits.device), query.to(logits.device), labels.to(logits.device)] = 1
        loss = sigmoid_focal_loss(
            logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="none"
        )
        padding = outputs.get("padding_mask")
        if padding is not None:
            # Encoder tokens on padding are not part of any image: they carry no loss, so the
            # loss of an image does not depend on the other images of its batch.
            loss = loss.masked_fill(padding.unsqueeze(-1), 0.0)
        num_queries = logits.shape[1]
        return {"loss_class": loss.mean(1).sum() / num_boxes * num_queries}

    def loss_boxes(self, outputs, targets, indices, num_boxes):
        """L1 and GIoU losses of the matched queries, summed and divided by the number of boxes."""
        batch, query = self._matched_queries(indices)
        pred = upcast(outputs["pred_boxes"][batch, query])
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(pred)
        loss_bbox = F.l1_loss(pred, tgt, reduction="none").sum() / num_boxes
        giou = generalized_box_iou(
            box_convert(pred, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy")
        )
        loss_giou = (1 - torch.diag(giou)).sum() / num_boxes
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def _weighted_losses(self, outputs, targets, num_boxes, suffix):
        indices = self.matcher(outputs, targets)
        losses = {}
        for name in self.losses:
            fn = self.loss_labels if name == "labels" else self.loss_boxes
            for key, value in fn(outputs, targets, indices, num_boxes).items():
                weight = self.weight_dict.get(key + suffix, self.weight_dict[key])
                losses[key + suffix] = value * weight
        return losses

    def get_num_boxes(self, targets, device):
        """Average number of target boxes per worker, at least 1 (the loss normaliser)."""
        num_boxes = sum(len(t["labels"]) for t in targets)
        num_boxes = torch.as_tensor([num_boxes], dtype=torch.float, device=device)
        world_size = comm.get_world_size()
        if world_size > 1:
            torch.distributed.all_reduce(num_boxes)
        return torch.clamp(num_boxes / world_size, min=1).item()

    def forward(self, outputs, targets):
        """Compute the weighted losses.

        Args:
            outputs (dict): "pred_logits" (N, Q, K) and "pred_boxes" (N, Q, 4) normalised cxcywh
                of the final decoder layer; optionally "aux_outputs" (list of such dicts, one per
                intermediate decoder layer) and "enc_outputs" (such a dict for the encoder
                proposals, two-stage).
            targets (list[dict]): per image, "labels" (T,) int64 in [0, num_classes) and "boxes"
                (T, 4) normalised cxcywh.

        Returns:
            dict[str, Tensor]: weighted scalar losses "loss_class", "loss_bbox", "loss_giou", the
            same with suffix "_{i}" for aux layer i and "_enc" for the encoder.
        """
        logits = outputs.get("pred_logits")
        if logits is None or logits.shape[-1] != self.num_classes:
            raise ValueError(
                f"SetCriterion: pred_logits must have num_classes={self.num_classes} columns; "
                f"got shape {None if logits is None else tuple(logits.shape)}"
            )
        # Every worker normalises by the same count, so gradients average correctly under DDP.
        num_boxes = self.get_num_boxes(targets, logits.device)

        main = {k: v for k, v in outputs.items() if k not in ("aux_outputs", "enc_outputs")}
        losses = self._weighted_losses(main, targets, num_boxes, "")
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update(self._weighted_losses(aux, targets, num_boxes, f"_{i}"))
        if "enc_outputs" in outputs:
            # The encoder proposals are scored class-agnostically: every target is class 0.
            binary = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            losses.update(self._weighted_losses(outputs["enc_outputs"], binary, num_boxes, "_enc"))
        return losses
