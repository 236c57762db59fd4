"""Tests of the deformable transformer: names, init, shapes, padding invariance, gradients, and
agreement with the transformers library's implementation of the same model."""

import math

import pytest
import torch
from torch import nn

from deformable_detr.layers import MultiScaleDeformableAttention
from deformable_detr.modeling.heads import inverse_sigmoid
from deformable_detr.modeling.position_encoding import PositionEmbeddingSine
from deformable_detr.modeling.transformer import DeformableTransformer

D_MODEL = 64
VARIANTS = {
    "plain": dict(two_stage=False, with_box_refine=False),
    "refine": dict(two_stage=False, with_box_refine=True),
    "two_stage": dict(two_stage=True, with_box_refine=True),
}
# (H, W) per level of the padded canvas, and of one smaller image inside it.
CANVAS = [(8, 10), (4, 5), (2, 3), (1, 2)]
SMALL = [(6, 7), (3, 4), (2, 2), (1, 1)]


def _build(variant, levels, dec_layers=2, proposals=8, seed=0, **kwargs):
    torch.manual_seed(seed)
    t = DeformableTransformer(
        d_model=D_MODEL,
        nhead=4,
        num_encoder_layers=1,
        num_decoder_layers=dec_layers,
        dim_feedforward=32,
        num_feature_levels=levels,
        enc_n_points=2,
        dec_n_points=2,
        two_stage_num_proposals=proposals,
        **VARIANTS[variant],
        **kwargs,
    )
    # The heads belong to the meta-architecture; small stand-ins here.
    n = dec_layers + 1
    class_embed = nn.ModuleList([nn.Linear(D_MODEL, 3) for _ in range(n)])
    bbox_embed = nn.ModuleList(
        [
            nn.Sequential(nn.Linear(D_MODEL, D_MODEL), nn.ReLU(), nn.Linear(D_MODEL, 4))
            for _ in range(n)
        ]
    )
    # Break the symmetric init so that every path carries signal.
    with torch.no_grad():
        for p in (
            list(t.parameters()) + list(class_embed.parameters()) + list(bbox_embed.parameters())
        ):
            p.add_(torch.randn_like(p) * 0.1)
    return t.eval(), class_embed.eval(), bbox_embed.eval()


