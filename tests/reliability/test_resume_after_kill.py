"""Interrupted training: real train_net.py runs killed with SIGKILL (once while a checkpoint is
being written, once mid-training) resume with --resume to the end; a diverging run stops with
FloatingPointError and leaves its last good checkpoint tagged."""

import json
import math
import os
import signal
import subprocess
import sys
import time
import weakref

import pytest
import torch
from detectron2.engine import HookBase
from helpers import (
    REPO_ROOT,
    TRAIN_NET,
    register_coco_dataset,
    tiny_cfg,
    write_cfg,
    write_coco_dataset,
)

from deformable_detr.checkpoint import is_complete_checkpoint

DATASET = "ddetr_reliability_kill_train"
MAX_ITER = 8
PERIOD = 2
# Six pictures with 0, 1 or 2 boxes.
PICTURES = [
    ((40, 56), [([4.0 + 10 * j, 6.0, 16.0, 20.0], 1 + j % 2) for j in range(i % 3)])
    for i in range(6)
]

# The tiny model on batches of 2 pictures, a checkpoint every PERIOD steps.
RUN = [
    "DATASETS.TRAIN", f'("{DATASET}",)',
    "INPUT.MIN_SIZE_TRAIN", "(40, 48)",
    "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.MIN_SIZE_TEST", "48",
    "INPUT.MAX_SIZE_TEST", "64",
    "INPUT.CROP_PRE_RESIZE_SIZES", "[48]",
    "INPUT.CROP.SIZE", "[32, 48]",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.MAX_ITER", str(MAX_ITER),
    "SOLVER.STEPS", "(5,)",
    "SOLVER.CHECKPOINT_PERIOD", str(PERIOD),
    "DATALOADER.ASPECT_RATIO_GROUPING", "False",
    "TEST.DETECTIONS_PER_IMAGE", "5",
]  # fmt: skip

# Runs train_net.py as __main__ after registering the tiny dataset. With DDETR_TEST_STALL set to
# a checkpoint name, the write of that checkpoint stops half-way (the temporary file is cut to
# half its size), touches a marker file and hangs, so the test can kill it mid-write.
LAUNCHER = """
import os, runpy, sys, time
import torch
from detectron2.data.datasets import register_coco_instances

root = os.environ["DDETR_TEST_DATA"]
image_root = os.path.join(root, "train")
register_coco_instances({dataset!r}, {{}}, os.path.join(root, "train.json"), image_root)
stall = os.environ.get("DDETR_TEST_STALL")
if stall:
    real_save = torch.save

    def stalled_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        name = os.path.basename(getattr(f, "name", str(f)))
        if name.startswith(stall + ".pth"):
            f.flush()
            f.truncate(f.tell() // 2)
            f.flush()
            open(os.environ["DDETR_TEST_MARKER"], "w").close()
            time.sleep(600)

    torch.save = stalled_save
torch.set_num_threads(1)
sys.argv = [{train_net!r}] + sys.argv[1:]
runpy.run_path({train_net!r}, run_name="__main__")
"""


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kill")
    data = str(tmp / "data")
    write_coco_dataset(data, {"train": PICTURES})
    config = write_cfg(tiny_cfg(*RUN), tmp / "tiny.yaml")
    launcher = tmp / "launcher.py"
    launcher.write_text(LAUNCHER.format(dataset=DATASET, train_net=TRAIN_NET))
    return tmp, data, config, str(launcher)


def _start(setup, output_dir, resume, **env):
    tmp, data, config, launcher = setup
    cmd = [sys.executable, launcher, "--config-file", config]
    if resume:
        cmd.append("--resume")
    cmd += ["OUTPUT_DIR", output_dir]
    full_env = dict(os.environ, DDETR_TEST_DATA=data, OMP_NUM_THREADS="1", **env)
    log = open(os.path.join(str(tmp), f"run_{time.monotonic_ns()}.log"), "w")
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)


