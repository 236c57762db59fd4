"""Whole-model inference benchmark: this project's Deformable DETR against HF transformers.

Run ``python -m deformable_detr.benchmark.model [--variants r50 ...] [--batch 1 4] [--repeat 5]
[--threads 2] [--precision float32 bfloat16] [--check] [--memory] [--backbone]``.

For every variant the project's model (built from its YAML) and HF transformers'
``DeformableDetrForObjectDetection`` with the same architecture (random weights, timm ResNet-50
backbone with frozen batch norm, ``use_pretrained_backbone=False``) run on the same 800x1216
image(s), both in eval mode under ``torch.inference_mode``. Each timed call covers what a user
pays for one batch: normalisation, the network and the top-100 post-processing (Detectron2's
``detector_postprocess`` here, ``post_process_object_detection`` for HF). After one warm-up call
each, the two models run alternately for ``--repeat`` rounds, so a noisy shared machine slows both
alike; the table gives the median seconds per image and the ratio of the medians. With several
``--precision`` values (TEST.PRECISION), one model of the project per precision takes part in the
same rounds, each compared with HF in float32.

``--backbone`` times the project's backbone body alone (as the model runs it at inference) against
torchvision's ResNet-50 in its fastest eager form (eval, channels-last, inference mode, autocast
in 16-bit), side by side.

``--memory`` measures the peak resident set size (``VmHWM``) of a fresh subprocess per model
that imports the same packages, builds the model, makes the inputs and runs one inference; it also
prints the peak above the resident size just before that inference (the activations and
workspace). ``--check`` converts the HF model's weights with
:func:`deformable_detr.checkpoint.convert_hf_state_dict`, loads them into the project's model and
compares the top-100 detections.
"""

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from .attention import header as machine_header

# Name -> (YAML under configs/, DeformableDetrConfig overrides).
VARIANTS = {
    "r50": ("r50.yaml", {}),
    "r50_box_refine": ("r50_box_refine.yaml", {"with_box_refine": True}),
    "r50_two_stage": ("r50_two_stage.yaml", {"with_box_refine": True, "two_stage": True}),
    "r50_single_scale": ("r50_single_scale.yaml", {"num_feature_levels": 1}),
    "r50_single_scale_dc5": (
        "r50_single_scale_dc5.yaml",
        {"num_feature_levels": 1, "dilation": True},
    ),
}
HEIGHT, WIDTH = 800, 1216
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "configs")


def build_ours(variant, opts=(), precision="float32"):
    """The project's model of ``variant`` in eval mode, random weights.

    Args:
        variant (str): a key of :data:`VARIANTS`.
        opts (list[str]): extra config overrides.
        precision (str): TEST.PRECISION.

    Returns:
        nn.Module
    """
    from detectron2.modeling import build_model

    from deformable_detr.config import load_config

    cfg = load_config(
        os.path.join(CONFIG_DIR, VARIANTS[variant][0]),
        ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "TEST.PRECISION", precision] + list(opts),
        freeze=False,
    )
    torch.manual_seed(0)
    return build_model(cfg).eval()


def build_hf(variant, **overrides):
    """HF transformers' model of ``variant`` (91 COCO labels) in eval mode, random weights.

    Args:
        variant (str): a key of :data:`VARIANTS`.
        overrides: extra ``DeformableDetrConfig`` arguments.

    Returns:
        DeformableDetrForObjectDetection
    """
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

    kwargs = dict(VARIANTS[variant][1], **overrides)
    config = DeformableDetrConfig(use_pretrained_backbone=False, num_labels=91, **kwargs)
    torch.manual_seed(0)
    model = DeformableDetrForObjectDetection(config).eval()
    _check_hf_frozen_bn(model)
    return model


def _check_hf_frozen_bn(model):
    # HF swaps every BatchNorm2d of the backbone for its frozen version; a trainable BN left in
    # would make the comparison unfair (and the outputs batch dependent).
    bn = [
        n for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)
    ]
    if bn:
        raise RuntimeError(f"HF backbone still has batch-norm layers that are not frozen: {bn[:3]}")


def make_images(batch, seed=0):
    """``batch`` random RGB images (3, HEIGHT, WIDTH) with values in [0, 255]."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, HEIGHT, WIDTH), generator=g).float() for _ in range(batch)]


def run_ours(model, images):
    """One inference call of the project's model: top-100 detections per image."""
    inputs = [{"image": im, "height": HEIGHT, "width": WIDTH} for im in images]
    return [r["instances"] for r in model(inputs)]


