#!/usr/bin/env python
"""Run a Deformable DETR model on pictures or a video and save the detections drawn on them.

Examples::

    python demo.py --config-file configs/quickstart.yaml --input pics/*.jpg --output out/ \
        --opts MODEL.WEIGHTS output/quickstart/model_final.pth
    python demo.py --config-file configs/r50.yaml --video-input clip.mp4 --output out/ \
        --confidence-threshold 0.4 --opts MODEL.WEIGHTS r50.pth

Every picture is written to the output folder as ``<name>.png`` (a video as ``<name>.mp4``), with
boxes, class names and scores of the detections above the confidence threshold; an input file is
never written over, and two inputs never share an output (see :func:`plan_outputs`). Each output
appears complete or not at all. Class names come from the metadata of the config's first test
dataset. Without a GPU the model runs on the CPU, unless ``--opts MODEL.DEVICE cuda`` asks for one.
"""

import argparse
import glob
import itertools
import logging
import os
import sys
import time

import cv2
import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import ColorMode, Visualizer
from PIL import Image

from deformable_detr.config import check_device, load_config
from deformable_detr.data.dataset_mapper import check_input_sizes

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


def _device_in_opts(opts):
    """Whether ``--opts`` sets MODEL.DEVICE (keys and values alternate)."""
    return "MODEL.DEVICE" in opts[::2]


def setup_cfg(args):
    """Build the frozen config from ``--config-file`` and ``--opts``."""
    cfg = load_config(args.config_file, args.opts, freeze=False)
    device = cfg.MODEL.DEVICE
    if (
        device.startswith("cuda")
        and not torch.cuda.is_available()
        and not _device_in_opts(args.opts)
    ):
        # Detectron2's default device is "cuda", which configs made for GPUs leave as it is.
        logger.warning(
            f"MODEL.DEVICE is {device!r} in the config but CUDA is not available: using cpu"
        )
        cfg.MODEL.DEVICE = "cpu"
    check_device(cfg.MODEL.DEVICE)
    check_input_sizes(cfg, is_train=False)
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


def _file_id(path):
    st = os.stat(path)
    return st.st_dev, st.st_ino


def plan_outputs(inputs, output_dir, suffix):
    """The output file of every input: never an input file, never the output of another input.

    ``<name><suffix>`` in ``output_dir``; when that is taken (an input, e.g. with the output folder
    the input folder, or the output of an input of the same name), ``<name>_<extension><suffix>``,
    then with a counter.

    Args:
        inputs (list[str]): the input files.
        output_dir (str): an existing folder.
        suffix (str): the output extension, e.g. ".png".

    Returns:
        list[str]: one path per input.
    """
    input_ids = {_file_id(p) for p in inputs}
    used = set()

    def free(path):
        key = os.path.normcase(os.path.realpath(path))
        if key in used or (os.path.exists(path) and _file_id(path) in input_ids):
            return False
        used.add(key)
        return True

    outputs = []
    for path in inputs:
        stem, ext = os.path.splitext(os.path.basename(path))
        names = [stem, f"{stem}_{ext.lstrip('.')}"] if ext else [stem]
        names = itertools.chain(names, (f"{names[-1]}_{k}" for k in itertools.count(1)))
        outputs.append(
            next(p for p in (os.path.join(output_dir, n + suffix) for n in names) if free(p))
        )
    return outputs


def _temporary_path(path):
    # Same folder (so that the rename is atomic) and same extension (OpenCV picks the format by it).
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.tmp-{os.getpid()}{os.path.splitext(name)[1]}")


def write_picture(path, image_bgr):
    """Write a PNG picture atomically: a complete file or none, never a half-written one."""
    ok, data = cv2.imencode(".png", image_bgr)
    if not ok:
        raise ValueError(f"cannot encode the picture for {path!r}")
    tmp = _temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data.tobytes())
        os.replace(tmp, path)
    except OSError as e:
        raise ValueError(f"cannot write {path!r}: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_pictures(files):
    """Fail, before the model is loaded, on files that are not pictures, listing them all."""
    bad = []
    for path in files:
        try:
            with Image.open(path):
                pass
        except Exception as e:
            bad.append(f"{path!r} ({type(e).__name__}: {e})")
    if bad:
        raise ValueError(f"{len(bad)} --input file(s) are not readable pictures: " + "; ".join(bad))


def run_on_pictures(drawer, files, output_dir):
    """Draw the detections on every picture; a picture that fails to decode is skipped.

    Returns:
        list[str]: the pictures that could not be read.
    """
    failed = []
    for path, out_path in zip(files, plan_outputs(files, output_dir, ".png")):
        try:
            image = read_image(path, format="BGR")
        except Exception as e:
            logger.error(f"cannot read picture {path!r}, skipped: {type(e).__name__}: {e}")
            failed.append(path)
            continue
        start = time.perf_counter()
        instances, drawn = drawer(image)
        write_picture(out_path, drawn)
        logger.info(
            f"{path}: {len(instances)} detections in {time.perf_counter() - start:.2f}s "
            f"-> {out_path}"
        )
    return failed


def open_video(video_path):
    """The opened ``cv2.VideoCapture`` of ``--video-input``, or a ValueError naming it."""
    video = cv2.VideoCapture(video_path)
    if not video.isOpened():
        raise ValueError(f"cannot open --video-input {video_path!r} with OpenCV")
    return video


def run_on_video(drawer, video, video_path, output_dir):
    """Draw the detections on every frame into ``<name>.mp4``, written under a temporary name and
    renamed when complete."""
    fps = video.get(cv2.CAP_PROP_FPS) or 25.0
    (out_path,) = plan_outputs([video_path], output_dir, ".mp4")
    tmp = _temporary_path(out_path)
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
                    tmp, cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (width, height)
                )
                if not writer.isOpened():
                    raise ValueError(f"cannot write the video {out_path!r}")
            writer.write(drawn)
            frames += 1
        if writer is not None:
            writer.release()
            writer = None
            if frames:
                os.replace(tmp, out_path)
    finally:
        video.release()
        if writer is not None:
            writer.release()
        if os.path.exists(tmp):
            os.remove(tmp)
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
        check_pictures(files)
        video = None
        if args.video_input:
            if not os.path.isfile(args.video_input):
                raise ValueError(f"--video-input file {args.video_input!r} does not exist")
            video = open_video(args.video_input)
        output_dir = prepare_output_dir(args.output)
        cfg = setup_cfg(args)
        drawer = DetectionDrawer(cfg, args.confidence_threshold)
        failed = []
        if files:
            failed = run_on_pictures(drawer, files, output_dir)
            what = f"{len(files) - len(failed)} picture(s)"
        else:
            run_on_video(drawer, video, args.video_input, output_dir)
            what = "the video"
    except ValueError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(f"Detections drawn on {what} written to {os.path.abspath(output_dir)}")
    if failed:
        parser.exit(
            1, f"{parser.prog}: error: {len(failed)} picture(s) could not be read: {failed}\n"
        )


if __name__ == "__main__":
    sys.exit(main())