def _wait_for(condition, proc, output_dir, timeout=240):
    """Poll until ``condition()``; meanwhile, whatever last_checkpoint names must be complete."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tagged = _tag(output_dir)
        if tagged:
            assert is_complete_checkpoint(os.path.join(output_dir, tagged)), tagged
        if condition():
            return
        if proc.poll() is not None:
            pytest.fail(f"training exited with {proc.returncode} before the expected moment")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("timed out waiting for the training run")


def _kill(proc):
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def _tag(output_dir):
    path = os.path.join(output_dir, "last_checkpoint")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip()


def _assert_tag_loadable(output_dir):
    name = _tag(output_dir)
    assert name, "last_checkpoint is missing or empty"
    data = torch.load(os.path.join(output_dir, name), map_location="cpu", weights_only=False)
    assert {"model", "trainer", "iteration"} <= set(data)
    assert all(torch.isfinite(v).all() for v in data["model"].values() if v.is_floating_point())
    return name, data


def _start_iters(output_dir):
    with open(os.path.join(output_dir, "log.txt")) as f:
        text = f.read()
    marker = "Starting training from iteration "
    return [int(line.split(marker)[1].split()[0]) for line in text.splitlines() if marker in line]


def test_kill_during_save_and_mid_training_then_resume(setup_dir):
    tmp = setup_dir[0]
    out = str(tmp / "out")
    marker = str(tmp / "stalled")

    # 1. Killed while model_0000003.pth is being written (half of it on disk).
    proc = _start(setup_dir, out, False, DDETR_TEST_STALL="model_0000003", DDETR_TEST_MARKER=marker)
    _wait_for(lambda: os.path.exists(marker), proc, out)
    _kill(proc)
    name, data = _assert_tag_loadable(out)
    assert name == "model_0000001.pth" and data["iteration"] == 1
    assert not os.path.exists(os.path.join(out, "model_0000003.pth"))
    leftovers = [n for n in os.listdir(out) if ".tmp-" in n]
    assert leftovers and leftovers[0].startswith("model_0000003.pth")

    # 2. Resumed, then killed at an arbitrary moment after its second checkpoint.
    proc = _start(setup_dir, out, True)
    _wait_for(lambda: _tag(out) == "model_0000005.pth", proc, out)
    time.sleep(0.5)
    _kill(proc)
    name, data = _assert_tag_loadable(out)
    assert data["iteration"] >= 5
    assert not any(".tmp-" in n and n.startswith("model_0000003") for n in os.listdir(out))

    # 3. Resumed again, to the end.
    proc = _start(setup_dir, out, True)
    _wait_for(lambda: proc.poll() is not None, proc, out, timeout=300)
    assert proc.returncode == 0
    name, final = _assert_tag_loadable(out)
    assert name == "model_final.pth" and final["iteration"] == MAX_ITER - 1

    starts = _start_iters(out)
    assert starts[:2] == [0, 2] and starts[2] == data["iteration"] + 1
    # The optimizer state came through both resumes: AdamW counted every one of the MAX_ITER
    # steps, not only those since the last resume.
    state = final["trainer"]
    steps = {int(s["step"]) for s in state["_trainer"]["optimizer"]["state"].values()}
    assert steps == {MAX_ITER}
    # The lr scheduler too: one step per iteration.
    assert state["hooks"]["LRScheduler"]["last_epoch"] == MAX_ITER
    # The sampler seed is saved, and each resumed run moved the data stream.
    assert isinstance(state["hooks"]["DataPositionHook"]["seed"], int)
    with open(os.path.join(out, "log.txt")) as f:
        log = f.read()
    assert "Resuming the training data stream at iteration 2 (4 images" in log
    assert "Removing model_0000003.pth.tmp-" in log

    with open(os.path.join(out, "metrics.json")) as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    last = max(metrics, key=lambda m: m["iteration"])
    assert last["iteration"] == MAX_ITER - 1
    assert all(math.isfinite(m["total_loss"]) for m in metrics if "total_loss" in m)


# ------------------------------------------------------------------------------------------------
# Non-finite values during a real (in-process) tiny training
# ------------------------------------------------------------------------------------------------


class _Poison(HookBase):
    """Fills class_embed.0.bias with NaN at one iteration, before or after its step."""

    def __init__(self, iteration, after_step):
        self.iteration, self.after = iteration, after_step

    def _poison(self):
        if self.trainer.iter == self.iteration:
            model = self.trainer.model
            model = getattr(model, "module", model)
            with torch.no_grad():
                model.class_embed[0].bias.fill_(float("nan"))

    def before_step(self):
        if not self.after:
            self._poison()

    def after_step(self):
        if self.after:
            self._poison()


def _trainer(setup, output_dir):
    from detectron2.engine import default_argument_parser

    from deformable_detr.engine import Trainer
    from deformable_detr.engine import setup as setup_cfg

    tmp, data, config, _ = setup
    register_coco_dataset(DATASET, data, "train")
    args = default_argument_parser().parse_args(
        ["--config-file", config, "OUTPUT_DIR", output_dir, "SOLVER.MAX_ITER", "6"]
    )
    return Trainer(setup_cfg(args))


@pytest.mark.parametrize("after_step", [False, True], ids=["nan_loss", "nan_weights"])
def test_non_finite_stops_training_and_keeps_last_good_checkpoint(setup_dir, after_step):
    out = str(setup_dir[0] / f"nan_{after_step}")
    trainer = _trainer(setup_dir, out)
    poison = _Poison(3, after_step)
    poison.trainer = weakref.proxy(trainer)
    # First, so that with after_step the weights are poisoned before iteration 3's checkpoint.
    trainer._hooks.insert(0, poison)
    trainer.resume_or_load(resume=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(FloatingPointError, match="iteration 3") as info:
            trainer.train()
    finally:
        torch.set_num_threads(threads)
    if after_step:
        # The step itself was fine: saving NaN weights is what is refused.
        assert "not saving checkpoint 'model_0000003'" in str(info.value)
        assert "class_embed.0.bias" in str(info.value)
    else:
        assert "Deformable DETR" in str(info.value)
    name, data = _assert_tag_loadable(out)
    assert name == "model_0000001.pth" and data["iteration"] == 1
    assert sorted(n for n in os.listdir(out) if n.endswith(".pth")) == ["model_0000001.pth"]
