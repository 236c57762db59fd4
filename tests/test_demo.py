"""Tests of demo.py: pictures with detections are written, bad inputs fail with a clear message."""

import glob
import importlib.util
import os
import subprocess
import sys

import cv2
import matplotlib.colors as mplc
import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model
from detectron2.utils.visualizer import Visualizer
from helpers import CONFIG_DIR, REPO_ROOT
from PIL import Image
from torch import nn

from deformable_detr import add_deformable_detr_config
from deformable_detr.data.quickstart import render_quickstart_image
from deformable_detr.layers import ms_deform_attn

DEMO = os.path.join(REPO_ROOT, "demo.py")
CONFIG = os.path.join(CONFIG_DIR, "quickstart.yaml")
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
        cwd=REPO_ROOT,
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
        (
            lambda w: ["--video-input", str(w / "clip.mp4"), "--output", str(w / "o")]
            + ["--show-sampling"],
            "--show-sampling draws on pictures only",
        ),
        (
            lambda w: ["--input", str(w / "pics" / "pic0.jpg"), "--output", str(w / "o")]
            + ["--show-sampling", "--sampling-top", "0"],
            "--sampling-top must be at least 1, got 0",
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


def _tiny_run(workdir, inputs, output, *extra):
    return (
        ["--config-file", CONFIG, "--input", *inputs, "--output", str(output)]
        + list(extra)
        + ["--opts", "MODEL.WEIGHTS", str(workdir / "tiny.pth")]
        + TINY_OPTS
    )


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_inputs_are_never_written_over(workdir):
    demo = _load_demo()
    same = workdir / "same"
    same.mkdir()
    img, _ = render_quickstart_image(np.random.SeedSequence([5, 0]))
    for name in ("photo.jpg", "photo.png", "holiday.png"):
        cv2.imwrite(str(same / name), img[:, :, ::-1])
    before = _snapshot(same)

    # Output folder = input folder, and two inputs named "photo".
    demo.main(_tiny_run(workdir, [str(same / "*")], same, "--confidence-threshold", "0.0"))
    after = _snapshot(same)
    assert {k: after[k] for k in before} == before
    assert sorted(set(after) - set(before)) == ["holiday_png.png", "photo_jpg.png", "photo_png.png"]
    for name in set(after) - set(before):
        assert cv2.imread(str(same / name)).shape == img.shape

    demo.main(_tiny_run(workdir, [str(same / "holiday.png")], same))
    assert (same / "holiday.png").read_bytes() == before["holiday.png"]
    # The input folder under another name (a symbolic link) is still the input folder.
    alias = workdir / "alias"
    alias.symlink_to(same, target_is_directory=True)
    demo.main(_tiny_run(workdir, [str(same / "holiday.png")], alias))
    assert (same / "holiday.png").read_bytes() == before["holiday.png"]
    assert "holiday_png.png" in os.listdir(same)


def test_outputs_of_inputs_with_one_name_do_not_collide(workdir, tmp_path):
    demo = _load_demo()
    paths = []
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        paths.append(tmp_path / folder / "x.jpg")
        (paths[-1]).write_bytes((workdir / "pics" / "pic0.jpg").read_bytes())
    out = tmp_path / "out"
    out.mkdir()
    planned = demo.plan_outputs([str(p) for p in paths], str(out), ".png")
    assert [os.path.basename(p) for p in planned] == ["x.png", "x_jpg.png"]


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    demo = _load_demo()
    target = tmp_path / "drawn.png"

    def no_rename(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(demo.os, "replace", no_rename)
    with pytest.raises(ValueError, match="cannot write .*drawn.png.*No space left"):
        demo.write_picture(str(target), np.zeros((4, 4, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_pictures_are_checked_before_the_model_is_loaded(workdir, monkeypatch, capsys):
    demo = _load_demo()

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(demo, "DetectionDrawer", no_model)
    text = workdir / "notes.jpg"
    text.write_text("not a picture either")
    inputs = [str(workdir / "pics" / "pic0.jpg"), str(workdir / "broken.jpg"), str(text)]
    with pytest.raises(SystemExit) as exc:
        demo.main(_tiny_run(workdir, inputs, workdir / "o3"))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "2 --input file(s) are not readable pictures" in err
    assert "broken.jpg" in err and "notes.jpg" in err

    video = workdir / "fake.mp4"
    video.write_text("not a video")
    with pytest.raises(SystemExit):
        demo.main(["--config-file", CONFIG, "--video-input", str(video), "--output", str(workdir)])
    assert "cannot open --video-input" in capsys.readouterr().err


def test_a_truncated_picture_is_skipped_and_reported(workdir, tmp_path, capsys):
    demo = _load_demo()
    data = (workdir / "pics" / "pic1.jpg").read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 3])
    out = tmp_path / "out"
    inputs = [str(truncated), str(workdir / "pics" / "pic0.jpg")]
    with pytest.raises(SystemExit) as exc:
        demo.main(_tiny_run(workdir, inputs, out))
    assert exc.value.code == 1
    assert "1 picture(s) could not be read" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["pic0.png"]


@pytest.mark.parametrize(
    "device, message",
    [
        pytest.param(
            "cuda",
            "MODEL.DEVICE is 'cuda' but no CUDA device",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has a CUDA device"),
        ),
        ("gpu", "MODEL.DEVICE 'gpu' is not a device name"),
    ],
)
def test_device_given_in_opts_is_checked(workdir, device, message, capsys):
    demo = _load_demo()
    argv = _tiny_run(workdir, [str(workdir / "pics" / "pic0.jpg")], workdir / "o4")
    with pytest.raises(SystemExit) as exc:
        demo.main(argv + ["MODEL.DEVICE", device])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_video_next_to_its_output_is_not_written_over(workdir, tmp_path):
    clip = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (96, 64))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write mp4 videos")
    for i in range(2):
        img, _ = render_quickstart_image(np.random.SeedSequence([9, i]))
        writer.write(np.ascontiguousarray(cv2.resize(img, (96, 64))[:, :, ::-1]))
    writer.release()
    original = clip.read_bytes()
    demo = _load_demo()
    demo.main(
        ["--config-file", CONFIG, "--video-input", str(clip), "--output", str(tmp_path)]
        + ["--opts", "MODEL.WEIGHTS", str(workdir / "tiny.pth")]
        + TINY_OPTS
    )
    assert clip.read_bytes() == original
    assert sorted(os.listdir(tmp_path)) == ["clip.mp4", "clip_mp4.mp4"]


def test_show_sampling_writes_a_picture_next_to_the_detections(workdir, capsys):
    demo = _load_demo()
    out = workdir / "sampling_out"
    demo.main(
        _tiny_run(
            workdir,
            [str(workdir / "pics" / "pic0.jpg")],
            out,
            "--confidence-threshold",
            "0.0",
            "--show-sampling",
            "--sampling-top",
            "2",
        )
    )
    assert str(out) in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["pic0.png", "pic0_sampling.png"]
    with Image.open(out / "pic0_sampling.png") as picture:
        assert picture.format == "PNG"
        picture.verify()
    src = cv2.imread(str(workdir / "pics" / "pic0.jpg"))
    sampling = cv2.imread(str(out / "pic0_sampling.png"))
    drawn = cv2.imread(str(out / "pic0.png"))
    assert sampling.shape == src.shape
    assert np.abs(sampling.astype(np.int32) - src.astype(np.int32)).max() > 50
    assert np.abs(sampling.astype(np.int32) - drawn.astype(np.int32)).max() > 50


def test_sampling_is_drawn_where_the_op_sampled(workdir, monkeypatch):
    demo = _load_demo()
    args = demo.get_parser().parse_args(
        _tiny_run(workdir, [str(workdir / "pics" / "pic0.jpg")], workdir / "o5")
    )
    drawer = demo.DetectionDrawer(demo.setup_cfg(args), 0.0)
    attn = drawer.predictor.model.transformer.decoder.layers[-1].cross_attn
    with torch.no_grad():
        # Offsets and weights that differ between queries, heads, levels and points.
        torch.manual_seed(0)
        nn.init.normal_(attn.sampling_offsets.weight, std=0.3)
        nn.init.normal_(attn.attention_weights.weight, std=0.3)

    op_calls, circles = [], []
    real_op = ms_deform_attn.multi_scale_deformable_attention
    real_circle = Visualizer.draw_circle

    def op_spy(*op_args):
        op_calls.append(op_args)
        return real_op(*op_args)

    def circle_spy(self, coord, color, radius=3):
        circles.append((tuple(coord), mplc.to_rgba(color), radius))
        return real_circle(self, coord, color, radius)

    monkeypatch.setattr(ms_deform_attn, "multi_scale_deformable_attention", op_spy)
    monkeypatch.setattr(Visualizer, "draw_circle", circle_spy)
    image = read_image(str(workdir / "pics" / "pic0.jpg"), format="BGR")
    instances, _, sampling = drawer.with_sampling(image, 2)
    assert sampling.shape == image.shape

    # The last call of the op is the last decoder layer's cross-attention. One unpadded picture:
    # every level is valid, so normalised locations scale by the picture's size.
    _, _, _, locations, weights = op_calls[-1]
    m, levels, points = weights.shape[2:]
    height, width = image.shape[:2]
    expected = (locations[0] * torch.tensor([width, height])).numpy()
    queries = demo.top_detections(instances, 2).pred_query.tolist()
    assert len(queries) == 2 and len(set(queries)) == 2
    assert queries[0] == int(instances.pred_query[instances.scores.argmax()])
    group = m * levels * points + 2
    assert len(circles) == 2 * group
    for k, query in enumerate(queries):
        drawn = circles[k * group : k * group + m * levels * points]
        coords = np.array([c for c, _, _ in drawn])
        radius_of = []
        for head in range(m):
            for level in range(levels):
                for point in range(points):
                    distance = np.abs(coords - expected[query, head, level, point]).max(1)
                    i = int(distance.argmin())
                    assert distance[i] < 1e-3, (query, head, level, point)
                    assert drawn[i][1] == mplc.to_rgba(demo.LEVEL_COLORS[level], alpha=0.75)
                    radius_of.append((float(weights[0, query, head, level, point]), drawn[i][2]))
        # Larger attention weight, larger marker.
        radii = [r for _, r in sorted(radius_of)]
        assert radii == sorted(radii) and radii[0] < radii[-1]
        # Then the reference point: a black and a white dot at one place.
        (black, _, _), (white, _, _) = circles[k * group + group - 2 : (k + 1) * group]
        assert black == white


def test_sampling_outputs_never_take_another_file(tmp_path):
    demo = _load_demo()
    for name in ("pic.jpg", "pic_sampling.jpg", "a.jpg", "a_sampling.png"):
        (tmp_path / name).write_bytes(b"")
    inputs = [str(tmp_path / n) for n in ("pic.jpg", "pic_sampling.jpg", "a.jpg")]
    plain = demo.plan_outputs(inputs, str(tmp_path), ".png")
    assert [os.path.basename(p) for p in plain] == ["pic.png", "pic_sampling.png", "a.png"]
    # "a_sampling.png" is a file in the output folder, taken as an input of this run.
    inputs.append(str(tmp_path / "a_sampling.png"))
    planned = demo.plan_outputs(inputs, str(tmp_path), ".png", (demo.SAMPLING_SUFFIX,))
    names = [os.path.basename(p) for p in planned]
    assert names == ["pic.png", "pic_sampling_jpg.png", "a_jpg.png", "a_sampling_png.png"]
    companions = [demo.companion_path(p, ".png", demo.SAMPLING_SUFFIX) for p in planned]
    every = [os.path.basename(p) for p in planned + companions]
    assert len(set(every)) == len(every)
    assert "a_jpg_sampling.png" in every and "pic_sampling.png" in every
