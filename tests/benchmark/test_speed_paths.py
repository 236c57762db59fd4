"""The fast eager paths give what the plain (traced) formulas give, and the benchmarks run."""

import pytest
import torch

from deformable_detr.layers import MultiScaleDeformableAttention
from deformable_detr.layers import fused as fused_module
from deformable_detr.layers import ms_deform_attn as attn_module
from deformable_detr.modeling import position_encoding as pe_module
from deformable_detr.modeling import transformer as transformer_module
from deformable_detr.modeling.heads import build_prediction_heads
from deformable_detr.modeling.position_encoding import PositionEmbeddingSine
from deformable_detr.modeling.transformer import DeformableTransformer


@pytest.fixture
def plain_paths(monkeypatch):
    """Make the modules take the code paths they use under tracing and export."""

    def enable():
        for module in (pe_module, attn_module, transformer_module, fused_module):
            monkeypatch.setattr(module, "is_tracing", lambda: True)

    return enable


def test_position_encoding_gather_path_is_bitwise_equal(plain_paths):
    g = torch.Generator().manual_seed(0)
    # Irregular masks (not just a padded rectangle), several images, odd sizes.
    masks = [torch.rand(3, 7, 11, generator=g) > 0.6, torch.zeros(2, 5, 4, dtype=torch.bool)]
    rect = torch.ones(2, 9, 13, dtype=torch.bool)
    rect[0, :9, :6] = False
    rect[1, :4, :13] = False
    masks.append(rect)
    encoders = [PositionEmbeddingSine(16, normalize=n) for n in (True, False)]
    fast = [pe(m) for pe in encoders for m in masks]
    plain_paths()
    plain = [pe(m) for pe in encoders for m in masks]
    for a, b in zip(fast, plain):
        assert a.shape == b.shape and a.stride() == b.stride()
        assert torch.equal(a, b)


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_attention_fused_locations_match_plain_formula(ref_dim, plain_paths):
    torch.manual_seed(0)
    shapes = [(5, 7), (3, 4)]
    m = MultiScaleDeformableAttention(16, 2, len(shapes), 3)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    spatial_shapes = torch.tensor(shapes)
    starts = torch.tensor([0, shapes[0][0] * shapes[0][1]])
    s = sum(h * w for h, w in shapes)
    query, value = torch.randn(2, 6, 16), torch.randn(2, s, 16)
    ref = torch.rand(2, 6, len(shapes), ref_dim)
    mask = torch.rand(2, s) > 0.8
    fast = m(query, ref, value, spatial_shapes, starts, mask)
    plain_paths()
    plain = m(query, ref, value, spatial_shapes, starts, mask)
    torch.testing.assert_close(fast, plain, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("two_stage", [False, True])
def test_transformer_without_padding_matches_the_masked_path(two_stage, plain_paths):
    torch.manual_seed(0)
    t = DeformableTransformer(
        d_model=32,
        nhead=2,
        num_encoder_layers=1,
        num_decoder_layers=2,
        dim_feedforward=64,
        num_feature_levels=2,
        dec_n_points=2,
        enc_n_points=2,
        two_stage=two_stage,
        two_stage_num_proposals=10,
        with_box_refine=two_stage,
    ).eval()
    class_embed, bbox_embed = build_prediction_heads(32, 5, 3, two_stage, two_stage)
    shapes = [(6, 8), (3, 4)]
    srcs = [torch.randn(2, 32, h, w) for h, w in shapes]
    masks = [torch.zeros(2, h, w, dtype=torch.bool) for h, w in shapes]
    pos = [PositionEmbeddingSine(16)(m) for m in masks]
    query = None if two_stage else torch.randn(7, 64)
    with torch.no_grad():
        fast = t(srcs, masks, pos, query, class_embed, bbox_embed)
        plain_paths()
        plain = t(srcs, masks, pos, query, class_embed, bbox_embed)
    for a, b in zip(fast, plain):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_train_benchmark_measures_a_step():
    from deformable_detr.benchmark.train import CONFIG_DIR, measure, setup_cfg

    opts = ["SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN", "(64, 96)"]
    opts += ["MODEL.DEFORMABLE_DETR.ENC_LAYERS", "1", "MODEL.DEFORMABLE_DETR.DEC_LAYERS", "1"]
    cfg = setup_cfg(f"{CONFIG_DIR}/quickstart.yaml", opts)
    r = measure(cfg, iters=1, precisions=("float32", "bfloat16"))
    for precision in ("float32", "bfloat16"):
        assert len(r["times"][precision]) == 1 and r["median"][precision] > 0
    assert r["peak_mib"] > r["extra_mib"] >= 0


def test_train_benchmark_on_loader_batches_compares_two_models(tiny_dataset, capsys, one_thread):
    from deformable_detr.benchmark.train import CONFIG_DIR, main

    opts = ["SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN", "(64, 96)"]
    opts += ["INPUT.MAX_SIZE_TRAIN", "128", "DATASETS.TRAIN", "('tiny_train',)"]
    opts += ["MODEL.DEFORMABLE_DETR.ENC_LAYERS", "1", "MODEL.DEFORMABLE_DETR.DEC_LAYERS", "1"]
    opts += ["MODEL.DEFORMABLE_DETR.NUM_CLASSES", "2"]
    main(
        ["--config-file", f"{CONFIG_DIR}/quickstart.yaml", "--iters", "2", "--threads", "1"]
        + ["--loader", "--compare", "MODEL.DEFORMABLE_DETR.PADDED_TRAINING_BATCH True"]
        + opts
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if "training step" in line]
    assert len(lines) == 2
    assert all("3 batches of its training loader" in line for line in lines)
    assert "with MODEL.DEFORMABLE_DETR.PADDED_TRAINING_BATCH True" in lines[1]
    with pytest.raises(SystemExit):
        main(["--compare", "MODEL.DEFORMABLE_DETR.PADDED_TRAINING_BATCH"])


def test_model_benchmark_detections_match_hf_on_converted_weights():
    pytest.importorskip("transformers")
    pytest.importorskip("timm")
    from deformable_detr.benchmark.model import check_detections

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = check_detections("r50", height=64, width=96)
    finally:
        torch.set_num_threads(threads)
    assert r["labels_equal"]
    assert r["max_score_diff"] < 1e-4
    assert r["max_box_diff_px"] < 0.01