def run_hf(model, images):
    """One inference call of the HF model: normalisation, network, top-100 post-processing."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixel_values = torch.stack([(im / 255.0 - mean) / std for im in images])
    pixel_mask = torch.ones((len(images), HEIGHT, WIDTH), dtype=torch.long)
    outputs = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
    return _hf_processor().post_process_object_detection(
        outputs, threshold=-1.0, target_sizes=[(HEIGHT, WIDTH)] * len(images), top_k=100
    )


@functools.lru_cache(maxsize=None)
def _hf_processor():
    from transformers import DeformableDetrImageProcessor

    return DeformableDetrImageProcessor()


def _time(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_speed(variant, batch, repeat, precisions=("float32",)):
    """Median seconds per image of the models, measured alternately in this process.

    Args:
        precisions (list[str]): TEST.PRECISION of each of the project's models.

    Returns:
        dict: per precision, "ours" and "hf" medians (s/image), their ratio and every round's
        times, with the same HF float32 rounds in every entry.
    """
    calls = {}
    images = make_images(batch)
    for precision in precisions:
        model = build_ours(variant, precision=precision)
        calls[precision] = functools.partial(run_ours, model, images)
    hf = build_hf(variant)
    calls["hf"] = lambda: run_hf(hf, images)
    times = {name: [] for name in calls}
    with torch.inference_mode():
        for fn in calls.values():
            fn()
        for r in range(repeat):
            # Alternate the order so that a drift in the machine's load hits every model alike.
            order = list(calls) if r % 2 == 0 else list(calls)[::-1]
            for name in order:
                times[name].append(_time(calls[name]) / batch)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        p: {
            "ours": med[p],
            "hf": med["hf"],
            "speedup": med["hf"] / med[p],
            "times": {"ours": times[p], "hf": times["hf"]},
        }
        for p in precisions
    }


def measure_backbone(variant, repeat, precision="float32"):
    """Median seconds of the project's backbone body at inference and of torchvision's
    ResNet-50 in its fastest eager form, on one 800x1216 image, alternately.

    Returns:
        dict: "ours" and "torchvision" medians (s).
    """
    import torchvision

    model = build_ours(variant, precision=precision)
    tv = torchvision.models.resnet50().eval().to(memory_format=torch.channels_last)
    image = make_images(1)[0]
    x = model.normalize(image)[None].contiguous(memory_format=torch.channels_last)
    dtype = {"float32": None, "bfloat16": torch.bfloat16}[precision]

    def autocast():
        return torch.autocast("cpu", dtype=dtype, enabled=dtype is not None)

    def ours():
        with autocast():
            model.backbone.features(x)

    def torchvision_resnet():
        with autocast():
            tv(x)

    calls = {"ours": ours, "torchvision": torchvision_resnet}
    times = {name: [] for name in calls}
    with torch.inference_mode():
        for fn in calls.values():
            fn()
        for r in range(repeat):
            for name in list(calls) if r % 2 == 0 else list(calls)[::-1]:
                times[name].append(_time(calls[name]))
    return {k: statistics.median(v) for k, v in times.items()}


def _status_mib(field):
    # VmHWM is the peak resident size of this process's own address space: unlike ru_maxrss it
    # does not inherit the parent's peak across fork and exec.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _rss_mib():
    return _status_mib("VmRSS")


def _memory_child(impl, variant, batch, threads, precision="float32"):
    torch.set_num_threads(threads)
    # Both children import the same packages, so the peaks differ only by the model.
    import transformers.models.deformable_detr.modeling_deformable_detr  # noqa: F401

    import deformable_detr  # noqa: F401

    model = build_ours(variant, precision=precision) if impl == "ours" else build_hf(variant)
    images = make_images(batch)
    before = _rss_mib()
    with torch.inference_mode():
        (run_ours if impl == "ours" else run_hf)(model, images)
    peak = _status_mib("VmHWM")
    print(json.dumps({"peak_mib": peak, "extra_mib": max(0.0, peak - before)}))


def measure_memory(impl, variant, batch, threads, precision="float32"):
    """Peak RSS of a fresh process running one inference of ``impl`` ("ours" or "hf") in
    ``precision`` (the project's model only).

    Returns:
        dict: "peak_mib" (whole process) and "extra_mib" (above the level before the inference).
    """
    cmd = [sys.executable, "-m", "deformable_detr.benchmark.model", "--_memory-child"]
    cmd += [impl, variant, str(batch), str(threads), precision]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def check_detections(variant, height=HEIGHT, width=WIDTH):
    """Load the HF model's weights (converted) into the project's model and compare detections.

    Returns:
        dict: largest score and box differences, and whether the labels are identical.
    """
    from deformable_detr.checkpoint import COCO_CATEGORY_IDS, convert_hf_state_dict

    hf = build_hf(variant)
    # Spread the class head so that the top-100 scores are well apart (ties would make the
    # order of equal scores, not the models, decide the comparison).
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "class_embed" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    state_dict, report = convert_hf_state_dict(hf.state_dict(), hf.config.to_dict())
    ours = build_ours(variant)
    incompatible = ours.load_state_dict(state_dict, strict=False)
    missing = [k for k in incompatible.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or incompatible.unexpected_keys:
        raise RuntimeError(
            f"converted HF weights do not fit the {variant} model: missing {missing[:5]}, "
            f"unexpected {incompatible.unexpected_keys[:5]}"
        )
    g = torch.Generator().manual_seed(2)
    image = torch.randint(0, 256, (3, height, width), generator=g).float()
    with torch.inference_mode():
        mine = ours([{"image": image, "height": height, "width": width}])[0]["instances"]
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        out = hf(pixel_values=((image / 255.0 - mean) / std)[None])
        logits = out.logits[..., list(COCO_CATEGORY_IDS)]
        prob = logits.sigmoid().flatten(1)
        scores, index = prob.topk(100, dim=1)
        query = index // logits.shape[-1]
        labels = index % logits.shape[-1]
        cx, cy, w, h = out.pred_boxes[0, query[0]].unbind(-1)
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
        boxes = boxes * torch.tensor([width, height, width, height])
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return {
        "labels_equal": bool(torch.equal(mine.pred_classes, labels[0])),
        "max_score_diff": float((mine.scores - scores[0]).abs().max()),
        "max_box_diff_px": float((mine.pred_boxes.tensor - boxes).abs().max()),
    }


def profile_ours(variant, batch, precision="float32"):
    """Where the project's model spends its time: one inference under ``torch.profiler``, with
    ranges opened around the parts of the model by forward hooks (nothing in the model changes).

    Returns:
        list[tuple[str, float]]: (part, milliseconds) rows; indented rows are inside the row above.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    from deformable_detr.layers import ms_deform_attn as attn_module

    model = build_ours(variant, precision=precision)
    images = make_images(batch)
    transformer = model.transformer
    open_ranges = []

    def ranged(name, module):
        def pre(_module, _inputs):
            r = record_function(name)
            r.__enter__()
            open_ranges.append(r)

        def post(_module, _inputs, _output):
            open_ranges.pop().__exit__(None, None, None)

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    ranged("backbone.body", model.backbone.body)
    for proj in model.backbone.input_proj:
        ranged("backbone.input_proj", proj)
    ranged("position_embedding", model.position_embedding)
    ranged("transformer", transformer)
    for stack, name in ((transformer.encoder, "encoder"), (transformer.decoder, "decoder")):
        ranged(name, stack)
        for layer in stack.layers:
            attn = layer.self_attn if name == "encoder" else layer.cross_attn
            ranged(f"{name}.deformable_attention", attn)
            ranged(f"{name}.value_proj", attn.value_proj)
            ranged(f"{name}.output_proj", attn.output_proj)
            ranged(f"{name}.ffn", layer.linear1)
            ranged(f"{name}.ffn", layer.linear2)
            if name == "decoder":
                ranged("decoder.self_attn", layer.self_attn)

    # The op is labelled by the stack that calls it.
    op = attn_module.multi_scale_deformable_attention
    in_encoder = [False]
    transformer.encoder.register_forward_pre_hook(lambda *_: in_encoder.__setitem__(0, True))
    transformer.encoder.register_forward_hook(lambda *_: in_encoder.__setitem__(0, False))

    def labelled_op(*args):
        with record_function("encoder.op" if in_encoder[0] else "decoder.op"):
            return op(*args)

    attn_module.multi_scale_deformable_attention = labelled_op
    try:
        with torch.inference_mode():
            run_ours(model, images)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                with record_function("total"):
                    run_ours(model, images)
    finally:
        attn_module.multi_scale_deformable_attention = op
    ms = {e.key: e.cpu_time_total / 1000 for e in prof.key_averages()}
    get = lambda k: ms.get(k, 0.0)  # noqa: E731
    rows = [("total", get("total")), ("backbone (ResNet body)", get("backbone.body"))]
    rows.append(("input projections (conv + GroupNorm)", get("backbone.input_proj")))
    rows.append(("position encoding", get("position_embedding")))
    for name in ("encoder", "decoder"):
        attn = get(f"{name}.deformable_attention")
        parts = [get(f"{name}.{k}") for k in ("value_proj", "op", "output_proj")]
        rows.append((name, get(name)))
        rows.append(("  deformable attention", attn))
        rows.append(("    value projection", parts[0]))
        rows.append(("    attention op", parts[1]))
        rows.append(("    output projection", parts[2]))
        rows.append(("    offsets/weights linear, softmax, locations", attn - sum(parts)))
        if name == "decoder":
            rows.append(("  self-attention", get("decoder.self_attn")))
        rows.append(("  FFN linears", get(f"{name}.ffn")))
    inside = sum(get(f"{n}.deformable_attention") + get(f"{n}.ffn") for n in ("encoder", "decoder"))
    rest = get("transformer") - inside - get("decoder.self_attn")
    rows.append(("transformer, rest (flatten, masks, references, norms, residuals)", rest))
    outside = get("total") - sum(
        get(k)
        for k in ("backbone.body", "backbone.input_proj", "position_embedding", "transformer")
    )
    rows.append(("heads, normalisation, post-processing", outside))
    return rows, prof


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=["r50"], choices=sorted(VARIANTS))
    parser.add_argument("--batch", nargs="+", type=int, default=[1])
    parser.add_argument("--repeat", type=int, default=5, help="alternating timed rounds")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument(
        "--precision",
        nargs="+",
        default=["float32"],
        choices=["float32", "bfloat16", "float16"],
        help="TEST.PRECISION of the project's model (HF runs in float32)",
    )
    parser.add_argument("--memory", action="store_true", help="peak RSS, one subprocess each")
    parser.add_argument(
        "--backbone", action="store_true", help="time the backbone body against torchvision's"
    )
    parser.add_argument("--check", action="store_true", help="compare detections on HF weights")
    parser.add_argument("--profile", action="store_true", help="profile the project's model")
    parser.add_argument("--_memory-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._memory_child:
        impl, variant, batch, threads, precision = args._memory_child
        _memory_child(impl, variant, int(batch), int(threads), precision)
        return
    torch.set_num_threads(args.threads)
    if args.profile:
        for variant in args.variants:
            rows, prof = profile_ours(variant, args.batch[0], args.precision[0])
            print(
                f"profile of {variant}, batch {args.batch[0]}, {args.precision[0]}, "
                f"{args.threads} threads (ms)"
            )
            print("| part | ms | share |")
            print("|---|---|---|")
            for name, value in rows:
                share = 100 * value / rows[0][1]
                print(f"| {name.replace('  ', '&nbsp;&nbsp;')} | {value:.0f} | {share:.1f}% |")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        return

    if args.backbone:
        print(
            f"backbone body alone, one {HEIGHT}x{WIDTH} image, {args.threads} threads, median of "
            f"{args.repeat} alternating rounds (s)"
        )
        print("| variant | precision | ours | torchvision ResNet-50 | ours / torchvision |")
        print("|---|---|---|---|---|")
        for variant in args.variants:
            for precision in args.precision:
                r = measure_backbone(variant, args.repeat, precision)
                ratio = r["ours"] / r["torchvision"]
                print(
                    f"| {variant} | {precision} | {r['ours']:.3f} | {r['torchvision']:.3f} | "
                    f"{ratio:.2f} |",
                    flush=True,
                )
        return

    print("\n".join(machine_header("cpu", args.threads, args.repeat)))
    print(
        f"CPU inference, {HEIGHT}x{WIDTH} images, {args.threads} threads, best / median of "
        f"{args.repeat} alternating rounds after one warm-up; HF always in float32"
    )
    header = (
        "| variant | batch | precision | ours s/img best / median | HF s/img best / median | "
        "speedup best / median |"
    )
    if args.memory:
        header += " ours peak / extra MiB | HF peak / extra MiB |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for variant in args.variants:
        for batch in args.batch:
            results = measure_speed(variant, batch, args.repeat, args.precision)
            hf_memory = None
            for precision, r in results.items():
                ours, hf = min(r["times"]["ours"]), min(r["times"]["hf"])
                row = (
                    f"| {variant} | {batch} | {precision} | {ours:.3f} / {r['ours']:.3f} | "
                    f"{hf:.3f} / {r['hf']:.3f} | {hf / ours:.2f}x / {r['speedup']:.2f}x |"
                )
                if args.memory:
                    m = measure_memory("ours", variant, batch, args.threads, precision)
                    hf_memory = hf_memory or measure_memory("hf", variant, batch, args.threads)
                    for m in (m, hf_memory):
                        row += f" {m['peak_mib']:.0f} / {m['extra_mib']:.0f} |"
                print(row, flush=True)
    load = os.getloadavg() if hasattr(os, "getloadavg") else ()
    print("load average at the end: " + " ".join(f"{x:.2f}" for x in load))
    if args.check:
        for variant in args.variants:
            print(f"check {variant}: {json.dumps(check_detections(variant))}", flush=True)


if __name__ == "__main__":
    main()
