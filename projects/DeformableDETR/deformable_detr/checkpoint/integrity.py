"""Whether a checkpoint file is whole: sha256 sidecar files, zip CRCs, and what is wrong otherwise.

A checkpoint written by this package has a sidecar ``<file>.sha256`` in ``sha256sum`` format
(``sha256sum -c model_0000999.pth.sha256`` checks it too). A file without one (a converted or
foreign checkpoint) is still checked: ``torch.save`` writes a zip archive with a CRC32 per member.
``torch.load`` checks neither, so without these checks a damaged tensor loads silently.
"""

import hashlib
import os
import zipfile

import torch

from .atomic import atomic_write_text
from .errors import CheckpointFileError

__all__ = [
    "CHECKSUM_SUFFIX",
    "checkpoint_problem",
    "file_sha256",
    "is_complete_checkpoint",
    "legacy_load_problem",
    "verify_checkpoint",
    "write_checksum",
]

CHECKSUM_SUFFIX = ".sha256"
_ZIP_MAGIC = b"PK\x03\x04"
# Pickle protocol 2 and later: Detectron2's .pkl files and torch's legacy (non-zip) format.
_PICKLE_MAGIC = b"\x80"
_CHUNK = 1 << 20


def file_sha256(path):
    """Hex sha256 of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksum(path):
    """Write ``<path>.sha256`` (``sha256sum`` format) for the file at ``path``, atomically."""
    text = f"{file_sha256(path)}  {os.path.basename(path)}\n"
    atomic_write_text(text, path + CHECKSUM_SUFFIX)


def _checksum_problem(path, sidecar):
    try:
        with open(sidecar) as f:
            expected = f.read().split()
    except (OSError, UnicodeDecodeError) as e:
        return f"its checksum file {sidecar} cannot be read ({e})"
    if not expected or len(expected[0]) != 64:
        return f"its checksum file {sidecar} holds no sha256"
    actual = file_sha256(path)
    if actual != expected[0].lower():
        return f"corrupt: its sha256 {actual} differs from the one in {sidecar} ({expected[0]})"
    return None


def _zip_problem(path, check_crc):
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(n.endswith("data.pkl") for n in archive.namelist()):
                return "not a torch checkpoint: a zip archive without data.pkl"
            bad = archive.testzip() if check_crc else None
    except zipfile.BadZipFile as e:
        return f"truncated or damaged: its zip directory cannot be read ({e})"
    except (OSError, EOFError, zipfile.LargeZipFile) as e:
        return f"truncated or damaged zip archive ({e})"
    if bad is not None:
        return f"corrupt: the CRC of its member '{bad}' does not match its bytes"
    return None


def checkpoint_problem(path):
    """What is wrong with the checkpoint file at ``path``, or None if nothing can be seen.

    With a ``.sha256`` sidecar the whole file is checked against it; a zip archive without one
    has every member's CRC checked; a pickle (Detectron2 ``.pkl``, legacy torch format) without
    one is only checked for being non-empty.

    Args:
        path (str): a local file.

    Returns:
        str or None: a short description, e.g. "the file is empty".
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if size == 0:
        return "the file is empty"
    if magic != _ZIP_MAGIC and not magic.startswith(_PICKLE_MAGIC):
        return (
            "not a checkpoint: neither a torch.save zip archive nor a pickle "
            f"(it starts with {magic!r})"
        )
    sidecar = path + CHECKSUM_SUFFIX
    checked = os.path.isfile(sidecar)
    if checked:
        problem = _checksum_problem(path, sidecar)
        if problem is not None:
            return problem
    # With a matching checksum the CRCs add nothing, but the directory is still read: a file can
    # be hashed as it is and still not be a torch archive.
    return _zip_problem(path, check_crc=not checked) if magic == _ZIP_MAGIC else None


def verify_checkpoint(path):
    """Raise :class:`CheckpointFileError` naming ``path`` if :func:`checkpoint_problem` finds one.

    Args:
        path (str): a local file.
    """
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointFileError(f"checkpoint {path}: {problem}")


def legacy_load_problem(path):
    """What ``torch.load`` says of a legacy-format file without a checksum, else None.

    Nothing but loading tells whether such a file is whole; zip archives and checksummed files
    are checked by :func:`checkpoint_problem` instead.
    """
    with open(path, "rb") as f:
        if f.read(4) == _ZIP_MAGIC or os.path.isfile(path + CHECKSUM_SUFFIX):
            return None
    try:
        torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        return f"incomplete: torch.load cannot read it ({type(e).__name__}: {e})"
    return None


def is_complete_checkpoint(path):
    """Whether ``path`` is a whole, uncorrupted ``torch.save`` file.

    Args:
        path (str): a local file.

    Returns:
        bool
    """
    return checkpoint_problem(path) is None and legacy_load_problem(path) is None