def _inputs(levels, valid_sizes, canvas, seed=1):
    """Random features on the canvas; image b is valid in the top-left valid_sizes[b][lvl]."""
    g = torch.Generator().manual_seed(seed)
    n = len(valid_sizes)
    pe = PositionEmbeddingSine(D_MODEL // 2)
    srcs, masks, pos = [], [], []
    for lvl in range(levels):
        h, w = canvas[lvl]
        srcs.append(torch.randn(n, D_MODEL, h, w, generator=g))
        mask = torch.ones(n, h, w, dtype=torch.bool)
        for b in range(n):
            vh, vw = valid_sizes[b][lvl]
            mask[b, :vh, :vw] = False
        masks.append(mask)
        pos.append(pe(mask))
    return srcs, masks, pos


def _run(t, class_embed, bbox_embed, srcs, masks, pos, query_embed):
    memory = {}
    handle = t.encoder.register_forward_hook(lambda mod, inp, out: memory.setdefault("m", out))
    try:
        out = t(srcs, masks, pos, None if t.two_stage else query_embed, class_embed, bbox_embed)
    finally:
        handle.remove()
    return out, memory["m"]


def _query_embed(num_queries=5, seed=2):
    return torch.randn(num_queries, 2 * D_MODEL, generator=torch.Generator().manual_seed(seed))


def test_state_dict_names_follow_the_official_checkpoint():
    t, _, _ = _build("plain", 4, dec_layers=1)
    keys = set(t.state_dict())
    expected_prefixes = {
        "level_embed",
        "reference_points.weight",
        "reference_points.bias",
        "encoder.layers.0.self_attn.sampling_offsets.weight",
        "encoder.layers.0.self_attn.attention_weights.bias",
        "encoder.layers.0.self_attn.value_proj.weight",
        "encoder.layers.0.self_attn.output_proj.bias",
        "encoder.layers.0.norm1.weight",
        "encoder.layers.0.linear1.weight",
        "encoder.layers.0.linear2.bias",
        "encoder.layers.0.norm2.bias",
        "decoder.layers.0.cross_attn.sampling_offsets.bias",
        "decoder.layers.0.norm1.weight",
        "decoder.layers.0.self_attn.in_proj_weight",
        "decoder.layers.0.self_attn.in_proj_bias",
        "decoder.layers.0.self_attn.out_proj.weight",
        "decoder.layers.0.norm2.weight",
        "decoder.layers.0.linear1.bias",
        "decoder.layers.0.linear2.weight",
        "decoder.layers.0.norm3.bias",
    }
    assert expected_prefixes <= keys
    assert t.state_dict()["decoder.layers.0.self_attn.in_proj_weight"].shape == (
        3 * D_MODEL,
        D_MODEL,
    )
    assert not any(k.startswith(("enc_output", "pos_trans")) for k in keys)
    assert not any("class_embed" in k or "bbox_embed" in k for k in keys)

    t2, _, _ = _build("two_stage", 4, dec_layers=1)
    keys2 = set(t2.state_dict())
    assert {
        "enc_output.weight",
        "enc_output_norm.weight",
        "pos_trans.weight",
        "pos_trans_norm.bias",
    } <= keys2
    assert t2.state_dict()["pos_trans.weight"].shape == (2 * D_MODEL, 2 * D_MODEL)
    assert not any(k.startswith("reference_points") for k in keys2)
    assert not any("class_embed" in k or "bbox_embed" in k for k in keys2)


def test_init_facts():
    torch.manual_seed(0)
    t = DeformableTransformer(
        d_model=D_MODEL, nhead=4, num_encoder_layers=1, num_decoder_layers=1, num_feature_levels=3
    )
    assert t.level_embed.shape == (3, D_MODEL)
    assert torch.count_nonzero(t.reference_points.bias) == 0
    bound = math.sqrt(6.0 / (D_MODEL + 2))
    assert t.reference_points.weight.abs().max() <= bound
    # level_embed is N(0, 1), far wider than any xavier bound here.
    assert t.level_embed.std() > 0.5
    attns = [m for m in t.modules() if isinstance(m, MultiScaleDeformableAttention)]
    assert len(attns) == 2
    for m in attns:
        # The transformer's xavier pass must not survive on the deformable attention.
        assert torch.count_nonzero(m.sampling_offsets.weight) == 0
        assert torch.count_nonzero(m.attention_weights.weight) == 0
        bias = m.sampling_offsets.bias.view(4, 3, 4, 2)
        torch.testing.assert_close(bias[0, :, :, 0], torch.arange(1.0, 5.0).expand(3, 4))
        torch.testing.assert_close(bias[:, :, 3], 4 * bias[:, :, 0])
    lin = t.decoder.layers[0].linear1.weight
    assert lin.abs().max() <= math.sqrt(6.0 / (D_MODEL + 1024))


def test_from_config():
    from detectron2.config import CfgNode as CN

    cfg = CN(
        {
            "MODEL": {
                "DEFORMABLE_DETR": {
                    "HIDDEN_DIM": 32,
                    "NHEADS": 2,
                    "ENC_LAYERS": 1,
                    "DEC_LAYERS": 2,
                    "DIM_FEEDFORWARD": 16,
                    "DROPOUT": 0.0,
                    "NUM_FEATURE_LEVELS": 2,
                    "DEC_N_POINTS": 3,
                    "ENC_N_POINTS": 1,
                    "TWO_STAGE": True,
                    "TWO_STAGE_NUM_PROPOSALS": 11,
                    "WITH_BOX_REFINE": True,
                }
            }
        }
    )
    t = DeformableTransformer(cfg)
    assert (t.d_model, t.num_feature_levels, t.two_stage_num_proposals) == (32, 2, 11)
    assert t.two_stage and t.with_box_refine
    assert len(t.encoder.layers) == 1 and t.decoder.num_layers == 2
    assert t.decoder.layers[0].cross_attn.num_points == 3
    assert t.encoder.layers[0].self_attn.num_points == 1


@pytest.mark.parametrize("levels", [1, 4])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_output_shapes(variant, levels):
    t, ce, be = _build(variant, levels)
    srcs, masks, pos = _inputs(levels, [CANVAS, SMALL], CANVAS)
    (hs, init_ref, inter, boxes, enc_cls, enc_coord), memory = _run(
        t, ce, be, srcs, masks, pos, _query_embed()
    )
    q = 8 if variant == "two_stage" else 5
    s = sum(h * w for h, w in CANVAS[:levels])
    assert hs.shape == (2, 2, q, D_MODEL)
    assert memory.shape == (2, s, D_MODEL)
    ref_dim = 4 if variant == "two_stage" else 2
    assert init_ref.shape == (2, q, ref_dim)
    assert inter.shape == (2, 2, q, 2 if variant == "plain" else 4)
    assert boxes.shape == (2, 2, q, 4)
    for r in (init_ref, inter, boxes):
        assert ((r >= 0) & (r <= 1)).all()
    if variant == "plain":
        # Without refinement every layer keeps the initial references.
        torch.testing.assert_close(inter, init_ref.expand_as(inter), atol=0, rtol=0)
    if variant == "two_stage":
        assert enc_cls.shape == (2, s, 3) and enc_coord.shape == (2, s, 4)
        # Padded tokens carry +inf proposals, so their coordinates are +inf too.
        flat_mask = torch.cat([m.flatten(1) for m in masks], 1)
        assert torch.isinf(enc_coord[flat_mask]).all()
        assert torch.isfinite(enc_coord[~flat_mask]).all()
    else:
        assert enc_cls is None and enc_coord is None
    assert torch.isfinite(hs).all()


def _valid_tokens(canvas, small, levels):
    index = []
    start = 0
    for (h, w), (vh, vw) in zip(canvas[:levels], small[:levels]):
        for y in range(vh):
            index.extend(start + y * w + x for x in range(vw))
        start += h * w
    return torch.tensor(index)


@pytest.mark.parametrize("levels", [1, 4])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_padding_does_not_change_the_outputs(variant, levels):
    """An image alone, and the same image padded on the right/bottom (with garbage, masked) in a
    batch with a larger image, give the same memory at its tokens and the same decoder outputs."""
    t, ce, be = _build(variant, levels)
    query_embed = _query_embed()
    srcs, masks, pos = _inputs(levels, [CANVAS, SMALL], CANVAS)
    # The small image alone: crop its features; its masks are all valid.
    srcs_1 = [s[1:, :, :vh, :vw] for s, (vh, vw) in zip(srcs, SMALL)]
    masks_1 = [m[1:, :vh, :vw] for m, (vh, vw) in zip(masks, SMALL)]
    assert not any(m.any() for m in masks_1)
    pos_1 = [PositionEmbeddingSine(D_MODEL // 2)(m) for m in masks_1]

    with torch.no_grad():
        out_b, mem_b = _run(t, ce, be, srcs, masks, pos, query_embed)
        out_1, mem_1 = _run(t, ce, be, srcs_1, masks_1, pos_1, query_embed)

    tokens = _valid_tokens(CANVAS, SMALL, levels)
    torch.testing.assert_close(mem_b[1, tokens], mem_1[0], atol=1e-5, rtol=1e-5)
    hs_b, init_b, inter_b, boxes_b, cls_b, coord_b = out_b
    hs_1, init_1, inter_1, boxes_1, cls_1, coord_1 = out_1
    torch.testing.assert_close(hs_b[:, 1], hs_1[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(init_b[1], init_1[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inter_b[:, 1], inter_1[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(boxes_b[:, 1], boxes_1[:, 0], atol=1e-5, rtol=1e-5)
    if variant == "two_stage":
        torch.testing.assert_close(cls_b[1, tokens], cls_1[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(coord_b[1, tokens], coord_1[0], atol=1e-5, rtol=1e-5)


class _PreferPadding(nn.Module):
    """Scores tokens by closeness to ``target``: zeroed (padded) memory projects exactly onto the
    output norm's bias, so padded tokens would win the top-k unless they are masked out."""

    def __init__(self, target):
        super().__init__()
        self.target = target

    def forward(self, x):
        return -(x - self.target).norm(dim=-1, keepdim=True).expand(*x.shape[:-1], 3)


def test_two_stage_never_selects_padding():
    t, ce, be = _build("two_stage", 4, proposals=8)
    srcs, masks, pos = _inputs(4, [CANVAS, SMALL], CANVAS)
    with torch.no_grad():
        t.enc_output.bias.zero_()
    ce[-1] = _PreferPadding(t.enc_output_norm.bias.detach())
    num_valid = sum(vh * vw for vh, vw in SMALL)
    num_padded = sum(h * w for h, w in CANVAS) - num_valid
    assert t.two_stage_num_proposals <= min(num_valid, num_padded)
    with torch.no_grad():
        _, init_ref, _, _, enc_cls, _ = t(srcs, masks, pos, None, ce, be)
        flat_mask = torch.cat([m.flatten(1) for m in masks], 1)
        # The setup really favours padding: the best raw scores of image 1 are padded tokens.
        best = enc_cls[1, :, 0].topk(t.two_stage_num_proposals).indices
        assert flat_mask[1, best].all()
    # Padded proposals are +inf, i.e. references of exactly 1.
    assert (init_ref[1] < 1).all()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradients_reach_every_parameter(variant):
    t, ce, be = _build(variant, 2, dec_layers=2)
    t.train()
    srcs, masks, pos = _inputs(2, [CANVAS, SMALL], CANVAS)
    query_embed = _query_embed().requires_grad_()
    srcs = [s.requires_grad_() for s in srcs]
    hs, init_ref, inter, boxes, enc_cls, enc_coord = t(
        srcs, masks, pos, None if t.two_stage else query_embed, ce, be
    )
    loss = hs.square().sum() + init_ref.sum() + boxes.sum()
    if variant == "two_stage":
        valid = ~torch.cat([m.flatten(1) for m in masks], 1)
        loss = loss + enc_cls.sum() + enc_coord[valid].sum()
    loss.backward()
    for name, p in t.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(s.grad is not None for s in srcs)
    # Every layer's box head is trained by that layer's boxes.
    assert all(p.grad is not None for p in be[: t.decoder.num_layers].parameters())
    if variant != "plain":
        # References are detached between layers.
        assert not inter.requires_grad
    if variant == "two_stage":
        assert not init_ref.requires_grad


def test_refinement_uses_the_given_heads_per_layer():
    t, ce, be = _build("refine", 2, dec_layers=2)
    srcs, masks, pos = _inputs(2, [CANVAS], CANVAS)
    query_embed = _query_embed()
    with torch.no_grad():
        hs, init_ref, inter, boxes, _, _ = t(srcs, masks, pos, query_embed, ce, be)
        # Layer 0 turns the 2-d points into boxes; layer 1 refines those boxes.
        delta0 = be[0](hs[0])
        expected0 = torch.cat([delta0[..., :2] + inverse_sigmoid(init_ref), delta0[..., 2:]], -1)
        torch.testing.assert_close(inter[0], expected0.sigmoid())
        expected1 = (be[1](hs[1]) + inverse_sigmoid(inter[0])).sigmoid()
        torch.testing.assert_close(inter[1], expected1)
    # Each layer's predicted boxes are the references of the next: the heads ran once.
    torch.testing.assert_close(boxes, inter, atol=0, rtol=0)


def test_boxes_without_refinement_are_around_the_initial_references():
    t, ce, be = _build("plain", 2, dec_layers=2)
    srcs, masks, pos = _inputs(2, [CANVAS], CANVAS)
    with torch.no_grad():
        hs, init_ref, inter, boxes, _, _ = t(srcs, masks, pos, _query_embed(), ce, be)
        torch.testing.assert_close(inter, init_ref.expand_as(inter), atol=0, rtol=0)
        for lid in range(2):
            delta = be[lid](hs[lid])
            expected = torch.cat([delta[..., :2] + inverse_sigmoid(init_ref), delta[..., 2:]], -1)
            torch.testing.assert_close(boxes[lid], expected.sigmoid())
        # The transformer alone, without heads, predicts no boxes.
        assert t(srcs, masks, pos, _query_embed())[3] is None


def test_inverse_sigmoid():
    x = torch.tensor([-3.0, 0.0, 0.2, 0.5, 0.9, 1.0, 2.0])
    y = inverse_sigmoid(x)
    assert y[0] == y[1] == pytest.approx(math.log(1e-5))
    assert y[-1] == y[-2] == pytest.approx(-math.log(1e-5))
    z = torch.linspace(-5, 5, 11)
    torch.testing.assert_close(inverse_sigmoid(z.sigmoid()), z, atol=1e-4, rtol=1e-4)


def test_bad_arguments_raise_clear_errors():
    # Tensors are checked once, where they enter the attention op (tests/layers).
    with pytest.raises(ValueError, match="divisible"):
        DeformableTransformer(d_model=30, nhead=4)
    with pytest.raises(ValueError, match="activation"):
        DeformableTransformer(d_model=32, nhead=4, activation="tanh")
    t, _, _ = _build("refine", 2)
    srcs, masks, pos = _inputs(2, [CANVAS], CANVAS)
    with pytest.raises(ValueError, match="refinement needs bbox_embed"):
        t(srcs, masks, pos, _query_embed())


def _to_hf_names(state_dict):
    """Our (official) names -> transformers 5.x DeformableDetrModel names."""
    enc = {"norm1": "self_attn_layer_norm", "linear1": "mlp.fc1", "linear2": "mlp.fc2"}
    enc["norm2"] = "final_layer_norm"
    dec = {"norm2": "self_attn_layer_norm", "cross_attn": "encoder_attn", "linear1": "mlp.fc1"}
    dec.update(
        {"norm1": "encoder_attn_layer_norm", "linear2": "mlp.fc2", "norm3": "final_layer_norm"}
    )
    dec["self_attn.out_proj"] = "self_attn.o_proj"
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] in ("encoder", "decoder") and parts[1] == "layers":
            head, rest = ".".join(parts[:3]), ".".join(parts[3:])
            if rest.startswith("self_attn.in_proj_") and parts[0] == "decoder":
                kind = rest.rsplit("_", 1)[1]
                for name, chunk in zip("qkv", value.chunk(3, 0)):
                    out[f"{head}.self_attn.{name}_proj.{kind}"] = chunk
                continue
            table = enc if parts[0] == "encoder" else dec
            for ours, theirs in table.items():
                if rest.startswith(ours + "."):
                    rest = theirs + rest[len(ours) :]
                    break
            key = f"{head}.{rest}"
        out[key] = value
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_transformers_implementation(variant):
    """Same weights and features in the transformers library's DeformableDetrModel (whose
    backbone and input projections are bypassed) give the same outputs."""
    transformers = pytest.importorskip("transformers")
    levels, sizes = 3, [CANVAS, SMALL, [(8, 4), (4, 2), (2, 1), (1, 1)]]
    if variant == "two_stage":
        # The library may pick padded proposals; compare on an unpadded batch.
        sizes = [CANVAS, CANVAS]
    t, ce, be = _build(variant, levels)
    query_embed = _query_embed()
    srcs, masks, pos = _inputs(levels, sizes, CANVAS)
    with torch.no_grad():
        out, memory = _run(t, ce, be, srcs, masks, pos, query_embed)

    class Features(nn.Module):
        def forward(self, pixel_values, pixel_mask):
            return [(s, ~m) for s, m in zip(srcs, masks)]  # the library's masks are True=valid

    backbone = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8] * 4, depths=[1] * 4, out_features=["stage4"]
    )
    config = transformers.DeformableDetrConfig(
        use_timm_backbone=False,
        backbone_config=backbone,
        use_pretrained_backbone=False,
        d_model=D_MODEL,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_feature_levels=levels,
        encoder_n_points=2,
        decoder_n_points=2,
        num_queries=query_embed.shape[0],
        two_stage=t.two_stage,
        with_box_refine=t.with_box_refine,
        two_stage_num_proposals=t.two_stage_num_proposals,
    )
    hf = transformers.DeformableDetrModel(config).eval()
    hf.backbone = Features()
    hf.input_proj = nn.ModuleList([nn.Identity() for _ in range(levels)])
    state = _to_hf_names(t.state_dict())
    if not t.two_stage:
        state["query_position_embeddings.weight"] = query_embed
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected
    assert all(k.startswith(("backbone.", "input_proj.")) for k in missing), missing
    if t.with_box_refine or t.two_stage:
        hf.decoder.bbox_embed = be
    if t.two_stage:
        hf.decoder.class_embed = ce
    with torch.no_grad():
        ref = hf(pixel_values=torch.zeros(len(sizes), 3, 16, 16))

    hs, init_ref, inter, _, enc_cls, enc_coord = out
    close = dict(atol=1e-5, rtol=1e-5)
    valid = ~torch.cat([m.flatten(1) for m in masks], 1)
    torch.testing.assert_close(memory[valid], ref.encoder_last_hidden_state[valid], **close)
    torch.testing.assert_close(hs, ref.intermediate_hidden_states.transpose(0, 1), **close)
    torch.testing.assert_close(init_ref, ref.init_reference_points, **close)
    torch.testing.assert_close(inter, ref.intermediate_reference_points.transpose(0, 1), **close)
    if t.two_stage:
        torch.testing.assert_close(enc_cls, ref.enc_outputs_class, **close)
        torch.testing.assert_close(enc_coord, ref.enc_outputs_coord_logits, **close)


def _autocast_run(device, dtype, variant):
    t, ce, be = _build(variant, 2)
    t, ce, be = t.to(device), ce.to(device), be.to(device)
    srcs, masks, pos = _inputs(2, [CANVAS, SMALL], CANVAS)
    srcs, masks, pos = ([x.to(device) for x in xs] for xs in (srcs, masks, pos))
    query_embed = None if t.two_stage else _query_embed().to(device)
    with torch.no_grad():
        expected = t(srcs, masks, pos, query_embed, ce, be)
        with torch.autocast(device, dtype=dtype):
            out = t(srcs, masks, pos, query_embed, ce, be)
    hs, init_ref, inter, boxes, _, _ = out
    assert torch.isfinite(hs).all()
    # References stay in float32: they feed inverse_sigmoid and the sampling locations.
    assert init_ref.dtype == inter.dtype == boxes.dtype == torch.float32
    if not t.two_stage:  # low precision may reorder the two-stage top-k
        torch.testing.assert_close(hs.float(), expected[0], atol=0.1, rtol=0.05)


@pytest.mark.parametrize("variant", ["refine", "two_stage"])
def test_runs_under_cpu_autocast(variant):
    _autocast_run("cpu", torch.bfloat16, variant)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_under_cuda_autocast_and_matches_cpu():
    _autocast_run("cuda", torch.float16, "refine")
    _autocast_run("cuda", torch.float16, "two_stage")
    t, ce, be = _build("refine", 2)
    srcs, masks, pos = _inputs(2, [CANVAS, SMALL], CANVAS)
    with torch.no_grad():
        out = t(srcs, masks, pos, _query_embed(), ce, be)
        t, ce, be = t.cuda(), ce.cuda(), be.cuda()
        cuda_in = ([x.cuda() for x in xs] for xs in (srcs, masks, pos))
        out_cuda = t(*cuda_in, _query_embed().cuda(), ce, be)
    for a, b in zip(out[:4], out_cuda[:4]):
        torch.testing.assert_close(b.cpu(), a, atol=1e-4, rtol=1e-4)


def _graph_nodes(tensor):
    """Names of every autograd node that ``tensor`` was computed through."""
    seen, stack, names = set(), [tensor.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names


def test_training_graph_has_no_in_place_copies_and_inference_matches():
    # In place on a linear layer's 3-d output (a view) is replayed on its base in backward
    # (CopySlices): the layers compute out of place when a graph is recorded, and in place,
    # with the same values, when none is.
    # Eval mode (no dropout), so that only the recorded graph differs between the two passes.
    t, ce, be = _build("two_stage", 2, dec_layers=2)
    srcs, masks, pos = _inputs(2, [CANVAS, SMALL], CANVAS)
    srcs = [s.requires_grad_() for s in srcs]
    hs = t(srcs, masks, pos, None, ce, be)[0]
    nodes = _graph_nodes(hs)
    assert "AddmmBackward0" in nodes and "ReluBackward0" in nodes
    assert "CopySlices" not in nodes and "AsStridedBackward0" not in nodes, sorted(set(nodes))
    with torch.no_grad():
        hs_inference = t(srcs, masks, pos, None, ce, be)[0]
    torch.testing.assert_close(hs_inference, hs.detach(), rtol=0, atol=0)
