"""Backbone adapter: a Detectron2 backbone plus the input projections of Deformable DETR.

``DeformableDetrBackbone`` turns a batch of padded images into the multi-level feature maps the
transformer reads, with one exact padding mask per level. Images of the same size are run through
the backbone together and images of other sizes separately, so convolutions and GroupNorm never
see padding: the features of an image do not depend on the rest of the batch, and an image alone
gives the same features as the official model.

At inference the backbone runs a derived copy of its body in which every frozen batch norm is
folded into the convolution before it (in the autocast dtype, when there is one); the module's
own parameters, and so its state dict and checkpoints, are left as they are.
"""

import copy
import math
from collections import OrderedDict

import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d, FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import Backbone, build_backbone
from detectron2.modeling.backbone import ResNet
from torch import nn
from torch.nn import functional as F

from ..layers.tracing import is_tracing

__all__ = ["DeformableDetrBackbone"]


class DeformableDetrBackbone(nn.Module):
    """Backbone features projected to the transformer width, with extra coarser levels.

    Level ``l < len(in_features)`` is ``input_proj[l]`` (1x1 conv + GroupNorm) of backbone
    feature ``in_features[l]``. Further levels are ``input_proj[l]`` (3x3 stride-2 conv +
    GroupNorm) of the raw last backbone feature for the first one and of the previous level for
    the next ones, as in the official model.

    Attributes:
        body (Backbone): the Detectron2 backbone.
        input_proj (nn.ModuleList): one ``nn.Sequential(Conv2d, GroupNorm(32, hidden_dim))`` per
            level.
    """

    @configurable
    def __init__(
        self, *, body, in_features, num_feature_levels, hidden_dim=256, padded_training_batch=False
    ):
        """
        Args:
            body (Backbone): a Detectron2 backbone whose ``output_shape()`` lists ``in_features``.
            in_features (list[str]): backbone outputs used, from the finest to the coarsest.
            num_feature_levels (int): total number of levels, at least ``len(in_features)``.
            hidden_dim (int): output channels of every level, a multiple of 32.
            padded_training_batch (bool): in training, run a batch of images of several sizes
                through the backbone at once, zero-padded to a common size, as the official
                model and Detectron2's detectors do: one pass instead of one per size, but an
                image's features then depend on the padding (through the convolutions near its
                border and every GroupNorm). Inference is exact either way.
        """
        super().__init__()
        if not isinstance(body, Backbone):
            raise TypeError(f"body must be a detectron2 Backbone, got {type(body).__name__}")
        in_features = list(in_features)
        if len(in_features) == 0:
            raise ValueError("in_features (MODEL.DEFORMABLE_DETR.IN_FEATURES) is empty")
        if num_feature_levels < len(in_features):
            raise ValueError(
                f"num_feature_levels (MODEL.DEFORMABLE_DETR.NUM_FEATURE_LEVELS) = "
                f"{num_feature_levels} is smaller than the number of in_features "
                f"(MODEL.DEFORMABLE_DETR.IN_FEATURES) {in_features}"
            )
        if hidden_dim % 32 != 0:
            raise ValueError(
                f"hidden_dim (MODEL.DEFORMABLE_DETR.HIDDEN_DIM) = {hidden_dim} must be a multiple "
                "of 32 for GroupNorm(32, hidden_dim)"
            )
        shapes = body.output_shape()
        missing = [f for f in in_features if f not in shapes]
        if missing:
            raise ValueError(
                f"in_features (MODEL.DEFORMABLE_DETR.IN_FEATURES) {missing} are not produced by "
                f"the backbone {type(body).__name__}, whose outputs are {sorted(shapes)}: list "
                "them in the backbone's output features too (MODEL.RESNETS.OUT_FEATURES for "
                "ResNet)"
            )

        self.body = body
        self.in_features = in_features
        self.num_feature_levels = num_feature_levels
        self.hidden_dim = hidden_dim
        self.padded_training_batch = bool(padded_training_batch)

        projs = []
        for name in in_features:
            projs.append(self._proj(shapes[name].channels, hidden_dim, kernel_size=1, stride=1))
        in_channels = shapes[in_features[-1]].channels
        for _ in range(num_feature_levels - len(in_features)):
            projs.append(self._proj(in_channels, hidden_dim, kernel_size=3, stride=2))
            in_channels = hidden_dim
        self.input_proj = nn.ModuleList(projs)

        strides = [shapes[name].stride for name in in_features]
        for _ in range(num_feature_levels - len(in_features)):
            strides.append(strides[-1] * 2)
        self._strides = strides

    @staticmethod
    def _proj(in_channels, out_channels, kernel_size, stride):
        conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2
        )
        nn.init.xavier_uniform_(conv.weight, gain=1)
        nn.init.constant_(conv.bias, 0)
        return nn.Sequential(conv, nn.GroupNorm(32, out_channels))

    @classmethod
    def from_config(cls, cfg, input_shape=None):
        if input_shape is None:
            input_shape = ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN))
        body = build_backbone(cfg, input_shape)
        if isinstance(body, ResNet) and cfg.MODEL.RESNETS.RES5_DILATION > 1:
            _undilate_first_res5_block(body)
        return {
            "body": body,
            "in_features": cfg.MODEL.DEFORMABLE_DETR.IN_FEATURES,
            "num_feature_levels": cfg.MODEL.DEFORMABLE_DETR.NUM_FEATURE_LEVELS,
            "hidden_dim": cfg.MODEL.DEFORMABLE_DETR.HIDDEN_DIM,
            "padded_training_batch": cfg.MODEL.DEFORMABLE_DETR.PADDED_TRAINING_BATCH,
        }

    def output_shape(self):
        """
        Returns:
            list[ShapeSpec]: channels and stride of every level.
        """
        return [ShapeSpec(channels=self.hidden_dim, stride=s) for s in self._strides]

    def features(self, x):
        """Features of all levels for a batch of unpadded images of one size.

        Every position of ``x`` is image content, so every position of every level is valid:
        ``forward`` calls this per group of same-size images, and export calls it on its input.

        Args:
            x (Tensor): (N, C, H, W) normalised images.

        Returns:
            list[Tensor]: per level, (N, hidden_dim, H_l, W_l).
        """
        body = self.body
        if not is_tracing():
            if x.device.type == "cpu":
                # oneDNN's CPU convolutions are faster on channels-last tensors (docs/benchmarks.md
                # has the measurement); the results are equal up to rounding.
                x = x.contiguous(memory_format=torch.channels_last)
            body, dtype = self._inference_body(x)
            x = x.to(dtype)
        feats = body(x)
        srcs = [proj(feats[name]) for proj, name in zip(self.input_proj, self.in_features)]
        prev = feats[self.in_features[-1]]
        for proj in self.input_proj[len(self.in_features) :]:
            prev = proj(prev)
            srcs.append(prev)
        return srcs

    def _inference_body(self, x):
        """The body to run on ``x`` and the dtype to give it: outside training, a copy with its
        frozen batch norms folded into the convolutions, in the autocast dtype if any.

        The copy is made once and made again when the body's tensors change (loading weights, an
        optimiser step, ``.to()``). It is kept outside the module's attributes, so it is not in
        the state dict.
        """
        device_type = x.device.type
        dtype = x.dtype
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        if self.training or (
            torch.is_grad_enabled() and any(p.requires_grad for p in self.body.parameters())
        ):
            # Gradients must reach the body's own parameters.
            return self.body, x.dtype
        tensors = list(self.body.parameters()) + list(self.body.buffers())
        key = (dtype, x.device, tuple((t.data_ptr(), t._version) for t in tensors))
        cached = self.__dict__.get("_folded_body")
        if cached is None or cached[0] != key:
            folded = _fold_frozen_batch_norms(self.body, dtype)
            cached = (key, folded if folded is not None else self.body)
            # object.__setattr__: a Module attribute would be registered as a submodule.
            object.__setattr__(self, "_folded_body", cached)
        body = cached[1]
        return body, dtype if body is not self.body else x.dtype

    @property
    def body_size_divisibility(self):
        """int: the multiple the body needs the input sizes padded to (0 or 1: none)."""
        constraints = getattr(self.body, "padding_constraints", None) or {}
        return int(constraints.get("size_divisibility", self.body.size_divisibility) or 0)

    def forward(self, images):
        """
        Args:
            images (ImageList): normalised images, padded to a common size; ``image_sizes`` gives
                the valid part of each.

        Returns:
            tuple[list[Tensor], list[Tensor]]: per level, the features (N, hidden_dim, H_l, W_l)
            padded with zeros to the largest image's size, and the bool masks (N, H_l, W_l),
            True on padding.
        """
        tensor = images.tensor
        sizes = [(int(h), int(w)) for h, w in images.image_sizes]
        groups = OrderedDict()
        for i, size in enumerate(sizes):
            groups.setdefault(size, []).append(i)

        divisibility = self.body_size_divisibility
        if self.training and self.padded_training_batch and len(groups) > 1:
            # One pass over the padded batch; the masks still mark each image's own part.
            srcs = self.features(_pad_to_multiple(tensor, divisibility))
            masks = []
            for src, stride in zip(srcs, self._strides):
                # An image alone would give ceil(side / stride) positions per side (every
                # stride-2 step maps s to ceil(s / 2)): the same valid part as without padding.
                mask = torch.ones(
                    (len(sizes),) + tuple(src.shape[-2:]), dtype=torch.bool, device=src.device
                )
                for i, (h, w) in enumerate(sizes):
                    mask[i, : int(math.ceil(h / stride)), : int(math.ceil(w / stride))] = False
                masks.append(mask)
            return srcs, masks

        per_group = []
        for (h, w), idx in groups.items():
            x = tensor[idx, :, :h, :w] if len(idx) < len(sizes) else tensor[:, :, :h, :w]
            if divisibility > 1:
                # Backbones that need divisible inputs see zeros past the image, as in
                # Detectron2; the mask below still marks only the image's own part as valid.
                x = _pad_to_multiple(x, divisibility)
                ph, pw = x.shape[-2:]
                srcs = self.features(x)
                valid = [
                    (
                        min(s.shape[-2], int(math.ceil(h * s.shape[-2] / ph))),
                        min(s.shape[-1], int(math.ceil(w * s.shape[-1] / pw))),
                    )
                    for s in srcs
                ]
            else:
                srcs = self.features(x)
                valid = [tuple(s.shape[-2:]) for s in srcs]
            per_group.append((idx, srcs, valid))

        if len(per_group) == 1 and len(per_group[0][0]) == len(sizes):
            idx, srcs, valid = per_group[0]
            masks = []
            for src, (vh, vw) in zip(srcs, valid):
                mask = torch.ones(
                    (src.shape[0],) + tuple(src.shape[-2:]), dtype=torch.bool, device=src.device
                )
                mask[:, :vh, :vw] = False
                masks.append(mask)
            return srcs, masks

        n = len(sizes)
        out_srcs, out_masks = [], []
        for lvl in range(self.num_feature_levels):
            hmax = max(srcs[lvl].shape[-2] for _, srcs, _ in per_group)
            wmax = max(srcs[lvl].shape[-1] for _, srcs, _ in per_group)
            ref = per_group[0][1][lvl]
            src = ref.new_zeros((n, ref.shape[1], hmax, wmax))
            mask = torch.ones((n, hmax, wmax), dtype=torch.bool, device=ref.device)
            for idx, srcs, valid in per_group:
                s = srcs[lvl]
                index = torch.as_tensor(idx, device=s.device)
                padded = F.pad(s, (0, wmax - s.shape[-1], 0, hmax - s.shape[-2]))
                src = src.index_copy(0, index, padded)
                vh, vw = valid[lvl]
                mask[idx, :vh, :vw] = False
            out_srcs.append(src)
            out_masks.append(mask)
        return out_srcs, out_masks


