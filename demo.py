#!/usr/bin/env python
"""Run a Deformable DETR model on pictures or a video and save the detections drawn on them.

Examples::

    python demo.py --config-file configs/quickstart.yaml --input pics/*.jpg --output out/ \
        --opts MODEL.WEIGHTS output/quickstart/model_final.pth
    python demo.py --config-file configs/r50.yaml --video-input clip.mp4 --output out/ \
        --confidence-threshold 0.4 --opts MODEL.WEIGHTS r50.pth
    python demo.py --config-file configs/r50.yaml --input photo.jpg --output out/ \
        --show-sampling --sampling-top 3 --opts MODEL.WEIGHTS r50.pth

Every picture is written to the output folder as ``<name>.png`` (a video as ``<name>.mp4``), with
boxes, class names and scores of the detections above the confidence threshold; an input file is
never written over, and two inputs never share an output (see :func:`plan_outputs`). Each output
appears complete or not at all. Class names come from the metadata of the config's first test
dataset. Without a GPU the model runs on the CPU, unless ``--opts MODEL.DEVICE cuda`` asks for one.

With ``--show-sampling`` every picture also gets ``<name>_sampling.png``: for its top detections,
the reference point (and reference box, with box refinement or two-stage) and every sampling point
of the last decoder layer's deformable cross-attention, one colour per feature level, the marker
area following the attention weight. The points are those the attention module passed to its op
in the same forward pass that gave the detections (see ``record_sampling``).
"""

import argparse
import glob
import itertools
import logging
import os
import sys
import time

import cv2
import matplotlib.colors as mplc
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
from deformable_detr.layers import record_sampling
from deformable_detr.modeling.sampling_points import detection_sampling, last_cross_attention

logger = logging.getLogger("deformable_detr.demo")

