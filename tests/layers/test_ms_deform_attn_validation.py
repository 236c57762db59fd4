"""Bad inputs to the multi-scale deformable attention op raise clear errors, on every path."""

import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deformable_detr.layers import ms_deform_attn_func as func
from deformable_detr.layers import ms_deform_attn_reference, multi_scale_deformable_attention

HAS_COMPILED = func._C is not None
requires_compiled = pytest.mark.skipif(
    not HAS_COMPILED, reason=f"deformable_detr._C is not built ({func._COMPILED_IMPORT_ERROR})"
)


def good_inputs(levels=((4, 5), (2, 3)), batch=2, queries=3, heads=2, dim=4, points=2):
    shapes = torch.tensor(levels, dtype=torch.int64)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    value = torch.randn(batch, int(sizes.sum()), heads, dim)
    loc = torch.rand(batch, queries, heads, len(levels), points, 2)
    weights = torch.rand(batch, queries, heads, len(levels), points)
    return {
        "value": value,
        "spatial_shapes": shapes,
        "level_start_index": starts,
        "sampling_locations": loc,
        "attention_weights": weights,
    }


def call(fn, args):
    return fn(
        args["value"],
        args["spatial_shapes"],
        args["level_start_index"],
        args["sampling_locations"],
        args["attention_weights"],
    )


def call_op(args):
    return torch.ops.deformable_detr.ms_deform_attn_forward(
        args["value"],
        args["spatial_shapes"],
        args["level_start_index"],
        args["sampling_locations"],
        args["attention_weights"],
    )


ENTRY_POINTS = {
    "entry": multi_scale_deformable_attention,
    "reference": ms_deform_attn_reference,
}


def _with(**changes):
    def make():
        args = good_inputs()
        for key, fn in changes.items():
            args[key] = fn(args[key])
        return args

    return make


# name: (input maker, argument the message must name)
BAD_METADATA = {
    "value_rank": (_with(value=lambda v: v[0]), "value"),
    "shapes_rank": (_with(spatial_shapes=lambda s: s.flatten()), "spatial_shapes"),
    "shapes_cols": (_with(spatial_shapes=lambda s: torch.cat([s, s[:, :1]], 1)), "spatial_shapes"),
    "start_len": (_with(level_start_index=lambda s: s[:1]), "level_start_index"),
    "loc_rank": (_with(sampling_locations=lambda t: t[..., 0]), "sampling_locations"),
    "loc_batch": (_with(sampling_locations=lambda t: t[:1]), "sampling_locations"),
    "loc_heads": (_with(sampling_locations=lambda t: t[:, :, :1]), "sampling_locations"),
    "loc_levels": (_with(sampling_locations=lambda t: t[:, :, :, :1]), "sampling_locations"),
    "loc_last": (
        _with(sampling_locations=lambda t: t.repeat(1, 1, 1, 1, 1, 2)),
        "sampling_locations",
    ),
    "weights_shape": (_with(attention_weights=lambda t: t[..., :1]), "attention_weights"),
    "weights_rank": (_with(attention_weights=lambda t: t.flatten(3)), "attention_weights"),
    "shapes_int32": (_with(spatial_shapes=lambda s: s.int()), "spatial_shapes"),
    "shapes_float": (_with(spatial_shapes=lambda s: s.float()), "spatial_shapes"),
    "start_int32": (_with(level_start_index=lambda s: s.int()), "level_start_index"),
    "value_int": (_with(value=lambda v: v.long()), "value"),
    "mixed_float64": (_with(value=lambda v: v.double()), "sampling_locations"),
    "loc_weights_dtype": (_with(attention_weights=lambda w: w.double()), "attention_weights"),
    "not_a_tensor": (_with(spatial_shapes=lambda s: s.tolist()), "spatial_shapes"),
}

