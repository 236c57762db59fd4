"""Tests of the sampling points in picture pixels and of the query index of every detection."""

import helpers
import pytest
import torch
from detectron2.modeling import build_model
from torchvision.ops import box_convert

from deformable_detr.layers import record_sampling
from deformable_detr.modeling.sampling_points import (
    detection_sampling,
    last_cross_attention,
    record_valid_ratios,
    to_picture_pixels,
)
from deformable_detr.modeling.transformer import DeformableTransformer

VARIANTS = {
    "plain": [],
    "refine": ["MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE", "True"],
    "two_stage": [
        "MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE",
        "True",
        "MODEL.DEFORMABLE_DETR.TWO_STAGE",
        "True",
        "MODEL.DEFORMABLE_DETR.TWO_STAGE_NUM_PROPOSALS",
        "10",
    ],
}
# Two pictures of different sizes: the second is padded in the batch. Output sizes as the
# "height" / "width" inputs: the first as seen, the second reported at another scale.
SIZES = [(64, 72), (40, 56)]
OUTPUT_SIZES = [(64, 72), (100, 84)]


def _model(variant):
    torch.manual_seed(0)
    return build_model(helpers.tiny_cfg(*VARIANTS[variant])).eval()


def _inputs():
    g = torch.Generator().manual_seed(3)
    return [
        {"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)}
        for h, w in SIZES
    ]


def _xy(x, y):
    return torch.tensor([x, y], dtype=torch.float32)


def test_pixels_of_an_unpadded_level():
    # A 48x64 image at stride 8: a 6x8 map, every cell valid and 8 pixels wide.
    ratio = torch.ones(2)
    for i, j in [(0, 0), (3, 2), (7, 5)]:
        centre = _xy((i + 0.5) / 8, (j + 0.5) / 6)
        torch.testing.assert_close(
            to_picture_pixels(centre, ratio, (48, 64)), _xy(8 * i + 4, 8 * j + 4)
        )
    assert torch.equal(to_picture_pixels(_xy(0, 0), ratio, (48, 64)), _xy(0, 0))
    assert torch.equal(to_picture_pixels(_xy(1, 1), ratio, (48, 64)), _xy(64, 48))


def test_pixels_of_a_padded_level():
    # A 24x48 image whose level covers 3x6 cells of a 6x8 padded map: valid ratios (6/8, 3/6),
    # every valid cell 8 pixels wide.
    ratio = _xy(6 / 8, 3 / 6)
    for i, j in [(0, 0), (5, 2), (2, 1)]:
        centre = _xy((i + 0.5) / 8, (j + 0.5) / 6)
        torch.testing.assert_close(
            to_picture_pixels(centre, ratio, (24, 48)), _xy(8 * i + 4, 8 * j + 4)
        )
    # The valid region's far edge is the image's.
    torch.testing.assert_close(to_picture_pixels(ratio, ratio, (24, 48)), _xy(48, 24))
    # Reported at another size, as detector_postprocess scales the boxes.
    torch.testing.assert_close(
        to_picture_pixels(ratio, ratio, (24, 48), output_size=(72, 96)), _xy(96, 72)
    )
    torch.testing.assert_close(
        to_picture_pixels(_xy(1 / 16, 1 / 12), ratio, (24, 48), output_size=(72, 96)),
        _xy(8, 12),
    )
    # Half precision locations come out in float32, float64 ones stay float64.
    half = to_picture_pixels(ratio.to(torch.bfloat16), ratio, (24, 48))
    assert half.dtype == torch.float32
    assert to_picture_pixels(ratio.double(), ratio, (24, 48)).dtype == torch.float64


def test_batched_pixels_broadcast_per_level():
    # (M, L, P, 2) locations with one ratio per level, as detection_sampling maps them.
    ratios = torch.tensor([[1.0, 1.0], [0.5, 0.25]])
    points = torch.tensor([[0.5, 0.5], [0.25, 0.125]]).view(1, 2, 1, 2).expand(3, 2, 4, 2)
    pixels = to_picture_pixels(points, ratios[None, :, None], (40, 80))
    assert pixels.shape == (3, 2, 4, 2)
    torch.testing.assert_close(pixels[:, 0], torch.tensor([40.0, 20.0]).expand(3, 4, 2))
    torch.testing.assert_close(pixels[:, 1], torch.tensor([40.0, 20.0]).expand(3, 4, 2))


def test_record_valid_ratios_are_the_transformers(monkeypatch):
    model = _model("plain")
    computed = []
    real = DeformableTransformer.valid_ratios

    def spy(shapes, sizes):
        computed.append(real(shapes, sizes))
        return computed[-1]

    monkeypatch.setattr(DeformableTransformer, "valid_ratios", staticmethod(spy))
    with torch.no_grad(), record_sampling(last_cross_attention(model)) as record:
        model.forward_raw(_inputs())
    assert record.padding_mask is not None
    ratios = record_valid_ratios(record)
    assert torch.equal(ratios, computed[-1])
    assert (ratios[1] < 1).any() and torch.equal(ratios[0], torch.ones_like(ratios[0]))

    with torch.no_grad(), record_sampling(last_cross_attention(model)) as record:
        model.forward_raw(_inputs()[1:])
    assert record.padding_mask is None
    assert torch.equal(record_valid_ratios(record), computed[-1])


def _last_layer_references(model, raw):
    """The references of the last decoder layer in the image's normalised frame, from outside
    the attention module."""
    if model.with_box_refine:
        # With box refinement the boxes of the previous layer.
        return raw["aux_outputs"][-1]["pred_boxes"]
    query_pos = model.query_embed.weight[:, : model.transformer.d_model]
    return model.transformer.reference_points(query_pos).sigmoid().expand(len(SIZES), -1, -1)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_references_land_on_the_models_own_points(variant):
    model = _model(variant)
    attn = last_cross_attention(model)
    assert attn is model.transformer.decoder.layers[-1].cross_attn
    with torch.no_grad(), record_sampling(attn) as record:
        raw, images = model.forward_raw(_inputs())
    assert record.calls == 1
    expected = _last_layer_references(model, raw)
    assert record.reference_points.shape[-1] == expected.shape[-1]
    for image, (seen, out) in enumerate(zip(images.image_sizes, OUTPUT_SIZES)):
        assert tuple(seen) == SIZES[image]
        scale = torch.tensor([out[1], out[0]], dtype=torch.float32)
        for query in range(expected.shape[1]):
            got = detection_sampling(record, query, tuple(seen), out, image=image)
            ref = expected[image, query]
            torch.testing.assert_close(got["reference"], ref[:2] * scale, rtol=0, atol=1e-3)
            if ref.shape[-1] == 4:
                box = box_convert(ref, "cxcywh", "xyxy") * scale.repeat(2)
                torch.testing.assert_close(got["reference_box"], box, rtol=0, atol=1e-3)
            else:
                assert got["reference_box"] is None
            assert got["locations"].shape == (2, 4, 2, 2)
            assert torch.equal(got["weights"], record.attention_weights[image, query])


def test_locations_are_the_recorded_ones_in_pixels():
    model = _model("refine")
    with torch.no_grad(), record_sampling(last_cross_attention(model)) as record:
        _, images = model.forward_raw(_inputs())
    ratios = record_valid_ratios(record)
    got = detection_sampling(record, 4, SIZES[1], OUTPUT_SIZES[1], image=1)["locations"]
    h, w = OUTPUT_SIZES[1]
    for level in range(4):
        normalised = record.sampling_locations[1, 4, :, level] / ratios[1, level]
        torch.testing.assert_close(
            got[:, level], normalised * torch.tensor([w, h]), rtol=1e-6, atol=1e-4
        )


def test_an_empty_record_is_refused():
    model = _model("plain")
    with record_sampling(last_cross_attention(model)) as record:
        pass
    with pytest.raises(ValueError, match="empty"):
        detection_sampling(record, 0, (10, 10))


@pytest.mark.parametrize("variant", ["plain", "two_stage"])
def test_every_detection_names_its_query(variant):
    model = _model(variant)
    inputs = _inputs()
    for x, (h, w) in zip(inputs, OUTPUT_SIZES):
        x.update(height=h, width=w)
    with torch.no_grad():
        raw, _ = model.forward_raw(inputs)
        results = model(inputs)
    for image, (result, (h, w)) in enumerate(zip(results, OUTPUT_SIZES)):
        inst = result["instances"]
        assert len(inst) > 0 and inst.pred_query.dtype == torch.int64
        logits = raw["pred_logits"][image, inst.pred_query, inst.pred_classes]
        torch.testing.assert_close(inst.scores, logits.sigmoid(), rtol=0, atol=1e-6)
        boxes = box_convert(raw["pred_boxes"][image, inst.pred_query], "cxcywh", "xyxy")
        boxes = boxes * torch.tensor([w, h, w, h]).float()
        boxes = boxes.clamp(min=0).minimum(torch.tensor([w, h, w, h]).float())
        torch.testing.assert_close(inst.pred_boxes.tensor, boxes, rtol=0, atol=1e-3)
