"""Deployment of a built ``DeformableDETR``: a tensor-in / tensor-out wrapper and its exporters.

``DeformableDetrExportWrapper`` runs the whole detector, from an image tensor to the top-K
detections, without Detectron2 structures. ``export_model`` saves it in one of three formats:

- ``exported-program``: a ``torch.export`` program (``.pt2``), fixed or dynamic image size, with
  the deformable attention as the registered op ``torch.ops.deformable_detr.ms_deform_attn_forward``;
- ``torchscript``: a traced module (``.ts``) holding the same op, fixed image size;
- ``onnx``: an ONNX graph (``.onnx``, opset ``ONNX_OPSET``), fixed image size, where the op is
  written as its reference computation in standard operators (one ``GridSample`` per level), so
  that any ONNX runtime runs it.

``load_exported`` runs a saved file back with its own runtime (``torch.export.load``,
``torch.jit.load``, onnxruntime).
"""

import logging
import math
import os
import warnings

import torch
from torch import nn

from .checkpoint.atomic import atomic_write_file
from .modeling.heads import select_detections

__all__ = [
    "DeformableDetrExportWrapper",
    "EXPORT_FORMATS",
    "ONNX_OPSET",
    "OUTPUT_NAMES",
    "export_model",
    "export_program",
    "save_exported",
    "load_exported",
    "min_dynamic_size",
]

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("torchscript", "onnx", "exported-program")
# GridSample, which the ONNX form of the attention op uses, exists from opset 16 on.
ONNX_OPSET = 17
FILE_NAMES = {
    "torchscript": "model.ts",
    "onnx": "model.onnx",
    "exported-program": "model.pt2",
}
INPUT_NAME = "image"
OUTPUT_NAMES = ("boxes", "scores", "classes")
_OP_NAME = "deformable_detr::ms_deform_attn_forward"


class DeformableDetrExportWrapper(nn.Module):
    """The detector as a function of image tensors only.

    Calls the code ``DeformableDETR.forward`` runs at inference, on one image or on a batch of
    images of one size: ``normalize``, ``backbone.features``, ``predict`` and
    ``select_detections``. Nothing is padded, so every feature level is valid everywhere, as for
    a single image in the eager model, whose detections it gives bit for bit.

    Boxes are in the pixels of the input image: the caller maps them back to the original
    picture if it resized it. For a single image they are clipped to the image and empty ones
    are dropped, as ``detector_postprocess`` does; for a batch every image keeps its K rows
    (clipped; empty boxes, which sigmoid boxes only give through float underflow, are kept).
    """

    def __init__(self, model):
        """
        Args:
            model (DeformableDETR): a built detector; put it in eval mode before exporting.
        """
        super().__init__()
        divisibility = model.backbone.body_size_divisibility
        if divisibility > 1:
            raise ValueError(
                f"cannot export a DeformableDETR whose backbone {type(model.backbone.body).__name__} "
                f"needs inputs padded to a multiple of {divisibility}: the padding would be seen "
                "as image content. Export supports backbones without a size constraint (ResNet)."
            )
        self.model = model

    def forward(self, image):
        """
        Args:
            image (Tensor): (C, H, W) or (N, C, H, W) image(s) in the model's input format
                (INPUT.FORMAT channel order, 0-255), any real dtype.

        Returns:
            tuple[Tensor, Tensor, Tensor]: boxes (K, 4) XYXY in input pixels, scores (K,) and
            classes (K,) int64 in 0..NUM_CLASSES-1, by decreasing score; for a batched input
            (N, K, 4), (N, K) and (N, K).
        """
        model = self.model
        channels = model.pixel_mean.shape[0]
        single = image.dim() == 3
        images = image[None] if single else image
        if images.dim() != 4 or images.shape[1] != channels:
            raise ValueError(
                f"image must be ({channels}, H, W) or (N, {channels}, H, W), "
                f"got {tuple(image.shape)}"
            )
        # The model's own path after preprocessing, on unpadded images: every level is valid.
        srcs = model.backbone.features(model.normalize(images))
        masks = [torch.zeros_like(s[:, 0], dtype=torch.bool) for s in srcs]
        outputs = model.predict(srcs, masks)
        scores, classes, boxes, _ = select_detections(
            outputs["pred_logits"], outputs["pred_boxes"], model.detections_per_image
        )
        height, width = images.shape[-2:]
        # torch.full follows symbolic sizes in a dynamic export; a Python list would freeze them.
        limits = torch.stack(
            [torch.full((), v, dtype=boxes.dtype, device=boxes.device) for v in (width, height)]
        ).repeat(2)
        boxes = boxes * limits
        # The clipping of detector_postprocess, whose scale is 1 for outputs in input pixels.
        boxes = torch.minimum(boxes.clamp(min=0), limits)
        if not single:
            return boxes, scores, classes
        boxes, scores, classes = boxes[0], scores[0], classes[0]
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return boxes[keep], scores[keep], classes[keep]