def _pad_to_multiple(x, divisibility):
    """``x`` (N, C, H, W) zero-padded at the bottom and right to sides that are multiples of
    ``divisibility`` (0 or 1: unchanged)."""
    if divisibility <= 1:
        return x
    h, w = x.shape[-2:]
    ph = int(math.ceil(h / divisibility)) * divisibility
    pw = int(math.ceil(w / divisibility)) * divisibility
    return F.pad(x, (0, pw - w, 0, ph - h))


def _fold_frozen_batch_norms(body, dtype):
    """A copy of ``body`` in ``dtype`` whose convolutions carry their frozen batch norm.

    A ``FrozenBatchNorm2d`` after a convolution is an affine map per output channel: folded into
    the convolution's weight and bias, it costs no pass over the activations.

    Args:
        body (nn.Module): a backbone with Detectron2 ``Conv2d`` layers.
        dtype (torch.dtype): dtype of the copy's parameters.

    Returns:
        nn.Module or None: the folded copy in eval mode, or None when ``body`` has no
        convolution followed by a frozen batch norm.
    """
    if not any(
        isinstance(m, Conv2d) and isinstance(m.norm, FrozenBatchNorm2d) for m in body.modules()
    ):
        return None
    folded = copy.deepcopy(body).eval()
    with torch.no_grad():
        for m in folded.modules():
            if isinstance(m, Conv2d) and isinstance(m.norm, FrozenBatchNorm2d):
                norm = m.norm
                # In float32 (or float64): the fold itself adds no rounding before the cast.
                scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
                shift = norm.bias - norm.running_mean * scale
                if m.bias is not None:
                    shift = shift + m.bias * scale
                m.weight = nn.Parameter(m.weight * scale.view(-1, 1, 1, 1))
                m.bias = nn.Parameter(shift)
                m.norm = None
    folded.requires_grad_(False)
    folded.to(dtype)
    if next(folded.parameters()).device.type == "cpu":
        folded.to(memory_format=torch.channels_last)
    return folded


def _undilate_first_res5_block(body):
    """Give the first res5 block the dilation torchvision's DC5 ResNet uses.

    Detectron2 dilates every 3x3 conv of a dilated res5; torchvision (and so the official DC5
    model and its checkpoints) keeps the first block's 3x3 conv at dilation 1, because that
    block is the one that used to downsample.
    """
    conv = body.res5[0].conv2
    conv.dilation = (1, 1)
    conv.padding = (1, 1)
