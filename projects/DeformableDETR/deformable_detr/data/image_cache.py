"""Encoded training images held in memory once per machine, for slow file systems.

The official ``--cache_mode`` as a Detectron2 switch (``DATALOADER.CACHE_IMAGES``): before training,
local rank 0 of every machine reads the encoded bytes (JPEG, PNG, ...) of all training images into
one file in a memory-backed folder (``/dev/shm`` by default), next to a sorted index of the file
names. Every training process of the machine maps that file read-only, and its data-loader workers
inherit the mapping (fork) or map it again (spawn, forkserver), so the bytes sit in memory once per
machine whatever the number of GPUs and workers. The mapper decodes from the cache instead of
opening the image file.

The files are removed when local rank 0 exits. A run killed without cleanup leaves them behind:
they are named ``deformable_detr_images_*`` in the cache folder.
"""

import atexit
import io
import logging
import os
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from detectron2.data import detection_utils as utils
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from PIL import Image

__all__ = [
    "ImageCache",
    "build_shared_image_cache",
    "default_cache_dir",
    "write_image_cache",
]

logger = logging.getLogger(__name__)

_DATA = ".data"
_NAMES = ".names.npy"
# Written last, under its final name: its presence means the cache is complete.
_OFFSETS = ".offsets.npy"
_FAILED = ".failed"
_PREFIX = "deformable_detr_images_"
# Files read at once while the cache is built; results are written in order, so a bounded chunk
# keeps the memory spent on bytes not yet written small.
_CHUNK = 512


