"""Benchmark of the exported detector against the eager model, on the CPU.

Run ``python -m deformable_detr.benchmark.export [--config-file configs/r50.yaml] [--height 800]
[--width 1216] [--threads 2] [--repeat 3] [--formats exported-program torchscript onnx]``.

The model is built from the config with random weights (the timings do not depend on them),
exported to every requested format in a temporary folder (the ``torch.export`` program with a
dynamic image size, TorchScript and ONNX at the benchmark size), and each file is loaded with its
own runtime (``torch.export.load``, ``torch.jit.load``, onnxruntime). Then the eager model and the
loaded files run on the same image in turns, ``--repeat`` rounds after one warm-up round, so that
load changes on a shared machine hit them alike. The table gives the best and median time of each
and the eager model's best and median over its own (above 1: faster than eager), plus the export
time, the file size and the largest score difference from the eager detections.
"""

import argparse
import os
import statistics
import tempfile
import time

import torch
from detectron2.modeling import build_model

from deformable_detr.config import load_config
from deformable_detr.export import EXPORT_FORMATS, export_model, load_exported

DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "configs",
    "r50.yaml",
)


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default=DEFAULT_CONFIG, metavar="FILE")
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1216)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of every runtime")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds after the warm-up")
    parser.add_argument(
        "--formats", nargs="+", choices=EXPORT_FORMATS, default=list(EXPORT_FORMATS)
    )
    parser.add_argument(
        "--opts", default=[], nargs=argparse.REMAINDER, help="config options as KEY VALUE pairs"
    )
    return parser


def build(args):
    cfg = load_config(args.config_file, ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"] + args.opts)
    torch.manual_seed(0)
    return build_model(cfg).eval()


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv=None):
    args = get_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build(args)
    image = torch.rand((3, args.height, args.width), generator=torch.Generator().manual_seed(0))
    image = image * 255

    def eager():
        with torch.no_grad():
            inst = model([{"image": image}])[0]["instances"]
        return inst.scores

    runners = {"eager": eager}
    info = {"eager": ("-", "-")}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.formats:
            seconds, path = _timed(
                lambda: export_model(
                    model, fmt, image, os.path.join(tmp, fmt), dynamic=fmt == "exported-program"
                )
            )
            size_mb = os.path.getsize(path) / 2**20
            run = load_exported(path, num_threads=args.threads)

            def runner(run=run):
                with torch.no_grad():
                    return run(image)[1]

            name = f"{fmt} (dynamic)" if fmt == "exported-program" else fmt
            runners[name] = runner
            info[name] = (f"{seconds:.0f}", f"{size_mb:.0f}")

        times = {name: [] for name in runners}
        scores = {}
        for round_ in range(args.repeat + 1):
            for name, fn in runners.items():
                seconds, out = _timed(fn)
                scores[name] = out
                if round_ > 0:
                    times[name].append(seconds)

    eager_median = statistics.median(times["eager"])
    eager_best = min(times["eager"])
    print(
        f"\nconfig {os.path.basename(args.config_file)}, image {args.height}x{args.width}, "
        f"{args.threads} threads, CPU, best / median of {args.repeat} after one warm-up"
    )
    header = (
        "| runtime | best (s) | median (s) | eager best / best | eager median / median "
        "| export (s) | file (MiB) | max score diff |"
    )
    print(header)
    print("|" + "---|" * 8)
    for name, ts in times.items():
        median = statistics.median(ts)
        n = min(len(scores[name]), len(scores["eager"]))
        diff = (scores[name][:n] - scores["eager"][:n]).abs().max().item() if n else 0.0
        print(
            f"| {name} | {min(ts):.3f} | {median:.3f} | {eager_best / min(ts):.2f}x "
            f"| {eager_median / median:.2f}x "
            f"| {info[name][0]} | {info[name][1]} | {diff:.1e} |"
        )


if __name__ == "__main__":
    main()
