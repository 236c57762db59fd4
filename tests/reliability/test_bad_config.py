"""Bad configurations fail at build (or load) time with an error naming the config key."""

import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model
from helpers import BASE_CONFIG, TOOLS_DIR, tiny_cfg

from deformable_detr.config import add_deformable_detr_config

# The tiny model with one decoder layer and the official four sampling points.
TINY = [
    "MODEL.DEFORMABLE_DETR.DEC_LAYERS", "1",
    "MODEL.DEFORMABLE_DETR.ENC_N_POINTS", "4",
    "MODEL.DEFORMABLE_DETR.DEC_N_POINTS", "4",
    "MODEL.DEFORMABLE_DETR.TWO_STAGE_NUM_PROPOSALS", "10",
    "INPUT.MIN_SIZE_TEST", "32",
    "INPUT.MAX_SIZE_TEST", "48",
]  # fmt: skip


def _cfg(*opts):
    return tiny_cfg(*TINY, *opts)


def test_unknown_key_is_named(tmp_path):
    cfg = get_cfg()
    add_deformable_detr_config(cfg)
    with pytest.raises((KeyError, AssertionError), match="MODEL.DEFORMABLE_DETR.NUM_QUERIS"):
        cfg.merge_from_list(["MODEL.DEFORMABLE_DETR.NUM_QUERIS", "3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{BASE_CONFIG}"\nMODEL:\n  DEFORMABLE_DETR:\n    TWO_STAGES: True\n')
    with pytest.raises(KeyError, match="MODEL.DEFORMABLE_DETR.TWO_STAGES"):
        cfg.merge_from_file(str(bad))


@pytest.mark.parametrize(
    "opts, message",
    [
        # res3 is not among the backbone's outputs.
        (
            ["MODEL.RESNETS.OUT_FEATURES", '["res4", "res5"]'],
            r"IN_FEATURES\) \['res3'\] are not produced.*MODEL.RESNETS.OUT_FEATURES",
        ),
        (
            ["MODEL.DEFORMABLE_DETR.NUM_FEATURE_LEVELS", "2"],
            r"NUM_FEATURE_LEVELS\) = 2 is smaller than the number of in_features",
        ),
        (
            ["MODEL.DEFORMABLE_DETR.TWO_STAGE", "True"],
            "TWO_STAGE = True: requires MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE",
        ),
        (["MODEL.DEFORMABLE_DETR.NHEADS", "3"], "HIDDEN_DIM = 64: must be a multiple of"),
        (["MODEL.DEFORMABLE_DETR.HIDDEN_DIM", "48", "MODEL.DEFORMABLE_DETR.NHEADS", "4"], "32"),
        (["MODEL.DEFORMABLE_DETR.NUM_CLASSES", "0"], "NUM_CLASSES = 0: must be >= 1"),
        (["MODEL.DEFORMABLE_DETR.NUM_QUERIES", "0"], "NUM_QUERIES = 0: must be >= 1"),
        (["MODEL.DEFORMABLE_DETR.DROPOUT", "1.0"], r"DROPOUT = 1.0: must be in \[0, 1\)"),
        (["MODEL.DEFORMABLE_DETR.DEC_N_POINTS", "0"], "DEC_N_POINTS = 0: must be >= 1"),
    ],
    ids=[
        "in_features",
        "levels",
        "two_stage",
        "heads",
        "hidden",
        "classes",
        "queries",
        "drop",
        "pts",
    ],
)
def test_bad_model_config_fails_at_build_time(opts, message):
    with pytest.raises(ValueError, match=message):
        build_model(_cfg(*opts))


def test_two_stage_with_refinement_builds():
    model = build_model(
        _cfg(
            "MODEL.DEFORMABLE_DETR.TWO_STAGE",
            "True",
            "MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE",
            "True",
        )
    )
    assert not hasattr(model, "query_embed")


def test_class_count_that_does_not_match_the_weights(tmp_path):
    source = build_model(_cfg())
    path = str(tmp_path / "two_classes.pth")
    DetectionCheckpointer(source, save_dir=str(tmp_path)).save("two_classes")

    cfg = _cfg("MODEL.DEFORMABLE_DETR.NUM_CLASSES", "3", "MODEL.WEIGHTS", path)
    model = build_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="MODEL.DEFORMABLE_DETR.NUM_CLASSES") as info:
        DetectionCheckpointer(model).load(path)
    assert "class_embed.0.weight" in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # The predictor loads MODEL.WEIGHTS the same way.
    with pytest.raises(RuntimeError, match="NUM_CLASSES"):
        DefaultPredictor(cfg)
    # The matching config loads.
    DetectionCheckpointer(build_model(_cfg())).load(path)


# ------------------------------------------------------------------------------------------------
# The export script checks what it is given before it builds the model
# ------------------------------------------------------------------------------------------------


def _load_export_script():
    import importlib.util

    path = os.path.join(TOOLS_DIR, "export_model.py")
    spec = importlib.util.spec_from_file_location("deformable_detr_export_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "extra, message",
    [
        pytest.param(
            ["--opts", "MODEL.DEVICE", "cuda"],
            "MODEL.DEVICE is 'cuda' but no CUDA device",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has a CUDA device"),
            id="cuda",
        ),
        pytest.param(
            ["--opts", "MODEL.DEVICE", "gpu"], "MODEL.DEVICE 'gpu' is not a device", id="device"
        ),
        pytest.param(
            ["--opts", "MODEL.DEFORMABLE_DETR.NUM_QUERIS", "3"], "NUM_QUERIS", id="unknown_key"
        ),
        pytest.param(["--sample-image", "{tmp}/notes.jpg"], "cannot read --sample-image", id="img"),
        pytest.param(["--output", "{tmp}/notes.jpg"], "exists and is not a folder", id="output"),
    ],
)
def test_export_script_checks_its_inputs_first(tmp_path, monkeypatch, capsys, extra, message):
    script = _load_export_script()

    def no_model(cfg):
        raise AssertionError("the model was built before the inputs were checked")

    monkeypatch.setattr(script, "build_model", no_model)
    (tmp_path / "notes.jpg").write_text("not a picture")
    argv = ["--config-file", BASE_CONFIG, "--format", "torchscript", "--output", str(tmp_path)]
    with pytest.raises(SystemExit) as exc:
        script.main(argv + [a.format(tmp=tmp_path) for a in extra])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