def min_dynamic_size(model):
    """Smallest image side a dynamic export accepts.

    The coarsest level must be at least 2x2 (a 1x1 map is a special case for the shape solver),
    and in two-stage mode the encoder must have as many tokens as proposals are kept.

    Args:
        model (DeformableDETR): the detector.

    Returns:
        int: the smallest height and width.
    """
    strides = [s.stride for s in model.backbone.output_shape()]
    side = max(strides) + 1
    if model.two_stage:
        wanted = model.transformer.two_stage_num_proposals

        def tokens(n):
            # Stride-2 convolutions with 'same' padding round up: a level is ceil(n / stride).
            return sum(math.ceil(n / s) ** 2 for s in strides)

        while tokens(side) < wanted:
            side += 1
    return side


def _check_exportable(wrapper):
    if not hasattr(torch.ops.deformable_detr, "ms_deform_attn_forward"):
        raise RuntimeError(
            "export needs the compiled deformable attention op (deformable_detr._C), which is not "
            "built: run `pip install -e .` in the repository root"
        )
    if wrapper.training:
        raise ValueError("the model is in training mode: call .eval() before exporting it")


def _check_image(image, channels):
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != channels:
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"the sample image must be a ({channels}, H, W) tensor, got {got}")
    if not image.dtype.is_floating_point:
        raise ValueError(f"the sample image must be a float tensor, got {image.dtype}")


def export_program(wrapper, image, dynamic=False):
    """Export the wrapper with ``torch.export``.

    Args:
        wrapper (DeformableDetrExportWrapper): the detector, in eval mode.
        image (Tensor): (C, H, W) float sample image.
        dynamic (bool): let height and width vary from ``min_dynamic_size`` to 8192 pixels;
            otherwise the program only accepts the sample's size.

    Returns:
        torch.export.ExportedProgram: the program, with the deformable attention as
        ``torch.ops.deformable_detr.ms_deform_attn_forward``.
    """
    _check_exportable(wrapper)
    _check_image(image, wrapper.model.pixel_mean.shape[0])
    dynamic_shapes = None
    if dynamic:
        body = wrapper.model.backbone.body
        if getattr(body, "supports_dynamic_export", True) is False:
            # The per-image padding to a multiple of the backbone's stride has bounds that the
            # export's shape solver cannot prove: it fails with "Constraints violated" (or runs
            # for many minutes) deep inside torch.export.
            raise ValueError(
                f"a dynamic image size cannot be exported with the {type(body).__name__} backbone "
                f"({getattr(body, 'model_name', '')}): export at a fixed size instead (leave out "
                "--dynamic), one file per input size"
            )
        low = min_dynamic_size(wrapper.model)
        if min(image.shape[-2:]) < low:
            raise ValueError(
                f"a dynamic export needs a sample image of at least {low}x{low} pixels for this "
                f"model, got {tuple(image.shape[-2:])}"
            )
        height = torch.export.Dim("height", min=low, max=8192)
        width = torch.export.Dim("width", min=low, max=8192)
        dynamic_shapes = ({1: height, 2: width},)
    with torch.no_grad():
        return torch.export.export(wrapper, (image,), dynamic_shapes=dynamic_shapes)


