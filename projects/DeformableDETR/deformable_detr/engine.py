"""Training and evaluation of Deformable DETR with Detectron2's ``DefaultTrainer``.

``Trainer`` adds what the official recipe needs: the dataset mapper with the official augmentation,
AdamW with lower learning rates for the backbone and for the sampling-offset / reference-point
layers, and gradient clipping on the norm of the whole model. ``setup`` builds the config.
"""

import itertools
import logging
import os
import weakref

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import (
    AMPTrainer,
    DefaultTrainer,
    SimpleTrainer,
    TrainerBase,
    create_ddp_model,
    default_setup,
)
from detectron2.evaluation import COCOEvaluator
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .config import add_deformable_detr_config
from .data import DeformableDetrDatasetMapper

__all__ = [
    "Trainer",
    "setup",
    "build_optimizer",
    "lr_factor_of",
    "maybe_add_full_model_gradient_clipping",
]

logger = logging.getLogger(__name__)

# Parameters of the Detectron2 backbone inside the meta-architecture's backbone adapter. The
# adapter's input projections are not part of it: they train at the base learning rate.
BACKBONE_PREFIX = "backbone.body."


def lr_factor_of(name, backbone_multiplier, linear_proj_multiplier, linear_proj_names):
    """Learning-rate factor of one parameter, by name, as in the official recipe.

    Args:
        name (str): the parameter's full name in the model, e.g. "backbone.body.res3.0.conv1.weight".
        backbone_multiplier (float): factor of the Detectron2 backbone's parameters.
        linear_proj_multiplier (float): factor of the parameters whose name contains any of
            ``linear_proj_names``.
        linear_proj_names (list[str]): name fragments, e.g. ["sampling_offsets", "reference_points"].

    Returns:
        float
    """
    name = name.lstrip(".")
    if name.startswith(BACKBONE_PREFIX):
        return backbone_multiplier
    if any(fragment in name for fragment in linear_proj_names):
        return linear_proj_multiplier
    return 1.0


def maybe_add_full_model_gradient_clipping(cfg, optimizer_type):
    """The optimizer class with the gradient clipping that ``cfg.SOLVER.CLIP_GRADIENTS`` asks for.

    CLIP_TYPE "full_model" clips the norm (NORM_TYPE) of all gradients together at CLIP_VALUE before
    every step, as the official training does; "value" and "norm" are Detectron2's per-parameter
    clipping.

    Args:
        cfg (CfgNode): the config.
        optimizer_type (type): a subclass of ``torch.optim.Optimizer``.

    Returns:
        type: ``optimizer_type`` or a subclass of it that clips in ``step``.
    """
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if not clip.ENABLED:
        return optimizer_type
    if clip.CLIP_TYPE != "full_model":
        return maybe_add_gradient_clipping(cfg, optimizer_type)
    if clip.CLIP_VALUE <= 0:
        raise ValueError(
            f"cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE must be > 0 for 'full_model'; got "
            f"{clip.CLIP_VALUE}"
        )
    max_norm, norm_type = float(clip.CLIP_VALUE), float(clip.NORM_TYPE)

    class FullModelGradientClippingOptimizer(optimizer_type):
        def step(self, closure=None):
            # Under AMP the grad scaler unscales the gradients before calling step(), so the
            # norm is measured on the true gradients.
            params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
            torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type)
            return super().step(closure=closure)

    FullModelGradientClippingOptimizer.__name__ = optimizer_type.__name__ + "WithFullModelClipping"
    FullModelGradientClippingOptimizer.__qualname__ = FullModelGradientClippingOptimizer.__name__
    return FullModelGradientClippingOptimizer


def build_optimizer(cfg, model):
    """The optimizer of the official recipe.

    Trainable parameters get SOLVER.WEIGHT_DECAY, those of normalisation layers
    SOLVER.WEIGHT_DECAY_NORM (the official recipe decays everything alike: the base config sets both
    to 1e-4); the learning rate is SOLVER.BASE_LR times :func:`lr_factor_of`.

    Args:
        cfg (CfgNode): the config (SOLVER.OPTIMIZER "ADAMW" or "SGD").
        model (nn.Module): the model, not yet wrapped in DistributedDataParallel.

    Returns:
        torch.optim.Optimizer
    """
    solver = cfg.SOLVER

    def lr_factor_func(name):
        return lr_factor_of(
            name,
            solver.BACKBONE_MULTIPLIER,
            solver.LINEAR_PROJ_MULTIPLIER,
            list(solver.LINEAR_PROJ_NAMES),
        )

    params = get_default_optimizer_params(
        model,
        base_lr=solver.BASE_LR,
        weight_decay=solver.WEIGHT_DECAY,
        weight_decay_norm=solver.WEIGHT_DECAY_NORM,
        lr_factor_func=lr_factor_func,
    )
    name = solver.OPTIMIZER.upper()
    if name == "ADAMW":
        optimizer_type = maybe_add_full_model_gradient_clipping(cfg, torch.optim.AdamW)
        return optimizer_type(params, lr=solver.BASE_LR, weight_decay=solver.WEIGHT_DECAY)
    if name == "SGD":
        optimizer_type = maybe_add_full_model_gradient_clipping(cfg, torch.optim.SGD)
        return optimizer_type(
            params,
            lr=solver.BASE_LR,
            momentum=solver.MOMENTUM,
            nesterov=solver.NESTEROV,
            weight_decay=solver.WEIGHT_DECAY,
        )
    raise ValueError(f"cfg.SOLVER.OPTIMIZER must be 'ADAMW' or 'SGD'; got {solver.OPTIMIZER!r}")


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` with the Deformable DETR data pipeline, optimizer and evaluator.

    Mixed precision follows SOLVER.AMP.ENABLED (Detectron2's AMPTrainer). Several processes train
    on GPUs (NCCL) or, without GPUs, on the CPU (gloo).
    """

    def __init__(self, cfg):
        """
        Args:
            cfg (CfgNode): the frozen config.
        """
        # The same construction as DefaultTrainer.__init__, except for the DistributedDataParallel
        # device_ids: DefaultTrainer always passes [local rank], which PyTorch rejects for a model
        # on the CPU, so multi-process CPU training (gloo) would fail there.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())

        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)

        on_gpu = any(p.is_cuda for p in model.parameters())
        device_ids = [comm.get_local_rank()] if on_gpu else None
        model = create_ddp_model(model, broadcast_buffers=False, device_ids=device_ids)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(
            model, data_loader, optimizer
        )

        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = DetectionCheckpointer(
            model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """COCO box evaluation, writing its results under OUTPUT_DIR/inference by default."""
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(dataset_name, output_dir=output_folder)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=DeformableDetrDatasetMapper(cfg, True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(
            cfg, dataset_name, mapper=DeformableDetrDatasetMapper(cfg, False)
        )

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)


def setup(args):
    """Build the frozen config from ``args`` and run Detectron2's default setup (logging, seeds,
    config dump in OUTPUT_DIR).

    Args:
        args (argparse.Namespace): from ``detectron2.engine.default_argument_parser``; uses
            ``config_file`` and ``opts``.

    Returns:
        CfgNode
    """
    if not args.config_file:
        raise ValueError("--config-file is required (e.g. configs/r50.yaml)")
    if not os.path.isfile(args.config_file):
        raise FileNotFoundError(f"--config-file {args.config_file!r} does not exist")
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg
