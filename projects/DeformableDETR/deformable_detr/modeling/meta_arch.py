"""The Deformable DETR meta-architecture, registered in Detectron2's ``META_ARCH_REGISTRY``.

``DeformableDETR`` normalises the images, runs the backbone adapter, the sine position encoding
and the deformable transformer, applies the class and box heads to every decoder layer, and then
either returns the weighted set-prediction losses (training) or the top-scoring detections of
every image (inference). ``predict`` is the tensor-level part after the backbone adapter, which
the export wrapper calls too. At inference the network runs in the precision of TEST.PRECISION
(under autocast), while the post-processing and the returned detections stay in float32.
"""

import contextlib
import logging
import math

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage
from detectron2.utils.logger import log_first_n
from torch import nn
from torchvision.ops import box_convert

from ..checkpoint import install_strict_loading
from ..config import check_deformable_detr_config
from .backbone import DeformableDetrBackbone
from .criterion import SetCriterion
from .heads import build_prediction_heads, select_detections
from .position_encoding import PositionEmbeddingSine
from .transformer import DeformableTransformer

__all__ = ["DeformableDETR", "PRECISIONS"]

# TEST.PRECISION values, with the dtype the network then runs in (None: no autocast).
PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _source(inputs):
    """The file name and image id the dataset mapper kept in ``inputs``, for error messages."""
    parts = [f"{k} {inputs[k]!r}" for k in ("file_name", "image_id") if k in inputs]
    return f" ({', '.join(parts)})" if parts else ""


def _where():
    """The training iteration, for error messages."""
    try:
        return f"iteration {get_event_storage().iter}"
    except AssertionError:  # no EventStorage outside a trainer
        return "a forward pass outside training"


def _has_native(device_type, dtype):
    """Whether ``device_type`` computes in ``dtype`` natively (float16 is asked of GPUs only)."""
    if device_type == "cuda" and dtype == torch.bfloat16:
        return torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        from ..engine import cpu_supports_bfloat16  # here: the engine imports the model

        return cpu_supports_bfloat16()
    return True


