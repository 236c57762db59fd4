"""Config keys of Deformable DETR: ``add_deformable_detr_config`` adds them to a Detectron2 cfg.

Model keys live under ``cfg.MODEL.DEFORMABLE_DETR``; the optimiser extras the official recipe needs
(AdamW, learning-rate multipliers, full-model gradient clipping) live under ``cfg.SOLVER``. The
defaults here are the official model's and are declared nowhere else: the YAML files state only
what differs from them (dataset, schedule, variant). ``check_deformable_detr_config`` is the one
check of the model keys, run when the model is built. ``load_config`` is how every entry point
(training, evaluation, the demo, export, the converter, the benchmarks) builds its config.
"""

import os

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

__all__ = [
    "ConfigError",
    "add_deformable_detr_config",
    "check_deformable_detr_config",
    "check_device",
    "load_config",
]


# Values of MODEL.DEFORMABLE_DETR.FREEZE.
FREEZE_CHOICES = ("", "backbone", "backbone+encoder")


class ConfigError(ValueError):
    """A config file, an override or a config value that cannot be used; the message names it."""


def add_deformable_detr_config(cfg):
    """Add the Deformable DETR keys to ``cfg`` in place.

    Args:
        cfg (CfgNode): a Detectron2 config, usually from ``detectron2.config.get_cfg()``.
    """
    cfg.MODEL.DEFORMABLE_DETR = CN()
    _C = cfg.MODEL.DEFORMABLE_DETR

    # Number of object classes, without a background class: the classifier is a sigmoid per class.
    # 80 for COCO with the contiguous ids of detectron2's COCO datasets.
    _C.NUM_CLASSES = 80
    # Number of object queries (decoder slots); in two-stage mode the number of proposals used
    # as queries is TWO_STAGE_NUM_PROPOSALS instead.
    _C.NUM_QUERIES = 300
    # Backbone outputs fed to the transformer, from the finest to the coarsest. The backbone must
    # produce each of them (for ResNet, list them in MODEL.RESNETS.OUT_FEATURES too).
    _C.IN_FEATURES = ["res3", "res4", "res5"]
    # Total number of feature levels. Levels beyond len(IN_FEATURES) are made by 3x3 stride-2
    # convolutions, the first on the last backbone feature, the next ones on the previous level.
    _C.NUM_FEATURE_LEVELS = 4
    # In training, run a batch of images of several sizes through the backbone at once, padded
    # with zeros to a common size (as the official model does), instead of once per image size.
    # Faster when the sizes vary (docs/quickstart.md measures it), but the features of an image
    # then depend on the padding: near its border and, with GroupNorm, through the statistics.
    # Inference always runs each image size on its own, whatever this key says.
    _C.PADDED_TRAINING_BATCH = False
    # Width of the transformer (d_model). input_proj uses GroupNorm(32, HIDDEN_DIM), so it must be
    # a multiple of 32.
    _C.HIDDEN_DIM = 256
    # Attention heads in the deformable attention and in the decoder self-attention.
    _C.NHEADS = 8
    # Number of encoder and decoder layers.
    _C.ENC_LAYERS = 6
    _C.DEC_LAYERS = 6
    # Hidden width of the feed-forward block of every transformer layer.
    _C.DIM_FEEDFORWARD = 1024
    # Dropout in the transformer layers.
    _C.DROPOUT = 0.1
    # Sampling points per head and per level in the encoder and decoder deformable attention.
    _C.ENC_N_POINTS = 4
    _C.DEC_N_POINTS = 4
    # Iterative bounding box refinement: every decoder layer refines the boxes of the previous one,
    # and each layer has its own prediction heads.
    _C.WITH_BOX_REFINE = False
    # Two-stage mode: the encoder proposes boxes and the top-scoring proposals become the queries.
    _C.TWO_STAGE = False
    # Number of encoder proposals kept as decoder queries in two-stage mode.
    _C.TWO_STAGE_NUM_PROPOSALS = 300
    # Add the matching losses of every intermediate decoder layer.
    _C.AUX_LOSS = True

    # Loss weights: sigmoid focal classification loss, L1 box loss and GIoU box loss.
    _C.CLASS_WEIGHT = 2.0
    _C.BBOX_WEIGHT = 5.0
    _C.GIOU_WEIGHT = 2.0
    # Weights of the same three terms in the Hungarian matching cost.
    _C.COST_CLASS = 2.0
    _C.COST_BBOX = 5.0
    _C.COST_GIOU = 2.0
    # Focal loss parameters, shared by the loss and the matching cost.
    _C.FOCAL_ALPHA = 0.25
    _C.FOCAL_GAMMA = 2.0

    # Fine-tuning from MODEL.WEIGHTS whose class heads have another class count (only when
    # training, never when resuming): a class whose name (case-insensitive) is one of the
    # checkpoint's classes starts from that class's row in every class head; the other rows start
    # fresh. False: every row starts fresh. The names are the training dataset's thing_classes and
    # the "thing_classes" stored in the checkpoint.
    _C.TRANSFER_CLASSES_BY_NAME = True
    # Parts kept fixed during training: "" (nothing), "backbone" (the whole ResNet, whatever
    # MODEL.BACKBONE.FREEZE_AT says) or "backbone+encoder" (also the input projections, the level
    # embeddings and the transformer encoder). Fine-tuning on a small dataset overfits less and
    # trains faster with less to learn.
    _C.FREEZE = ""

    # Shorter-side sizes of the resize applied before the random crop of the official training
    # augmentation (the crop itself is INPUT.CROP with TYPE "absolute_range").
    cfg.INPUT.CROP_PRE_RESIZE_SIZES = [400, 500, 600]

    # Hold the encoded training images in memory, once per machine, and decode them from there
    # instead of reading the files (the official --cache_mode, for slow file systems).
    cfg.DATALOADER.CACHE_IMAGES = False
    # Folder of the image cache; it must be memory-backed to keep the images in memory.
    # "" means /dev/shm when it exists and is writable, else the temporary folder.
    cfg.DATALOADER.CACHE_DIR = ""

    # COCO-format datasets registered from the config, as (name, json_file, image_root) triples,
    # in every process that builds the config (Detectron2's register_coco_instances); then name
    # them in DATASETS.TRAIN / DATASETS.TEST.
    cfg.DATASETS.REGISTER_COCO = ()

    # Exponential moving average of the weights, updated after every step, saved with every
    # checkpoint (as "ema") and resumed with it; evaluation during training and --eval-only use
    # the averaged weights when enabled.
    cfg.SOLVER.EMA = CN()
    cfg.SOLVER.EMA.ENABLED = False
    # Largest decay: the average keeps this fraction of itself at every step.
    cfg.SOLVER.EMA.DECAY = 0.9998
    # Ramp the decay up from 0 (timm's warmup: 1 - (1 + step)^(-2/3)), so that a short run's
    # average is not dominated by its first weights.
    cfg.SOLVER.EMA.WARMUP = True

    # Optimiser: "ADAMW" (the official recipe) or "SGD".
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    # Learning-rate factor for the backbone parameters (official: 2e-5 = 0.1 x 2e-4).
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    # Learning-rate factor for parameters whose name contains any of LINEAR_PROJ_NAMES: the layers
    # predicting sampling offsets and reference points learn ten times slower in the official recipe.
    cfg.SOLVER.LINEAR_PROJ_MULTIPLIER = 0.1
    cfg.SOLVER.LINEAR_PROJ_NAMES = ["sampling_offsets", "reference_points"]
    # The official recipe clips the gradient norm of the whole model at 0.1 (L2 norm); Detectron2
    # knows only per-parameter clipping, so "full_model" is a clip type handled by the trainer.
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.1
    cfg.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0

    # Precision of the network at inference (training's is SOLVER.AMP): "float32", "bfloat16"
    # (GPUs, and CPUs with AMX or AVX512-BF16; elsewhere float32 with a warning) or "float16"
    # (GPUs only). Boxes and scores come out in float32 whatever the precision.
    cfg.TEST.PRECISION = "float32"

    from .modeling.timm_backbone import add_timm_backbone_config  # here: modeling imports config

    add_timm_backbone_config(cfg)


