"""Training-step benchmark: seconds per iteration and peak memory of one optimisation step.

Run ``python -m deformable_detr.benchmark.train [--config-file configs/quickstart.yaml]
[--iters 5] [--threads 2] [--precision float32 bfloat16] [--loader] [--compare 'KEY VALUE ...']
[opts ...]``.

The model, the optimizer (parameter groups and full-model gradient clipping, as the Trainer
builds them) and ``cfg.SOLVER.IMS_PER_BATCH`` images come from the config. By default the images
are random, of two sizes around the config's training size (so the batch has padding, as in
training), each with a few random boxes; with ``--loader`` the batches are the first ones of the
config's own training data loader (``DATASETS.TRAIN``, its augmentations and picture sizes),
drawn before any timing. Data loading is never timed. One iteration is forward, the weighted loss
sum, backward and the optimizer step; in bfloat16 it runs under CPU autocast, as
``SOLVER.AMP.ENABLED`` trains on a CPU. With several precisions, one model and optimizer take
their steps in turn (float32, bfloat16, float32, ...), so that every precision is timed against
the same load; ``--compare 'KEY VALUE ...'`` builds a second model (same seed) from the config with
those overrides, which takes its steps in turn with the first on the same batches. After one
warm-up iteration per precision and model the median over ``--iters`` iterations of each is
printed. The peak resident set size (``VmHWM``) is that of this process, which does nothing else;
"extra" is the peak above the resident size before the first iteration.
"""

import argparse
import os
import shlex
import statistics
import time

import torch

from .attention import header
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


def loader_batches(cfg, count):
    """The first ``count`` batches of the config's training data loader, in the main process."""
    from deformable_detr.engine import Trainer

    cfg = cfg.clone()
    cfg.defrost()
    cfg.DATALOADER.NUM_WORKERS = 0
    it = iter(Trainer.build_train_loader(cfg))
    return [next(it) for _ in range(count)]


def measure(cfg, iters, precisions=("float32",), compare=None, batches=None):
    """Seconds of every timed iteration of each precision (and model) and the peak memory.

    Args:
        precisions (list[str]): "float32" and/or "bfloat16" (CPU autocast), timed in turn.
        compare (CfgNode or None): a second model's config; its steps alternate with the
            first model's, precision by precision.
        batches (list or None): the batches to step on, in turn (one iteration each); None: one
            random batch (:func:`make_batch`).

    Returns:
        dict: "times" and "median" (dicts keyed by precision, and by ("compare", precision) for
        the second model: list[float] seconds, float), "peak_mib", "extra_mib".
    """
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from deformable_detr.engine import Trainer

    def build(c):
        torch.manual_seed(0)
        model = build_model(c).train()
        return model, Trainer.build_optimizer(c, model)

    runs = {p: build(cfg) for p in precisions[:1]}
    for p in precisions[1:]:
        runs[p] = runs[precisions[0]]
    if compare is not None:
        second = build(compare)
        for p in precisions:
            runs[("compare", p)] = second
    batches = batches or [make_batch(cfg)]

    def step(key, batch):
        precision = key[1] if isinstance(key, tuple) else key
        model, optimizer = runs[key]
        # The whole step under autocast, as CPUAutocastTrainer runs it.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
            losses = model(batch)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()

    before = _rss_mib()
    times = {k: [] for k in runs}
    with EventStorage(0):
        for key in runs:
            step(key, batches[0])
        for i in range(iters):
            for key in runs:
                batch = batches[(i + 1) % len(batches)]
                start = time.perf_counter()
                step(key, batch)
                times[key].append(time.perf_counter() - start)
    peak = _status_mib("VmHWM")
    return {
        "times": times,
        "median": {k: statistics.median(t) for k, t in times.items()},
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
    parser.add_argument(
        "--precision",
        nargs="+",
        choices=("float32", "bfloat16"),
        default=["float32"],
        help="step precisions, timed in turn in one process (bfloat16: CPU autocast)",
    )
    parser.add_argument(
        "--loader",
        action="store_true",
        help="step on batches of the config's training data loader instead of random images",
    )
    parser.add_argument(
        "--compare",
        default=None,
        metavar="'KEY VALUE ...'",
        help="also time a second model built with these config overrides (one quoted string), "
        "in turn with the first",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = setup_cfg(args.config_file, args.opts)
    compare = None
    if args.compare is not None:
        overrides = shlex.split(args.compare)
        if not overrides or len(overrides) % 2:
            parser.error(f"--compare takes one string of KEY VALUE pairs, got {args.compare!r}")
        compare = setup_cfg(args.config_file, list(args.opts) + overrides)
    batches = loader_batches(cfg, args.iters + 1) if args.loader else None
    r = measure(cfg, args.iters, args.precision, compare=compare, batches=batches)
    print("\n".join(header("cpu", args.threads, args.iters)))
    data = f"{len(batches)} batches of its training loader" if batches else "random images"
    first = args.precision[0]
    for key, t in r["times"].items():
        precision = key[1] if isinstance(key, tuple) else key
        name = os.path.basename(args.config_file)
        if isinstance(key, tuple):
            name += " with " + args.compare
        print(
            f"training step, {name}, batch {cfg.SOLVER.IMS_PER_BATCH} ({data}), {precision}: "
            f"median {r['median'][key]:.3f} s/iter over {args.iters} iterations (min {min(t):.3f}, "
            f"max {max(t):.3f}); {r['median'][first] / r['median'][key]:.2f}x {first} of the "
            "first model (medians)"
        )
    print(
        f"peak RSS {r['peak_mib']:.0f} MiB ({r['extra_mib']:.0f} MiB above the level before "
        "training)"
    )


if __name__ == "__main__":
    main()
