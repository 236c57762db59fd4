"""The training data position: the sampler seed saved with each checkpoint, and the stream resumed
where the checkpointed iteration left it.

Detectron2's training samplers are infinite seeded streams that restart from their beginning in
every process, and their seed is random unless given at construction, so a resumed run would see
the first images of another shuffled order. :class:`DataPositionHook` saves the seed with the
trainer state and, on resume, restores it and skips the indices the finished iterations consumed.
"""

import itertools
import logging

from detectron2.data.samplers import (
    RandomSubsetTrainingSampler,
    RepeatFactorTrainingSampler,
    TrainingSampler,
)
from detectron2.engine import HookBase
from torch.utils.data import DataLoader, Sampler

__all__ = ["DataPositionHook", "ResumableSampler", "sampler_seed_attribute"]

logger = logging.getLogger(__name__)

# Detectron2's samplers keep the seed they were built with in this attribute and have no public
# accessor for it; sampler_seed_attribute is the one place that relies on it.
_SEED_ATTRIBUTE = "_seed"
_DETECTRON2_SAMPLERS = (TrainingSampler, RepeatFactorTrainingSampler, RandomSubsetTrainingSampler)


def sampler_seed_attribute(sampler):
    """The attribute holding ``sampler``'s shuffling seed, or None for a sampler without one.

    Args:
        sampler (Sampler): a training sampler.

    Returns:
        str or None

    Raises:
        RuntimeError: for one of Detectron2's samplers that no longer keeps an integer seed
            there, so that a changed Detectron2 fails here instead of resuming another order.
    """
    seed = getattr(sampler, _SEED_ATTRIBUTE, None)
    if isinstance(seed, int):
        return _SEED_ATTRIBUTE
    if isinstance(sampler, _DETECTRON2_SAMPLERS):
        raise RuntimeError(
            f"{type(sampler).__name__} has no integer '{_SEED_ATTRIBUTE}' (found {seed!r}): this "
            "Detectron2 keeps the sampler seed elsewhere, so the data position cannot be saved; "
            "update deformable_detr.checkpoint.data_position.sampler_seed_attribute"
        )
    return None


class ResumableSampler(Sampler):
    """An infinite training sampler that starts ``start`` indices into its own stream.

    Wraps the per-worker stream of Detectron2's training samplers (``TrainingSampler``,
    ``RepeatFactorTrainingSampler``, ``RandomSubsetTrainingSampler``): index ``k`` of the wrapped
    stream is what the original sampler would give at position ``start + k``.

    Attributes:
        sampler (Sampler): the wrapped sampler.
        start (int): indices of this worker's stream to skip.
    """

    def __init__(self, sampler, start=0):
        """
        Args:
            sampler (Sampler): an infinite per-worker sampler.
            start (int): indices to skip, >= 0.
        """
        if start < 0:
            raise ValueError(f"ResumableSampler: start must be >= 0, got {start}")
        self.sampler = sampler
        self.start = int(start)
        self._seed_attribute = sampler_seed_attribute(sampler)

    @property
    def seed(self):
        """int or None: the wrapped sampler's shuffling seed, if it has one."""
        if self._seed_attribute is None:
            return None
        return getattr(self.sampler, self._seed_attribute)

    @seed.setter
    def seed(self, value):
        if self._seed_attribute is None:
            raise AttributeError(f"{type(self.sampler).__name__} has no seed to restore")
        setattr(self.sampler, self._seed_attribute, int(value))

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.start, None)


def _find_sampler_holder(loader, max_depth=8):
    """The object in a Detectron2 train loader that holds the index sampler (``.sampler``).

    Detectron2 wraps a map-style dataset in ``ToIterableDataset(dataset, sampler)`` inside a
    ``DataLoader``, possibly inside ``AspectRatioGroupedDataset``; each wrapper keeps the inner one
    as its public ``dataset``.
    """
    seen = set()
    obj = loader
    for _ in range(max_depth):
        if obj is None or id(obj) in seen:
            return None
        seen.add(id(obj))
        if isinstance(getattr(obj, "sampler", None), Sampler) and not isinstance(obj, DataLoader):
            return obj
        obj = getattr(obj, "dataset", None)
    return None


class DataPositionHook(HookBase):
    """Resume the training data stream where the checkpointed iteration left it.

    The hook saves the sampler's seed with the trainer state and, before the resumed training
    starts, skips ``start_iter * images_per_worker`` indices of the stream. It must run before the
    train loader is first iterated, as Detectron2's trainers do (their loader iterator is made in
    the first ``run_step``): register it first.

    The continuation is exact with ``DATALOADER.ASPECT_RATIO_GROUPING`` off. With grouping (the
    default), the images waiting in the aspect-ratio buckets of the killed run, at most one batch
    per bucket and worker, are not replayed. Augmentation randomness is not restored.
    """

    def __init__(self, images_per_worker):
        """
        Args:
            images_per_worker (int): images of one iteration in this process
                (SOLVER.IMS_PER_BATCH // world size).
        """
        if images_per_worker < 1:
            raise ValueError(f"images_per_worker must be >= 1, got {images_per_worker}")
        self.images_per_worker = int(images_per_worker)
        self._sampler = None

    def _resumable(self):
        """The train loader's sampler, wrapped in a ResumableSampler once; None if not found."""
        if self._sampler is not None:
            return self._sampler
        holder = _find_sampler_holder(getattr(self.trainer, "data_loader", None))
        if holder is None:
            return None
        if not isinstance(holder.sampler, ResumableSampler):
            holder.sampler = ResumableSampler(holder.sampler)
        self._sampler = holder.sampler
        return self._sampler

    def state_dict(self):
        sampler = self._resumable()
        if sampler is None or sampler.seed is None:
            return {}
        return {"seed": int(sampler.seed)}

    def load_state_dict(self, state_dict):
        sampler = self._resumable()
        if sampler is None or "seed" not in state_dict:
            return
        if sampler.seed is not None and sampler.seed != state_dict["seed"]:
            logger.info("Restoring the training sampler seed %d", state_dict["seed"])
        sampler.seed = state_dict["seed"]

    def before_train(self):
        # Wrapped before the loader is first iterated, whether or not this run resumes.
        sampler = self._resumable()
        start_iter = self.trainer.start_iter
        if start_iter == 0:
            return
        if sampler is None:
            logger.warning(
                "Resuming at iteration %d: the train loader has no index sampler this hook can "
                "move, so the data stream restarts from its beginning",
                start_iter,
            )
            return
        sampler.start = start_iter * self.images_per_worker
        logger.info(
            "Resuming the training data stream at iteration %d (%d images into this worker's "
            "stream)",
            start_iter,
            sampler.start,
        )
