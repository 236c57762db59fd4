#!/usr/bin/env python
"""Run a Deformable DETR model on pictures or a video and save the detections drawn on them.

Examples::

    python demo.py --config-file configs/quickstart.yaml --input pics/*.jpg --output out/ \
        --opts MODEL.WEIGHTS output/quickstart/model_final.pth
    python demo.py --config-file configs/r50.yaml --video-input clip.mp4 --output out/ \
        --confidence-threshold 0.4 --opts MODEL.WEIGHTS r50.pth

Every picture is written to the output folder as ``<name>.png`` (a video as ``<name>.mp4``), with
boxes, class names and scores of the detections above the confidence threshold. Class names come
from the metadata of the config's first test dataset. Without a GPU the model runs on the CPU.
"""

import argparse
import glob
import logging
import os
import sys
import time

import cv2
import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import ColorMode, Visualizer

from deformable_detr import add_deformable_detr_config

logger = logging.getLogger("deformable_detr.demo")

_GLOB_CHARS = set("*?[")


def get_parser():
    parser = argparse.ArgumentParser(
        description="Deformable DETR demo: draw detections on pictures or a video."
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    parser.add_argument(
        "--input",
        nargs="+",
        metavar="PATH",
        help="picture files or glob patterns, e.g. 'directory/*.jpg'",
    )
    parser.add_argument("--video-input", metavar="FILE", help="a video file readable by OpenCV")
    parser.add_argument(
        "--output",
        required=True,
        metavar="DIR",
        help="folder for the pictures with detections (created if needed)",
    )
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.5,
        help="minimum score for a detection to be drawn (default: 0.5)",
    )
    parser.add_argument(
        "--opts",
        default=[],
        nargs=argparse.REMAINDER,
        help="config options as KEY VALUE pairs, e.g. MODEL.WEIGHTS model_final.pth",
    )
    return parser