BAD_VALUES = {
    "start_inconsistent": (_with(level_start_index=lambda s: s + 1), "level_start_index"),
    "start_swapped": (_with(level_start_index=lambda s: s.flip(0)), "level_start_index"),
    "rows_mismatch": (_with(value=lambda v: v[:, :-1]), "sum(H * W)"),
    "rows_extra": (_with(value=lambda v: torch.cat([v, v[:, :2]], 1)), "sum(H * W)"),
    "zero_height": (
        _with(spatial_shapes=lambda s: torch.tensor([[0, 5], [2, 3]]), value=lambda v: v[:, 20:]),
        "spatial_shapes",
    ),
    "negative_size": (
        _with(spatial_shapes=lambda s: torch.tensor([[-4, -5], [2, 3]])),
        "spatial_shapes",
    ),
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("case", sorted(BAD_METADATA))
def test_bad_metadata_raises_value_error(entry, case):
    make, culprit = BAD_METADATA[case]
    with pytest.raises(ValueError, match=re.escape(culprit)):
        call(ENTRY_POINTS[entry], make())


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_level_values_raise(entry, case):
    make, culprit = BAD_VALUES[case]
    if entry == "entry" and not HAS_COMPILED:
        pytest.skip("the entry point uses the reference path, tested separately")
    # The compiled path checks these inside the kernel (RuntimeError), the reference path in
    # Python (ValueError); both name the culprit.
    with pytest.raises((ValueError, RuntimeError), match=re.escape(culprit)):
        call(ENTRY_POINTS[entry], make())


@requires_compiled
@pytest.mark.parametrize("case", sorted(set(BAD_METADATA) - {"not_a_tensor"} | set(BAD_VALUES)))
def test_operator_checks_inputs_itself(case):
    # Direct callers of torch.ops.deformable_detr bypass the Python checks: the C++ ones still hold.
    make, culprit = {**BAD_METADATA, **BAD_VALUES}[case]
    with pytest.raises(RuntimeError, match=re.escape(culprit)):
        call_op(make())


@requires_compiled
def test_backward_operator_checks_grad_output():
    args = good_inputs()
    out = call_op(args)
    bwd = torch.ops.deformable_detr.ms_deform_attn_backward
    rest = [args[k] for k in ("value", "spatial_shapes", "level_start_index")]
    rest += [args["sampling_locations"], args["attention_weights"]]
    with pytest.raises(RuntimeError, match="grad_output"):
        bwd(out[:, :1], *rest)
    with pytest.raises(RuntimeError, match="grad_output"):
        bwd(out.double(), *rest)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_mixed_devices_raise(entry):
    args = good_inputs()
    args["value"] = args["value"].cuda()
    with pytest.raises(ValueError, match="device"):
        call(ENTRY_POINTS[entry], args)


@st.composite
def perturbed_inputs(draw):
    n, m, d, lq, p = (draw(st.integers(1, 3)) for _ in range(5))
    num_levels = draw(st.integers(1, 3))
    levels = [(draw(st.integers(1, 4)), draw(st.integers(1, 4))) for _ in range(num_levels)]
    s = sum(h * w for h, w in levels)
    shapes = torch.tensor(levels, dtype=torch.int64)
    starts = torch.tensor([sum(h * w for h, w in levels[:i]) for i in range(num_levels)])
    what = draw(st.sampled_from(["value", "loc", "weights", "shapes", "starts", "values", "dtype"]))
    v_shape = [n, s, m, d]
    loc_shape = [n, lq, m, num_levels, p, 2]
    w_shape = [n, lq, m, num_levels, p]
    if what == "value":
        v_shape = draw(st.lists(st.integers(0, 5), min_size=1, max_size=6))
    elif what == "loc":
        loc_shape = draw(st.lists(st.integers(0, 5), min_size=1, max_size=7))
    elif what == "weights":
        w_shape = draw(st.lists(st.integers(0, 5), min_size=1, max_size=6))
    elif what == "shapes":
        rows = draw(st.integers(0, 4))
        shapes = torch.tensor(
            draw(st.lists(st.integers(-3, 6), min_size=rows * 2, max_size=rows * 2))
        )
        shapes = shapes.view(rows, 2) if draw(st.booleans()) else shapes
    elif what == "starts":
        starts = torch.tensor(draw(st.lists(st.integers(-5, 40), min_size=0, max_size=4)))
    elif what == "values":
        if draw(st.booleans()):
            starts = starts + draw(st.sampled_from([-1, 1, 7]))
        else:
            v_shape[1] = draw(st.integers(0, s + 5).filter(lambda x: x != s))
    value = torch.randn(v_shape)
    loc = torch.rand(loc_shape) * 1.4 - 0.2
    weights = torch.rand(w_shape)
    if what == "dtype":
        target = draw(st.sampled_from(["value", "loc", "weights", "shapes", "starts"]))
        dtype = draw(st.sampled_from([torch.float64, torch.int32, torch.int64, torch.float16]))
        if target == "value":
            value = value.to(dtype)
        elif target == "loc":
            loc = loc.to(dtype)
        elif target == "weights":
            weights = weights.to(dtype)
        elif target == "shapes":
            shapes = shapes.to(dtype)
        else:
            starts = starts.to(dtype)
    return value, shapes, starts, loc, weights


def _is_valid(value, shapes, starts, loc, weights):
    """Whether the inputs satisfy the documented contract (independent of the implementations)."""
    if value.dim() != 4 or shapes.dim() != 2 or shapes.shape[1] != 2 or shapes.shape[0] < 1:
        return False
    num_levels = shapes.shape[0]
    n, s, m, _ = value.shape
    if starts.dim() != 1 or starts.shape[0] != num_levels:
        return False
    if loc.dim() != 6 or tuple(loc.shape[i] for i in (0, 2, 3, 5)) != (n, m, num_levels, 2):
        return False
    if weights.shape != loc.shape[:5]:
        return False
    if shapes.dtype != torch.int64 or starts.dtype != torch.int64:
        return False
    if not value.dtype.is_floating_point or loc.dtype != weights.dtype:
        return False
    if loc.dtype != value.dtype and not (
        value.dtype in (torch.float16, torch.bfloat16) and loc.dtype == torch.float32
    ):
        return False
    sizes = shapes.tolist()
    if any(h <= 0 or w <= 0 for h, w in sizes):
        return False
    expected = [sum(h * w for h, w in sizes[:i]) for i in range(num_levels)]
    return starts.tolist() == expected and sum(h * w for h, w in sizes) == s


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
@given(perturbed_inputs())
def test_fuzzed_inputs_raise_cleanly_or_agree(inputs):
    valid = _is_valid(*inputs)
    for name, fn in ENTRY_POINTS.items():
        if valid:
            out = fn(*inputs)
            value, _, _, loc, _ = inputs
            assert out.shape == (value.shape[0], loc.shape[1], value.shape[2] * value.shape[3])
        else:
            with pytest.raises((ValueError, RuntimeError)):
                fn(*inputs)
    if HAS_COMPILED:
        # The operator itself, without the Python checks in front of it.
        if valid:
            torch.ops.deformable_detr.ms_deform_attn_forward(*inputs)
        else:
            with pytest.raises(RuntimeError):
                torch.ops.deformable_detr.ms_deform_attn_forward(*inputs)