def _trace_program(program, image):
    module = program.module()
    # Saved tensors should not carry autograd state into the traced module.
    for p in module.parameters():
        p.requires_grad_(False)
    with torch.no_grad(), warnings.catch_warnings():
        # The program's own input-shape checks are what the tracer warns about: the traced module
        # is meant for the sample's size only.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace(module, (image,), check_trace=False)


def _register_onnx_symbolic():
    from torch.onnx import register_custom_op_symbolic

    register_custom_op_symbolic(_OP_NAME, _onnx_ms_deform_attn, ONNX_OPSET)


def save_exported(program, fmt, image, output_dir):
    """Write a ``torch.export`` program of the detector in the given format.

    TorchScript and ONNX are traced from the program (aten operators and the registered
    attention op), so they never trace the model's Python control flow; they keep the size of
    ``image``, which must be one the program accepts.

    Args:
        program (torch.export.ExportedProgram): from ``export_program``.
        fmt (str): one of ``EXPORT_FORMATS``.
        image (Tensor): (C, H, W) float image the traced formats are made for.
        output_dir (str): folder for the file (created if needed).

    Returns:
        str: path of the written file (``FILE_NAMES[fmt]`` in ``output_dir``).
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: choose one of {EXPORT_FORMATS}")
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, FILE_NAMES[fmt])
    if fmt == "exported-program":
        write = lambda f: torch.export.save(program, f)  # noqa: E731
    elif fmt == "torchscript":
        traced = _trace_program(program, image)
        write = lambda f: torch.jit.save(traced, f)  # noqa: E731
    else:
        _register_onnx_symbolic()
        traced = _trace_program(program, image)

        def write(f):
            with torch.no_grad(), warnings.catch_warnings():
                # A traced module has no Python signature to read the input names from.
                warnings.filterwarnings("ignore", message="no signature found")
                torch.onnx.export(
                    traced,
                    (image,),
                    f,
                    dynamo=False,
                    opset_version=ONNX_OPSET,
                    input_names=[INPUT_NAME],
                    output_names=list(OUTPUT_NAMES),
                )

    # A failed or interrupted export leaves the previous file (or none), never a partial one.
    atomic_write_file(path, write)
    logger.info(f"Exported the detector as {fmt} to {path}")
    return path


def export_model(model, fmt, image, output_dir, dynamic=False):
    """Export a built detector to ``output_dir`` in the given format.

    Args:
        model (DeformableDETR): the detector; it is put in eval mode.
        fmt (str): one of ``EXPORT_FORMATS``.
        image (Tensor): (C, H, W) float sample image in the model's input format; TorchScript
            and ONNX files accept its size only.
        output_dir (str): folder for the file (created if needed).
        dynamic (bool): export for any image size (``exported-program`` only).

    Returns:
        str: path of the written file (``FILE_NAMES[fmt]`` in ``output_dir``).
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: choose one of {EXPORT_FORMATS}")
    if dynamic and fmt != "exported-program":
        raise ValueError(
            f"a dynamic image size is only supported by the exported-program format: {fmt} is "
            "traced at the sample image's size (export one file per input size instead)"
        )
    wrapper = DeformableDetrExportWrapper(model).eval()
    program = export_program(wrapper, image, dynamic=dynamic)
    return save_exported(program, fmt, image, output_dir)


def _format_of(path):
    for fmt, name in FILE_NAMES.items():
        if path.endswith(os.path.splitext(name)[1]):
            return fmt
    raise ValueError(
        f"cannot tell the format of {path!r} from its extension: expected one of "
        f"{sorted(os.path.splitext(n)[1] for n in FILE_NAMES.values())}"
    )


class _OnnxRunner:
    """Runs an ONNX file with onnxruntime, tensors in and out."""

    def __init__(self, path, num_threads=None):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
            options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(
            path, options, providers=["CPUExecutionProvider"]
        )

    def __call__(self, image):
        feed = {INPUT_NAME: image.detach().cpu().float().numpy()}
        return tuple(torch.from_numpy(x) for x in self.session.run(list(OUTPUT_NAMES), feed))


