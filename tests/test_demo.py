"""Tests of demo.py: pictures with detections are written, bad inputs fail with a clear message."""

import glob
import importlib.util
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from deformable_detr import add_deformable_detr_config
from deformable_detr.data.quickstart import render_quickstart_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "demo.py")
CONFIG = os.path.join(REPO, "configs", "quickstart.yaml")
# Shrink the quickstart model further: the demo only has to run.
TINY_OPTS = [
    "MODEL.DEVICE",
    "cpu",
    "MODEL.DEFORMABLE_DETR.ENC_LAYERS",
    "1",
    "MODEL.DEFORMABLE_DETR.DEC_LAYERS",
    "1",
    "MODEL.DEFORMABLE_DETR.HIDDEN_DIM",
    "64",
    "MODEL.DEFORMABLE_DETR.DIM_FEEDFORWARD",
    "64",
    "MODEL.DEFORMABLE_DETR.NUM_QUERIES",
    "10",
    "INPUT.MIN_SIZE_TEST",
    "128",
]


def _load_demo():
    spec = importlib.util.spec_from_file_location("deformable_detr_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Two pictures, an unreadable one and the weights of a tiny random model."""
    root = tmp_path_factory.mktemp("demo")
    pics = root / "pics"
    pics.mkdir()
    for i in range(2):
        img, _ = render_quickstart_image(np.random.SeedSequence([123, i]))
        cv2.imwrite(str(pics / f"pic{i}.jpg"), img[:, :, ::-1])
    (root / "broken.jpg").write_bytes(b"this is not a picture")

    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(TINY_OPTS)
    torch.manual_seed(0)
    model = build_model(cfg)
    DetectionCheckpointer(model, save_dir=str(root)).save("tiny")
    return root


def _run_demo(args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, DEMO] + args,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_demo_writes_pictures(workdir):
    out = workdir / "out" / "nested"
    weights = str(workdir / "tiny.pth")
    proc = _run_demo(
        ["--config-file", CONFIG, "--input", str(workdir / "pics" / "*.jpg")]
        + ["--output", str(out), "--confidence-threshold", "0.0"]
        + ["--opts", "MODEL.WEIGHTS", weights]
        + TINY_OPTS
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(out) in proc.stdout
    written = sorted(os.path.basename(p) for p in glob.glob(str(out / "*")))
    assert written == ["pic0.png", "pic1.png"]
    for name in ("pic0", "pic1"):
        src = cv2.imread(str(workdir / "pics" / f"{name}.jpg"))
        drawn = cv2.imread(str(out / f"{name}.png"))
        assert drawn is not None and drawn.shape == src.shape
        # With a zero threshold every detection is drawn, so the picture changes.
        assert np.abs(drawn.astype(np.int32) - src.astype(np.int32)).max() > 50


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda w: ["--input", str(w / "missing.jpg"), "--output", str(w / "o")], "missing.jpg"),
        (lambda w: ["--input", str(w / "pics" / "*.png"), "--output", str(w / "o")], "*.png"),
        (lambda w: ["--input", str(w / "pics"), "--output", str(w / "o")], "is a folder"),
        (
            lambda w: ["--input", str(w / "pics" / "pic0.jpg"), "--output", str(w / "tiny.pth")],
            "not a folder",
        ),
        (
            lambda w: [
                "--input",
                str(w / "pics" / "pic0.jpg"),
                "--output",
                str(w / "o"),
                "--opts",
                "MODEL.WEIGHTS",
                str(w / "nowhere.pth"),
            ],
            "nowhere.pth",
        ),
        (lambda w: ["--output", str(w / "o")], "--input"),
        (
            lambda w: ["--video-input", str(w / "clip.mp4"), "--output", str(w / "o")],
            "clip.mp4",
        ),
    ],
)
def test_bad_arguments_fail_cleanly(workdir, make_args, message, capsys):
    demo = _load_demo()
    with pytest.raises(SystemExit) as exc:
        demo.main(["--config-file", CONFIG] + make_args(workdir))
    assert exc.value.code != 0
    assert message in capsys.readouterr().err


def test_missing_config_fails_cleanly(workdir, capsys):
    demo = _load_demo()
    with pytest.raises(SystemExit) as exc:
        demo.main(
            ["--config-file", str(workdir / "nope.yaml"), "--input", str(workdir / "pics" / "*")]
            + ["--output", str(workdir / "o")]
        )
    assert exc.value.code != 0
    assert "nope.yaml" in capsys.readouterr().err


def test_unreadable_picture_fails_without_traceback(workdir):
    proc = _run_demo(
        ["--config-file", CONFIG, "--input", str(workdir / "broken.jpg")]
        + ["--output", str(workdir / "o2"), "--opts", "MODEL.WEIGHTS", ""]
        + TINY_OPTS
    )
    assert proc.returncode != 0
    assert "broken.jpg" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_demo_on_video(workdir, capsys):
    clip = str(workdir / "clip3.mp4")
    writer = cv2.VideoWriter(clip, cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (160, 128))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write mp4 videos")
    for i in range(3):
        img, _ = render_quickstart_image(np.random.SeedSequence([7, i]))
        writer.write(np.ascontiguousarray(cv2.resize(img, (160, 128))[:, :, ::-1]))
    writer.release()

    demo = _load_demo()
    out = workdir / "video_out"
    demo.main(
        ["--config-file", CONFIG, "--video-input", clip, "--output", str(out)]
        + ["--opts", "MODEL.WEIGHTS", str(workdir / "tiny.pth")]
        + TINY_OPTS
    )
    assert str(out) in capsys.readouterr().out
    video = cv2.VideoCapture(str(out / "clip3.mp4"))
    frames = 0
    while video.read()[0]:
        frames += 1
    video.release()
    assert frames == 3
