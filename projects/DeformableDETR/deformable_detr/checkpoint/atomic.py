"""Atomic file writes: a reader sees either the previous file or the complete new one."""

import os

import torch

__all__ = ["TEMP_MARKER", "atomic_torch_save", "atomic_write_file", "atomic_write_text"]

# Temporary files are "<final name>.tmp-<pid>": never "*.pth", so nothing lists them as checkpoints.
TEMP_MARKER = ".tmp-"


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


def _atomic_write(path, write, mode, before_replace=None):
    directory = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}{TEMP_MARKER}{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        # Includes KeyboardInterrupt: a half-written temporary file is never left behind by us.
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


def atomic_write_file(path, write):
    """Write a binary file atomically: ``write(f)`` fills an open temporary file, which then
    replaces ``path``; on any error the temporary file is removed and ``path`` is untouched.

    Args:
        path (str): destination, in a local folder.
        write (callable): ``write(f)`` with ``f`` a file opened for binary writing.
    """
    _atomic_write(path, write, "wb")


def atomic_torch_save(obj, path, before_replace=None):
    """``torch.save(obj, path)`` that leaves either the old file or the complete new one.

    Args:
        obj: anything ``torch.save`` accepts.
        path (str): destination, in a local folder.
        before_replace (callable or None): called once the new file is complete, just before it
            replaces ``path`` (not called if the write fails).
    """
    _atomic_write(path, lambda f: torch.save(obj, f), "wb", before_replace)


def atomic_write_text(text, path):
    """Write ``text`` to ``path`` atomically (see :func:`atomic_torch_save`).

    Args:
        text (str): the new content.
        path (str): destination, in a local folder.
    """
    _atomic_write(path, lambda f: f.write(text), "w")
