"""Tests of the deployment path: the export wrapper, the three export formats run with their own
runtimes against the eager model, and the export_model.py tool's error handling."""

import importlib.util
import os

import helpers
import onnx
import pytest
import torch
from detectron2.modeling import build_model
from helpers import CONFIG_DIR

from deformable_detr.export import (
    ONNX_OPSET,
    DeformableDetrExportWrapper,
    export_model,
    export_program,
    load_exported,
    min_dynamic_size,
    save_exported,
)

TOOL = os.path.join(helpers.TOOLS_DIR, "export_model.py")

# Two input sizes with different feature-map sizes at every level (strides 8 to 64).
SIZE_A = (128, 160)
SIZE_B = (200, 136)


def tiny_cfg(config_name):
    """A published config on the tiny model with the published backbone layout."""
    # Export and load times grow with the number of graph nodes, mostly in the backbone: the tiny
    # ResNet-18 keeps them small, and the backbone is exported the same way at any depth.
    cfg = helpers.tiny_cfg(*helpers.PUBLISHED_BACKBONE, config=config_name)
    d = cfg.MODEL.DEFORMABLE_DETR
    d.NUM_CLASSES = 5
    d.NUM_QUERIES = 12
    d.TWO_STAGE_NUM_PROPOSALS = 12
    cfg.TEST.DETECTIONS_PER_IMAGE = 20
    return cfg


def _randomise_heads(model, seed):
    # The official init gives every query almost the same class score; spread them so that the
    # top-K order is decided by clear margins.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in model.class_embed:
            head.weight.copy_(torch.randn(head.weight.shape, generator=g))
            head.bias.copy_(torch.randn(head.bias.shape, generator=g) - 2)


def _image(size, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, *size), generator=g).float()


VARIANTS = {"r50": "r50.yaml", "two_stage": "r50_two_stage.yaml"}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def model(request):
    torch.manual_seed(0)
    m = build_model(tiny_cfg(VARIANTS[request.param]))
    _randomise_heads(m, 1)
    return m.eval()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """Files of every format: one program with a dynamic size, saved as such and traced at two
    sizes (TorchScript and ONNX keep one size per file)."""
    folder = tmp_path_factory.mktemp("export")
    program = export_program(
        DeformableDetrExportWrapper(model).eval(), _image(SIZE_A, 3), dynamic=True
    )
    files = {"exported-program": save_exported(program, "exported-program", None, str(folder))}
    for fmt in ("torchscript", "onnx"):
        for k, size in enumerate((SIZE_A, SIZE_B)):
            image = _image(size, 10 + k)
            files[fmt, size] = save_exported(program, fmt, image, str(folder / f"{fmt}{k}"))
    return files


def _eager(model, image):
    with torch.no_grad():
        inst = model([{"image": image}])[0]["instances"]
    return inst.pred_boxes.tensor, inst.scores, inst.pred_classes


def assert_same_detections(got, expected, score_tol=1e-4, box_tol=0.01):
    """Every detection of ``got`` matches one of ``expected``: same class, close score and box.

    Scores are compared in order; classes and boxes are matched so that two detections whose
    scores differ by less than the tolerance may come in either order.
    """
    boxes, scores, classes = (t.detach().cpu() for t in got)
    e_boxes, e_scores, e_classes = expected
    assert classes.dtype == torch.int64
    assert boxes.shape == e_boxes.shape and scores.shape == e_scores.shape
    assert len(scores) > 0
    torch.testing.assert_close(scores, e_scores, atol=score_tol, rtol=0)
    used = set()
    for i in range(len(scores)):
        close = [
            j
            for j in range(len(e_scores))
            if j not in used
            and classes[i] == e_classes[j]
            and abs(scores[i] - e_scores[j]) <= score_tol
            and (boxes[i] - e_boxes[j]).abs().max() <= box_tol
        ]
        assert close, f"detection {i} (class {classes[i]}, score {scores[i]:.6f}) has no match"
        used.add(close[0])


