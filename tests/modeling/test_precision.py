"""Tests of TEST.PRECISION: the inference precision of DeformableDETR, on tiny CPU models."""

import logging

import pytest
import torch
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model
from detectron2.structures import Boxes, pairwise_iou
from detectron2.utils.events import EventStorage
from test_meta_arch import VARIANTS, _image, _instances, tiny_cfg

from deformable_detr.config import check_deformable_detr_config
from deformable_detr.engine import cpu_supports_bfloat16
from deformable_detr.modeling import meta_arch

needs_bf16 = pytest.mark.skipif(
    not cpu_supports_bfloat16(), reason="this CPU has no bfloat16 arithmetic"
)


def _build(cfg, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    # Spread the class head so that the top-K scores are well apart: with the initial head every
    # score is near 0.01 and bfloat16 rounding alone would reorder them.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for head in model.class_embed:
            head.weight.add_(torch.randn(head.weight.shape, generator=g))
    return model


def _detect(model, image):
    with torch.no_grad():
        return model([{"image": image}])[0]["instances"]


def _dtypes_seen(module, fn, inputs=False):
    """The dtypes of ``module``'s output (or first input) at every call while ``fn`` runs."""
    seen = []
    if inputs:
        hook = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
    else:
        hook = module.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    try:
        fn()
    finally:
        hook.remove()
    return seen


def _transformer_dtypes(model, fn):
    """The output dtypes of the first decoder layer's value projection while ``fn`` runs."""
    return _dtypes_seen(model.transformer.decoder.layers[0].cross_attn.value_proj, fn)


@needs_bf16
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_bfloat16_close_to_float32(variant):
    cfg = tiny_cfg(**VARIANTS[variant])
    model = _build(cfg)
    image = _image(96, 128, seed=3)
    ref = _detect(model, image)
    model.precision = "bfloat16"
    dtypes = _transformer_dtypes(model, lambda: _detect(model, image))
    assert dtypes == [torch.bfloat16]
    got = _detect(model, image)

    for inst in (ref, got):
        assert inst.scores.dtype == torch.float32
        assert inst.pred_boxes.tensor.dtype == torch.float32
        assert inst.pred_classes.dtype == torch.int64
    # bfloat16 keeps 8 significant bits: scores within a few hundredths, boxes within a few
    # pixels of a 128-pixel image, and the best detections mostly the same (query, class) pairs.
    k = 10
    torch.testing.assert_close(got.scores[:k], ref.scores[:k], atol=0.03, rtol=0)
    matched = 0
    iou = pairwise_iou(Boxes(got.pred_boxes.tensor[:k]), Boxes(ref.pred_boxes.tensor[:k]))
    for i in range(k):
        same_class = got.pred_classes[i] == ref.pred_classes[:k]
        matched += bool(((iou[i] > 0.9) & same_class).any())
    assert matched >= k - 2, f"only {matched} of the top {k} bfloat16 detections match float32"


def test_float32_default_unchanged_by_autocast_context():
    cfg = tiny_cfg()
    assert cfg.TEST.PRECISION == "float32"
    model = _build(cfg)
    assert model.precision == "float32"
    dtypes = _transformer_dtypes(model, lambda: _detect(model, _image(64, 96, seed=1)))
    assert dtypes == [torch.float32]


def test_float16_on_cpu_is_an_error():
    cfg = tiny_cfg()
    cfg.TEST.PRECISION = "float16"
    with pytest.raises(ValueError, match="TEST.PRECISION"):
        check_deformable_detr_config(cfg)
    with pytest.raises(ValueError, match="TEST.PRECISION"):
        build_model(cfg)
    # Set on a built model (or a model moved to the CPU): the forward says it.
    model = _build(tiny_cfg())
    model.precision = "float16"
    with pytest.raises(ValueError, match="TEST.PRECISION = 'float16'.*CPU"):
        _detect(model, _image(64, 64, seed=0))


@pytest.mark.parametrize("value", ["bf16", "half", "", "FLOAT32"])
def test_bad_precision_names_the_key(value):
    cfg = tiny_cfg()
    cfg.TEST.PRECISION = value
    with pytest.raises(ValueError, match=f"TEST.PRECISION = {value!r}"):
        build_model(cfg)
    model = _build(tiny_cfg())
    model.precision = value
    with pytest.raises(ValueError, match="TEST.PRECISION"):
        _detect(model, _image(64, 64, seed=0))


def test_no_bfloat16_arithmetic_warns_and_runs_float32(monkeypatch, caplog):
    model = _build(tiny_cfg())
    image = _image(64, 96, seed=2)
    ref = _detect(model, image)
    model.precision = "bfloat16"
    monkeypatch.setattr(meta_arch, "_has_native", lambda device_type, dtype: False)
    with caplog.at_level(logging.WARNING):
        dtypes = _transformer_dtypes(model, lambda: _detect(model, image))
    assert dtypes == [torch.float32]
    assert any("no native bfloat16" in r.getMessage() for r in caplog.records)
    got = _detect(model, image)
    assert torch.equal(got.scores, ref.scores)
    assert torch.equal(got.pred_boxes.tensor, ref.pred_boxes.tensor)


def test_training_forward_unaffected():
    cfg = tiny_cfg(refine=True)
    image = _image(64, 96, seed=4)
    inputs = [{"image": image, "instances": _instances(64, 96, [[4, 8, 40, 50]], [1])}]
    losses = {}
    for precision in ("float32", "bfloat16"):
        cfg.TEST.PRECISION = precision
        torch.manual_seed(0)
        model = build_model(cfg).train()
        dtypes = []
        hook = model.transformer.decoder.layers[0].linear1.register_forward_hook(
            lambda _m, _i, out: dtypes.append(out.dtype)
        )
        torch.manual_seed(1)  # dropout
        with EventStorage(0):
            losses[precision] = model(inputs)
        hook.remove()
        assert dtypes == [torch.float32]
        sum(losses[precision].values()).backward()
        assert model.backbone.body.res5[0].conv1.weight.grad is not None
    for k, v in losses["float32"].items():
        assert torch.equal(v, losses["bfloat16"][k]), k


@needs_bf16
def test_default_predictor_honours_precision():
    cfg = tiny_cfg()
    cfg.TEST.PRECISION = "bfloat16"
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.MAX_SIZE_TEST = 128
    predictor = DefaultPredictor(cfg)
    array = _image(60, 90, seed=5).permute(1, 2, 0).numpy()[:, :, ::-1].copy()  # BGR
    dtypes = _transformer_dtypes(predictor.model, lambda: predictor(array))
    assert dtypes == [torch.bfloat16]
    inst = predictor(array)["instances"]
    assert inst.scores.dtype == torch.float32 and inst.pred_boxes.tensor.dtype == torch.float32
    assert inst.image_size == (60, 90)


def test_folded_backbone_keeps_state_dict_and_follows_weights():
    model = _build(tiny_cfg())
    image = _image(64, 96, seed=6)
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    x = model.normalize(image)[None]
    with torch.no_grad():
        unfolded = [model.backbone.input_proj[0](model.backbone.body(x)["res3"])]
        folded = model.backbone.features(x)[:1]
    # Folding the frozen batch norms changes the rounding only.
    torch.testing.assert_close(folded, unfolded, atol=1e-4, rtol=1e-4)
    state = model.state_dict()
    assert list(state) == list(keys)
    assert all(torch.equal(state[k], v) for k, v in keys.items())

    # New weights (as from a checkpoint) are folded again before the next inference.
    before = _detect(model, image)
    other = _build(tiny_cfg(), seed=7)
    model.load_state_dict(other.state_dict())
    after = _detect(model, image)
    expected = _detect(other, image)
    assert not torch.equal(before.scores, after.scores)
    assert torch.equal(after.scores, expected.scores)
    assert torch.equal(after.pred_boxes.tensor, expected.pred_boxes.tensor)


def _query_dtypes(model, fn):
    """The dtypes of the queries of the first encoder layer's attention while ``fn`` runs."""
    return _dtypes_seen(model.transformer.encoder.layers[0].self_attn, fn, inputs=True)


@needs_bf16
def test_bfloat16_encoder_queries_stay_16_bit():
    # The features and positions come out of the input projections in bfloat16; a float32 level
    # embedding added to the positions would make every encoder query (N, S, C) float32, cast
    # back before each linear layer. Training under autocast (SOLVER.AMP) gets the same.
    cfg = tiny_cfg(two_stage=True, refine=True)
    model = _build(cfg)
    image = _image(64, 96, seed=5)
    model.precision = "bfloat16"
    assert _query_dtypes(model, lambda: _detect(model, image)) == [torch.bfloat16]
    model.train()
    inputs = [{"image": image, "instances": _instances(64, 96, [[4, 8, 40, 50]], [1])}]

    def train_step():
        with EventStorage(0), torch.autocast("cpu", dtype=torch.bfloat16):
            sum(model(inputs).values()).backward()

    assert _query_dtypes(model, train_step) == [torch.bfloat16]
    assert model.transformer.level_embed.grad is not None
    # float32 stays float32.
    model.eval()
    model.precision = "float32"
    assert _query_dtypes(model, lambda: _detect(model, image)) == [torch.float32]
