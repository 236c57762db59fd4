"""The Deformable DETR meta-architecture, registered in Detectron2's ``META_ARCH_REGISTRY``.

``DeformableDETR`` normalises the images, runs the backbone adapter, the sine position encoding
and the deformable transformer, applies the class and box heads to every decoder layer, and then
either returns the weighted set-prediction losses (training) or the top-scoring detections of
every image (inference).
"""

import logging
import math

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage
from torch import nn
from torchvision.ops import box_convert

from ..checkpoint import install_strict_loading
from ..config import check_deformable_detr_config
from .backbone import DeformableDetrBackbone
from .criterion import SetCriterion
from .heads import build_prediction_heads
from .matcher import HungarianMatcher
from .position_encoding import PositionEmbeddingSine
from .transformer import DeformableTransformer, inverse_sigmoid

__all__ = ["DeformableDETR"]

logger = logging.getLogger(__name__)


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
        with_box_refine=False,
        two_stage=False,
        detections_per_image=100,
    ):
        """
        Args:
            backbone (DeformableDetrBackbone): returns the per-level features and padding masks.
            position_embedding (nn.Module): maps a padding mask (N, H, W) to (N, C, H, W).
            transformer (DeformableTransformer): the encoder and decoder; its width (d_model)
                sets the width of the heads and of the queries.
            num_classes (int): number of classes (sigmoid, no background).
            num_queries (int): number of learned queries (unused in two-stage mode, where the
                transformer's number of proposals is the number of queries).
            criterion (nn.Module): ``SetCriterion`` returning a dict of weighted losses.
            pixel_mean (list[float]): per-channel mean subtracted from the input images.
            pixel_std (list[float]): per-channel std the images are divided by.
            aux_loss (bool): also train the outputs of the intermediate decoder layers.
            with_box_refine (bool): iterative box refinement with one head per decoder layer.
            two_stage (bool): queries from the top-scoring encoder proposals.
            detections_per_image (int): detections kept per image at inference.
        """
        super().__init__()
        # level_embed is (num_feature_levels, d_model) in every variant.
        num_levels, hidden_dim = transformer.level_embed.shape
        num_dec_layers = len(transformer.decoder.layers)
        if len(backbone.input_proj) != num_levels:
            raise ValueError(
                f"the backbone makes {len(backbone.input_proj)} feature levels but the transformer "
                f"expects {num_levels} (MODEL.DEFORMABLE_DETR.NUM_FEATURE_LEVELS)"
            )
        if num_classes < 1:
            raise ValueError(f"num_classes (MODEL.DEFORMABLE_DETR.NUM_CLASSES) = {num_classes} < 1")
        if not two_stage and num_queries < 1:
            raise ValueError(f"num_queries (MODEL.DEFORMABLE_DETR.NUM_QUERIES) = {num_queries} < 1")
        if detections_per_image < 1:
            raise ValueError(
                f"detections_per_image (TEST.DETECTIONS_PER_IMAGE) = {detections_per_image} < 1"
            )
        if two_stage and not with_box_refine:
            # The official code (and every published two-stage result) uses two-stage only with
            # refinement: without it the official decoder has no box heads to score proposals.
            raise ValueError(
                "MODEL.DEFORMABLE_DETR.TWO_STAGE requires MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE "
                "(two-stage is defined only with iterative box refinement, as in "
                "configs/r50_two_stage.yaml)"
            )
        if len(pixel_mean) != len(pixel_std):
            raise ValueError(
                f"MODEL.PIXEL_MEAN {list(pixel_mean)} and MODEL.PIXEL_STD {list(pixel_std)} "
                "differ in length"
            )

        self.backbone = backbone
        self.position_embedding = position_embedding
        self.transformer = transformer
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.aux_loss = aux_loss
        self.with_box_refine = with_box_refine
        self.two_stage = two_stage
        self.detections_per_image = detections_per_image

        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)
        num_pred = num_dec_layers + (1 if two_stage else 0)
        self.class_embed, self.bbox_embed = build_prediction_heads(
            hidden_dim, num_classes, num_pred, with_box_refine, two_stage
        )
        self.criterion = criterion

        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        # Weights of another variant (class count, levels, two-stage) fail to load with an error
        # naming the config key, instead of leaving randomly initialised layers behind.
        install_strict_loading(self)
        self._warned_unit_range = False

    @classmethod
    def from_config(cls, cfg):
        check_deformable_detr_config(cfg)
        ddetr = cfg.MODEL.DEFORMABLE_DETR
        backbone = DeformableDetrBackbone(cfg)
        transformer = DeformableTransformer(
            d_model=ddetr.HIDDEN_DIM,
            nhead=ddetr.NHEADS,
            num_encoder_layers=ddetr.ENC_LAYERS,
            num_decoder_layers=ddetr.DEC_LAYERS,
            dim_feedforward=ddetr.DIM_FEEDFORWARD,
            dropout=ddetr.DROPOUT,
            activation="relu",
            num_feature_levels=ddetr.NUM_FEATURE_LEVELS,
            dec_n_points=ddetr.DEC_N_POINTS,
            enc_n_points=ddetr.ENC_N_POINTS,
            two_stage=ddetr.TWO_STAGE,
            two_stage_num_proposals=ddetr.TWO_STAGE_NUM_PROPOSALS,
            with_box_refine=ddetr.WITH_BOX_REFINE,
        )
        matcher = HungarianMatcher(
            cost_class=ddetr.COST_CLASS,
            cost_bbox=ddetr.COST_BBOX,
            cost_giou=ddetr.COST_GIOU,
            focal_alpha=ddetr.FOCAL_ALPHA,
            focal_gamma=ddetr.FOCAL_GAMMA,
        )
        base = {
            "loss_class": ddetr.CLASS_WEIGHT,
            "loss_bbox": ddetr.BBOX_WEIGHT,
            "loss_giou": ddetr.GIOU_WEIGHT,
        }
        weight_dict = dict(base)
        if ddetr.AUX_LOSS:
            for i in range(ddetr.DEC_LAYERS - 1):
                weight_dict.update({f"{k}_{i}": v for k, v in base.items()})
        if ddetr.TWO_STAGE:
            weight_dict.update({f"{k}_enc": v for k, v in base.items()})
        criterion = SetCriterion(
            ddetr.NUM_CLASSES,
            matcher=matcher,
            weight_dict=weight_dict,
            losses=("labels", "boxes"),
            focal_alpha=ddetr.FOCAL_ALPHA,
            focal_gamma=ddetr.FOCAL_GAMMA,
        )
        return {
            "backbone": backbone,
            "position_embedding": PositionEmbeddingSine(
                num_pos_feats=ddetr.HIDDEN_DIM // 2, normalize=True
            ),
            "transformer": transformer,
            "num_classes": ddetr.NUM_CLASSES,
            "num_queries": ddetr.NUM_QUERIES,
            "criterion": criterion,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "aux_loss": ddetr.AUX_LOSS,
            "with_box_refine": ddetr.WITH_BOX_REFINE,
            "two_stage": ddetr.TWO_STAGE,
            "detections_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs):
        """Normalise the images and pad them to a common size.

        Args:
            batched_inputs (list[dict]): Detectron2 inputs with "image" (C, H, W) in the channel
                order of INPUT.FORMAT.

        Returns:
            ImageList: the normalised images and their sizes before padding.
        """
        if len(batched_inputs) == 0:
            raise ValueError("batched_inputs is empty")
        images = []
        for i, x in enumerate(batched_inputs):
            image = self._checked_image(i, x)
            # Any float input (e.g. float64) is computed in the model's own precision.
            image = image.to(device=self.device, dtype=self.pixel_mean.dtype)
            images.append((image - self.pixel_mean) / self.pixel_std)
        # The backbone adapter runs on each image's own extent, so no size divisibility is needed.
        return ImageList.from_tensors(images)

    def _checked_image(self, i, inputs):
        """The image of ``batched_inputs[i]``, or a clear error if the model cannot use it."""
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
        if image.is_floating_point():
            low, high = (float(v) for v in torch.aminmax(image))
            if not (math.isfinite(low) and math.isfinite(high)):
                raise ValueError(f"{name} has NaN or infinite pixel values")
            if high <= 1.0 and not self._warned_unit_range:
                # Could be a black image, so only a warning; a [0, 1] image would otherwise be
                # normalised by MODEL.PIXEL_MEAN/STD meant for 0..255 and give no detections.
                self._warned_unit_range = True
                logger.warning(
                    "%s has pixel values in [%g, %g]: the model expects 0..255 (as "
                    "DefaultPredictor and the dataset mapper give); multiply [0, 1] images by "
                    "255. This warning is shown once.",
                    name,
                    low,
                    high,
                )
        return image

    def forward_raw(self, batched_inputs):
        """Run the network and return its raw outputs, before losses or post-processing.

        Args:
            batched_inputs (list[dict]): Detectron2 inputs (see ``preprocess_image``).

        Returns:
            tuple[dict, ImageList]: the outputs dict, as the official model returns it:
            "pred_logits" (N, Q, num_classes), "pred_boxes" (N, Q, 4) normalised (cx, cy, w, h)
            relative to each image's own size, "aux_outputs" (one dict with both keys per
            intermediate decoder layer) and, in two-stage mode, "enc_outputs" (the encoder
            proposals' logits and boxes); and the preprocessed images.
        """
        images = self.preprocess_image(batched_inputs)
        srcs, masks = self.backbone(images)
        pos = [self.position_embedding(m).to(s.dtype) for s, m in zip(srcs, masks)]
        query_embed = None if self.two_stage else self.query_embed.weight
        hs, init_reference, inter_references, enc_class, enc_coord_unact = self.transformer(
            srcs, masks, pos, query_embed, self.class_embed, self.bbox_embed
        )

        outputs_classes, outputs_coords = [], []
        for lvl in range(hs.shape[0]):
            reference = init_reference if lvl == 0 else inter_references[lvl - 1]
            reference = inverse_sigmoid(reference)
            outputs_classes.append(self.class_embed[lvl](hs[lvl]))
            delta = self.bbox_embed[lvl](hs[lvl])
            if reference.shape[-1] == 4:
                delta = delta + reference
            else:
                delta = torch.cat([delta[..., :2] + reference, delta[..., 2:]], dim=-1)
            outputs_coords.append(delta.sigmoid())

        outputs = {
            "pred_logits": outputs_classes[-1],
            "pred_boxes": outputs_coords[-1],
            "aux_outputs": [
                {"pred_logits": c, "pred_boxes": b}
                for c, b in zip(outputs_classes[:-1], outputs_coords[:-1])
            ],
        }
        if self.two_stage:
            outputs["enc_outputs"] = {
                "pred_logits": enc_class,
                "pred_boxes": enc_coord_unact.sigmoid(),
            }
        return outputs, images

    def forward(self, batched_inputs):
        """
        Args:
            batched_inputs (list[dict]): Detectron2 inputs: "image" (C, H, W), in training
                "instances" with gt_boxes and gt_classes, and optionally the requested output
                "height" and "width".

        Returns:
            dict[str, Tensor] in training: the weighted loss terms. In inference, list[dict]: one
            {"instances": Instances} per image with pred_boxes (XYXY, output image coordinates),
            scores and pred_classes.
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
        outputs, images = self.forward_raw(batched_inputs)
        results = self.inference(outputs["pred_logits"], outputs["pred_boxes"], images.image_sizes)
        processed = []
        for result, inputs, size in zip(results, batched_inputs, images.image_sizes):
            height = inputs.get("height", size[0])
            width = inputs.get("width", size[1])
            processed.append({"instances": detector_postprocess(result, height, width)})
        return processed

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
            gt = inputs["instances"].to(self.device)
            labels = gt.gt_classes.long()
            # Sigmoid classifier without background: labels index the NUM_CLASSES outputs directly.
            if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(
                    f"batched_inputs[{i}]['instances'].gt_classes{_source(inputs)} has labels "
                    f"{sorted(set(labels.tolist()))} outside [0, {self.num_classes}): "
                    "MODEL.DEFORMABLE_DETR.NUM_CLASSES must be the number of dataset classes "
                    "(contiguous ids, no background class)"
                )
            scale = torch.as_tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            boxes = box_convert(gt.gt_boxes.tensor.float() / scale, in_fmt="xyxy", out_fmt="cxcywh")
            targets.append({"labels": labels, "boxes": boxes})
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
            list[Instances]: boxes in the coordinates of the images seen by the model.
        """
        num_classes = pred_logits.shape[-1]
        prob = pred_logits.sigmoid().flatten(1)
        k = min(self.detections_per_image, prob.shape[1])
        scores, index = prob.topk(k, dim=1)
        query = torch.div(index, num_classes, rounding_mode="floor")
        labels = index % num_classes
        boxes = box_convert(pred_boxes, in_fmt="cxcywh", out_fmt="xyxy")
        boxes = torch.gather(boxes, 1, query.unsqueeze(-1).expand(-1, -1, 4))

        results = []
        for b, s, l, (h, w) in zip(boxes, scores, labels, image_sizes):
            scale = torch.as_tensor([w, h, w, h], dtype=b.dtype, device=b.device)
            result = Instances((h, w))
            result.pred_boxes = Boxes(b * scale)
            result.scores = s
            result.pred_classes = l
            results.append(result)
        return results
