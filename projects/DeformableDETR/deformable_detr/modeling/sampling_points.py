"""Where the decoder's deformable attention looked, in the pixels of the picture.

``record_sampling`` (in ``deformable_detr.layers``) keeps what an attention module handed to the
op: sampling locations and reference points normalised to each level's padded feature map. This
module maps them into the picture the detections are reported in, with the same arithmetic the
model applies to its boxes, and gathers them for one detection's query. ``demo.py
--show-sampling`` draws the result.
"""

import torch

from .transformer import DeformableTransformer

__all__ = [
    "detection_sampling",
    "last_cross_attention",
    "record_valid_ratios",
    "to_picture_pixels",
]


def last_cross_attention(model):
    """The deformable cross-attention of the last decoder layer, whose queries give the
    detections.

    Args:
        model (DeformableDETR): the detector.

    Returns:
        MultiScaleDeformableAttention: ``model.transformer.decoder.layers[-1].cross_attn``.
    """
    return model.transformer.decoder.layers[-1].cross_attn


def record_valid_ratios(record):
    """The valid ratios the transformer computed for the recorded forward pass.

    Recomputed from the padding mask the module received, with the transformer's own functions;
    without a mask nothing was padded and every ratio is 1.

    Args:
        record (SamplingRecord): a filled record.

    Returns:
        Tensor: (N, L, 2) float32 valid (width, height) fraction of every level's padded map.
    """
    shapes = [tuple(hw) for hw in record.spatial_shapes.tolist()]
    n = record.sampling_locations.shape[0]
    device = record.sampling_locations.device
    if record.padding_mask is None:
        return torch.ones((n, len(shapes), 2), dtype=torch.float32, device=device)
    masks = record.padding_mask.split([h * w for h, w in shapes], 1)
    sizes = [
        DeformableTransformer.valid_sizes(mask.view(n, h, w)) for mask, (h, w) in zip(masks, shapes)
    ]
    return DeformableTransformer.valid_ratios(shapes, sizes)


def to_picture_pixels(points, valid_ratios, image_size, output_size=None):
    """Pixel coordinates in the picture of normalised points of a level's padded feature map.

    The decoder moves a reference from the image's normalised frame into a level's padded frame by
    multiplying it by the level's valid ratio; this divides by it, so that (0, 0) is the image's
    top-left corner and the valid region's far edge is the image's far edge, whatever the padding
    of the batch or of the backbone. The normalised point is then scaled as the model scales its
    boxes: by the size of the image it saw (resized, unpadded), then by ``detector_postprocess``'s
    factor to the output size. A reference point of a box therefore lands on that box's centre.

    Args:
        points (Tensor): (..., 2) normalised (x, y) in the padded frame of a level.
        valid_ratios (Tensor): valid (width, height) fraction of that level's padded map,
            broadcastable to ``points``.
        image_size (tuple[int, int]): (height, width) of the image the model saw.
        output_size (tuple[int, int] or None): (height, width) of the picture the detections are
            reported in (the "height" and "width" inputs of the model); None: ``image_size``.

    Returns:
        Tensor: (..., 2) (x, y) pixel coordinates in the picture, in float32 (float64 for float64
        points); points outside the image map outside the picture.
    """
    if points.dtype not in (torch.float32, torch.float64):
        points = points.float()
    h, w = image_size
    out_h, out_w = output_size if output_size is not None else image_size
    normalised = points / valid_ratios.to(points)
    size = torch.as_tensor([w, h], dtype=points.dtype, device=points.device)
    scale = torch.as_tensor([out_w / w, out_h / h], dtype=points.dtype, device=points.device)
    return normalised * size * scale


def detection_sampling(record, query, image_size, output_size=None, image=0):
    """The reference and the sampling points of one query, in the picture's pixels.

    Args:
        record (SamplingRecord): a record of the attention module (filled).
        query (int): the query index (an ``Instances.pred_query`` of the detection).
        image_size (tuple[int, int]): (height, width) of the image the model saw.
        output_size (tuple[int, int] or None): (height, width) of the output picture.
        image (int): the image's index in the recorded batch.

    Returns:
        dict: "reference" (2,) (x, y) of the reference point; "reference_box" (4,) XYXY of the
        reference box, or None when the references are points; "locations" (M, L, P, 2) (x, y) of
        every head's sampling points on every level; "weights" (M, L, P) their attention weights
        in float32. Coordinates in float32 pixels of the output picture.
    """
    if record.sampling_locations is None:
        raise ValueError("the sampling record is empty: the attention module did not run")
    ratios = record_valid_ratios(record)[image]  # (L, 2)
    locations = to_picture_pixels(
        record.sampling_locations[image, query], ratios[None, :, None], image_size, output_size
    )
    # Every level holds the same reference, scaled to its own frame; level 0 is taken.
    reference = record.reference_points[image, query, 0]
    centre = to_picture_pixels(reference[:2], ratios[0], image_size, output_size)
    box = None
    if reference.shape[-1] == 4:
        half = reference[2:] / 2
        corners = torch.stack([reference[:2] - half, reference[:2] + half])
        box = to_picture_pixels(corners, ratios[0], image_size, output_size).flatten()
    return {
        "reference": centre,
        "reference_box": box,
        "locations": locations,
        "weights": record.attention_weights[image, query].float(),
    }
