"""Training-step benchmark: seconds per iteration and peak memory of one optimisation step.

Run ``python -m deformable_detr.benchmark.train [--config-file configs/quickstart.yaml]
[--iters 5] [--threads 2] [opts ...]``.

The model, the optimizer (parameter groups and full-model gradient clipping, as the Trainer
builds them) and ``cfg.SOLVER.IMS_PER_BATCH`` images come from the config. The images are random,
of two sizes around the config's training size (so the batch has padding, as in training), each
with a few random boxes; data loading is not timed. One iteration is forward, the weighted loss
sum, backward and the optimizer step. After one warm-up iteration the median over ``--iters``
iterations is printed. The peak resident set size (``VmHWM``) is that of this process, which
does nothing else; "extra" is the peak above the resident size before the first iteration.
"""

import argparse
import os
import statistics
import time

import torch

from .model import _rss_mib, _status_mib

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "configs")


def make_batch(cfg, seed=0):
    """``cfg.SOLVER.IMS_PER_BATCH`` random training inputs in Detectron2's format.

    Half the images have the largest training size of ``cfg.INPUT.MIN_SIZE_TRAIN`` as their
    shorter side and half the smallest, with a 4:3 aspect ratio.
    """
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    sizes = cfg.INPUT.MIN_SIZE_TRAIN
    num_classes = cfg.MODEL.DEFORMABLE_DETR.NUM_CLASSES
    batch = []
    for i in range(cfg.SOLVER.IMS_PER_BATCH):
        short = max(sizes) if i % 2 == 0 else min(sizes)
        h, w = short, min(int(short * 4 / 3), cfg.INPUT.MAX_SIZE_TRAIN)
        image = torch.randint(0, 256, (3, h, w), generator=g).float()
        num_boxes = 3
        xy = torch.rand(num_boxes, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = (torch.rand(num_boxes, 2, generator=g) * 0.25 + 0.05) * torch.tensor([w, h])
        instances = Instances((h, w))
        instances.gt_boxes = Boxes(torch.cat([xy, xy + wh], 1))
        instances.gt_classes = torch.randint(0, num_classes, (num_boxes,), generator=g)
        batch.append({"image": image, "instances": instances})
    return batch


def setup_cfg(config_file, opts):

    from deformable_detr.config import load_config

    cfg = load_config(
        config_file, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""] + list(opts), freeze=False
    )
    return cfg


def measure(cfg, iters):
    """Seconds of every timed iteration and the peak memory.

    Returns:
        dict: "times" (list[float] seconds), "median", "peak_mib", "extra_mib".
    """
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from deformable_detr.engine import Trainer

    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = Trainer.build_optimizer(cfg, model)
    batch = make_batch(cfg)

    def step():
        losses = model(batch)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()

    before = _rss_mib()
    times = []
    with EventStorage(0):
        step()
        for _ in range(iters):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    peak = _status_mib("VmHWM")
    return {
        "times": times,
        "median": statistics.median(times),
        "peak_mib": peak,
        "extra_mib": max(0.0, peak - before),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config-file", default=os.path.join(CONFIG_DIR, "quickstart.yaml"), metavar="FILE"
    )
    parser.add_argument("--iters", type=int, default=5, help="timed iterations after a warm-up")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = setup_cfg(args.config_file, args.opts)
    r = measure(cfg, args.iters)
    print(
        f"training step, {os.path.basename(args.config_file)}, batch {cfg.SOLVER.IMS_PER_BATCH}, "
        f"{args.threads} threads, CPU: median {r['median']:.3f} s/iter over {args.iters} "
        f"iterations (min {min(r['times']):.3f}, max {max(r['times']):.3f}); peak RSS "
        f"{r['peak_mib']:.0f} MiB ({r['extra_mib']:.0f} MiB above the level before training)"
    )


if __name__ == "__main__":
    main()