@META_ARCH_REGISTRY.register()
class DeformableDETR(nn.Module):
    """Deformable DETR (Zhu et al., arXiv 2010.04159): plain, with iterative box refinement, or
    two-stage.

    Attributes:
        backbone (DeformableDetrBackbone): Detectron2 backbone and input projections.
        position_embedding (PositionEmbeddingSine): position encoding of every level.
        transformer (DeformableTransformer): deformable encoder and decoder.
        query_embed (nn.Embedding): (num_queries, 2 * hidden_dim) query position and content;
            absent in two-stage mode.
        class_embed (nn.ModuleList): class head of every decoder layer (and of the encoder in
            two-stage mode).
        bbox_embed (nn.ModuleList): box head of every decoder layer (and of the encoder).
        criterion (SetCriterion): the matching losses.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone,
        position_embedding,
        transformer,
        num_classes,
        num_queries,
        criterion,
        pixel_mean,
        pixel_std,
        aux_loss=True,
        detections_per_image=100,
        precision="float32",
    ):
        """
        Args:
            backbone (DeformableDetrBackbone): returns the per-level features and padding masks.
            position_embedding (nn.Module): maps a padding mask (N, H, W) to (N, C, H, W).
            transformer (DeformableTransformer): the encoder and decoder; its width (d_model)
                and variant (box refinement, two-stage) set those of the heads and queries.
            num_classes (int): number of classes (sigmoid, no background).
            num_queries (int): number of learned queries (unused in two-stage mode, where the
                transformer's number of proposals is the number of queries).
            criterion (nn.Module): ``SetCriterion`` returning a dict of weighted losses.
            pixel_mean (list[float]): per-channel mean subtracted from the input images.
            pixel_std (list[float]): per-channel std the images are divided by.
            aux_loss (bool): also train the outputs of the intermediate decoder layers.
            detections_per_image (int): detections kept per image at inference.
            precision (str): one of :data:`PRECISIONS`, the precision of the network at
                inference (TEST.PRECISION): "bfloat16" needs a GPU or a CPU with bfloat16
                arithmetic (elsewhere a warning and float32), "float16" a GPU.
        """
        super().__init__()
        self.backbone = backbone
        self.position_embedding = position_embedding
        self.transformer = transformer
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.aux_loss = aux_loss
        self.with_box_refine = with_box_refine = transformer.with_box_refine
        self.two_stage = two_stage = transformer.two_stage
        self.detections_per_image = detections_per_image
        if precision not in PRECISIONS:
            raise ValueError(
                f"precision (TEST.PRECISION) = {precision!r}: must be one of {sorted(PRECISIONS)}"
            )
        self.precision = precision

        hidden_dim = transformer.d_model
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)
        num_pred = transformer.decoder.num_layers + (1 if two_stage else 0)
        self.class_embed, self.bbox_embed = build_prediction_heads(
            hidden_dim, num_classes, num_pred, with_box_refine, two_stage
        )
        self.criterion = criterion

        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        # Weights of another variant (class count, levels, two-stage) fail to load with an error
        # naming the config key, instead of leaving randomly initialised layers behind.
        install_strict_loading(self)

    @classmethod
    def from_config(cls, cfg):
        check_deformable_detr_config(cfg)
        ddetr = cfg.MODEL.DEFORMABLE_DETR
        return {
            "backbone": DeformableDetrBackbone(cfg),
            "position_embedding": PositionEmbeddingSine(cfg),
            "transformer": DeformableTransformer(cfg),
            "num_classes": ddetr.NUM_CLASSES,
            "num_queries": ddetr.NUM_QUERIES,
            "criterion": SetCriterion(cfg),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "aux_loss": ddetr.AUX_LOSS,
            "detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "precision": cfg.TEST.PRECISION,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def normalize(self, images):
        """Normalise pixel values (INPUT.FORMAT channel order, 0..255) with MODEL.PIXEL_MEAN/STD.

        Args:
            images (Tensor): (C, H, W) or (N, C, H, W), any real dtype and device.

        Returns:
            Tensor: the normalised images, in the model's dtype and on its device.
        """
        return (images.to(self.pixel_mean) - self.pixel_mean) / self.pixel_std

    def preprocess_image(self, batched_inputs):
        """Check and normalise the images, then pad them to a common size.

        Args:
            batched_inputs (list[dict]): Detectron2 inputs with "image" (C, H, W) in the channel
                order of INPUT.FORMAT.

        Returns:
            ImageList: the normalised images and their sizes before padding.
        """
        if len(batched_inputs) == 0:
            raise ValueError("batched_inputs is empty")
        images = [self._checked_image(i, x) for i, x in enumerate(batched_inputs)]
        floats = [(name, x) for name, x in images if x.is_floating_point()]
        if floats:
            # Integer pixels need no value check; float ones cost one host read per batch.
            device = floats[0][1].device
            ranges = [torch.stack(torch.aminmax(x)).to(device) for _, x in floats]
            for (name, _), (low, high) in zip(floats, torch.stack(ranges).tolist()):
                self._check_pixel_range(name, low, high)
        # The backbone adapter runs on each image's own extent, so no size divisibility is needed.
        return ImageList.from_tensors([self.normalize(x) for _, x in images])

    def _checked_image(self, i, inputs):
        """The name and image of ``batched_inputs[i]``, or a clear error on a bad layout."""
        if not isinstance(inputs, dict) or "image" not in inputs:
            raise TypeError(f"batched_inputs[{i}] must be a dict with an 'image' tensor")
        image = inputs["image"]
        name = f"batched_inputs[{i}]['image']" + _source(inputs)
        if not torch.is_tensor(image):
            raise TypeError(
                f"{name} must be a torch.Tensor (C, H, W), got {type(image).__name__}; convert an "
                "(H, W, C) array with torch.as_tensor(array.transpose(2, 0, 1).copy())"
            )
        channels = self.pixel_mean.shape[0]
        if image.dim() != 3 or image.shape[0] != channels:
            raise ValueError(f"{name} must be ({channels}, H, W), got {tuple(image.shape)}")
        if image.shape[1] == 0 or image.shape[2] == 0:
            raise ValueError(f"{name} is empty: shape {tuple(image.shape)}")
        if image.dtype != torch.uint8 and not image.is_floating_point():
            raise TypeError(
                f"{name} has dtype {image.dtype}; expected uint8 or floating point pixel values "
                "in 0..255 (INPUT.FORMAT channel order)"
            )
        return name, image

    @staticmethod
    def _check_pixel_range(name, low, high):
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError(f"{name} has NaN or infinite pixel values")
        if high <= 1.0:
            # Could be a black image, so only a warning; a [0, 1] image would otherwise be
            # normalised by MODEL.PIXEL_MEAN/STD meant for 0..255 and give no detections.
            log_first_n(
                logging.WARNING,
                f"{name} has pixel values in [{low:g}, {high:g}]: the model expects 0..255 (as "
                "DefaultPredictor and the dataset mapper give); multiply [0, 1] images by 255. "
                "This warning is shown once.",
            )

    def forward_raw(self, batched_inputs):
        """Run the network and return its raw outputs, before losses or post-processing.

        Args:
            batched_inputs (list[dict]): Detectron2 inputs (see ``preprocess_image``).

        Returns:
            tuple[dict, ImageList]: the outputs of :meth:`predict` and the preprocessed images.
        """
        images = self.preprocess_image(batched_inputs)
        return self.predict(*self.backbone(images)), images

    def predict(self, srcs, masks):
        """The network after the backbone adapter: the tensor-level core of training, inference
        and export.

        Args:
            srcs (list[Tensor]): per level, (N, hidden_dim, H_l, W_l) features.
            masks (list[Tensor]): per level, (N, H_l, W_l) bool, True on padding.

        Returns:
            dict: the outputs as the official model returns them: "pred_logits"
            (N, Q, num_classes), "pred_boxes" (N, Q, 4) normalised (cx, cy, w, h) relative to
            each image's own size, "aux_outputs" (one dict with both keys per intermediate
            decoder layer) and, in two-stage mode, "enc_outputs" (the encoder proposals' logits
            and boxes, and the tokens' "padding_mask").
        """
        pos = [self.position_embedding(m).to(s.dtype) for s, m in zip(srcs, masks)]
        query_embed = None if self.two_stage else self.query_embed.weight
        hs, _, _, boxes, enc_logits, enc_coord_unact = self.transformer(
            srcs, masks, pos, query_embed, self.class_embed, self.bbox_embed
        )
        logits = [self.class_embed[lvl](hs[lvl]) for lvl in range(hs.shape[0])]
        outputs = {
            "pred_logits": logits[-1],
            "pred_boxes": boxes[-1],
            "aux_outputs": [
                {"pred_logits": c, "pred_boxes": b} for c, b in zip(logits[:-1], boxes[:-1])
            ],
        }
        if self.two_stage:
            outputs["enc_outputs"] = {
                "pred_logits": enc_logits,
                "pred_boxes": enc_coord_unact.sigmoid(),
                "padding_mask": torch.cat([m.flatten(1) for m in masks], 1),
            }
        return outputs

    def forward(self, batched_inputs):
        """
        Args:
            batched_inputs (list[dict]): Detectron2 inputs: "image" (C, H, W), in training
                "instances" with gt_boxes and gt_classes, and optionally the requested output
                "height" and "width".

        Returns:
            dict[str, Tensor] in training: the weighted loss terms. In inference, list[dict]: one
            {"instances": Instances} per image with pred_boxes (XYXY, output image coordinates),
            scores, pred_classes and pred_query (the decoder query of each detection).
        """
        if self.training:
            # Targets first: bad annotations fail before the network runs.
            targets = self.prepare_targets(batched_inputs)
            outputs, _ = self.forward_raw(batched_inputs)
            if not self.aux_loss:
                outputs = {k: v for k, v in outputs.items() if k != "aux_outputs"}
            try:
                losses = self.criterion(outputs, targets)
            except FloatingPointError as e:
                # The matcher meets non-finite predictions before the losses do.
                raise FloatingPointError(f"Deformable DETR at {_where()}: {e}") from e
            self._check_losses(losses)
            return losses

        if len(batched_inputs) == 0:
            return []
        with self.inference_precision():
            outputs, images = self.forward_raw(batched_inputs)
        # Scores and the top-K ranking in float32, so that 16-bit logits rank as float32 ones do
        # up to their own rounding.
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
        results = self.inference(logits, boxes, images.image_sizes)
        processed = []
        for result, inputs, size in zip(results, batched_inputs, images.image_sizes):
            height = inputs.get("height", size[0])
            width = inputs.get("width", size[1])
            processed.append({"instances": detector_postprocess(result, height, width)})
        return processed

    def inference_precision(self):
        """The autocast region the network runs in at inference, as TEST.PRECISION asks.

        Returns:
            context manager: ``torch.autocast`` in 16-bit, a null context in float32 (and for
            bfloat16 on a CPU without bfloat16 arithmetic, with a warning).

        Raises:
            ValueError: float16 on a CPU, or an unknown precision; the message names the key.
        """
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"TEST.PRECISION = {self.precision!r}: must be one of {sorted(PRECISIONS)}"
            )
        dtype = PRECISIONS[self.precision]
        device_type = self.device.type
        if dtype is None:
            return contextlib.nullcontext()
        if device_type == "cpu" and dtype == torch.float16:
            raise ValueError(
                "TEST.PRECISION = 'float16' is not supported on the CPU: use 'bfloat16' (CPUs with "
                "AMX or AVX512-BF16) or 'float32', or move the model to a GPU"
            )
        if not _has_native(device_type, dtype):
            log_first_n(
                logging.WARNING,
                f"TEST.PRECISION = {self.precision!r} but this {device_type.upper()} has no "
                f"native {self.precision} arithmetic: inference runs in float32. This warning "
                "is shown once.",
                key="message",
            )
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=dtype)

    def prepare_targets(self, batched_inputs):
        """Ground truth in the criterion's format, boxes normalised by each image's own size.

        Args:
            batched_inputs (list[dict]): inputs with "image" (C, H, W) and "instances"
                (gt_boxes, gt_classes) in the coordinates of that image.

        Returns:
            list[dict]: per image, "labels" (T,) int64 and "boxes" (T, 4) normalised
            (cx, cy, w, h).
        """
        targets = []
        for i, inputs in enumerate(batched_inputs):
            if "instances" not in inputs:
                raise ValueError(
                    f"batched_inputs[{i}]{_source(inputs)} has no 'instances' in training mode"
                )
            h, w = inputs["image"].shape[-2:]
            gt = inputs["instances"]
            labels = gt.gt_classes.long()
            # Sigmoid classifier without background: labels index the NUM_CLASSES outputs directly.
            # Checked where it costs no device sync: on the CPU, where the data loader leaves
            # them (its mapper checks the dataset's labels too).
            on_cpu = labels.device.type == "cpu"
            if on_cpu and len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(
                    f"batched_inputs[{i}]['instances'].gt_classes{_source(inputs)} has labels "
                    f"{sorted(set(labels.tolist()))} outside [0, {self.num_classes}): "
                    "MODEL.DEFORMABLE_DETR.NUM_CLASSES must be the number of dataset classes "
                    "(contiguous ids, no background class)"
                )
            # float32, or float64 for a float64 model: the losses compare them with its boxes.
            dtype = torch.promote_types(self.pixel_mean.dtype, torch.float32)
            scale = torch.as_tensor([w, h, w, h], dtype=dtype, device=self.device)
            boxes = gt.gt_boxes.tensor.to(self.device, dtype) / scale
            boxes = box_convert(boxes, in_fmt="xyxy", out_fmt="cxcywh")
            targets.append({"labels": labels.to(self.device), "boxes": boxes})
        return targets

    def _check_losses(self, losses):
        """Raise FloatingPointError if the total loss is not finite, naming the bad terms."""
        total = sum(losses.values())
        if torch.isfinite(total).all():
            return
        bad = sorted(k for k, v in losses.items() if not torch.isfinite(v).all())
        raise FloatingPointError(
            f"Deformable DETR loss is not finite at {_where()}: non-finite terms {bad} "
            f"({', '.join(f'{k}={losses[k].item()}' for k in bad)})"
        )

    def inference(self, pred_logits, pred_boxes, image_sizes):
        """Top-scoring (query, class) pairs of every image, as the official post-processing.

        Args:
            pred_logits (Tensor): (N, Q, C) class logits.
            pred_boxes (Tensor): (N, Q, 4) normalised (cx, cy, w, h).
            image_sizes (list[tuple[int, int]]): (h, w) of every image as seen by the model.

        Returns:
            list[Instances]: pred_boxes in the coordinates of the images seen by the model,
            scores, pred_classes and pred_query, the index in Q of each detection's query (several
            detections may share a query, with different classes).
        """
        scores, labels, boxes, queries = select_detections(
            pred_logits, pred_boxes, self.detections_per_image
        )
        results = []
        for b, s, l, q, (h, w) in zip(boxes, scores, labels, queries, image_sizes):
            scale = torch.as_tensor([w, h, w, h], dtype=b.dtype, device=b.device)
            result = Instances((h, w))
            result.pred_boxes = Boxes(b * scale)
            result.scores = s
            result.pred_classes = l
            result.pred_query = q
            results.append(result)
        return results