def default_cache_dir():
    """``/dev/shm`` when it is a writable folder (memory-backed on Linux), else the temporary
    folder."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        return "/dev/shm"
    return tempfile.gettempdir()


def _encode_name(file_name):
    return file_name.encode("utf-8", "surrogateescape")


def _read_bytes(file_name):
    try:
        with PathManager.open(file_name, "rb") as f:
            return f.read()
    except OSError as e:
        raise OSError(f"Image cache: cannot read image file {file_name!r}: {e}") from e


def _remove_files(base):
    for suffix in (_OFFSETS, _NAMES, _DATA, _FAILED):
        try:
            os.remove(base + suffix)
        except FileNotFoundError:
            pass


def _remove_files_of_process(base, pid):
    # Forked children (data-loader workers) inherit the exit handler: only the builder removes.
    if os.getpid() == pid:
        _remove_files(base)


def write_image_cache(file_names, base, num_threads=16):
    """Read image files and write their bytes as an image cache.

    Args:
        file_names (list[str]): the images, as the dataset dicts name them ("file_name");
            duplicates are stored once.
        base (str): path prefix of the cache files (``base + ".data"`` etc.).
        num_threads (int): files read at the same time (file reads release the GIL, and slow
            file systems serve parallel reads faster).

    Returns:
        int: number of bytes of image data written.
    """
    names = np.unique(np.array([_encode_name(n) for n in file_names], dtype=np.bytes_))
    if len(names) == 0:
        raise ValueError("Image cache: the dataset has no images to cache")
    folder = os.path.dirname(base) or "."
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"Image cache: folder {folder!r} (DATALOADER.CACHE_DIR) not found")
    tmp = f"{base}.tmp{os.getpid()}"
    offsets = np.zeros(len(names) + 1, dtype=np.int64)
    decoded = [n.decode("utf-8", "surrogateescape") for n in names]
    try:
        with open(tmp + _DATA, "wb") as out, ThreadPoolExecutor(num_threads) as pool:
            for start in range(0, len(decoded), _CHUNK):
                chunk = decoded[start : start + _CHUNK]
                for i, blob in enumerate(pool.map(_read_bytes, chunk), start):
                    out.write(blob)
                    offsets[i + 1] = offsets[i] + len(blob)
        np.save(tmp + _NAMES, names)
        np.save(tmp + _OFFSETS, offsets)
    except OSError as e:
        _remove_files(tmp)
        if e.errno == 28:  # ENOSPC
            raise OSError(
                f"Image cache: no space left in {folder!r} after {offsets.max() / 2**20:.0f} MB. "
                "The images must fit in that folder; in a container /dev/shm is often small "
                "(docker run --shm-size), or set DATALOADER.CACHE_DIR to a larger memory-backed "
                "folder"
            ) from e
        raise
    except BaseException:
        _remove_files(tmp)
        raise
    os.replace(tmp + _DATA, base + _DATA)
    os.replace(tmp + _NAMES, base + _NAMES)
    os.replace(tmp + _OFFSETS, base + _OFFSETS)
    return int(offsets[-1])


class ImageCache:
    """Read-only view of an image cache written by :func:`write_image_cache`.

    Lookups use a sorted array of file names (no Python object per image), so forked data-loader
    workers share every page of the cache with their parent. Pickling (spawned workers) maps the
    files again instead of copying the bytes.
    """

    def __init__(self, base):
        """
        Args:
            base (str): path prefix of the cache files, as given to :func:`write_image_cache`.
        """
        self.base = base
        self._open()

    def _open(self):
        if not os.path.isfile(self.base + _OFFSETS):
            raise FileNotFoundError(
                f"Image cache: {self.base + _OFFSETS!r} not found (the cache is incomplete or was "
                "removed when the process that built it exited)"
            )
        self._names = np.load(self.base + _NAMES, mmap_mode="r")
        self._offsets = np.load(self.base + _OFFSETS, mmap_mode="r")
        if int(self._offsets[-1]) > 0:
            self._data = np.memmap(self.base + _DATA, dtype=np.uint8, mode="r")
        else:
            self._data = np.zeros(0, dtype=np.uint8)

    def __getstate__(self):
        return {"base": self.base}

    def __setstate__(self, state):
        self.base = state["base"]
        self._open()

    def __len__(self):
        return len(self._names)

    @property
    def nbytes(self):
        """int: bytes of image data held."""
        return int(self._offsets[-1])

    def _index(self, file_name):
        key = _encode_name(file_name)
        if len(key) > self._names.dtype.itemsize:
            return None
        i = int(np.searchsorted(self._names, key))
        if i < len(self._names) and self._names[i] == key:
            return i
        return None

    def __contains__(self, file_name):
        return self._index(file_name) is not None

    def get_bytes(self, file_name):
        """The encoded bytes of one image.

        Args:
            file_name (str): the image's "file_name", as given when the cache was written.

        Returns:
            memoryview: read-only view into the cache (no copy).
        """
        i = self._index(file_name)
        if i is None:
            raise KeyError(
                f"Image cache {self.base!r}: image {file_name!r} is not in the cache (it holds the "
                f"{len(self)} images of the training datasets)"
            )
        return memoryview(self._data[int(self._offsets[i]) : int(self._offsets[i + 1])])

    def read_image(self, file_name, format=None):
        """Decode one image like ``detectron2.data.detection_utils.read_image`` does from the file.

        Args:
            file_name (str): the image's "file_name".
            format (str): one of the formats of ``read_image`` (e.g. "RGB", "BGR"), or None.

        Returns:
            np.ndarray: (H, W, C) image (or (H, W, 1) for "L").
        """
        image = Image.open(io.BytesIO(self.get_bytes(file_name)))
        # The same EXIF rotation as read_image: cached and uncached images must be identical.
        image = utils._apply_exif_orientation(image)
        return utils.convert_PIL_to_numpy(image, format)

    def __repr__(self):
        return f"ImageCache({self.base!r}, images={len(self)}, MB={self.nbytes / 2**20:.1f})"


def _wait_for(base, poll_s=0.5, log_every_s=60.0):
    start = last_log = time.monotonic()
    while not os.path.isfile(base + _OFFSETS):
        if os.path.isfile(base + _FAILED):
            with open(base + _FAILED) as f:
                raise RuntimeError(f"Image cache: local rank 0 failed to build it: {f.read()}")
        now = time.monotonic()
        if now - last_log >= log_every_s:
            logger.info(
                "Waiting for local rank 0 to build the image cache (%.0f s so far)", now - start
            )
            last_log = now
        time.sleep(poll_s)


def build_shared_image_cache(file_names, cache_dir=None, num_threads=16):
    """Build the image cache of this machine, or map the one local rank 0 builds.

    Called by every training process. Ranks must be numbered machine by machine (as
    Detectron2's ``launch`` does): the process of rank ``rank - local_rank`` builds the cache that
    the processes of its machine share. Building counts against the process group's timeout (the
    other machines wait for the slowest one at the first collective).

    Args:
        file_names (list[str]): the "file_name" of every training image.
        cache_dir (str or None): folder of the cache files; None: :func:`default_cache_dir`.
        num_threads (int): files read at the same time.

    Returns:
        ImageCache
    """
    cache_dir = cache_dir or default_cache_dir()
    local_rank = comm.get_local_rank()
    base = None
    if local_rank == 0:
        base = os.path.join(cache_dir, f"{_PREFIX}{os.getpid()}_{uuid.uuid4().hex[:12]}")
    if comm.get_world_size() > 1:
        base = comm.all_gather(base)[comm.get_rank() - local_rank]
    if base is None:
        raise RuntimeError(
            "Image cache: no process of local rank 0 at rank "
            f"{comm.get_rank() - local_rank}; ranks must be numbered machine by machine"
        )

    start = time.perf_counter()
    if local_rank == 0:
        atexit.register(_remove_files_of_process, base, os.getpid())
        try:
            write_image_cache(file_names, base, num_threads=num_threads)
        except BaseException as e:
            # Tells the other local ranks, which wait for the cache, to stop.
            try:
                with open(base + _FAILED, "w") as f:
                    f.write(f"{type(e).__name__}: {e}")
            except OSError:
                pass
            raise
    else:
        _wait_for(base)
    cache = ImageCache(base)
    logger.info(
        "Image cache: %d images, %.1f MB in %s (%s in %.1f s), shared by the %d training "
        "process(es) of this machine and their data-loader workers",
        len(cache),
        cache.nbytes / 2**20,
        base + _DATA,
        "read" if local_rank == 0 else "waited",
        time.perf_counter() - start,
        comm.get_local_size(),
    )
    return cache
