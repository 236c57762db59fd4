"""Prediction heads of Deformable DETR and the arithmetic on their outputs.

``build_prediction_heads`` makes the ``class_embed`` and ``bbox_embed`` module lists with the
official initialisation and sharing: one module repeated for every decoder layer without box
refinement, independent copies with it, plus one more head for the encoder in two-stage mode.
``decode_boxes`` turns a box head's output into boxes around the layer's references, and
``select_detections`` keeps the top-scoring (query, class) pairs: the decoder, the model's
inference and the export wrapper all call these two, so they cannot drift apart.
"""

import copy
import math

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import box_convert

__all__ = [
    "MLP",
    "build_prediction_heads",
    "decode_boxes",
    "inverse_sigmoid",
    "select_detections",
    "upcast",
]


def upcast(x):
    """``x`` in float32 if it is half precision, else unchanged (float32 or float64).

    Under autocast the heads return half precision; references, losses and matching costs are kept
    in at least float32 because half a pixel of rounding on a large feature map is visible in the
    sampling locations, and the losses sum many small terms. A float64 model stays in float64.
    """
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def inverse_sigmoid(x, eps=1e-5):
    """Logit of ``x`` clamped to [0, 1], with both ``x`` and ``1 - x`` clamped to at least ``eps``.

    Args:
        x (Tensor): values in [0, 1].
        eps (float): smallest value kept away from 0 and 1.

    Returns:
        Tensor: same shape as ``x``.
    """
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def decode_boxes(delta, reference):
    """Boxes from a box head's output and the references it corrects.

    Args:
        delta (Tensor): (..., 4) box head output, in logit space.
        reference (Tensor): (..., 4) normalised (cx, cy, w, h) boxes, or (..., 2) normalised
            (x, y) points, whose box size the head then predicts from scratch.

    Returns:
        Tensor: (..., 4) normalised (cx, cy, w, h), in the promoted dtype of both inputs.
    """
    reference = inverse_sigmoid(reference)
    if reference.shape[-1] == 4:
        return (delta + reference).sigmoid()
    return torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1).sigmoid()


def select_detections(logits, boxes, k):
    """The ``k`` top-scoring (query, class) pairs of every image, as the official post-processing.

    Args:
        logits (Tensor): (N, Q, C) class logits (one sigmoid per class).
        boxes (Tensor): (N, Q, 4) normalised (cx, cy, w, h).
        k (int): detections kept per image (at most Q * C).

    Returns:
        tuple[Tensor, Tensor, Tensor, Tensor]: scores (N, K) by decreasing value, classes (N, K)
        int64, boxes (N, K, 4) normalised (x0, y0, x1, y1) and queries (N, K) int64, the query
        each detection comes from, with K = min(k, Q * C).
    """
    num_classes = logits.shape[-1]
    prob = logits.sigmoid().flatten(1)
    scores, index = prob.topk(min(k, prob.shape[1]), dim=1)
    query = torch.div(index, num_classes, rounding_mode="floor")
    classes = index % num_classes
    boxes = box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy")
    boxes = torch.gather(boxes, 1, query.unsqueeze(-1).expand(-1, -1, 4))
    return scores, classes, boxes, query


class MLP(nn.Module):
    """A stack of linear layers with ReLU between them (none after the last one).

    Attributes:
        layers (nn.ModuleList): the ``nn.Linear`` layers, named ``layers.{i}`` as in the official
            checkpoints.
    """

    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        """
        Args:
            input_dim (int): input channels.
            hidden_dim (int): channels of the hidden layers.
            output_dim (int): output channels.
            num_layers (int): number of linear layers, at least 1.
        """
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MLP needs num_layers >= 1, got {num_layers}")
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x):
        """
        Args:
            x (Tensor): (..., input_dim).

        Returns:
            Tensor: (..., output_dim).
        """
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def build_prediction_heads(hidden_dim, num_classes, num_pred, with_box_refine, two_stage):
    """Build the class and box heads of every prediction step, initialised as the official model.

    Args:
        hidden_dim (int): width of the decoder output.
        num_classes (int): number of classes (sigmoid outputs, no background).
        num_pred (int): number of heads: one per decoder layer, plus one for the encoder proposals
            in two-stage mode.
        with_box_refine (bool): if True the heads are independent copies; otherwise a single class
            head and a single box head are repeated ``num_pred`` times.
        two_stage (bool): two-stage mode, which resets the size bias of every box head to 0.

    Returns:
        tuple[nn.ModuleList, nn.ModuleList]: ``class_embed`` (``nn.Linear(hidden_dim, num_classes)``
        each) and ``bbox_embed`` (``MLP(hidden_dim, hidden_dim, 4, 3)`` each).
    """
    class_head = nn.Linear(hidden_dim, num_classes)
    box_head = MLP(hidden_dim, hidden_dim, 4, 3)

    # Every class starts at probability 0.01 so that the focal loss is not swamped at the start.
    prior_prob = 0.01
    nn.init.constant_(class_head.bias, -math.log((1 - prior_prob) / prior_prob))
    nn.init.constant_(box_head.layers[-1].weight, 0)
    nn.init.constant_(box_head.layers[-1].bias, 0)

    # The official order matters: the copies share the initial weights of one head, the size bias
    # of -2 (boxes of about 0.12 of the image) goes on the first copy only, and two-stage then
    # clears it on every head because its references already carry a size.
    if with_box_refine:
        class_embed = nn.ModuleList(copy.deepcopy(class_head) for _ in range(num_pred))
        bbox_embed = nn.ModuleList(copy.deepcopy(box_head) for _ in range(num_pred))
        nn.init.constant_(bbox_embed[0].layers[-1].bias[2:], -2.0)
    else:
        nn.init.constant_(box_head.layers[-1].bias[2:], -2.0)
        class_embed = nn.ModuleList(class_head for _ in range(num_pred))
        bbox_embed = nn.ModuleList(box_head for _ in range(num_pred))
    if two_stage:
        for head in bbox_embed:
            nn.init.constant_(head.layers[-1].bias[2:], 0.0)
    return class_embed, bbox_embed
