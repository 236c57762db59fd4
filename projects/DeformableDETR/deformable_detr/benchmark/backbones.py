"""Backbones side by side: the box-refinement model on ResNet-50, Swin-T and ConvNeXt-T.

Run ``python -m deformable_detr.benchmark.backbones [--configs r50_box_refine.yaml swin_t.yaml
convnext_t.yaml] [--precision float32 bfloat16] [--repeat 3] [--threads 2] [--memory]``.

Every config is built with random weights and runs one 800x1216 image in eval mode under
``torch.inference_mode``, with each ``TEST.PRECISION`` as one model. After one warm-up call each,
the models run alternately for ``--repeat`` rounds (the order flips every round), so a shared
machine slows them alike; the table gives parameters, median and best seconds and the ratio to the
first config in float32. ``--memory`` runs each (config, precision) once more in a fresh
subprocess and reports its peak resident set size.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from .model import _rss_mib, _status_mib

HEIGHT, WIDTH = 800, 1216
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "configs")


def build(config, precision):
    """A model of ``configs/<config>`` with random weights, in eval mode."""
    from detectron2.modeling import build_model

    from deformable_detr.config import load_config

    opts = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "TEST.PRECISION", precision]
    cfg = load_config(os.path.join(CONFIG_DIR, config), opts)
    torch.manual_seed(0)
    return build_model(cfg).eval()


def _image():
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, HEIGHT, WIDTH), generator=gen, dtype=torch.uint8)


def _call(model, image):
    with torch.inference_mode():
        start = time.perf_counter()
        model([{"image": image}])
        return time.perf_counter() - start


def _memory_child(config, precision, threads):
    torch.set_num_threads(threads)
    model, image = build(config, precision), _image()
    before = _rss_mib()
    _call(model, image)
    print(
        json.dumps(
            {"peak_mib": _status_mib("VmHWM"), "inference_mib": _status_mib("VmHWM") - before}
        )
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--configs", nargs="+", default=["r50_box_refine.yaml", "swin_t.yaml", "convnext_t.yaml"]
    )
    parser.add_argument("--precision", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        return _memory_child(*args.memory_child, args.threads)

    torch.set_num_threads(args.threads)
    image = _image()
    models = {(c, p): build(c, p) for c in args.configs for p in args.precision}
    for model in models.values():
        _call(model, image)
    times = {key: [] for key in models}
    for r in range(args.repeat):
        for key in list(models) if r % 2 == 0 else list(models)[::-1]:
            times[key].append(_call(models[key], image))
    base = statistics.median(times[(args.configs[0], args.precision[0])])
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(
        f"CPU inference, {HEIGHT}x{WIDTH}, {args.threads} threads, median and best of "
        f"{args.repeat} alternating rounds; torch {torch.__version__}; load average {load}"
    )
    print(
        "| config | precision | params (backbone) | median s | best s | x first fp32 | peak MiB |"
    )
    print("|---|---|---|---|---|---|---|")
    for (config, precision), ts in times.items():
        model = models[(config, precision)]
        params = sum(p.numel() for p in model.parameters()) / 1e6
        body = sum(p.numel() for p in model.backbone.body.parameters()) / 1e6
        peak = ""
        if args.memory:
            cmd = [sys.executable, "-m", __spec__.name, "--threads", str(args.threads)]
            out = subprocess.run(
                cmd + ["--memory-child", config, precision], capture_output=True, text=True
            )
            peak = f"{json.loads(out.stdout.strip().splitlines()[-1])['peak_mib']:.0f}"
        median = statistics.median(ts)
        print(
            f"| {config} | {precision} | {params:.2f}M ({body:.2f}M) | {median:.3f} | {min(ts):.3f} "
            f"| {median / base:.2f} | {peak} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
