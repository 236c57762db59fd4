"""Atomic checkpoint files, robust resume and the resumed data position (no training needed)."""

import logging
import os
import struct
import types
import zipfile

import pytest
import torch
from detectron2.data import build_detection_train_loader
from detectron2.data.samplers import TrainingSampler
from torch import nn

from deformable_detr.checkpoint import (
    AtomicDetectionCheckpointer,
    CheckpointFileError,
    DataPositionHook,
    ResumableSampler,
)
from deformable_detr.checkpoint import atomic as atomic_module
from deformable_detr.checkpoint import (
    atomic_torch_save,
    is_complete_checkpoint,
)
from deformable_detr.checkpoint.data_position import sampler_seed_attribute


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

    monkeypatch.setattr(atomic_module.torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save("model_0000003", iteration=3)
    # Overwriting an existing name fails the same way without touching the old file.
    with pytest.raises(OSError):
        ckpt.save("model_0000001", iteration=1)
    monkeypatch.undo()

    assert sorted(os.listdir(tmp_path)) == [
        "last_checkpoint",
        "model_0000001.pth",
        "model_0000001.pth.sha256",
    ]
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
    with caplog.at_level(logging.WARNING, logger="deformable_detr.checkpoint.checkpointer"):
        assert ckpt.get_checkpoint_file() == str(tmp_path / "model_0000003.pth")
    assert "model_0000005.pth, which is missing, incomplete or corrupt" in caplog.text
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
    assert sorted(os.listdir(tmp_path)) == [
        "last_checkpoint",
        "model_0000001.pth",
        "model_0000001.pth.sha256",
    ]


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
    # What the hook sees of a DefaultTrainer: its public data_loader and start_iter.
    return types.SimpleNamespace(data_loader=loader, start_iter=start_iter)


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
    uninterrupted = _batches(first.trainer.data_loader, 10)

    # The resumed process: a new loader with another random seed, then resume at iteration 6.
    resumed = DataPositionHook(BATCH)
    resumed.trainer = _fake_trainer(_loader(num_workers), 6)
    assert resumed.state_dict()["seed"] != state["seed"]
    resumed.load_state_dict(state)
    resumed.before_train()
    assert _batches(resumed.trainer.data_loader, 4) == uninterrupted[6:]

    # Without the hook, the data stream would have restarted.
    assert _batches(_loader(num_workers, seed=state["seed"]), 4) == uninterrupted[:4]


def test_resumable_sampler():
    base = TrainingSampler(5, seed=3)
    stream = list(zip(range(12), iter(base)))
    skipped = ResumableSampler(TrainingSampler(5, seed=3), start=7)
    assert [i for _, i in zip(range(5), iter(skipped))] == [i for _, i in stream[7:12]]
    with pytest.raises(ValueError, match="start"):
        ResumableSampler(base, start=-1)


def test_sampler_seed_access_fails_loudly_when_detectron2_changes():
    # Detectron2's samplers keep their seed in a private attribute: the one accessor must notice
    # when a new Detectron2 keeps it elsewhere, instead of saving nothing and resuming another order.
    sampler = TrainingSampler(5, seed=3)
    assert ResumableSampler(sampler).seed == 3
    del sampler._seed
    with pytest.raises(RuntimeError, match="TrainingSampler has no integer '_seed'"):
        sampler_seed_attribute(sampler)
    # A sampler of another library simply has no seed to save.
    assert sampler_seed_attribute(torch.utils.data.SequentialSampler(range(3))) is None
    assert ResumableSampler(torch.utils.data.SequentialSampler(range(3))).seed is None


# ------------------------------------------------------------------------------------------------
# Corrupt and unreadable files
# ------------------------------------------------------------------------------------------------


def _member_span(path, suffix):
    """(offset, size) of the bytes of the first zip member whose name ends with ``suffix``."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(suffix))
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def _zero_half_of_a_tensor(path):
    # data/0 is the first tensor storage torch.save wrote: the Linear weight.
    offset, size = _member_span(path, "data/0")
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\x00" * (size // 2))


def _scribble(path):
    size = os.path.getsize(path)
    g = torch.Generator().manual_seed(0)
    noise = bytes(torch.randint(0, 256, (64,), generator=g, dtype=torch.uint8).tolist())
    with open(path, "r+b") as f:
        f.seek(size // 2 - 32)
        f.write(noise)


def _wide_checkpointer(tmp_path):
    # A weight of several kilobytes, so that a damaged half is a damaged tensor.
    os.makedirs(tmp_path, exist_ok=True)
    torch.manual_seed(0)
    model = nn.Linear(64, 32)
    counter = _Counter()
    return AtomicDetectionCheckpointer(model, str(tmp_path), counter=counter), model, counter


@pytest.mark.parametrize("damage", [_zero_half_of_a_tensor, _scribble], ids=["zeroed", "scribbled"])
def test_resume_falls_back_past_a_corrupt_tagged_file(tmp_path, caplog, damage):
    ckpt, model, counter = _wide_checkpointer(tmp_path)
    for it in (1, 3):
        counter.value = it
        with torch.no_grad():
            model.weight.add_(1.0)
        ckpt.save(f"model_{it:07d}", iteration=it)
    good = {k: v.clone() for k, v in torch.load(tmp_path / "model_0000001.pth")["model"].items()}
    damage(str(tmp_path / "model_0000003.pth"))
    with caplog.at_level(logging.WARNING):
        extra = ckpt.resume_or_load("", resume=True)
    assert extra["iteration"] == 1 and counter.value == 1
    assert torch.equal(model.weight, good["weight"])
    assert "model_0000003.pth" in caplog.text and "corrupt" in caplog.text


def test_model_weights_pointing_at_a_corrupt_file_fails_naming_it(tmp_path):
    ckpt, model, counter = _wide_checkpointer(tmp_path / "run")
    ckpt.save("model_0000001", iteration=1)
    path = str(tmp_path / "run" / "model_0000001.pth")
    _zero_half_of_a_tensor(path)
    other, _, _ = _wide_checkpointer(tmp_path / "other")
    with pytest.raises(CheckpointFileError) as info:
        other.resume_or_load(path, resume=False)
    assert path in str(info.value) and "corrupt" in str(info.value)

    # Without a checksum beside it (a converted or foreign file), the zip CRCs still catch it.
    os.remove(path + ".sha256")
    other, _, _ = _wide_checkpointer(tmp_path / "another")
    with pytest.raises(CheckpointFileError) as info:
        other.resume_or_load(path, resume=False)
    assert path in str(info.value) and "corrupt" in str(info.value)


def _unreadable_files(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"model": nn.Linear(64, 32).state_dict()}, good)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    text = tmp_path / "text.pth"
    text.write_text("this is not a checkpoint\n")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return {"empty": (empty, "empty"), "text": (text, "not a"), "truncated": (truncated, "trunc")}


@pytest.mark.parametrize("kind", ["empty", "text", "truncated"])
def test_model_weights_pointing_at_an_unreadable_file_fails_naming_it(tmp_path, kind):
    path, reason = _unreadable_files(tmp_path)[kind]
    ckpt, model, _ = _wide_checkpointer(tmp_path / "out")
    with pytest.raises(CheckpointFileError) as info:
        ckpt.resume_or_load(str(path), resume=False)
    message = str(info.value)
    assert str(path) in message and reason in message, message


def test_a_failed_export_leaves_no_partial_file(tmp_path, monkeypatch):
    from deformable_detr import export

    def half_then_fail(program, f):
        f.write(b"PK\x03\x04 half of a program")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch.export, "save", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        export.save_exported(object(), "exported-program", None, str(tmp_path))
    assert os.listdir(tmp_path) == []
    (tmp_path / "model.pt2").write_bytes(b"previous export")
    with pytest.raises(OSError):
        export.save_exported(object(), "exported-program", None, str(tmp_path))
    assert os.listdir(tmp_path) == ["model.pt2"]
    assert (tmp_path / "model.pt2").read_bytes() == b"previous export"
