#!/usr/bin/env python
"""Export a Deformable DETR detector (backbone to top-K detections) for deployment.

Examples::

    # a torch.export program that takes any image size (>= a model-dependent minimum)
    python projects/DeformableDETR/tools/export_model.py --config-file configs/r50.yaml \\
        --format exported-program --dynamic --output export/r50 \\
        --opts MODEL.WEIGHTS deformable_detr_r50.pth
    # TorchScript or ONNX, for 800x1216 inputs
    python projects/DeformableDETR/tools/export_model.py --config-file configs/r50.yaml \\
        --format onnx --height 800 --width 1216 --output export/r50 \\
        --opts MODEL.WEIGHTS deformable_detr_r50.pth

The exported model maps a float image (3, H, W) in the model's input format (INPUT.FORMAT
channel order, 0-255) to boxes (K, 4) XYXY in its pixels, scores (K,) and classes (K,). After
writing the file the script runs it with its own runtime on the sample image and prints how far
its detections are from the eager model's.
"""

import argparse
import logging
import os
import sys

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import detection_utils
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

from deformable_detr.config import check_device, load_config
from deformable_detr.export import (
    EXPORT_FORMATS,
    ONNX_OPSET,
    export_model,
    load_exported,
    min_dynamic_size,
)

logger = logging.getLogger("deformable_detr.export_model")


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    parser.add_argument(
        "--format",
        required=True,
        choices=EXPORT_FORMATS,
        help=f"torchscript (.ts), onnx (.onnx, opset {ONNX_OPSET}) or exported-program (.pt2)",
    )
    parser.add_argument(
        "--output", required=True, metavar="DIR", help="folder for the exported file"
    )
    parser.add_argument(
        "--sample-image",
        metavar="PATH",
        help="picture used to trace and check the export, resized as at test time "
        "(INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST), or to exactly --height x --width when given; "
        "default: a random image of --height x --width",
    )
    parser.add_argument("--height", type=int, help="input height (default 800)")
    parser.add_argument("--width", type=int, help="input width (default 1216)")
    parser.add_argument(
        "--dynamic",
        action="store_true",
        help="accept any input size (exported-program only); TorchScript and ONNX keep the "
        "sample's size",
    )
    parser.add_argument(
        "--opts",
        default=[],
        nargs=argparse.REMAINDER,
        help="config options as KEY VALUE pairs, e.g. MODEL.WEIGHTS model_final.pth",
    )
    return parser


def setup_cfg(args):
    # Exports are made on the CPU unless MODEL.DEVICE is given in --opts.
    cfg = load_config(args.config_file, ["MODEL.DEVICE", "cpu"] + list(args.opts))
    check_device(cfg.MODEL.DEVICE)
    return cfg


def build_detector(cfg):
    model = build_model(cfg)
    model.eval()
    weights = cfg.MODEL.WEIGHTS
    if not weights:
        logger.warning("MODEL.WEIGHTS is empty: exporting randomly initialised weights")
    elif "://" not in weights and not os.path.isfile(weights):
        raise ValueError(f"MODEL.WEIGHTS file {weights!r} does not exist")
    else:
        DetectionCheckpointer(model).load(weights)
    return model


def sample_image(args, cfg):
    """The (C, H, W) float image the export is traced and checked with."""
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be a positive number of pixels, got {value}")
    if args.sample_image is None:
        height, width = args.height or 800, args.width or 1216
        generator = torch.Generator().manual_seed(0)
        return torch.rand((3, height, width), generator=generator) * 255
    if not os.path.isfile(args.sample_image):
        raise ValueError(f"--sample-image {args.sample_image!r} does not exist")
    try:
        image = detection_utils.read_image(args.sample_image, format=cfg.INPUT.FORMAT)
    except Exception as e:
        raise ValueError(f"cannot read --sample-image {args.sample_image!r}: {e}") from e
    if args.height or args.width:
        h, w = image.shape[:2]
        resize = T.Resize((args.height or h, args.width or w))
    else:
        resize = T.ResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST
        )
    image = resize.get_transform(image).apply_image(image)
    return torch.as_tensor(image.astype("float32").transpose(2, 0, 1).copy())


def check_export(model, path, image):
    """Run the exported file and the eager model on ``image``; log the largest differences."""
    with torch.no_grad():
        expected = model([{"image": image}])[0]["instances"].to("cpu")
        boxes, scores, classes = (t.cpu() for t in load_exported(path)(image))
    if len(scores) != len(expected):
        logger.warning(
            f"the exported model kept {len(scores)} detections, the eager model {len(expected)}"
        )
        return
    if len(scores) == 0:
        logger.info("check: neither model returned a detection")
        return
    box_diff = (boxes - expected.pred_boxes.tensor).abs().max().item()
    score_diff = (scores - expected.scores).abs().max().item()
    same_classes = bool((classes == expected.pred_classes).all())
    logger.info(
        f"check against the eager model on {tuple(image.shape)}: {len(scores)} detections, "
        f"max |score diff| {score_diff:.2e}, max |box diff| {box_diff:.2e} px, "
        f"classes {'identical' if same_classes else 'DIFFERENT (near-tied scores?)'}"
    )


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    setup_logger(name="deformable_detr")
    logger.info("Arguments: " + str(args))
    if args.dynamic and args.format != "exported-program":
        parser.error(
            f"--dynamic is only supported by --format exported-program: {args.format} is traced "
            "at the sample image's size (export one file per input size instead)"
        )
    try:
        if os.path.exists(args.output) and not os.path.isdir(args.output):
            raise ValueError(f"--output {args.output!r} exists and is not a folder")
        cfg = setup_cfg(args)
        image = sample_image(args, cfg)
        model = build_detector(cfg)
        image = image.to(model.device)
        if args.dynamic and args.format == "exported-program":
            low = min_dynamic_size(model)
            logger.info(f"dynamic export: height and width from {low} to 8192 pixels")
        path = export_model(model, args.format, image, args.output, dynamic=args.dynamic)
        check_export(model, path, image)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(f"Exported {args.format} model written to {os.path.abspath(path)}")


if __name__ == "__main__":
    sys.exit(main())