def check_deformable_detr_config(cfg):
    """Raise a ValueError naming the key for model config values that cannot work.

    ``DeformableDETR.from_config`` calls it, so a bad config fails at build time instead of deep
    inside a layer; keys that depend on the backbone are checked by the backbone adapter.

    Args:
        cfg (CfgNode): a config with the Deformable DETR keys.
    """
    d = cfg.MODEL.DEFORMABLE_DETR

    def need(ok, key, requirement):
        if not ok:
            raise ValueError(f"MODEL.DEFORMABLE_DETR.{key} = {getattr(d, key)!r}: {requirement}")

    for key in ("NUM_CLASSES", "ENC_LAYERS", "DEC_LAYERS", "NHEADS", "NUM_FEATURE_LEVELS"):
        need(getattr(d, key) >= 1, key, "must be >= 1")
    for key in ("ENC_N_POINTS", "DEC_N_POINTS", "DIM_FEEDFORWARD"):
        need(getattr(d, key) >= 1, key, "must be >= 1")
    need(
        d.HIDDEN_DIM % d.NHEADS == 0,
        "HIDDEN_DIM",
        f"must be a multiple of MODEL.DEFORMABLE_DETR.NHEADS ({d.NHEADS})",
    )
    need(0.0 <= d.DROPOUT < 1.0, "DROPOUT", "must be in [0, 1)")
    if d.TWO_STAGE:
        need(d.TWO_STAGE_NUM_PROPOSALS >= 1, "TWO_STAGE_NUM_PROPOSALS", "must be >= 1")
        need(
            d.WITH_BOX_REFINE,
            "TWO_STAGE",
            "requires MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE True (two-stage is defined only with "
            "iterative box refinement, as in configs/r50_two_stage.yaml)",
        )
    else:
        need(d.NUM_QUERIES >= 1, "NUM_QUERIES", "must be >= 1")
    for key in (
        "CLASS_WEIGHT",
        "BBOX_WEIGHT",
        "GIOU_WEIGHT",
        "COST_CLASS",
        "COST_BBOX",
        "COST_GIOU",
    ):
        need(getattr(d, key) >= 0, key, "must be >= 0")
    need(d.FOCAL_GAMMA >= 0, "FOCAL_GAMMA", "must be >= 0")
    need(
        d.FREEZE in FREEZE_CHOICES,
        "FREEZE",
        "must be one of " + ", ".join(repr(c) for c in FREEZE_CHOICES),
    )
    if cfg.TEST.DETECTIONS_PER_IMAGE < 1:
        raise ValueError(
            f"TEST.DETECTIONS_PER_IMAGE = {cfg.TEST.DETECTIONS_PER_IMAGE}: must be >= 1"
        )
    device = check_device(cfg.MODEL.DEVICE)
    precisions = ("float32", "bfloat16", "float16")
    if cfg.TEST.PRECISION not in precisions:
        raise ValueError(f"TEST.PRECISION = {cfg.TEST.PRECISION!r}: must be one of {precisions}")
    if cfg.TEST.PRECISION == "float16" and device.type == "cpu":
        raise ValueError(
            "TEST.PRECISION = 'float16' is not supported on the CPU (MODEL.DEVICE cpu): use "
            "'bfloat16' or 'float32'"
        )
    if len(cfg.MODEL.PIXEL_MEAN) != len(cfg.MODEL.PIXEL_STD):
        raise ValueError(
            f"MODEL.PIXEL_MEAN {list(cfg.MODEL.PIXEL_MEAN)} and MODEL.PIXEL_STD "
            f"{list(cfg.MODEL.PIXEL_STD)} differ in length"
        )


