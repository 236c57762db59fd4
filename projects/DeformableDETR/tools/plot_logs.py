#!/usr/bin/env python
"""Draw training curves (losses, AP) of one or more Detectron2 output folders into a PNG.

Reads each folder's ``metrics.json`` (one JSON object per line, written by Detectron2's
``JSONWriter``: losses every 20 iterations, evaluation results at every evaluation) and draws one
panel per key with one line per folder, against the iteration.

Examples::

    python projects/DeformableDETR/tools/plot_logs.py output/r50 output/r50_box_refine \\
        --output curves.png
    python projects/DeformableDETR/tools/plot_logs.py output/r50 --keys total_loss bbox/AP50 \\
        --smooth 5 --output r50.png

A key matches the metric of that name and, with several test datasets, every metric ending in
``/<key>`` (e.g. ``bbox/AP`` matches ``coco_2017_val/bbox/AP``). After a resumed run the last
value written for an iteration wins.
"""

import argparse
import json
import logging
import math
import os

import numpy as np

logger = logging.getLogger("deformable_detr.plot_logs")

DEFAULT_KEYS = ("total_loss", "loss_class", "loss_bbox", "loss_giou", "bbox/AP")
METRICS_FILE = "metrics.json"


def metrics_path(run):
    """The metrics.json of an output folder (or the file itself when ``run`` is one).

    Args:
        run (str): a Detectron2 OUTPUT_DIR or a metrics.json file.

    Returns:
        str
    """
    if os.path.isfile(run):
        return run
    if not os.path.isdir(run):
        raise FileNotFoundError(f"{run!r} is neither a folder nor a metrics file")
    path = os.path.join(run, METRICS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"folder {run!r} has no {METRICS_FILE} (expected a Detectron2 OUTPUT_DIR of a run that "
            "has logged at least once)"
        )
    return path


def load_metrics(run):
    """Records of one run.

    Args:
        run (str): a Detectron2 OUTPUT_DIR or a metrics.json file.

    Returns:
        list[dict]: one dict per line, each with an "iteration".
    """
    path = metrics_path(run)
    with open(path) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):
                # A run still writing may have left half a line at the end.
                logger.warning("%s: ignoring the incomplete last line %d", path, number)
                continue
            raise ValueError(f"{path}, line {number}: not JSON ({e})") from e
        if not isinstance(record, dict) or "iteration" not in record:
            raise ValueError(f"{path}, line {number}: no 'iteration' in the record")
        records.append(record)
    return records


def extract_series(records, key):
    """The values of one key against the iteration.

    Args:
        records (list[dict]): from :func:`load_metrics`.
        key (str): a metric name, matched exactly or as the end of a longer name after "/".

    Returns:
        dict[str, tuple[np.ndarray, np.ndarray]]: full metric name -> (iterations, values), sorted
        by iteration; values that are not finite numbers are skipped.
    """
    by_name = {}
    for record in records:
        for name, value in record.items():
            if name != key and not name.endswith("/" + key):
                continue
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            # Later lines win: a resumed run writes its iterations again.
            by_name.setdefault(name, {})[int(record["iteration"])] = float(value)
    result = {}
    for name, points in sorted(by_name.items()):
        iterations = np.array(sorted(points), dtype=np.int64)
        result[name] = (iterations, np.array([points[i] for i in iterations], dtype=np.float64))
    return result


def moving_average(values, window):
    """Trailing moving average over ``window`` points (the first points average what exists).

    Args:
        values (np.ndarray): 1-d.
        window (int): >= 1.

    Returns:
        np.ndarray
    """
    if window <= 1 or len(values) == 0:
        return values
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    starts = np.arange(1, len(values) + 1) - counts
    return (cumulative[1:] - cumulative[starts]) / counts


def plot_logs(runs, output, keys=DEFAULT_KEYS, smooth=1, labels=None):
    """Draw the curves of ``keys`` for every run into the PNG ``output``.

    Args:
        runs (list[str]): Detectron2 output folders (or metrics.json files).
        output (str): path of the PNG to write.
        keys (list[str]): metrics to draw, one panel each.
        smooth (int): moving-average window, in logged points, for keys other than AP metrics.
        labels (list[str] or None): legend entry per run; default: the paths as given.

    Returns:
        dict[str, list[str]]: per key, the "label: metric" lines drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not runs:
        raise ValueError("no output folder given")
    if not keys:
        raise ValueError("no key given")
    if smooth < 1:
        raise ValueError(f"smooth must be >= 1; got {smooth}")
    labels = list(labels) if labels else [os.path.normpath(r) for r in runs]
    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
    records = [load_metrics(run) for run in runs]
    if os.path.isdir(output):
        raise ValueError(f"--output {output!r} is a folder; give a file name such as curves.png")
    for run in runs:
        if os.path.exists(output) and os.path.samefile(output, metrics_path(run)):
            raise ValueError(f"--output {output!r} is the metrics file of {run!r}")

    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 4 * rows), squeeze=False)
    drawn = {}
    for ax, key in zip(axes.flat, keys):
        drawn[key] = []
        for label, run_records in zip(labels, records):
            for name, (iterations, values) in extract_series(run_records, key).items():
                is_ap = "AP" in name.split("/")[-1]
                curve = values if is_ap else moving_average(values, smooth)
                line_label = label if name == key else f"{label}: {name}"
                ax.plot(iterations, curve, marker="o" if is_ap else None, ms=3, label=line_label)
                drawn[key].append(line_label)
        ax.set_title(key)
        ax.set_xlabel("iteration")
        ax.grid(True, alpha=0.3)
        if drawn[key]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            logger.warning("No run has metric %r", key)
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_visible(False)
    if not any(drawn.values()):
        plt.close(fig)
        raise ValueError(f"none of the keys {list(keys)} is in the metrics of {list(runs)}")
    fig.tight_layout()
    folder, name = os.path.split(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    # Drawn under a temporary name in the same folder (same extension: it sets the format) and
    # renamed when complete, so that an interrupted run leaves no half-written picture.
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}{os.path.splitext(name)[1]}")
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, output)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return drawn


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", help="Detectron2 output folders (or metrics.json files)")
    parser.add_argument("--output", required=True, help="PNG file to write")
    parser.add_argument(
        "--keys",
        nargs="+",
        default=list(DEFAULT_KEYS),
        help=f"metrics to draw, one panel each (default: {' '.join(DEFAULT_KEYS)})",
    )
    parser.add_argument(
        "--smooth",
        type=int,
        default=1,
        help="moving-average window (logged points) for the losses; AP is never smoothed",
    )
    parser.add_argument("--labels", nargs="+", help="legend entry per folder (default: the path)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        drawn = plot_logs(args.dirs, args.output, args.keys, args.smooth, args.labels)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    for key, lines in drawn.items():
        logger.info("%s: %s", key, ", ".join(lines) if lines else "no data")
    logger.info("Wrote %s", args.output)
    return drawn


if __name__ == "__main__":
    main()
