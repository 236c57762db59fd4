"""Training and evaluation of Deformable DETR with Detectron2's ``DefaultTrainer``.

``Trainer`` adds what the official recipe needs: the dataset mapper with the official augmentation,
AdamW with lower learning rates for the backbone and for the sampling-offset / reference-point
layers, and gradient clipping on the norm of the whole model; and the official training
conveniences: the in-memory image cache (DATALOADER.CACHE_IMAGES) and the batch-size policy
(:func:`apply_batch_size_policy`). ``setup`` builds the config.

Entry points check what they are given before the long work (:func:`check_run_config`,
:func:`check_output_dir`, :func:`check_device`): every error names the config key at fault.
Evaluation reports the classes the test dataset has (:class:`DatasetClassesCOCOEvaluator`).
"""

import contextlib
import itertools
import logging
import os
import weakref

import torch
from detectron2.data import (
    DatasetCatalog,
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.engine import DefaultTrainer, SimpleTrainer, default_setup
from detectron2.engine import defaults as d2_defaults
from detectron2.engine import hooks as d2_hooks
from detectron2.evaluation import COCOEvaluator
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .checkpoint import AtomicDetectionCheckpointer, DataPositionHook
from .config import check_device, load_config
from .data import DeformableDetrDatasetMapper, build_deformable_detr_augmentation
from .data.image_cache import build_shared_image_cache
from .data.validation import validate_dataset_dicts
from .ema import EMAHook, ModelEMA

__all__ = [
    "Trainer",
    "setup",
    "CPUAutocastTrainer",
    "DatasetClassesCOCOEvaluator",
    "apply_batch_size_policy",
    "build_optimizer",
    "check_device",
    "check_output_dir",
    "check_run_config",
    "cpu_supports_bfloat16",
    "freeze_parts",
    "lr_factor_of",
    "maybe_add_full_model_gradient_clipping",
]

logger = logging.getLogger(__name__)

# Parameters of the Detectron2 backbone inside the meta-architecture's backbone adapter. The
# adapter's input projections are not part of it: they train at the base learning rate.
BACKBONE_PREFIX = "backbone.body."

# Total batch of every published result; the official learning rates and schedule assume it.
OFFICIAL_TOTAL_BATCH = 32


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
        # On a CPU, AdamW's fused kernel: one pass per parameter instead of a dozen small ops
        # (the quickstart model's step with clipping: 6 ms instead of 21). Not on a GPU, where a
        # grad scaler would hand a fused step scaled gradients after the full-model clipping
        # had measured them; on a CPU no grad scaler is used (bfloat16 autocast needs none).
        kwargs = {"lr": solver.BASE_LR, "weight_decay": solver.WEIGHT_DECAY}
        if all(p.device.type == "cpu" for p in model.parameters()):
            try:
                return optimizer_type(params, fused=True, **kwargs)
            except RuntimeError:
                # A PyTorch without the fused kernel for CPU tensors (before 2.4).
                pass
        return optimizer_type(params, **kwargs)
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


def apply_batch_size_policy(cfg, num_workers):
    """The config to train with on ``num_workers`` processes, and a log of the batch it implies.

    SOLVER.IMS_PER_BATCH is the total batch over all workers, so by default a config keeps its
    total batch (and learning rate and schedule) whatever the number of GPUs, as the official
    authors advise: all published results use a total batch of 32, and AdamW's learning rate does
    not scale linearly with the batch size. A total batch other than 32 gets a warning. When
    SOLVER.REFERENCE_WORLD_SIZE is set and differs from ``num_workers``, Detectron2's
    auto-scaling applies instead (per-worker batch kept; total batch, learning rate and
    iterations scaled linearly), with a warning that this departs from the official recipe.

    Args:
        cfg (CfgNode): the config.
        num_workers (int): number of training processes (the world size).

    Returns:
        CfgNode: ``cfg`` itself or, after auto-scaling, a scaled copy.
    """
    solver = cfg.SOLVER
    reference = solver.REFERENCE_WORLD_SIZE
    if reference < 0 or (reference and solver.IMS_PER_BATCH % reference):
        raise ValueError(
            f"cfg.SOLVER.REFERENCE_WORLD_SIZE must be 0 or divide SOLVER.IMS_PER_BATCH "
            f"({solver.IMS_PER_BATCH}); got {reference}"
        )
    scaled = DefaultTrainer.auto_scale_workers(cfg, num_workers)
    auto_scaled = scaled is not cfg
    if auto_scaled:
        new = scaled.SOLVER
        logger.warning(
            "Auto-scaling applied (SOLVER.REFERENCE_WORLD_SIZE=%d, %d workers): IMS_PER_BATCH "
            "%d -> %d, BASE_LR %g -> %g, MAX_ITER %d -> %d, STEPS %s -> %s, WARMUP_ITERS %d -> %d, "
            "CHECKPOINT_PERIOD %d -> %d, TEST.EVAL_PERIOD %d -> %d. The official recipe keeps the "
            "total batch at %d instead (AdamW does not scale linearly with the batch size): set "
            "SOLVER.REFERENCE_WORLD_SIZE 0 to keep it.",
            reference,
            num_workers,
            solver.IMS_PER_BATCH,
            new.IMS_PER_BATCH,
            solver.BASE_LR,
            new.BASE_LR,
            solver.MAX_ITER,
            new.MAX_ITER,
            tuple(solver.STEPS),
            tuple(new.STEPS),
            solver.WARMUP_ITERS,
            new.WARMUP_ITERS,
            solver.CHECKPOINT_PERIOD,
            new.CHECKPOINT_PERIOD,
            cfg.TEST.EVAL_PERIOD,
            scaled.TEST.EVAL_PERIOD,
            OFFICIAL_TOTAL_BATCH,
        )
    cfg = scaled
    total = cfg.SOLVER.IMS_PER_BATCH
    if total <= 0 or total % num_workers:
        raise ValueError(
            f"cfg.SOLVER.IMS_PER_BATCH ({total}) is the total batch over all workers and must be "
            f"a positive multiple of the number of workers ({num_workers})"
        )
    logger.info(
        "Total batch %d = %d worker(s) x %d image(s); BASE_LR %g, MAX_ITER %d%s",
        total,
        num_workers,
        total // num_workers,
        cfg.SOLVER.BASE_LR,
        cfg.SOLVER.MAX_ITER,
        " (after auto-scaling)" if auto_scaled else "",
    )
    if total != OFFICIAL_TOTAL_BATCH and not auto_scaled:
        logger.warning(
            "SOLVER.IMS_PER_BATCH=%d differs from the official total batch of %d, for which the "
            "learning rate and schedule were tuned; AdamW does not scale linearly with the batch "
            "size, so nothing is rescaled. To reproduce the published AP keep the total batch at "
            "%d (SOLVER.IMS_PER_BATCH is the total, whatever the number of GPUs).",
            total,
            OFFICIAL_TOTAL_BATCH,
            OFFICIAL_TOTAL_BATCH,
        )
    return cfg


# Prefixes of the parameters each MODEL.DEFORMABLE_DETR.FREEZE value keeps fixed.
_FROZEN_PREFIXES = {
    "": (),
    "backbone": (BACKBONE_PREFIX,),
    "backbone+encoder": (
        BACKBONE_PREFIX,
        "backbone.input_proj.",
        "transformer.level_embed",
        "transformer.encoder.",
    ),
}


def freeze_parts(model, what):
    """Stop the gradients of the parts of ``model`` that MODEL.DEFORMABLE_DETR.FREEZE names.

    Args:
        model (nn.Module): the DeformableDETR model.
        what (str): "", "backbone" or "backbone+encoder".

    Returns:
        int: the number of parameters frozen.
    """
    if what not in _FROZEN_PREFIXES:
        raise ValueError(
            f"MODEL.DEFORMABLE_DETR.FREEZE must be one of {sorted(_FROZEN_PREFIXES)}; got {what!r}"
        )
    prefixes = _FROZEN_PREFIXES[what]
    frozen = 0
    for name, param in model.named_parameters():
        if prefixes and name.startswith(prefixes):
            param.requires_grad_(False)
            frozen += param.numel()
    if prefixes:
        logger.info("MODEL.DEFORMABLE_DETR.FREEZE %r: %d parameters fixed", what, frozen)
    return frozen


def training_class_names(cfg):
    """The class names of the training datasets (their ``thing_classes``), or None.

    Returns:
        list[str] or None
    """
    for name in cfg.DATASETS.TRAIN:
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if classes:
            return list(classes)
    return None


def cpu_supports_bfloat16():
    """Whether this CPU has native bfloat16 arithmetic (oneDNN's bfloat16 kernels).

    Returns:
        bool
    """
    try:
        return bool(
            torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
    except (AttributeError, RuntimeError):
        return False


def _check_registered(key, names):
    registered = DatasetCatalog.list()
    unknown = [n for n in names if n not in registered]
    if unknown:
        raise ValueError(
            f"{key} names {', '.join(repr(n) for n in unknown)}, not registered in Detectron2's "
            "DatasetCatalog: register it first (e.g. detectron2.data.datasets."
            f"register_coco_instances). Registered: {', '.join(sorted(registered))}"
        )


def check_run_config(cfg, *, training=True):
    """Check what a training or evaluation run is given, before it builds anything.

    A training run otherwise finds an unregistered test dataset at its final evaluation, a missing
    GPU deep in a driver message, or a zero checkpoint period at its first iteration. Every error
    names the config key at fault.

    Args:
        cfg (CfgNode): the config.
        training (bool): check the training keys too (else only what evaluation reads).

    Returns:
        torch.device: the device of MODEL.DEVICE.

    Raises:
        ValueError: naming the key at fault.
    """
    device = check_device(cfg.MODEL.DEVICE)
    if training:
        if not len(cfg.DATASETS.TRAIN):
            raise ValueError("DATASETS.TRAIN is empty: name the registered dataset(s) to train on")
        _check_registered("DATASETS.TRAIN", cfg.DATASETS.TRAIN)
        for key in ("MAX_ITER", "CHECKPOINT_PERIOD"):
            value = cfg.SOLVER[key]
            if not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"SOLVER.{key} must be a positive number of iterations; got {value!r}"
                )
        if cfg.DATALOADER.NUM_WORKERS < 0:
            raise ValueError(
                f"DATALOADER.NUM_WORKERS must be >= 0 (0 loads in the training process); got "
                f"{cfg.DATALOADER.NUM_WORKERS}"
            )
        if cfg.SOLVER.AMP.ENABLED and device.type == "cpu" and not cpu_supports_bfloat16():
            raise ValueError(
                "SOLVER.AMP.ENABLED is True on the CPU, which trains in bfloat16, but this CPU has "
                "no native bfloat16 arithmetic: set SOLVER.AMP.ENABLED False"
            )
        cache_dir = cfg.DATALOADER.get("CACHE_DIR", "")
        if cfg.DATALOADER.get("CACHE_IMAGES", False) and cache_dir and not os.path.isdir(cache_dir):
            raise ValueError(f"DATALOADER.CACHE_DIR {cache_dir!r} is not a folder")
        ema = cfg.SOLVER.get("EMA", None)
        if ema is not None and ema.ENABLED and not 0.0 <= ema.DECAY < 1.0:
            raise ValueError(f"SOLVER.EMA.DECAY must be in [0, 1); got {ema.DECAY}")
        build_deformable_detr_augmentation(cfg, is_train=True)
    elif not len(cfg.DATASETS.TEST):
        raise ValueError("DATASETS.TEST is empty: name the registered dataset(s) to evaluate on")
    _check_registered("DATASETS.TEST", cfg.DATASETS.TEST)
    build_deformable_detr_augmentation(cfg, is_train=False)
    return device


class CPUAutocastTrainer(SimpleTrainer):
    """``SimpleTrainer`` whose steps run under CPU autocast in bfloat16: SOLVER.AMP on a CPU.

    Detectron2's AMPTrainer needs CUDA. bfloat16 has float32's exponent range, so the losses need
    no grad scaler. The whole step is inside the autocast region: autograd replays the dtypes the
    forward pass chose, and the optimizer's operations are not among those autocast converts.
    """

    def run_step(self):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            super().run_step()


@contextlib.contextmanager
def _cpu_training_parts(device):
    """Make ``DefaultTrainer.__init__`` build a model wrapper and a step trainer that work on
    ``device``.

    Detectron2 builds both with no method to override: ``create_ddp_model`` passes
    ``device_ids=[local rank]``, which PyTorch refuses for a model on the CPU (several processes
    with gloo), and ``AMPTrainer`` needs CUDA. On the CPU both names are replaced in Detectron2's
    module while the constructor runs (an AttributeError here if Detectron2 renames them); the rest
    of the construction stays Detectron2's.
    """
    if device.type != "cpu":
        yield
        return
    create_ddp_model, amp_trainer = d2_defaults.create_ddp_model, d2_defaults.AMPTrainer

    def create_cpu_ddp_model(model, **kwargs):
        kwargs.setdefault("device_ids", None)
        return create_ddp_model(model, **kwargs)

    d2_defaults.create_ddp_model = create_cpu_ddp_model
    d2_defaults.AMPTrainer = CPUAutocastTrainer
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = create_ddp_model
        d2_defaults.AMPTrainer = amp_trainer


class DatasetClassesCOCOEvaluator(COCOEvaluator):
    """``COCOEvaluator`` that leaves out predictions of classes the dataset does not have.

    A model may have more classes than the dataset it is evaluated on (NUM_CLASSES left at a COCO
    config's 80 for a 3-class dataset: the extra classes are never trained as positives);
    ``COCOEvaluator`` stops at the first prediction of such a class. Those predictions are not
    reported, their number is logged, and the dataset's classes are evaluated as usual.
    """

    def __init__(self, dataset_name, *args, **kwargs):
        """Arguments as for ``COCOEvaluator``."""
        super().__init__(dataset_name, *args, **kwargs)
        self._num_left_out = 0

    def reset(self):
        super().reset()
        self._num_left_out = 0

    def process(self, inputs, outputs):
        classes = self._metadata.get("thing_classes", None)
        if classes is not None:
            kept = []
            for output in outputs:
                if "instances" in output:
                    instances = output["instances"]
                    inside = instances.pred_classes < len(classes)
                    self._num_left_out += int((~inside).sum())
                    output = dict(output, instances=instances[inside])
                kept.append(output)
            outputs = kept
        super().process(inputs, outputs)

    def evaluate(self, img_ids=None):
        num_left_out = self._num_left_out
        if self._distributed:
            num_left_out = sum(comm.gather(num_left_out, dst=0))
        if num_left_out and comm.is_main_process():
            logger.info(
                "%d prediction(s) of class ids >= %d, which the dataset %r does not have, were not "
                "reported",
                num_left_out,
                len(self._metadata.thing_classes),
                self._metadata.name,
            )
        return super().evaluate(img_ids)


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` with the Deformable DETR data pipeline, optimizer and evaluator.

    The config is checked first (:func:`check_run_config`) and the batch-size policy applied
    (:func:`apply_batch_size_policy`). Mixed precision follows SOLVER.AMP.ENABLED: Detectron2's
    AMPTrainer on a GPU, bfloat16 autocast on a CPU (:class:`CPUAutocastTrainer`). Several
    processes train on GPUs (NCCL) or, without GPUs, on the CPU (gloo).
    """

    def __init__(self, cfg):
        """
        Args:
            cfg (CfgNode): the frozen config.
        """
        device = check_run_config(cfg, training=True)
        cfg = apply_batch_size_policy(cfg, comm.get_world_size())
        self.ema = None
        with _cpu_training_parts(device):
            super().__init__(cfg)

    @classmethod
    def build_model(cls, cfg):
        """The model, with the parts MODEL.DEFORMABLE_DETR.FREEZE names fixed."""
        model = super().build_model(cfg)
        freeze_parts(model, cfg.MODEL.DEFORMABLE_DETR.FREEZE)
        return model

    def build_hooks(self):
        model = self.checkpointer.model
        class_names = training_class_names(self.cfg)
        checkpointables = {"trainer": weakref.proxy(self)}
        if self.cfg.SOLVER.EMA.ENABLED:
            self.ema = ModelEMA(model, self.cfg.SOLVER.EMA.DECAY, self.cfg.SOLVER.EMA.WARMUP)
            checkpointables["ema"] = self.ema
        # DefaultTrainer.__init__ creates its checkpointer just before the hooks, and the
        # checkpoint hook keeps the one it finds: the atomic one, so that a run killed at any
        # moment resumes from a complete file. It stores the class names with every checkpoint
        # and lets MODEL.WEIGHTS (not a resumed run) have another class count.
        self.checkpointer = AtomicDetectionCheckpointer(
            model,
            self.cfg.OUTPUT_DIR,
            class_names=class_names,
            fine_tune={
                "class_names": class_names,
                "transfer_by_name": self.cfg.MODEL.DEFORMABLE_DETR.TRANSFER_CLASSES_BY_NAME,
            },
            **checkpointables,
        )
        hooks = super().build_hooks()
        if self.ema is not None:
            # Before the checkpoint and evaluation hooks: both see this step's average.
            first = next(
                i for i, h in enumerate(hooks) if isinstance(h, (d2_hooks.PeriodicCheckpointer,))
            )
            hooks.insert(first, EMAHook(self.ema, model))
            for hook in hooks:
                if isinstance(hook, d2_hooks.EvalHook):
                    hook._func = self._test_ema
        # Saves the sampler seed with every checkpoint and continues the data stream on resume.
        hooks.insert(0, DataPositionHook(self.cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()))
        return hooks

    def _test_ema(self):
        logger.info("Evaluating the moving average of the weights (SOLVER.EMA)")
        self._last_eval_results = self.test(self.cfg, self.ema.module)
        return self._last_eval_results

    def resume_or_load(self, resume=True):
        """Resume from OUTPUT_DIR's last checkpoint (strictly), or load MODEL.WEIGHTS, whose class
        heads may then have another class count (see ``adapt_class_heads``); the moving average,
        unless resumed, starts at the loaded weights."""
        super().resume_or_load(resume=resume)
        if self.ema is not None and not self.ema.restored:
            if resume and self.checkpointer.has_checkpoint():
                logger.warning("The checkpoint has no 'ema' entry: the moving average restarts")
            self.ema.reset(self.checkpointer.model)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """COCO box evaluation of the dataset's classes (:class:`DatasetClassesCOCOEvaluator`),
        writing its results under OUTPUT_DIR/inference by default."""
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        return DatasetClassesCOCOEvaluator(dataset_name, output_dir=output_folder)

    @classmethod
    def build_train_loader(cls, cfg):
        """The training loader; with DATALOADER.CACHE_IMAGES, the mapper decodes the images from
        an in-memory cache built here (see :func:`build_shared_image_cache`). The records are
        checked first (:func:`validate_dataset_dicts`): bad data fails before the first iteration.
        """
        # The same dataset dicts as build_detection_train_loader would load.
        dataset = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=(
                cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0
            ),
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
        )
        dataset = validate_dataset_dicts(
            dataset, cfg.MODEL.DEFORMABLE_DETR.NUM_CLASSES, dataset_names=cfg.DATASETS.TRAIN
        )
        cache = None
        if cfg.DATALOADER.get("CACHE_IMAGES", False):
            cache = build_shared_image_cache(
                [d["file_name"] for d in dataset],
                cache_dir=cfg.DATALOADER.get("CACHE_DIR", "") or None,
            )
        mapper = DeformableDetrDatasetMapper(cfg, True, image_cache=cache)
        return build_detection_train_loader(cfg, mapper=mapper, dataset=dataset)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(
            cfg, dataset_name, mapper=DeformableDetrDatasetMapper(cfg, False)
        )

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)


def check_output_dir(path, key="OUTPUT_DIR"):
    """Create the folder ``path`` if needed and check that files can be written in it.

    Args:
        path (str): the folder.
        key (str): the config key or option it comes from, named in errors.

    Raises:
        ValueError: naming the key: empty, an existing file, or not creatable or writable.
    """
    if not path:
        raise ValueError(f"{key} is empty: set a folder for the logs, checkpoints and results")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{key} {path!r} exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{key} {path!r} cannot be created: {e}") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{key} {path!r} is not writable")


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
    cfg = load_config(args.config_file, args.opts)
    check_output_dir(cfg.OUTPUT_DIR)
    default_setup(cfg, args)
    # default_setup configures the "detectron2" loggers only: this package's messages (image cache,
    # batch size) go to the console and OUTPUT_DIR/log.txt as well. setup_logger stops propagation;
    # handlers of the application (or of a test harness) on the root logger still get them.
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="deformable_detr")
    logging.getLogger("deformable_detr").propagate = True
    return cfg
