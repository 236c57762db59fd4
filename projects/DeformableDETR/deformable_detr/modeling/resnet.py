"""ResNet-18/34 of any width, for small models trained from scratch.

Detectron2's ``build_resnet_backbone`` builds basic-block ResNets (depth 18 and 34) only at the
standard width (``MODEL.RESNETS.RES2_OUT_CHANNELS = 64``). ``build_basic_resnet_backbone`` builds
the same network at the width the config asks for, which is what a model trained from random
weights on a CPU wants: a ResNet-18 at half width (32) has a quarter of the multiply-adds and, on
the quickstart dataset, learns more per minute than the full-width one.
"""

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, ResNet

__all__ = ["build_basic_resnet_backbone"]

_BLOCKS_PER_STAGE = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}


def _check_width(name, value, norm):
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if norm == "GN" and value % 32 != 0:
        raise ValueError(
            f"{name} = {value} must be a multiple of 32 with MODEL.RESNETS.NORM = {norm!r} "
            "(GroupNorm with 32 groups)"
        )


@BACKBONE_REGISTRY.register()
def build_basic_resnet_backbone(cfg, input_shape=None):
    """
    A basic-block ResNet (``MODEL.RESNETS.DEPTH`` 18 or 34) whose stem has
    ``MODEL.RESNETS.STEM_OUT_CHANNELS`` channels and whose stages have ``RES2_OUT_CHANNELS``,
    twice, four and eight times as many. At width 64 it is Detectron2's ResNet-18/34, parameter
    for parameter. ``NORM``, ``OUT_FEATURES`` and ``MODEL.BACKBONE.FREEZE_AT`` mean what they mean there.

    Returns:
        ResNet: the backbone.
    """
    if input_shape is None:
        input_shape = ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN))
    r = cfg.MODEL.RESNETS
    if r.DEPTH not in _BLOCKS_PER_STAGE:
        raise ValueError(
            f"MODEL.RESNETS.DEPTH = {r.DEPTH} is not a basic-block depth: "
            f"build_basic_resnet_backbone builds depths {sorted(_BLOCKS_PER_STAGE)}; use "
            "build_resnet_backbone for the bottleneck ResNets"
        )
    unsupported = []
    if r.RES5_DILATION != 1:
        unsupported.append(f"MODEL.RESNETS.RES5_DILATION = {r.RES5_DILATION} (must be 1)")
    if r.NUM_GROUPS != 1:
        unsupported.append(f"MODEL.RESNETS.NUM_GROUPS = {r.NUM_GROUPS} (must be 1)")
    if any(r.DEFORM_ON_PER_STAGE):
        unsupported.append("MODEL.RESNETS.DEFORM_ON_PER_STAGE (must be all False)")
    if unsupported:
        raise ValueError("build_basic_resnet_backbone does not support " + "; ".join(unsupported))
    _check_width("MODEL.RESNETS.STEM_OUT_CHANNELS", r.STEM_OUT_CHANNELS, r.NORM)
    _check_width("MODEL.RESNETS.RES2_OUT_CHANNELS", r.RES2_OUT_CHANNELS, r.NORM)

    stem = BasicStem(input_shape.channels, r.STEM_OUT_CHANNELS, norm=r.NORM)
    stages = []
    in_channels, out_channels = r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS
    for idx, num_blocks in enumerate(_BLOCKS_PER_STAGE[r.DEPTH]):
        first_stride = 1 if idx == 0 else 2
        stages.append(
            ResNet.make_stage(
                block_class=BasicBlock,
                num_blocks=num_blocks,
                stride_per_block=[first_stride] + [1] * (num_blocks - 1),
                in_channels=in_channels,
                out_channels=out_channels,
                norm=r.NORM,
            )
        )
        in_channels, out_channels = out_channels, out_channels * 2
    return ResNet(stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)