def expand_inputs(patterns):
    """
    Args:
        patterns (list[str]): file names or glob patterns.

    Returns:
        list[str]: the files, in the given order, each pattern's matches sorted.

    Raises:
        ValueError: for a missing file or a pattern that matches no file.
    """
    files = []
    for pattern in patterns:
        if os.path.isfile(pattern):
            files.append(pattern)
        elif _GLOB_CHARS & set(pattern):
            matches = sorted(p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
            if not matches:
                raise ValueError(f"--input pattern {pattern!r} matches no file")
            files.extend(matches)
        elif os.path.isdir(pattern):
            raise ValueError(
                f"--input {pattern!r} is a folder; give files or a pattern like 'dir/*'"
            )
        else:
            raise ValueError(f"--input file {pattern!r} does not exist")
    return files


def prepare_output_dir(path):
    """Create the output folder (and its parents) if needed; fail clearly if that is impossible."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--output {path!r} exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the --output folder {path!r}: {e}") from e
    return path


def setup_cfg(args):
    """Build the frozen config from ``--config-file`` and ``--opts``."""
    if not os.path.isfile(args.config_file):
        raise ValueError(f"--config-file {args.config_file!r} does not exist")
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    try:
        cfg.merge_from_file(args.config_file)
        cfg.merge_from_list(args.opts)
    except Exception as e:
        raise ValueError(f"bad config ({args.config_file!r}, --opts {args.opts}): {e}") from e
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning(f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r} but CUDA is not available: using cpu")
        cfg.MODEL.DEVICE = "cpu"
    weights = cfg.MODEL.WEIGHTS
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise ValueError(f"MODEL.WEIGHTS {weights!r} does not exist")
    if not weights:
        logger.warning("MODEL.WEIGHTS is empty: the model runs with random weights")
    cfg.freeze()
    return cfg


class DetectionDrawer:
    """Run a :class:`DefaultPredictor` and draw its detections above a score threshold."""

    def __init__(self, cfg, confidence_threshold):
        """
        Args:
            cfg (CfgNode): frozen config with the model and its weights.
            confidence_threshold (float): minimum score of a drawn detection.
        """
        self.predictor = DefaultPredictor(cfg)
        test_sets = cfg.DATASETS.TEST
        self.metadata = MetadataCatalog.get(test_sets[0] if len(test_sets) else "__unused")
        self.confidence_threshold = confidence_threshold

    def __call__(self, image_bgr):
        """
        Args:
            image_bgr (ndarray): (H, W, 3) uint8 picture in BGR order.

        Returns:
            tuple[Instances, ndarray]: the kept detections and the BGR picture with them drawn.
        """
        instances = self.predictor(image_bgr)["instances"].to("cpu")
        instances = instances[instances.scores >= self.confidence_threshold]
        visualizer = Visualizer(image_bgr[:, :, ::-1], self.metadata, instance_mode=ColorMode.IMAGE)
        drawn = visualizer.draw_instance_predictions(instances).get_image()[:, :, ::-1]
        return instances, np.ascontiguousarray(drawn)


def _unique_name(name, used):
    stem, candidate, k = name, name, 1
    while candidate in used:
        candidate = f"{stem}_{k}"
        k += 1
    used.add(candidate)
    return candidate


def run_on_pictures(drawer, files, output_dir):
    used = set()
    for path in files:
        try:
            image = read_image(path, format="BGR")
        except Exception as e:
            raise ValueError(f"cannot read picture {path!r}: {e}") from e
        start = time.perf_counter()
        instances, drawn = drawer(image)
        name = _unique_name(os.path.splitext(os.path.basename(path))[0], used)
        out_path = os.path.join(output_dir, name + ".png")
        if not cv2.imwrite(out_path, drawn):
            raise ValueError(f"cannot write {out_path!r}")
        logger.info(
            f"{path}: {len(instances)} detections in {time.perf_counter() - start:.2f}s "
            f"-> {out_path}"
        )


def run_on_video(drawer, video_path, output_dir):
    video = cv2.VideoCapture(video_path)
    if not video.isOpened():
        raise ValueError(f"cannot open --video-input {video_path!r} with OpenCV")
    fps = video.get(cv2.CAP_PROP_FPS) or 25.0
    out_path = os.path.join(output_dir, os.path.splitext(os.path.basename(video_path))[0] + ".mp4")
    writer = None
    frames = 0
    try:
        while True:
            ok, frame = video.read()
            if not ok:
                break
            _, drawn = drawer(frame)
            if writer is None:
                height, width = drawn.shape[:2]
                writer = cv2.VideoWriter(
                    out_path, cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (width, height)
                )
                if not writer.isOpened():
                    raise ValueError(f"cannot write the video {out_path!r}")
            writer.write(drawn)
            frames += 1
    finally:
        video.release()
        if writer is not None:
            writer.release()
    if frames == 0:
        raise ValueError(f"--video-input {video_path!r} has no readable frame")
    logger.info(f"{video_path}: {frames} frames -> {out_path}")


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    setup_logger(name="deformable_detr")
    setup_logger(name="fvcore")
    logger.info("Arguments: " + str(args))

    if bool(args.input) == bool(args.video_input):
        parser.error("give exactly one of --input and --video-input")
    if not 0.0 <= args.confidence_threshold <= 1.0:
        parser.error(f"--confidence-threshold must be in [0, 1], got {args.confidence_threshold}")
    try:
        files = expand_inputs(args.input) if args.input else []
        if args.video_input and not os.path.isfile(args.video_input):
            raise ValueError(f"--video-input file {args.video_input!r} does not exist")
        output_dir = prepare_output_dir(args.output)
        cfg = setup_cfg(args)
        drawer = DetectionDrawer(cfg, args.confidence_threshold)
        if files:
            run_on_pictures(drawer, files, output_dir)
            what = f"{len(files)} picture(s)"
        else:
            run_on_video(drawer, args.video_input, output_dir)
            what = "the video"
    except ValueError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(f"Detections drawn on {what} written to {os.path.abspath(output_dir)}")


if __name__ == "__main__":
    sys.exit(main())
