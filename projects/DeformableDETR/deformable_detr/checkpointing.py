"""Resume-safe checkpointing: atomic checkpoint files, robust resume, and the data position.

A training run can be killed at any moment (SIGKILL, a pre-empted node, a full disk) and resumed
with ``--resume`` from the last complete checkpoint:

* :class:`AtomicDetectionCheckpointer` writes every checkpoint to a temporary file in the same
  folder, flushes and fsyncs it, and only then renames it over the final name (``os.replace`` is
  atomic on POSIX); the ``last_checkpoint`` tag is replaced the same way, after the file it names.
  A checkpoint whose weights are not finite is never written. On resume, a tagged file that is
  missing or unreadable is skipped with a warning for the newest complete ``model_*.pth``.
* :class:`DataPositionHook` keeps the training sampler's seed in the checkpoint and, on resume,
  makes the sampler skip the indices the finished iterations consumed, so the resumed run continues
  the same shuffled order instead of starting it again.
"""

import itertools
import logging
import os
import re
import zipfile

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import HookBase
from torch.utils.data import Sampler

__all__ = [
    "AtomicDetectionCheckpointer",
    "DataPositionHook",
    "ResumableSampler",
    "atomic_torch_save",
    "atomic_write_text",
    "is_complete_checkpoint",
]

logger = logging.getLogger(__name__)

# Temporary files are "<final name>.tmp-<pid>": never "*.pth", so nothing lists them as checkpoints.
TEMP_MARKER = ".tmp-"
# Files a fallback may resume from: what PeriodicCheckpointer writes ("model_0001234.pth",
# "model_final.pth"), not e.g. "model_best.pth", whose iteration is older than its date.
_RESUMABLE_NAME = re.compile(r"^model_(\d+|final)\.pth$")


def _fsync_dir(directory):
    # The rename is durable only once the folder entry is on disk; some filesystems refuse to
    # open a folder, which then only costs durability, not atomicity.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path, write, mode):
    directory = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}{TEMP_MARKER}{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Includes KeyboardInterrupt: a half-written temporary file is never left behind by us.
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


def atomic_torch_save(obj, path):
    """``torch.save(obj, path)`` that leaves either the old file or the complete new one.

    Args:
        obj: anything ``torch.save`` accepts.
        path (str): destination, in a local folder.
    """
    _atomic_write(path, lambda f: torch.save(obj, f), "wb")


def atomic_write_text(text, path):
    """Write ``text`` to ``path`` atomically (see :func:`atomic_torch_save`).

    Args:
        text (str): the new content.
        path (str): destination, in a local folder.
    """
    _atomic_write(path, lambda f: f.write(text), "w")


def is_complete_checkpoint(path):
    """Whether ``path`` is a whole ``torch.save`` file, without loading its tensors.

    ``torch.save`` writes a zip archive whose directory is at the end of the file, so a truncated
    file has no readable directory. Files in the legacy (non-zip) format are loaded instead.

    Args:
        path (str): a local file.

    Returns:
        bool
    """
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError:
        return False
    if magic == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as archive:
                return any(n.endswith("data.pkl") for n in archive.namelist())
        except (zipfile.BadZipFile, OSError):
            return False
    try:
        torch.load(path, map_location="cpu", weights_only=False)
    except Exception:
        return False
    return True


class AtomicDetectionCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose files are complete whenever they exist.

    Differences from Detectron2's checkpointer, which writes the file and then the tag in place:

    * ``save`` writes to ``<name>.pth.tmp-<pid>``, fsyncs, and renames it to ``<name>.pth``; then
      it replaces ``last_checkpoint`` the same way. A kill at any moment leaves the previous
      checkpoint tagged and loadable.
    * ``save`` refuses (FloatingPointError) a model with NaN or infinite weights, so the last
      checkpoint of a diverged run is the last good one.
    * ``get_checkpoint_file`` (used by ``resume_or_load``) returns the tagged file only if it is
      complete; otherwise, with a warning, the newest complete ``model_<iter>.pth`` or
      ``model_final.pth``; "" if there is none (``has_checkpoint`` is then False and training
      starts from MODEL.WEIGHTS).
    * ``resume_or_load`` removes temporary files left by a killed run.
    """

    def _is_local(self):
        return bool(self.save_dir) and os.path.isdir(self.save_dir)

    def _check_finite(self, name, extra):
        bad = [
            k
            for k, v in self.model.state_dict().items()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())
        ]
        if not bad:
            return
        where = f" at iteration {extra['iteration']}" if "iteration" in extra else ""
        last = os.path.basename(self.get_checkpoint_file()) or "none"
        listed = ", ".join(bad[:5]) + (f", ... ({len(bad)} in all)" if len(bad) > 5 else "")
        raise FloatingPointError(
            f"not saving checkpoint '{name}'{where}: the model has non-finite weights ({listed}); "
            f"the last complete checkpoint is still '{last}'"
        )

    def save(self, name, **kwargs):
        """Save the model and checkpointables as ``<save_dir>/<name>.pth``, atomically.

        Args:
            name (str): file name without ".pth".
            kwargs: extra data to save (e.g. ``iteration``).
        """
        if not self.save_dir or not self.save_to_disk:
            return
        if not self._is_local():
            # Remote storage (PathManager URLs) has its own semantics: keep Detectron2's writer.
            return super().save(name, **kwargs)
        self._check_finite(name, kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        if os.path.basename(save_file) != basename:
            raise ValueError(f"checkpoint name {name!r} must not contain a folder")
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_torch_save(data, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        """Point ``last_checkpoint`` at ``last_filename_basename``, atomically."""
        if not self._is_local():
            return super().tag_last_checkpoint(last_filename_basename)
        atomic_write_text(last_filename_basename, os.path.join(self.save_dir, "last_checkpoint"))

    def _resumable_files(self):
        """Complete checkpoints that a resume may use, newest first."""
        if not self._is_local():
            return []
        names = [n for n in os.listdir(self.save_dir) if _RESUMABLE_NAME.match(n)]
        paths = [os.path.join(self.save_dir, n) for n in names]
        paths.sort(key=lambda p: (os.path.getmtime(p), os.path.basename(p)), reverse=True)
        return [p for p in paths if is_complete_checkpoint(p)]

    def get_checkpoint_file(self):
        """
        Returns:
            str: the checkpoint to resume from: the tagged one if complete, else the newest
            complete ``model_*.pth`` (with a warning), else "".
        """
        tagged = super().get_checkpoint_file()
        if not self._is_local():
            return tagged
        tag_named_a_file = bool(tagged) and os.path.basename(tagged) != ""
        if tag_named_a_file and is_complete_checkpoint(tagged):
            return tagged
        candidates = self._resumable_files()
        fallback = candidates[0] if candidates else ""
        if tag_named_a_file:
            logger.warning(
                "last_checkpoint in %s names %s, which is missing or incomplete; %s",
                self.save_dir,
                os.path.basename(tagged),
                f"resuming from {fallback} instead" if fallback else "no complete checkpoint left",
            )
        elif tagged and fallback:
            logger.warning("last_checkpoint in %s is empty; using %s", self.save_dir, fallback)
        return fallback

    def has_checkpoint(self):
        """
        Returns:
            bool: whether :meth:`get_checkpoint_file` finds a checkpoint to resume from.
        """
        if not self._is_local():
            return super().has_checkpoint()
        return bool(self.get_checkpoint_file())

    def _remove_stale_temporary_files(self):
        if not (self.save_to_disk and self._is_local()):
            return
        own = f"{TEMP_MARKER}{os.getpid()}"
        for name in os.listdir(self.save_dir):
            if TEMP_MARKER in name and not name.endswith(own):
                logger.warning("Removing %s, left by an interrupted checkpoint write", name)
                try:
                    os.remove(os.path.join(self.save_dir, name))
                except OSError:
                    pass

    def resume_or_load(self, path, *, resume=True):
        """Resume from the last complete checkpoint (``resume``) or load the weights at ``path``.

        Args:
            path (str): weights used when not resuming or when there is nothing to resume from.
            resume (bool): load the model and all checkpointables from the last checkpoint.

        Returns:
            dict: extra data of the loaded checkpoint (e.g. "iteration").
        """
        if resume:
            self._remove_stale_temporary_files()
        return super().resume_or_load(path, resume=resume)


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

    @property
    def seed(self):
        """int or None: the wrapped sampler's shuffling seed, if it has one."""
        return getattr(self.sampler, "_seed", None)

    @seed.setter
    def seed(self, value):
        if not hasattr(self.sampler, "_seed"):
            raise AttributeError(f"{type(self.sampler).__name__} has no seed to restore")
        self.sampler._seed = int(value)

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.start, None)


