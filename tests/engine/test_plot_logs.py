"""Tests of tools/plot_logs.py on synthetic Detectron2 metrics.json files."""

import importlib.util
import json
import os

import numpy as np
import pytest
from helpers import TOOLS_DIR
from PIL import Image

TOOL = os.path.join(TOOLS_DIR, "plot_logs.py")


@pytest.fixture(scope="module")
def plot_logs():
    spec = importlib.util.spec_from_file_location("ddetr_plot_logs", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_metrics(folder, lines, tail=""):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        f.write("".join(json.dumps(line) + "\n" for line in lines) + tail)


def _training(iteration, scale=1.0):
    loss = scale * 10.0 / (1 + iteration / 50)
    return {
        "iteration": iteration,
        "total_loss": loss,
        "loss_class": 0.2 * loss,
        "loss_bbox": 0.5 * loss,
        "loss_giou": 0.3 * loss,
        "lr": 2e-4,
    }


@pytest.fixture
def runs(tmp_path):
    """Run "a": one test dataset. Run "b": two test datasets, resumed at iteration 100 (iterations
    after it written twice), a NaN AP and a half-written last line."""
    a = [_training(i) for i in range(19, 400, 20)]
    a += [{"iteration": 199, "bbox/AP": 10.0, "bbox/AP50": 20.0}]
    a += [{"iteration": 399, "bbox/AP": 15.0, "bbox/AP50": 28.0}]
    b = [_training(i, 1.5) for i in range(19, 200, 20)]
    b += [_training(i, 1.2) for i in range(119, 300, 20)]
    b += [{"iteration": 299, "ds1/bbox/AP": 7.0, "ds2/bbox/AP": float("nan")}]
    _write_metrics(str(tmp_path / "a"), a)
    _write_metrics(str(tmp_path / "b"), b, tail='{"iteration": 319, "total_lo')
    return str(tmp_path / "a"), str(tmp_path / "b")


def test_extract_series(plot_logs, runs):
    a, b = (plot_logs.load_metrics(run) for run in runs)
    ((name, (iterations, values)),) = plot_logs.extract_series(a, "bbox/AP").items()
    assert name == "bbox/AP"
    assert iterations.tolist() == [199, 399] and values.tolist() == [10.0, 15.0]

    series = plot_logs.extract_series(b, "total_loss")["total_loss"]
    assert series[0].tolist() == list(range(19, 300, 20))
    # The resumed run's values replace the first run's from iteration 119 on.
    expected = [_training(i, 1.5 if i < 119 else 1.2)["total_loss"] for i in range(19, 300, 20)]
    np.testing.assert_allclose(series[1], expected)

    # Several test datasets: every "<dataset>/bbox/AP"; the NaN one has no point.
    ap = plot_logs.extract_series(b, "bbox/AP")
    assert list(ap) == ["ds1/bbox/AP"] and ap["ds1/bbox/AP"][1].tolist() == [7.0]
    assert plot_logs.extract_series(b, "AP50") == {}


def test_moving_average(plot_logs):
    values = np.array([1.0, 3.0, 2.0, 8.0, 4.0])
    expected = [1.0, 2.0, 2.0, 13 / 3, 14 / 3]
    np.testing.assert_allclose(plot_logs.moving_average(values, 3), expected)
    assert plot_logs.moving_average(values, 1) is values


def test_png_of_two_runs(plot_logs, runs, tmp_path, caplog):
    output = str(tmp_path / "plots" / "curves.png")
    drawn = plot_logs.main(
        [*runs, "--output", output, "--smooth", "3", "--keys", "total_loss", "loss_giou", "bbox/AP"]
    )
    a, b = (os.path.normpath(r) for r in runs)
    assert drawn["total_loss"] == [a, b] and drawn["loss_giou"] == [a, b]
    assert drawn["bbox/AP"] == [a, f"{b}: ds1/bbox/AP"]
    with Image.open(output) as image:
        assert image.format == "PNG"
        assert image.size == (3 * 550, 400)
        pixels = np.asarray(image.convert("L"))
    # Not a blank canvas: axes, text and curves are drawn.
    assert (pixels < 128).mean() > 0.01

    # Default keys; a key no run has gets an empty panel, not an error.
    drawn = plot_logs.main([runs[0], "--output", output, "--keys", "total_loss", "loss_mask"])
    assert drawn["loss_mask"] == []
    assert "loss_mask" in caplog.text
    drawn = plot_logs.main([runs[0], "--output", output])
    assert list(drawn) == list(plot_logs.DEFAULT_KEYS) and all(drawn.values())


def test_errors(plot_logs, runs, tmp_path, capsys):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    output = str(tmp_path / "x.png")
    with pytest.raises(SystemExit) as exit_info:
        plot_logs.main([runs[0], str(empty), "--output", output])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "empty_run" in err and "metrics.json" in err
    with pytest.raises(SystemExit):
        plot_logs.main([str(tmp_path / "missing"), "--output", output])
    assert "missing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plot_logs.main([runs[0], "--output", output, "--keys", "loss_mask"])
    assert "loss_mask" in capsys.readouterr().err
    bad = tmp_path / "bad"
    _write_metrics(str(bad), [_training(19)], tail='{"iteration": \n{"iteration": 39}\n')
    with pytest.raises(SystemExit):
        plot_logs.main([str(bad), "--output", output])
    assert "line 2" in capsys.readouterr().err
    assert not os.path.exists(output)


def test_output_never_replaces_an_input_or_leaves_a_partial_file(
    plot_logs, runs, tmp_path, monkeypatch
):
    a, b = runs
    metrics = os.path.join(a, "metrics.json")
    before = open(metrics, "rb").read()
    with pytest.raises(ValueError, match="is the metrics file of"):
        plot_logs.plot_logs([a, b], metrics, ["total_loss"])
    assert open(metrics, "rb").read() == before
    with pytest.raises(ValueError, match="is a folder"):
        plot_logs.plot_logs([a], a, ["total_loss"])
    # Interrupted while writing (a full disk): nothing is left under the output's name.
    from matplotlib.figure import Figure

    def failing_savefig(self, path, **kwargs):
        with open(path, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", failing_savefig)
    with pytest.raises(OSError, match="No space left"):
        plot_logs.plot_logs([a], str(tmp_path / "curves.png"), ["total_loss"])
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]