def check_device(device, key="MODEL.DEVICE"):
    """The device that ``device`` names, if this machine has it.

    Args:
        device (str): a device name, e.g. "cpu", "cuda", "cuda:1".
        key (str): the config key or option it comes from, named in errors.

    Returns:
        torch.device

    Raises:
        ConfigError: the name is not a device, or names a CUDA device this machine does not have.
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"{key} {device!r} is not a device name (e.g. 'cpu', 'cuda'): {e}") from e
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"{key} is {device!r} but no CUDA device is usable here: set {key} cpu"
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ConfigError(
                f"{key} is {device!r} but this machine has {torch.cuda.device_count()} CUDA "
                "device(s)"
            )
    return parsed


def load_config(config_file=None, opts=(), *, freeze=True):
    """The config of a run: Detectron2's defaults, this project's keys, a YAML file and overrides.

    Every entry point builds its config here, so a missing file, an unknown key or a value of the
    wrong type fails the same way everywhere, naming the file or the override; the datasets of
    DATASETS.REGISTER_COCO are registered here too.

    Args:
        config_file (str or None): a YAML file (``_BASE_`` chains are followed); None for the
            defaults alone.
        opts (list[str]): overrides as alternating keys and values, as on the command line
            (``["MODEL.WEIGHTS", "model.pth", "SOLVER.MAX_ITER", "100"]``).
        freeze (bool): return the config frozen.

    Returns:
        CfgNode

    Raises:
        ConfigError: naming the file, the override or the DATASETS.REGISTER_COCO entry at fault.
    """
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    if config_file:
        if not os.path.isfile(config_file):
            raise ConfigError(f"config file {config_file!r} does not exist")
        try:
            cfg.merge_from_file(config_file)
        except Exception as e:
            raise ConfigError(f"config file {config_file!r}: {_reason(e)}") from e
    opts = list(opts or ())
    if len(opts) % 2:
        raise ConfigError(
            f"overrides must be KEY VALUE pairs; {opts[-1]!r} has no value (overrides: {opts})"
        )
    for key, value in zip(opts[::2], opts[1::2]):
        try:
            cfg.merge_from_list([key, value])
        except Exception as e:
            raise ConfigError(f"override {key} {value!r}: {_reason(e)}") from e
    # Every entry point and every launch worker builds its config here, so the datasets of
    # DATASETS.REGISTER_COCO exist wherever the config is used.
    from .data.register import register_coco_from_config

    register_coco_from_config(cfg)
    if freeze:
        cfg.freeze()
    return cfg


def _reason(error):
    # yacs wraps the key in a KeyError, whose str() adds quotes around the whole message.
    return error.args[0] if isinstance(error, KeyError) and error.args else str(error)