_GLOB_CHARS = set("*?[")
SAMPLING_SUFFIX = "_sampling.png"
# One colour per feature level, finest first, away from the white of the boxes and references.
LEVEL_COLORS = ("#ff3b30", "#34c759", "#2f8cff", "#ffcc00", "#d63af9", "#00e0e0")


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
        "--show-sampling",
        action="store_true",
        help="also write <name>_sampling.png: where the last decoder layer's deformable "
        "cross-attention samples for the top detections (pictures only)",
    )
    parser.add_argument(
        "--sampling-top",
        type=int,
        default=3,
        metavar="K",
        help="with --show-sampling, the number of detections (of distinct queries, best first, "
        "above the confidence threshold) whose sampling is drawn (default: 3)",
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

    def _detect(self, image_bgr):
        instances = self.predictor(image_bgr)["instances"].to("cpu")
        return instances[instances.scores >= self.confidence_threshold]

    def _draw(self, image_bgr, instances):
        visualizer = Visualizer(image_bgr[:, :, ::-1], self.metadata, instance_mode=ColorMode.IMAGE)
        drawn = visualizer.draw_instance_predictions(instances).get_image()[:, :, ::-1]
        return np.ascontiguousarray(drawn)

    def __call__(self, image_bgr):
        """
        Args:
            image_bgr (ndarray): (H, W, 3) uint8 picture in BGR order.

        Returns:
            tuple[Instances, ndarray]: the kept detections and the BGR picture with them drawn.
        """
        instances = self._detect(image_bgr)
        return instances, self._draw(image_bgr, instances)

    def with_sampling(self, image_bgr, top_k):
        """Detect, and draw where the last decoder layer looked for the ``top_k`` best detections.

        Args:
            image_bgr (ndarray): (H, W, 3) uint8 picture in BGR order.
            top_k (int): detections (of distinct queries) whose sampling is drawn.

        Returns:
            tuple[Instances, ndarray, ndarray]: the kept detections, the BGR picture with them
            drawn and the BGR picture of the sampling (see :func:`draw_sampling`).
        """
        model = self.predictor.model
        with record_sampling(last_cross_attention(model)) as record:
            instances = self._detect(image_bgr)
        # The size the model saw: DefaultPredictor's own resize of this picture.
        resized = self.predictor.aug.get_transform(image_bgr).apply_image(image_bgr).shape[:2]
        strides = [shape.stride for shape in model.backbone.output_shape()]
        sampling = draw_sampling(
            image_bgr,
            top_detections(instances, top_k),
            record,
            resized,
            strides,
            self.metadata,
        )
        return instances, self._draw(image_bgr, instances), sampling


def top_detections(instances, k):
    """The ``k`` best detections of distinct queries (a query may score for several classes; its
    sampling is the same for all of them).

    Args:
        instances (Instances): detections with ``scores`` and ``pred_query``, best first.
        k (int): detections kept.

    Returns:
        Instances: at most ``k`` of them, best first.
    """
    order = instances.scores.argsort(descending=True, stable=True).tolist()
    seen, keep = set(), []
    for i in order:
        query = int(instances.pred_query[i])
        if query not in seen:
            seen.add(query)
            keep.append(i)
        if len(keep) == k:
            break
    return instances[torch.as_tensor(keep, dtype=torch.long)]


def draw_sampling(image_bgr, detections, record, image_size, strides, metadata):
    """Draw the detections and, for each, where the recorded attention sampled.

    Every detection gets its box and label in white, its reference point as a white dot ringed in
    black (and its reference box dashed, when the references are boxes) and all its sampling
    points (every head, level and point), coloured by level with a marker area proportional to
    the attention weight, the largest of each detection at full size. A caption in the top-left
    corner names the level colours.

    Args:
        image_bgr (ndarray): (H, W, 3) uint8 picture in BGR order, as given to the predictor.
        detections (Instances): detections with ``pred_query``, in the picture's coordinates.
        record (SamplingRecord): the last decoder layer's record of the forward pass that gave
            ``detections`` (one image).
        image_size (tuple[int, int]): (height, width) of the image the model saw (resized).
        strides (list[int]): stride of every feature level, for the caption.
        metadata (Metadata): for the class names.

    Returns:
        ndarray: (H, W, 3) uint8 BGR picture.
    """
    height, width = image_bgr.shape[:2]
    visualizer = Visualizer(image_bgr[:, :, ::-1], metadata, instance_mode=ColorMode.IMAGE)
    names = metadata.get("thing_classes", None)
    labels = [
        f"{names[c] if names and c < len(names) else c} {s * 100:.0f}%"
        for c, s in zip(detections.pred_classes.tolist(), detections.scores.tolist())
    ]
    visualizer.overlay_instances(
        boxes=detections.pred_boxes, labels=labels, assigned_colors=["white"] * len(detections)
    )
    max_radius = max(2.0, (height * width) ** 0.5 / 80)
    # See-through markers: points of several heads or levels often fall on one spot.
    colors = [mplc.to_rgba(c, alpha=0.75) for c in LEVEL_COLORS]
    for query in detections.pred_query.tolist():
        points = detection_sampling(record, query, image_size, (height, width))
        weights = points["weights"].cpu()
        locations = points["locations"].cpu()
        # Area follows the weight; the smallest stay visible.
        radii = (max_radius * (weights / weights.max()).sqrt()).clamp(min=0.75)
        num_levels = weights.shape[1]
        # Largest first, so that small markers stay on top of the large ones.
        for flat in radii.flatten().argsort(descending=True).tolist():
            head, rest = divmod(flat, num_levels * weights.shape[2])
            level, point = divmod(rest, weights.shape[2])
            visualizer.draw_circle(
                locations[head, level, point].tolist(),
                color=colors[level % len(colors)],
                radius=float(radii[head, level, point]),
            )
        if points["reference_box"] is not None:
            x0, y0, x1, y1 = points["reference_box"].tolist()
            visualizer.draw_box((x0, y0, x1, y1), edge_color="white", line_style="--")
        reference = points["reference"].tolist()
        visualizer.draw_circle(reference, color="black", radius=max_radius * 0.6)
        visualizer.draw_circle(reference, color="white", radius=max_radius * 0.4)

    # A little smaller than the labels' default, so that the caption hides less of the picture.
    font_size = max(7.0, (height * width) ** 0.5 / 100)
    line = font_size * visualizer.output.dpi / 72 * 1.5
    for level, stride in enumerate(strides):
        visualizer.draw_text(
            f"level {level} (stride {stride})",
            (2, 2 + level * line),
            font_size=font_size,
            color=LEVEL_COLORS[level % len(LEVEL_COLORS)],
            horizontal_alignment="left",
        )
    return np.ascontiguousarray(visualizer.get_output().get_image()[:, :, ::-1])


def _file_id(path):
    st = os.stat(path)
    return st.st_dev, st.st_ino


def plan_outputs(inputs, output_dir, suffix, companions=()):
    """The output file of every input: never an input file, never the output of another input.

    ``<name><suffix>`` in ``output_dir``; when that is taken (an input, e.g. with the output folder
    the input folder, or the output of an input of the same name), ``<name>_<extension><suffix>``,
    then with a counter. With ``companions``, a name is only used when ``<name><companion>`` is
    free too for every companion.

    Args:
        inputs (list[str]): the input files.
        output_dir (str): an existing folder.
        suffix (str): the output extension, e.g. ".png".
        companions (tuple[str]): suffixes of further files written next to each output, e.g.
            ``SAMPLING_SUFFIX``; :func:`companion_path` gives their paths.

    Returns:
        list[str]: one path per input.
    """
    input_ids = {_file_id(p) for p in inputs}
    used = set()

    def key(path):
        return os.path.normcase(os.path.realpath(path))

    def free(name):
        paths = [os.path.join(output_dir, name + s) for s in (suffix,) + tuple(companions)]
        for path in paths:
            if key(path) in used or (os.path.exists(path) and _file_id(path) in input_ids):
                return False
        used.update(key(p) for p in paths)
        return True

    outputs = []
    for path in inputs:
        stem, ext = os.path.splitext(os.path.basename(path))
        names = [stem, f"{stem}_{ext.lstrip('.')}"] if ext else [stem]
        names = itertools.chain(names, (f"{names[-1]}_{k}" for k in itertools.count(1)))
        outputs.append(os.path.join(output_dir, next(n for n in names if free(n)) + suffix))
    return outputs


def companion_path(output, suffix, companion):
    """The path of the ``companion`` file of an output of :func:`plan_outputs`.

    Args:
        output (str): a path from :func:`plan_outputs`.
        suffix (str): the ``suffix`` it was planned with.
        companion (str): one of its ``companions``.
    """
    return output[: len(output) - len(suffix)] + companion


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


def run_on_pictures(drawer, files, output_dir, sampling_top=0):
    """Draw the detections on every picture; a picture that fails to decode is skipped.

    Args:
        drawer (DetectionDrawer): the model and its drawing.
        files (list[str]): the pictures.
        output_dir (str): an existing folder.
        sampling_top (int): if positive, also write ``<name>_sampling.png`` with the sampling of
            this many top detections (:meth:`DetectionDrawer.with_sampling`).

    Returns:
        list[str]: the pictures that could not be read.
    """
    failed = []
    companions = (SAMPLING_SUFFIX,) if sampling_top > 0 else ()
    for path, out_path in zip(files, plan_outputs(files, output_dir, ".png", companions)):
        try:
            image = read_image(path, format="BGR")
        except Exception as e:
            logger.error(f"cannot read picture {path!r}, skipped: {type(e).__name__}: {e}")
            failed.append(path)
            continue
        start = time.perf_counter()
        if sampling_top > 0:
            instances, drawn, sampling = drawer.with_sampling(image, sampling_top)
            sampling_path = companion_path(out_path, ".png", SAMPLING_SUFFIX)
            write_picture(sampling_path, sampling)
            logger.info(f"{path}: sampling of the last decoder layer -> {sampling_path}")
        else:
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
    if args.show_sampling and args.video_input:
        parser.error(
            "--show-sampling draws on pictures only: give them with --input, not --video-input"
        )
    if args.sampling_top < 1:
        parser.error(f"--sampling-top must be at least 1, got {args.sampling_top}")
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
            sampling_top = args.sampling_top if args.show_sampling else 0
            failed = run_on_pictures(drawer, files, output_dir, sampling_top)
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
