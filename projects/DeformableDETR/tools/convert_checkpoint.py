#!/usr/bin/env python
"""Convert released Deformable DETR weights (or an ImageNet ResNet) into a MODEL.WEIGHTS file.

Examples::

    # an official release, e.g. r50_deformable_detr-checkpoint.pth
    python projects/DeformableDETR/tools/convert_checkpoint.py --from official \\
        --input r50_deformable_detr-checkpoint.pth --output deformable_detr_r50.pth
    # a HF transformers save_pretrained folder (or its model.safetensors / pytorch_model.bin)
    python projects/DeformableDETR/tools/convert_checkpoint.py --from hf \\
        --input deformable-detr/ --output deformable_detr_r50_hf.pth
    # torchvision's ImageNet ResNet-50 (resnet50-0676ba61.pth) for training from ImageNet
    python projects/DeformableDETR/tools/convert_checkpoint.py --from torchvision \\
        --input resnet50-0676ba61.pth --output R-50-torchvision.pth
    # timm / HF-hub ImageNet weights of a timm model, for configs/swin_t.yaml or convnext_t.yaml
    python projects/DeformableDETR/tools/convert_checkpoint.py --from timm \
        --timm-model swin_tiny_patch4_window7_224 --input model.safetensors \
        --output swin_tiny_patch4_window7_224-timm.pth

The script prints what it converted per group, the variant it found and the config file to use
with the output. A file it does not understand makes it exit with status 1 and a message naming the
file and the key.
"""

import argparse
import logging
import os
import sys

from deformable_detr.checkpoint import (
    CheckpointConversionError,
    check_state_dict_compatibility,
    convert_checkpoint,
    convert_timm_checkpoint,
    format_conversion_report,
    save_converted_checkpoint,
)

logger = logging.getLogger("deformable_detr.convert_checkpoint")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--from",
        dest="source",
        required=True,
        choices=("official", "hf", "torchvision", "timm"),
        help="format of the input file",
    )
    parser.add_argument("--input", required=True, help="input file (or HF save_pretrained folder)")
    parser.add_argument("--output", required=True, help="output .pth (or .pkl) file")
    parser.add_argument(
        "--timm-model",
        help="with --from timm: the timm model the file holds (MODEL.TIMM.NAME of the config)",
    )
    parser.add_argument(
        "--out-indices",
        type=int,
        nargs="+",
        default=[1, 2, 3],
        help="with --from timm: MODEL.TIMM.OUT_INDICES of the config (default: 1 2 3)",
    )
    parser.add_argument(
        "--keep-all-classes",
        action="store_true",
        help="keep all 91 rows of a COCO head (default: the 80 used category ids, in id order)",
    )
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="read torch files with full unpickling (only for files from a trusted source)",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="build the model from the matching config and check the output loads exactly",
    )
    return parser


def verify(checkpoint, source):
    """Build the model of the matching config (with the reported overrides) and check the weights.

    Args:
        checkpoint (dict): the output of ``convert_checkpoint``.
        source (str): the input file, for messages.
    """
    from detectron2.modeling import build_model

    from deformable_detr.checkpoint.variant import CONFIG_DIR, variant_config
    from deformable_detr.config import load_config

    variant = checkpoint["deformable_detr_variant"]
    if "timm_model" in variant:
        config_file = variant["config_file"]
        cfg = load_config(
            os.path.join(CONFIG_DIR, config_file),
            ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.TIMM.NAME", variant["timm_model"]]
            + ["MODEL.TIMM.OUT_INDICES", str(variant["out_indices"])],
        )
    else:
        cfg, config_file, _ = variant_config(variant, source)
    check_state_dict_compatibility(build_model(cfg), checkpoint["model"])
    print(f"verified: the weights match the model of configs/{config_file} exactly")


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if (args.source == "timm") != bool(args.timm_model):
        print("error: --timm-model is needed with --from timm, and only there", file=sys.stderr)
        return 2
    try:
        if args.source == "timm":
            checkpoint = convert_timm_checkpoint(
                args.input,
                args.timm_model,
                out_indices=args.out_indices,
                trust_pickle=args.trust_pickle,
            )
        else:
            checkpoint = convert_checkpoint(
                args.source,
                args.input,
                keep_all_classes=args.keep_all_classes,
                trust_pickle=args.trust_pickle,
            )
    except CheckpointConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_conversion_report(checkpoint["conversion_report"]))
    if args.verify:
        try:
            verify(checkpoint, args.input)
        except RuntimeError as e:
            print(f"error: {args.input}: {e}", file=sys.stderr)
            return 1
    save_converted_checkpoint(checkpoint, args.output)
    print(f"wrote {args.output}")
    variant = checkpoint["deformable_detr_variant"]
    if args.source not in ("torchvision", "timm"):
        opts = " ".join(variant["overrides"])
        print(
            "evaluate with: python train_net.py --config-file "
            f"configs/{variant['config_file']} --eval-only "
            f"MODEL.WEIGHTS {args.output}" + (f" {opts}" if opts else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
