"""Atomic checkpoint files, robust resume and the resumed data position (no training needed)."""

import logging
import os
import types

import pytest
import torch
from detectron2.data import build_detection_train_loader
from detectron2.data.samplers import TrainingSampler
from torch import nn

from deformable_detr import checkpointing
from deformable_detr.checkpointing import (
    AtomicDetectionCheckpointer,
    DataPositionHook,
    ResumableSampler,
    atomic_torch_save,
    is_complete_checkpoint,
)


class _Counter:
    """A checkpointable like the trainer: state saved with every checkpoint."""

    def __init__(self):
        self.value = 0

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def _checkpointer(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    counter = _Counter()
    return AtomicDetectionCheckpointer(model, str(tmp_path), counter=counter), model, counter


def _tag(tmp_path):
    return (tmp_path / "last_checkpoint").read_text()


def _truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def test_save_is_atomic_when_the_write_fails(tmp_path, monkeypatch):
    ckpt, model, counter = _checkpointer(tmp_path)
    counter.value = 1
    ckpt.save("model_0000001", iteration=1)
    assert _tag(tmp_path) == "model_0000001.pth"
    good = (tmp_path / "model_0000001.pth").read_bytes()

    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpointing.torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save("model_0000003", iteration=3)
    # Overwriting an existing name fails the same way without touching the old file.
    with pytest.raises(OSError):
        ckpt.save("model_0000001", iteration=1)
    monkeypatch.undo()

    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]
    assert (tmp_path / "model_0000001.pth").read_bytes() == good
    assert _tag(tmp_path) == "model_0000001.pth"
    counter.value = 0
    extra = ckpt.resume_or_load("", resume=True)
    assert extra["iteration"] == 1 and counter.value == 1


def test_resume_falls_back_from_an_incomplete_tagged_file(tmp_path, caplog):
    ckpt, model, counter = _checkpointer(tmp_path)
    for it in (1, 3, 5):
        counter.value = it
        ckpt.save(f"model_{it:07d}", iteration=it)
    # What a non-atomic writer leaves when killed mid-write: a tagged, truncated file.
    _truncate(tmp_path / "model_0000005.pth")
    assert not is_complete_checkpoint(str(tmp_path / "model_0000005.pth"))
    with caplog.at_level(logging.WARNING, logger="deformable_detr.checkpointing"):
        assert ckpt.get_checkpoint_file() == str(tmp_path / "model_0000003.pth")
    assert "model_0000005.pth, which is missing or incomplete" in caplog.text
    assert ckpt.resume_or_load("", resume=True)["iteration"] == 3 and counter.value == 3

    # An empty tag (a tag write cut short by a non-atomic writer) falls back the same way.
    (tmp_path / "last_checkpoint").write_text("")
    assert ckpt.get_checkpoint_file() == str(tmp_path / "model_0000003.pth")
    # A tag naming a deleted file too.
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    assert ckpt.get_checkpoint_file() == str(tmp_path / "model_0000003.pth")

    # Nothing complete left: nothing to resume from, so MODEL.WEIGHTS is used.
    _truncate(tmp_path / "model_0000003.pth")
    _truncate(tmp_path / "model_0000001.pth")
    assert ckpt.get_checkpoint_file() == "" and not ckpt.has_checkpoint()
    counter.value = -1
    assert ckpt.resume_or_load("", resume=True) == {} and counter.value == -1


def test_a_checkpoint_is_found_without_its_tag(tmp_path):
    # Killed between the rename of the first checkpoint and the writing of its tag.
    ckpt, model, counter = _checkpointer(tmp_path)
    ckpt.save("model_0000001", iteration=1)
    os.remove(tmp_path / "last_checkpoint")
    assert ckpt.has_checkpoint()
    assert ckpt.get_checkpoint_file() == str(tmp_path / "model_0000001.pth")


def test_non_finite_weights_are_never_saved(tmp_path):
    ckpt, model, counter = _checkpointer(tmp_path)
    ckpt.save("model_0000001", iteration=1)
    with torch.no_grad():
        model.bias[0] = float("inf")
    with pytest.raises(FloatingPointError) as info:
        ckpt.save("model_0000003", iteration=3)
    message = str(info.value)
    assert "at iteration 3" in message and "bias" in message and "model_0000001.pth" in message
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]


def test_stale_temporary_files_are_removed_on_resume(tmp_path):
    ckpt, model, counter = _checkpointer(tmp_path)
    ckpt.save("model_0000001", iteration=1)
    stale = tmp_path / "model_0000003.pth.tmp-999999"
    stale.write_bytes(b"PK\x03\x04 half a checkpoint")
    assert ckpt.get_checkpoint_file().endswith("model_0000001.pth")
    ckpt.resume_or_load("", resume=True)
    assert not stale.exists()


def test_is_complete_checkpoint(tmp_path):
    legacy = str(tmp_path / "legacy.pth")
    torch.save({"a": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    assert is_complete_checkpoint(legacy)
    atomic_torch_save({"a": torch.ones(2)}, str(tmp_path / "new.pth"))
    assert is_complete_checkpoint(str(tmp_path / "new.pth"))
    (tmp_path / "garbage.pth").write_bytes(b"\x00" * 64)
    assert not is_complete_checkpoint(str(tmp_path / "garbage.pth"))
    assert not is_complete_checkpoint(str(tmp_path / "absent.pth"))


# ------------------------------------------------------------------------------------------------
# Data position
# ------------------------------------------------------------------------------------------------

DATASET = [{"image_id": i} for i in range(7)]
BATCH = 2


def _loader(num_workers, seed=None):
    # Detectron2's loader exactly as training builds it, on a dataset whose items are their ids.
    return build_detection_train_loader(
        dataset=DATASET,
        mapper=lambda d: d["image_id"],
        sampler=TrainingSampler(len(DATASET), seed=seed),
        total_batch_size=BATCH,
        aspect_ratio_grouping=False,
        num_workers=num_workers,
    )


def _fake_trainer(loader, start_iter):
    inner = types.SimpleNamespace(data_loader=loader, _data_loader_iter_obj=None)
    return types.SimpleNamespace(_trainer=inner, start_iter=start_iter)


def _batches(loader, n):
    it = iter(loader)
    return [list(next(it)) for _ in range(n)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_data_position_hook_continues_the_stream(num_workers):
    # The first run: its sampler got a random seed (SEED < 0), saved with the checkpoint.
    first = DataPositionHook(BATCH)
    first.trainer = _fake_trainer(_loader(num_workers), 0)
    state = first.state_dict()
    first.before_train()
    uninterrupted = _batches(first.trainer._trainer.data_loader, 10)

    # The resumed process: a new loader with another random seed, then resume at iteration 6.
    resumed = DataPositionHook(BATCH)
    resumed.trainer = _fake_trainer(_loader(num_workers), 6)
    assert resumed.state_dict()["seed"] != state["seed"]
    resumed.load_state_dict(state)
    resumed.before_train()
    assert _batches(resumed.trainer._trainer.data_loader, 4) == uninterrupted[6:]

    # Without the hook, the data stream would have restarted.
    assert _batches(_loader(num_workers, seed=state["seed"]), 4) == uninterrupted[:4]


def test_resumable_sampler():
    base = TrainingSampler(5, seed=3)
    stream = list(zip(range(12), iter(base)))
    skipped = ResumableSampler(TrainingSampler(5, seed=3), start=7)
    assert [i for _, i in zip(range(5), iter(skipped))] == [i for _, i in stream[7:12]]
    with pytest.raises(ValueError, match="start"):
        ResumableSampler(base, start=-1)
