"""Fixtures shared by every test: the repository's paths, the tiny model config and a tiny dataset.

The plain functions and constants behind them live in ``tests/helpers.py``, which test modules
also import directly for module-level constants and helpers.
"""

import helpers
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog


@pytest.fixture(scope="session")
def repo_root():
    """The repository's root folder."""
    return helpers.REPO_ROOT


@pytest.fixture(scope="session")
def config_dir():
    """The folder of the published YAML configs."""
    return helpers.CONFIG_DIR


@pytest.fixture(scope="session")
def tiny_cfg():
    """``tiny_cfg(*opts, config=...) -> CfgNode``, the factory ``helpers.tiny_cfg``."""
    return helpers.tiny_cfg


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: on the shared 2-core test machines a single thread is
    many times faster than two oversubscribed ones for small inputs."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture
def tiny_dataset(tmp_path):
    """``helpers.TINY_DATASET`` written under ``tmp_path`` and registered as ``tiny_train`` and
    ``tiny_val``; yields the dataset's folder. The names are free again after the test."""
    root = str(tmp_path / "tiny_dataset")
    helpers.write_coco_dataset(root, helpers.TINY_DATASET)
    for split in helpers.TINY_DATASET:
        helpers.register_coco_dataset(f"tiny_{split}", root, split)
    yield root


@pytest.fixture(autouse=True)
def _forget_datasets_registered_by_the_test():
    # Dataset names are global: a registration left behind would point the next test that uses
    # the name at a deleted temporary folder, or make its own registration fail.
    datasets, metadata = set(DatasetCatalog.list()), set(MetadataCatalog.list())
    yield
    helpers.unregister_datasets(*(set(DatasetCatalog.list()) - datasets))
    for name in set(MetadataCatalog.list()) - metadata:
        MetadataCatalog.remove(name)
