"""Tests of the in-memory image cache (DATALOADER.CACHE_IMAGES): decoding identical to reading the
files, one cache per machine shared by its processes, and training that opens no image file."""

import logging
import os
import pickle

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.data import detection_utils as utils
from detectron2.engine import default_argument_parser, launch
from detectron2.utils import comm
from helpers import BASE_CONFIG, tiny_cfg
from PIL import Image
from test_train_net import TINY_ENGINE_RUN

from deformable_detr import engine
from deformable_detr.config import add_deformable_detr_config
from deformable_detr.data import DeformableDetrDatasetMapper
from deformable_detr.data import image_cache as image_cache_module
from deformable_detr.data.image_cache import (
    ImageCache,
    build_shared_image_cache,
    write_image_cache,
)
from deformable_detr.engine import Trainer, setup


def _write_images(folder):
    """A PNG, a JPEG rotated by its EXIF tag and a grayscale PNG; returns their paths."""
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    paths = []
    png = os.path.join(folder, "a.png")
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(png)
    paths.append(png)
    jpg = os.path.join(folder, "rotated.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees when displayed
    Image.fromarray(rng.integers(0, 255, (16, 24, 3), dtype=np.uint8)).save(jpg, exif=exif)
    paths.append(jpg)
    gray = os.path.join(folder, "gray.png")
    Image.fromarray(rng.integers(0, 255, (10, 12), dtype=np.uint8)).save(gray)
    paths.append(gray)
    return paths


def test_cache_decodes_like_read_image(tmp_path, caplog):
    paths = _write_images(str(tmp_path / "images"))
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    with caplog.at_level(logging.INFO, logger="deformable_detr.data.image_cache"):
        # Duplicates (a dataset listed twice) are stored once.
        cache = build_shared_image_cache(paths + paths[:1], cache_dir=str(cache_dir))
    assert len(cache) == 3
    assert cache.nbytes == sum(os.path.getsize(p) for p in paths)
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "3 images" in message and f"{cache.nbytes / 2**20:.1f} MB" in message

    for path in paths:
        assert path in cache
        with open(path, "rb") as f:
            assert bytes(cache.get_bytes(path)) == f.read()
        for fmt in ("RGB", "BGR", "L", None):
            expected = utils.read_image(path, format=fmt)
            np.testing.assert_array_equal(cache.read_image(path, fmt), expected)
    # The EXIF rotation is applied, as read_image does: 16x24 stored, 24x16 shown.
    assert cache.read_image(paths[1], "RGB").shape == (24, 16, 3)

    missing = str(tmp_path / "images" / "other.png")
    assert missing not in cache and "x" * 1000 not in cache
    with pytest.raises(KeyError, match="other.png"):
        cache.get_bytes(missing)

    # Spawned loader workers receive the path, not the bytes, and map the same files.
    state = pickle.dumps(cache)
    assert len(state) < 500
    clone = pickle.loads(state)
    np.testing.assert_array_equal(clone.read_image(paths[0], "RGB"), cache.read_image(paths[0]))


def test_cache_errors(tmp_path):
    paths = _write_images(str(tmp_path / "images"))
    with pytest.raises(ValueError, match="no images"):
        write_image_cache([], str(tmp_path / "c"))
    missing = str(tmp_path / "images" / "missing.jpg")
    with pytest.raises(OSError, match="missing.jpg"):
        write_image_cache(paths + [missing], str(tmp_path / "c"))
    assert os.listdir(tmp_path) == ["images"]  # nothing half-written is left behind
    with pytest.raises(FileNotFoundError, match="CACHE_DIR"):
        write_image_cache(paths, str(tmp_path / "no_such_folder" / "c"))
    with pytest.raises(FileNotFoundError, match="not found"):
        ImageCache(str(tmp_path / "c"))


def test_cache_folder_full(tmp_path, monkeypatch):
    paths = _write_images(str(tmp_path / "images"))
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    real_open = open

    class FullFile:
        def __init__(self, path, mode):
            self._file = real_open(path, mode)

        def write(self, data):
            raise OSError(28, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._file.close()

    monkeypatch.setattr(image_cache_module, "open", FullFile, raising=False)
    with pytest.raises(OSError, match="no space left in .*shm-size.*CACHE_DIR"):
        write_image_cache(paths, str(cache_dir / "c"))
    assert os.listdir(cache_dir) == []


def _shared_cache_worker(paths, cache_dir, out_dir):
    reads = []
    original = image_cache_module._read_bytes

    def counting_read(name):
        reads.append(name)
        return original(name)

    image_cache_module._read_bytes = counting_read
    cache = build_shared_image_cache(paths, cache_dir=cache_dir)
    images = [cache.read_image(p, "RGB") for p in paths]
    comm.synchronize()
    files = sorted(os.listdir(cache_dir))
    torch.save(
        {"base": cache.base, "reads": len(reads), "images": images, "files": files},
        os.path.join(out_dir, f"rank{comm.get_rank()}.pth"),
    )


def test_one_cache_per_machine(tmp_path):
    paths = _write_images(str(tmp_path / "images"))
    cache_dir, out_dir = tmp_path / "cache", tmp_path / "out"
    cache_dir.mkdir()
    out_dir.mkdir()
    launch(_shared_cache_worker, 2, dist_url="auto", args=(paths, str(cache_dir), str(out_dir)))
    rank0 = torch.load(out_dir / "rank0.pth", weights_only=False)
    rank1 = torch.load(out_dir / "rank1.pth", weights_only=False)
    # Local rank 0 read every file once; local rank 1 read none and mapped the same cache.
    assert rank0["reads"] == len(paths) and rank1["reads"] == 0
    assert rank0["base"] == rank1["base"]
    assert len([f for f in rank0["files"] if f.endswith(".data")]) == 1
    for a, b, path in zip(rank0["images"], rank1["images"], paths):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, utils.read_image(path, "RGB"))
    # Removed when the process that built it exited.
    assert os.listdir(cache_dir) == []


def test_training_opens_no_image_file(tmp_path, caplog, monkeypatch, tiny_dataset):
    dataset_root = tiny_dataset
    cfg = tiny_cfg(*TINY_ENGINE_RUN, "DATASETS.TRAIN", '("tiny_train",)')
    cfg.DATALOADER.CACHE_IMAGES = True
    cfg.DATALOADER.CACHE_DIR = str(tmp_path)
    # Forked loader workers decode from the cache their parent mapped.
    cfg.DATALOADER.NUM_WORKERS = 2
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    # Written for two workers of 2 images: on one worker Detectron2's auto-scaling halves the
    # total batch and the learning rate and doubles the iterations.
    cfg.SOLVER.REFERENCE_WORLD_SIZE = 2
    cfg.freeze()

    train_dir = os.path.join(dataset_root, "train")
    record = DatasetCatalog.get("tiny_train")[1]
    caches = []

    def recording_build(*args, **kwargs):
        caches.append(build_shared_image_cache(*args, **kwargs))
        return caches[-1]

    monkeypatch.setattr(engine, "build_shared_image_cache", recording_build)

    class CacheOnlyTrainer(Trainer):
        @classmethod
        def build_train_loader(cls, cfg):
            loader = super().build_train_loader(cfg)
            (cache,) = caches
            cached = DeformableDetrDatasetMapper(cfg, False, image_cache=cache)
            uncached = DeformableDetrDatasetMapper(cfg, False)
            assert torch.equal(cached(record)["image"], uncached(record)["image"])
            # From here on every attempt to open a training image fails.
            os.rename(train_dir, train_dir + "_moved")
            with pytest.raises(FileNotFoundError):
                uncached(record)
            return loader

    torch.set_num_threads(1)
    with caplog.at_level(logging.INFO):
        trainer = CacheOnlyTrainer(cfg)
        trainer.train()
    assert len(caches) == 1 and len(caches[0]) == 4
    assert not os.path.exists(train_dir)
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "Image cache: 4 images" in message and " MB in " in message

    solver = trainer.cfg.SOLVER
    assert (solver.IMS_PER_BATCH, solver.MAX_ITER, solver.REFERENCE_WORLD_SIZE) == (2, 4, 1)
    assert solver.BASE_LR == pytest.approx(cfg.SOLVER.BASE_LR / 2)
    assert trainer.iter == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("Auto-scaling applied" in w and "IMS_PER_BATCH 4 -> 2" in w for w in warnings)


def test_setup_knows_the_cache_keys(tmp_path):
    args = default_argument_parser().parse_args(
        [
            "--config-file",
            BASE_CONFIG,
            "DATALOADER.CACHE_IMAGES",
            "True",
            "DATALOADER.CACHE_DIR",
            str(tmp_path),
            "OUTPUT_DIR",
            str(tmp_path / "out"),
        ]
    )
    cfg = setup(args)
    assert cfg.DATALOADER.CACHE_IMAGES is True and cfg.DATALOADER.CACHE_DIR == str(tmp_path)
    defaults = get_cfg()
    add_deformable_detr_config(defaults)
    assert defaults.DATALOADER.CACHE_IMAGES is False and defaults.DATALOADER.CACHE_DIR == ""