def _find_sampler_holder(loader, max_depth=8):
    """The object in a Detectron2 train loader that holds the index sampler (``.sampler``).

    Detectron2 wraps a map-style dataset in ``ToIterableDataset(dataset, sampler)`` inside a
    ``DataLoader``, possibly inside ``AspectRatioGroupedDataset`` and ``MapDataset``; each wrapper
    keeps the inner one as ``dataset``, ``_dataset`` or ``data_loader``.
    """
    seen = set()
    obj = loader
    for _ in range(max_depth):
        if obj is None or id(obj) in seen:
            return None
        seen.add(id(obj))
        if isinstance(getattr(obj, "sampler", None), Sampler) and not isinstance(
            obj, torch.utils.data.DataLoader
        ):
            return obj
        obj = next(
            (
                getattr(obj, a)
                for a in ("dataset", "_dataset", "data_loader")
                if getattr(obj, a, None) is not None
            ),
            None,
        )
    return None


class DataPositionHook(HookBase):
    """Resume the training data stream where the checkpointed iteration left it.

    Detectron2's training sampler is an infinite seeded stream that restarts from its beginning
    in every process, so a resumed run would see the first images of the shuffled order again
    (and, with SEED < 0, a different order). This hook saves the sampler's seed with the trainer
    state and, before the resumed training starts, skips ``start_iter * images_per_worker``
    indices of the stream.

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
        loader = getattr(getattr(self.trainer, "_trainer", self.trainer), "data_loader", None)
        holder = _find_sampler_holder(loader)
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
        inner = getattr(self.trainer, "_trainer", self.trainer)
        if getattr(inner, "_data_loader_iter_obj", None) is not None:
            logger.warning(
                "The train loader was iterated before training started; the data position is "
                "not restored"
            )
            return
        sampler.start = start_iter * self.images_per_worker
        logger.info(
            "Resuming the training data stream at iteration %d (%d images into this worker's "
            "stream)",
            start_iter,
            sampler.start,
        )
