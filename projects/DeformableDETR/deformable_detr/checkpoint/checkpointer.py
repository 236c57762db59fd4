"""``AtomicDetectionCheckpointer``: checkpoint files that are complete and verifiable whenever they
exist, and a resume that falls back past a bad file.

A training run can be killed at any moment (SIGKILL, a pre-empted node, a full disk) and resumed
with ``--resume`` from the last good checkpoint; a file damaged on disk afterwards is detected by
its checksum instead of being trained on.
"""

import logging
import os
import re

import torch
from detectron2.checkpoint import DetectionCheckpointer

from .atomic import TEMP_MARKER, atomic_torch_save, atomic_write_text
from .errors import CheckpointFileError
from .finetune import adapt_class_heads, format_fine_tune_table
from .integrity import CHECKSUM_SUFFIX, checkpoint_problem, legacy_load_problem, write_checksum

__all__ = ["AtomicDetectionCheckpointer"]

logger = logging.getLogger(__name__)

# Files a fallback may resume from: what PeriodicCheckpointer writes ("model_0001234.pth",
# "model_final.pth"), not e.g. "model_best.pth", whose iteration is older than its date.
_RESUMABLE_NAME = re.compile(r"^model_(\d+|final)\.pth$")
_MAX_LISTED = 5


def _remove(path):
    if os.path.exists(path):
        os.remove(path)


class AtomicDetectionCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose files are complete and verifiable whenever they exist.

    Differences from Detectron2's checkpointer, which writes the file and then the tag in place:

    * ``save`` writes to ``<name>.pth.tmp-<pid>``, fsyncs, and renames it to ``<name>.pth``; then
      it writes the checksum ``<name>.pth.sha256`` and replaces ``last_checkpoint``, each the same
      way. A kill at any moment leaves the previous checkpoint tagged and loadable.
    * ``save`` refuses (FloatingPointError) a model with NaN or infinite weights, so the last
      checkpoint of a diverged run is the last good one.
    * ``get_checkpoint_file`` (used by ``resume_or_load``) returns the tagged file only if it is
      complete and matches its checksum; otherwise, with a warning naming it and what is wrong,
      the newest good ``model_<iter>.pth`` or ``model_final.pth``; "" if there is none
      (``has_checkpoint`` is then False and training starts from MODEL.WEIGHTS).
    * every load (MODEL.WEIGHTS included) checks the file first and fails with a
      :class:`CheckpointFileError` naming it when it is empty, not a checkpoint, truncated or
      corrupt (see :func:`checkpoint_problem`).
    * ``resume_or_load`` removes temporary files left by a killed run.
    """

    def __init__(self, *args, class_names=None, fine_tune=None, **kwargs):
        """
        Args:
            args, kwargs: as for ``DetectionCheckpointer``.
            class_names (list[str] or None): names of the model's classes (the training
                dataset's ``thing_classes``), saved with every checkpoint as ``"thing_classes"``
                so that a later fine-tuning can transfer classes by name.
            fine_tune (dict or None): when given, weights loaded by ``resume_or_load`` other than
                a resumed checkpoint may have class heads of another class count (see
                :func:`adapt_class_heads`); keys ``class_names`` (list[str] or None) and
                ``transfer_by_name`` (bool). A resumed checkpoint always loads strictly.
        """
        super().__init__(*args, **kwargs)
        # (path, size, mtime) -> problem: a resume looks at the same file up to three times.
        self._checked = {}
        self.class_names = list(class_names) if class_names is not None else None
        self._fine_tune = fine_tune
        self._fine_tune_load = False
        self._loading = ""

    def _is_local(self):
        return bool(self.save_dir) and os.path.isdir(self.save_dir)

    def _problem(self, path, resumable=False):
        """:func:`checkpoint_problem` of ``path``, computed once per version of the file."""
        try:
            stat = os.stat(path)
        except OSError:
            return "does not exist"
        key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._checked:
            self._checked[key] = checkpoint_problem(path)
        if resumable and self._checked[key] is None:
            return legacy_load_problem(path)
        return self._checked[key]

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
        listed = ", ".join(bad[:_MAX_LISTED])
        if len(bad) > _MAX_LISTED:
            listed += f", ... ({len(bad)} in all)"
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
            if self.class_names is not None:
                kwargs.setdefault("thing_classes", list(self.class_names))
            return super().save(name, **kwargs)
        self._check_finite(name, kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        if self.class_names is not None:
            data["thing_classes"] = list(self.class_names)
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        if os.path.basename(save_file) != basename:
            raise ValueError(f"checkpoint name {name!r} must not contain a folder")
        self.logger.info(f"Saving checkpoint to {save_file}")
        # A checksum of an older file of the same name must never describe the new one; a file
        # left without its checksum by a kill is still checked through its zip CRCs.
        atomic_torch_save(
            data, save_file, before_replace=lambda: _remove(save_file + CHECKSUM_SUFFIX)
        )
        write_checksum(save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        """Point ``last_checkpoint`` at ``last_filename_basename``, atomically."""
        if not self._is_local():
            return super().tag_last_checkpoint(last_filename_basename)
        atomic_write_text(last_filename_basename, os.path.join(self.save_dir, "last_checkpoint"))

    def _newest_good_file(self, skip):
        """The newest resumable checkpoint other than ``skip`` without a problem, or ""."""
        names = [n for n in os.listdir(self.save_dir) if _RESUMABLE_NAME.match(n)]
        paths = [os.path.join(self.save_dir, n) for n in names]
        paths.sort(key=lambda p: (os.path.getmtime(p), os.path.basename(p)), reverse=True)
        for path in paths:
            if os.path.basename(path) == skip:
                continue
            problem = self._problem(path, resumable=True)
            if problem is None:
                return path
            logger.warning("Not resuming from %s: %s", path, problem)
        return ""

    def get_checkpoint_file(self):
        """
        Returns:
            str: the checkpoint to resume from: the tagged one if whole and uncorrupted, else the
            newest good ``model_*.pth`` (with a warning), else "".
        """
        tagged = super().get_checkpoint_file()
        if not self._is_local():
            return tagged
        tag_named_a_file = bool(tagged) and os.path.basename(tagged) != ""
        if tag_named_a_file:
            problem = self._problem(tagged, resumable=True)
            if problem is None:
                return tagged
            fallback = self._newest_good_file(skip=os.path.basename(tagged))
            logger.warning(
                "last_checkpoint in %s names %s, which is missing, incomplete or corrupt (%s); %s",
                self.save_dir,
                os.path.basename(tagged),
                problem,
                f"resuming from {fallback} instead" if fallback else "no good checkpoint left",
            )
            return fallback
        fallback = self._newest_good_file(skip=None)
        if tagged and fallback:
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

    def load(self, path, *args, **kwargs):
        self._loading = path
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._loading = ""

    def _load_model(self, checkpoint):
        if self._fine_tune_load and not checkpoint.get("matching_heuristics", False):
            state_dict, report = adapt_class_heads(
                self.model,
                checkpoint["model"],
                checkpoint.get("thing_classes"),
                self._fine_tune.get("class_names"),
                self._fine_tune.get("transfer_by_name", True),
            )
            if report is not None:
                checkpoint["model"] = state_dict
                logger.info(format_fine_tune_table(report, self._loading))
        return super()._load_model(checkpoint)

    def _load_file(self, filename):
        if os.path.isfile(filename):
            problem = self._problem(filename)
            if problem is not None:
                raise CheckpointFileError(f"checkpoint {filename}: {problem}")
        try:
            return super()._load_file(filename)
        except Exception as e:
            raise CheckpointFileError(
                f"checkpoint {filename} cannot be loaded: {type(e).__name__}: {e}"
            ) from e

    def _remove_stale_files(self):
        """Temporary files of a killed run, and checksums whose checkpoint was deleted."""
        if not (self.save_to_disk and self._is_local()):
            return
        own = f"{TEMP_MARKER}{os.getpid()}"
        names = set(os.listdir(self.save_dir))
        for name in sorted(names):
            stale_temporary = TEMP_MARKER in name and not name.endswith(own)
            orphan = name.endswith(CHECKSUM_SUFFIX) and name[: -len(CHECKSUM_SUFFIX)] not in names
            if not (stale_temporary or orphan):
                continue
            logger.warning(
                (
                    "Removing %s, left by an interrupted checkpoint write"
                    if stale_temporary
                    else "Removing %s, the checksum of a deleted checkpoint"
                ),
                name,
            )
            try:
                os.remove(os.path.join(self.save_dir, name))
            except OSError:
                pass

    def resume_or_load(self, path, *, resume=True):
        """Resume from the last good checkpoint (``resume``) or load the weights at ``path``.

        Args:
            path (str): weights used when not resuming or when there is nothing to resume from.
            resume (bool): load the model and all checkpointables from the last checkpoint.

        Returns:
            dict: extra data of the loaded checkpoint (e.g. "iteration").
        """
        if resume:
            self._remove_stale_files()
            if self.has_checkpoint():
                return super().resume_or_load(path, resume=True)
        # Only new weights for a training run may change the class count; a resumed run and
        # every inference path load strictly.
        self._fine_tune_load = self._fine_tune is not None
        try:
            return super().resume_or_load(path, resume=False)
        finally:
            self._fine_tune_load = False
