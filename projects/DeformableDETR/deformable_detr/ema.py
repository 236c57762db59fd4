"""Exponential moving average of the weights (SOLVER.EMA): the average, the hook that updates it
after every step, and the checkpoint entry (``"ema"``) it is saved and resumed as."""

import logging

from detectron2.engine import HookBase
from timm.utils import ModelEmaV3

__all__ = ["EMAHook", "ModelEMA", "load_ema_weights"]

logger = logging.getLogger(__name__)


class ModelEMA:
    """The moving average of a model's weights, a Detectron2 checkpointable.

    The average is timm's ``ModelEmaV3`` over the parameters; buffers are copied, not averaged.
    Its checkpoint entry is the averaged model's own state dict, so the ``"ema"`` entry of a
    checkpoint loads as model weights.

    Attributes:
        restored (bool): whether :meth:`load_state_dict` has run (a resumed average).
    """

    def __init__(self, model, decay, warmup=True):
        """
        Args:
            model (nn.Module): the model being trained, not wrapped in DistributedDataParallel.
            decay (float): largest decay, in [0, 1).
            warmup (bool): ramp the decay up with the step (timm's ``use_warmup``).
        """
        # Parameters only: without box refinement every decoder layer's head is the same module,
        # whose weights the state dict lists once per layer, and averaging by state-dict entry
        # would update them once per layer.
        self._ema = ModelEmaV3(model, decay=decay, use_warmup=warmup, exclude_buffers=True)
        self._ema.module.requires_grad_(False)
        self.restored = False

    @property
    def module(self):
        """nn.Module: the model with the averaged weights."""
        return self._ema.module

    def update(self, model, step):
        """Move the average towards ``model``'s weights after optimiser step ``step`` (from 1)."""
        self._ema.update(model, step=step)

    def reset(self, model):
        """Start the average at ``model``'s weights (e.g. once MODEL.WEIGHTS is loaded)."""
        self._ema.set(model)

    def state_dict(self):
        return self._ema.module.state_dict()

    def load_state_dict(self, state_dict):
        self._ema.module.load_state_dict(state_dict)
        self.restored = True


def load_ema_weights(model, checkpoint):
    """Load a checkpoint's moving average (its ``"ema"`` entry) into ``model``, if it has one.

    With SOLVER.EMA enabled, ``--eval-only`` evaluates the averaged weights, as the evaluations
    during training did.

    Args:
        model (nn.Module): the model, already loaded with the checkpoint's ``"model"`` entry.
        checkpoint (dict): what the checkpointer's load returned (the entries it did not use).

    Returns:
        bool: whether the average was loaded.
    """
    if not checkpoint or "ema" not in checkpoint:
        logger.warning("SOLVER.EMA is enabled but the checkpoint has no 'ema' entry: using 'model'")
        return False
    model.load_state_dict(checkpoint["ema"])
    logger.info("Loaded the moving average of the weights (the checkpoint's 'ema' entry)")
    return True


class EMAHook(HookBase):
    """Update a :class:`ModelEMA` after every optimiser step.

    It must run before the checkpoint and evaluation hooks, so that both see the average of the
    step that just ended; the step number, and hence the decay, follows the trainer's iteration,
    which a resumed run restores.
    """

    def __init__(self, ema, model):
        """
        Args:
            ema (ModelEMA): the average.
            model (nn.Module): the trained model, not wrapped in DistributedDataParallel.
        """
        self._ema = ema
        self._model = model

    def after_step(self):
        self._ema.update(self._model, step=self.trainer.iter + 1)