def load_exported(path, fmt=None, num_threads=None):
    """Load an exported detector with its format's runtime.

    Loading a TorchScript file or a program needs the attention op registered, which importing
    this module does (it loads ``deformable_detr._C``); ONNX needs onnxruntime only.

    Args:
        path (str): file written by ``export_model``.
        fmt (str or None): one of ``EXPORT_FORMATS``; None guesses it from the extension.
        num_threads (int or None): onnxruntime's intra-op threads (ONNX only); None keeps the
            runtime's default.

    Returns:
        callable: maps a (C, H, W) float image to (boxes, scores, classes) tensors.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"exported model file {path!r} does not exist")
    fmt = fmt or _format_of(path)
    if fmt == "exported-program":
        module = torch.export.load(path).module()
        for p in module.parameters():
            p.requires_grad_(False)
        return module
    if fmt == "torchscript":
        return torch.jit.load(path)
    if fmt == "onnx":
        return _OnnxRunner(path, num_threads)
    raise ValueError(f"unknown export format {fmt!r}: choose one of {EXPORT_FORMATS}")


def _onnx_ms_deform_attn(g, value, spatial_shapes, level_start_index, locations, weights):
    """ONNX form of ``torch.ops.deformable_detr.ms_deform_attn_forward``: the reference path
    (one ``GridSample`` per level) in standard operators, sizes read from the inputs at run time.
    """
    num_levels = locations.type().sizes()[3]

    def ints(*v):
        return g.op("Constant", value_t=torch.tensor(v, dtype=torch.int64))

    def dim(shape, i):
        return g.op("Gather", shape, ints(i))

    value_shape = g.op("Shape", value)
    loc_shape = g.op("Shape", locations)
    n, m, d = dim(value_shape, 0), dim(value_shape, 2), dim(value_shape, 3)
    lq, p = dim(loc_shape, 1), dim(loc_shape, 4)
    nm = g.op("Mul", n, m)
    one = g.op("Constant", value_t=torch.tensor(1.0))
    two = g.op("Constant", value_t=torch.tensor(2.0))
    # GridSample works in [-1, 1] with align_corners=0: pixel centres at (i + 0.5) / size.
    grids = g.op("Sub", g.op("Mul", locations, two), one)
    sampled = []
    for lvl in range(num_levels):
        hw = g.op("Gather", spatial_shapes, g.op("Constant", value_t=torch.tensor(lvl)))
        h, w = dim(hw, 0), dim(hw, 1)
        start = g.op("Gather", level_start_index, ints(lvl))
        end = g.op("Add", start, g.op("Mul", h, w))
        v = g.op("Slice", value, start, end, ints(1))
        v = g.op("Transpose", v, perm_i=[0, 2, 3, 1])
        v = g.op("Reshape", v, g.op("Concat", nm, d, h, w, axis_i=0))
        grid = g.op("Gather", grids, g.op("Constant", value_t=torch.tensor(lvl)), axis_i=3)
        grid = g.op("Transpose", grid, perm_i=[0, 2, 1, 3, 4])
        grid = g.op("Reshape", grid, g.op("Concat", nm, lq, p, ints(2), axis_i=0))
        out = g.op(
            "GridSample", v, grid, mode_s="bilinear", padding_mode_s="zeros", align_corners_i=0
        )
        sampled.append(g.op("Unsqueeze", out, ints(3)))
    # (N*M, D, Lq, L, P) weighted over levels and points.
    stacked = g.op("Concat", *sampled, axis_i=3)
    w = g.op("Transpose", weights, perm_i=[0, 2, 1, 3, 4])
    w = g.op("Reshape", w, g.op("Concat", nm, ints(1), lq, ints(num_levels), p, axis_i=0))
    out = g.op("ReduceSum", g.op("Mul", stacked, w), ints(-1, -2), keepdims_i=0)
    out = g.op("Reshape", out, g.op("Concat", n, g.op("Mul", m, d), lq, axis_i=0))
    return g.op("Transpose", out, perm_i=[0, 2, 1])