def test_wrapper_matches_eager_model(model):
    wrapper = DeformableDetrExportWrapper(model).eval()
    a, b = _image(SIZE_A, 1), _image(SIZE_B, 2)
    with torch.no_grad():
        for image in (a, b):
            # The wrapper runs the eager model's own code on the unpadded image: same bits.
            for got, expected in zip(wrapper(image), _eager(model, image)):
                assert torch.equal(got, expected)
        # A batch of equal-sized images gives each image's own detections.
        boxes, scores, classes = wrapper(torch.stack([a, a.flip(-1)]))
    assert boxes.shape == (2, 20, 4) and scores.shape == (2, 20) and classes.shape == (2, 20)
    for i, image in enumerate((a, a.flip(-1))):
        got = (boxes[i], scores[i], classes[i])
        assert_same_detections(got, _eager(model, image), score_tol=1e-5, box_tol=1e-3)


def test_exported_program_dynamic_sizes(model, exported):
    path = exported["exported-program"]
    program = torch.export.load(path)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "deformable_detr.ms_deform_attn_forward.default" in targets
    assert not any("grid_sampler" in t for t in targets)
    run = load_exported(path)
    # Neither size is the one it was exported with.
    for size, seed in ((SIZE_B, 4), ((160, 224), 5)):
        image = _image(size, seed)
        assert_same_detections(run(image), _eager(model, image))


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_fixed_size_formats(model, exported, fmt):
    for k, size in enumerate((SIZE_A, SIZE_B)):
        image = _image(size, 10 + k)
        run = load_exported(exported[fmt, size])
        assert_same_detections(run(image), _eager(model, image))
    if fmt == "torchscript":
        graph = str(torch.jit.load(exported[fmt, SIZE_A]).inlined_graph)
        assert "deformable_detr::ms_deform_attn_forward" in graph
    else:
        graph = onnx.load(exported[fmt, SIZE_A])
        onnx.checker.check_model(graph)
        assert {o.domain for o in graph.opset_import} <= {"", "ai.onnx"}
        assert graph.opset_import[0].version == ONNX_OPSET
        assert "GridSample" in {node.op_type for node in graph.graph.node}


def test_min_dynamic_size():
    torch.manual_seed(0)
    cfg = tiny_cfg("r50_two_stage.yaml")
    cfg.MODEL.DEFORMABLE_DETR.TWO_STAGE_NUM_PROPOSALS = 300
    two_stage = build_model(cfg)
    side = min_dynamic_size(two_stage)

    def tokens(n):
        return sum((-(-n // s)) ** 2 for s in (8, 16, 32, 64))

    assert tokens(side) >= 300 > tokens(side - 1)
    cfg = tiny_cfg("r50_single_scale.yaml")
    assert min_dynamic_size(build_model(cfg)) == 33


def test_export_errors(model, tmp_path):
    image = _image(SIZE_A, 0)
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export_model(model, "tflite", image, str(tmp_path))
    with pytest.raises(ValueError, match="only supported by the exported-program"):
        export_model(model, "onnx", image, str(tmp_path), dynamic=True)
    with pytest.raises(ValueError, match="sample image must be a"):
        export_model(model, "exported-program", image[None], str(tmp_path))
    with pytest.raises(ValueError, match=r"at least \d+x\d+ pixels"):
        export_model(model, "exported-program", _image((48, 160), 0), str(tmp_path), dynamic=True)
    with pytest.raises(ValueError, match="image must be"):
        DeformableDetrExportWrapper(model)(image[:2])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_exported(str(tmp_path / "missing.onnx"))
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="cannot tell the format"):
        load_exported(str(tmp_path / "model.bin"))
    assert os.listdir(tmp_path) == ["model.bin"]


def _tool():
    spec = importlib.util.spec_from_file_location("export_model_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tool_rejects_bad_arguments(tmp_path, capsys):
    tool = _tool()
    config = os.path.join(CONFIG_DIR, "r50.yaml")
    out = str(tmp_path / "out")
    cases = [
        (["--format", "tflite"], "invalid choice: 'tflite'"),
        (["--format", "torchscript", "--dynamic"], "--dynamic is only supported"),
        (["--format", "onnx", "--opts", "MODEL.WEIGHTS", str(tmp_path / "w.pth")], "w.pth"),
        (["--format", "onnx", "--height", "0"], "--height must be a positive"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exc:
            tool.main(["--config-file", config, "--output", out] + extra)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        tool.main(
            ["--config-file", str(tmp_path / "nope.yaml"), "--format", "onnx", "--output", out]
        )
    assert exc.value.code == 2
    assert "nope.yaml' does not exist" in capsys.readouterr().err
    assert not os.path.exists(out)
