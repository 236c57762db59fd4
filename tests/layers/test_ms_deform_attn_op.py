"""Numerical tests of the compiled multi-scale deformable attention op against the PyTorch path."""

import warnings

import pytest
import torch

from deformable_detr.layers import ms_deform_attn_func as func
from deformable_detr.layers import ms_deform_attn_reference, multi_scale_deformable_attention

requires_compiled = pytest.mark.skipif(
    func._C is None, reason=f"deformable_detr._C is not built ({func._COMPILED_IMPORT_ERROR})"
)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


def make_inputs(
    levels,
    batch=2,
    queries=5,
    heads=2,
    dim=4,
    points=3,
    dtype=torch.float32,
    low=-0.2,
    high=1.2,
    seed=0,
):
    gen = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels, dtype=torch.int64).view(-1, 2)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    num_levels = shapes.shape[0]
    value = torch.randn(batch, int(sizes.sum()), heads, dim, generator=gen, dtype=dtype)
    loc = torch.rand(batch, queries, heads, num_levels, points, 2, generator=gen, dtype=dtype)
    loc = loc * (high - low) + low
    weights = torch.rand(batch, queries, heads, num_levels, points, generator=gen, dtype=dtype)
    return value, shapes, starts, loc, weights


def forward_and_grads(fn, value, shapes, starts, loc, weights, grad_out=None):
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, weights)]
    out = fn(leaves[0], shapes, starts, leaves[1], leaves[2])
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]
    return out, grads


CASES = {
    # name: (levels, kwargs)
    "multi_level": ([(5, 7), (3, 4), (2, 2)], {}),
    "tiny_levels": ([(1, 1), (1, 6), (4, 1)], {}),
    "one_level": ([(6, 5)], {}),
    "one_query": ([(4, 6), (2, 3)], {"queries": 1}),
    "zero_queries": ([(4, 6), (2, 3)], {"queries": 0}),
    "batch_0": ([(4, 6), (2, 3)], {"batch": 0}),
    "batch_3": ([(4, 6), (2, 3)], {"batch": 3}),
    "dim_32": ([(5, 7), (3, 4)], {"dim": 32, "heads": 3}),
    "dim_32_one_head": ([(5, 7), (3, 4)], {"dim": 32, "heads": 1, "queries": 60}),
    # More samples than rows: the kernels work on dense copies of each head.
    "dense_heads": ([(4, 5), (2, 3)], {"queries": 40, "heads": 3, "dim": 5}),
    "dense_heads_dim_32": ([(4, 5), (2, 3)], {"queries": 40, "heads": 2, "dim": 32}),
    "far_outside": ([(4, 6), (2, 3)], {"low": -3.0, "high": 4.0}),
    "inside": ([(4, 6), (2, 3)], {"low": 0.0, "high": 1.0}),
}


@requires_compiled
@pytest.mark.parametrize("name", sorted(CASES))
def test_compiled_matches_reference_fp32(name):
    levels, kwargs = CASES[name]
    inputs = make_inputs(levels, seed=len(name), **kwargs)
    out, grads = forward_and_grads(multi_scale_deformable_attention, *inputs)
    ref_out, ref_grads = forward_and_grads(ms_deform_attn_reference, *inputs)
    assert out.shape == ref_out.shape
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for got, want, what in zip(grads, ref_grads, ("value", "locations", "weights")):
        # Location gradients are scaled by the level size (pixels per unit), hence the rtol.
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(levels)[1], msg=what)


@requires_compiled
def test_compiled_matches_reference_fp64():
    inputs = make_inputs([(5, 7), (3, 4), (1, 1)], dim=32, dtype=torch.float64)
    out, grads = forward_and_grads(multi_scale_deformable_attention, *inputs)
    ref_out, ref_grads = forward_and_grads(ms_deform_attn_reference, *inputs)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@requires_compiled
def test_non_contiguous_inputs():
    value, shapes, starts, loc, weights = make_inputs([(4, 6), (2, 3)], batch=2, queries=6)
    # Same values, strided memory.
    value_nc = value.transpose(0, 1).contiguous().transpose(0, 1)
    loc_nc = loc.permute(5, 0, 1, 2, 3, 4).contiguous().permute(1, 2, 3, 4, 5, 0)
    weights_nc = weights.transpose(1, 2).contiguous().transpose(1, 2)
    shapes_nc = shapes.t().contiguous().t()
    assert not (value_nc.is_contiguous() or loc_nc.is_contiguous() or shapes_nc.is_contiguous())
    out, grads = forward_and_grads(
        multi_scale_deformable_attention, value_nc, shapes_nc, starts, loc_nc, weights_nc
    )
    ref_out, ref_grads = forward_and_grads(
        ms_deform_attn_reference, value, shapes, starts, loc, weights
    )
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@requires_compiled
@pytest.mark.parametrize("dense", [False, True])
def test_gradcheck_fp64(dense):
    kwargs = {"queries": 12, "heads": 2, "dim": 3} if dense else {"queries": 2, "dim": 3}
    value, shapes, starts, loc, weights = make_inputs(
        [(3, 4), (2, 2)], batch=2, points=2, dtype=torch.float64, low=-0.1, high=1.1, **kwargs
    )
    # Keep samples away from pixel centres, where bilinear interpolation has kinks.
    loc = loc + 0.013

    def fn(v, lc, w):
        return multi_scale_deformable_attention(v, shapes, starts, lc, w)

    inputs = [t.requires_grad_() for t in (value, loc, weights)]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


CASES_16BIT = {
    # name: (levels, kwargs); dim 32 takes the vectorised loops, dim 5 the generic ones.
    "dim_32": ([(5, 7), (3, 4)], {"dim": 32, "heads": 3, "queries": 6}),
    "dim_32_dense": ([(4, 5), (2, 3)], {"dim": 32, "heads": 2, "queries": 40}),
    "dim_5": ([(5, 7), (3, 4)], {"dim": 5, "heads": 2, "queries": 6}),
    "dim_5_dense": ([(4, 5), (2, 3)], {"dim": 5, "heads": 3, "queries": 40}),
}


@requires_compiled
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("float_locations", [True, False])
@pytest.mark.parametrize("name", sorted(CASES_16BIT))
def test_16bit_matches_fp32_kernel_on_cpu(name, float_locations, dtype):
    # The 16-bit kernel reads 16-bit values and sums in float32: on inputs already rounded to the
    # 16-bit dtype it must agree with the float32 kernel up to the rounding of its own outputs.
    levels, kwargs = CASES_16BIT[name]
    value, shapes, starts, loc, weights = make_inputs(levels, seed=len(name), **kwargs)
    loc_dtype = torch.float32 if float_locations else dtype
    value16, loc16, weights16 = value.to(dtype), loc.to(loc_dtype), weights.to(loc_dtype)
    n, _, m, d = value.shape
    gen = torch.Generator().manual_seed(3)
    grad_out16 = torch.randn(n, loc.shape[1], m * d, generator=gen).to(dtype)
    out16, grads16 = forward_and_grads(
        multi_scale_deformable_attention, value16, shapes, starts, loc16, weights16, grad_out16
    )
    out, grads = forward_and_grads(
        multi_scale_deformable_attention,
        value16.float(),
        shapes,
        starts,
        loc16.float(),
        weights16.float(),
        grad_out16.float(),
    )
    assert out16.dtype == dtype
    assert [g.dtype for g in grads16] == [dtype, loc_dtype, loc_dtype]
    # Round to nearest: at most half a unit in the last place of the result.
    rtol = torch.finfo(dtype).eps / 2
    torch.testing.assert_close(out16.float(), out, rtol=rtol, atol=1e-7)
    torch.testing.assert_close(grads16[0].float(), grads[0], rtol=rtol, atol=1e-7)
    # The dot products behind the location and weight gradients may be contracted differently
    # (fused multiply-adds) in the two instantiations: float32 tolerances, scaled by the level size
    # for the locations, on top of the rounding of 16-bit results.
    for got, want, scale, what in zip(grads16[1:], grads[1:], (max(levels)[1], 1), ("loc", "w")):
        tol = 1e-5 + (rtol if got.dtype != torch.float32 else 0)
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=1e-5 * scale, msg=what)


@requires_compiled
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [32, 5])
def test_16bit_output_rounding_matches_torch(dtype, dim):
    # Sums near the ends of the 16-bit range (overflow, subnormals) and NaN: the kernel's own
    # float32 -> 16-bit rounding must give the bits that Tensor.to gives.
    value, shapes, starts, loc, weights = make_inputs([(4, 5)], batch=1, queries=30, dim=dim)
    info = torch.finfo(dtype)
    scales = torch.tensor([info.max / 3, info.tiny / 8, 1.0, info.tiny * 50])
    value = value * scales.repeat(dim)[:dim]
    value[0, 3, 0, 2] = float("nan")
    value16 = value.to(dtype)
    weights = weights * 2
    out16 = multi_scale_deformable_attention(value16, shapes, starts, loc, weights)
    out = multi_scale_deformable_attention(value16.float(), shapes, starts, loc, weights)
    assert torch.isinf(out16.float()).any() and torch.isnan(out16.float()).any()
    torch.testing.assert_close(out16, out.to(dtype), rtol=0, atol=0, equal_nan=True)


@requires_compiled
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_values_against_reference_on_cpu(dtype):
    value, shapes, starts, loc, weights = make_inputs([(4, 6), (2, 3)], dim=8)
    value16 = value.to(dtype)
    want = ms_deform_attn_reference(value16.float(), shapes, starts, loc, weights)
    got = multi_scale_deformable_attention(value16, shapes, starts, loc, weights)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    # Mixed location / weight dtypes are promoted to float32.
    got = multi_scale_deformable_attention(value16, shapes, starts, loc, weights.to(dtype))
    assert got.dtype == dtype


@requires_compiled
def test_cpu_kernels_run_on_the_intra_op_threads():
    # With PyTorch's OpenMP backend the kernels' parallel loops are OpenMP regions compiled into
    # the extension: built without the compiler's OpenMP flag they run on one thread, silently.
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            assert torch.ops.deformable_detr._cpu_parallel_threads(64) == threads
        assert torch.ops.deformable_detr._cpu_parallel_threads(1) == 1
    finally:
        torch.set_num_threads(old)


@requires_compiled
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("queries", [70, 3])
def test_results_do_not_depend_on_thread_count(queries, dtype):
    # 70 queries take more samples than the heads have rows (dense heads), 3 fewer; batch 2 x 4
    # heads is more tasks than threads, so workers reuse their buffers from one head to the next.
    value, shapes, starts, loc, weights = make_inputs(
        [(6, 8), (3, 4)], batch=2, queries=queries, heads=4, dim=32
    )
    inputs = (value.to(dtype), shapes, starts, loc, weights)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        out1, grads1 = forward_and_grads(multi_scale_deformable_attention, *inputs)
        torch.set_num_threads(2)
        out2, grads2 = forward_and_grads(multi_scale_deformable_attention, *inputs)
    finally:
        torch.set_num_threads(old)
    # Tasks own disjoint outputs, so the sums happen in the same order whatever the threads.
    assert torch.equal(out1, out2)
    for a, b in zip(grads1, grads2):
        assert torch.equal(a, b)


@requires_compiled
def test_compiled_op_is_used_when_built(monkeypatch):
    calls = []
    monkeypatch.setattr(func, "ms_deform_attn_reference", lambda *a: calls.append(a))
    inputs = make_inputs([(3, 3)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = multi_scale_deformable_attention(*inputs)
    assert not calls and out.shape == (2, 5, 8)


def test_fallback_warns_once_and_matches_reference(monkeypatch):
    monkeypatch.setattr(func, "_C", None)
    monkeypatch.setattr(func, "_COMPILED_IMPORT_ERROR", ImportError("simulated"))
    monkeypatch.setattr(func, "_FALLBACK_WARNED", set())
    inputs = make_inputs([(4, 5), (2, 2)])
    with pytest.warns(RuntimeWarning, match="reference path") as record:
        out1 = multi_scale_deformable_attention(*inputs)
        out2 = multi_scale_deformable_attention(*inputs)
    assert len([w for w in record if "reference path" in str(w.message)]) == 1
    want = ms_deform_attn_reference(*inputs)
    assert torch.equal(out1, want) and torch.equal(out2, want)


def test_reference_matches_explicit_bilinear_sum():
    # An independent, loop-based evaluation of the definition on a small case.
    value, shapes, starts, loc, weights = make_inputs([(3, 4), (2, 5)], batch=1, queries=3, dim=2)
    out = ms_deform_attn_reference(value, shapes, starts, loc, weights)
    n, _, m, d = value.shape
    expected = torch.zeros(n, loc.shape[1], m, d)
    for q in range(loc.shape[1]):
        for h in range(m):
            for lvl, (hh, ww) in enumerate(shapes.tolist()):
                grid = value[0, starts[lvl] : starts[lvl] + hh * ww, h].view(hh, ww, d)
                for p in range(loc.shape[4]):
                    x = loc[0, q, h, lvl, p, 0] * ww - 0.5
                    y = loc[0, q, h, lvl, p, 1] * hh - 0.5
                    x0, y0 = int(torch.floor(x)), int(torch.floor(y))
                    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                            if 0 <= yy < hh and 0 <= xx < ww:
                                w = weights[0, q, h, lvl, p] * wy * wx
                                expected[0, q, h] += w * grid[yy, xx]
    torch.testing.assert_close(out, expected.view(n, -1, m * d), rtol=1e-5, atol=1e-6)


@requires_compiled
@requires_cuda
@pytest.mark.parametrize("name", ["multi_level", "tiny_levels", "dim_32", "dense_heads", "batch_0"])
def test_cuda_matches_cpu(name):
    levels, kwargs = CASES[name]
    inputs = make_inputs(levels, **kwargs)
    cuda_inputs = [t.cuda() for t in inputs]
    n, _, m, d = inputs[0].shape
    grad_out = torch.randn(n, inputs[3].shape[1], m * d, generator=torch.Generator().manual_seed(1))
    out, grads = forward_and_grads(multi_scale_deformable_attention, *inputs, grad_out=grad_out)
    out_c, grads_c = forward_and_grads(
        multi_scale_deformable_attention, *cuda_inputs, grad_out=grad_out.cuda()
    )
    torch.testing.assert_close(out_c.cpu(), out, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads_c, grads):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


@requires_compiled
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("float_locations", [False, True])
def test_cuda_16bit_matches_fp32(dtype, float_locations):
    value, shapes, starts, loc, weights = [
        t.cuda() for t in make_inputs([(5, 7), (3, 4)], dim=32, queries=20)
    ]
    grad_out = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * 32, device="cuda")
    out, grads = forward_and_grads(
        multi_scale_deformable_attention, value, shapes, starts, loc, weights, grad_out
    )
    loc_dtype = torch.float32 if float_locations else dtype
    out16, grads16 = forward_and_grads(
        multi_scale_deformable_attention,
        value.to(dtype),
        shapes,
        starts,
        loc.to(loc_dtype),
        weights.to(loc_dtype),
        grad_out.to(dtype),
    )
    assert out16.dtype == dtype
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
    torch.testing.assert_close(out16.float(), out, rtol=tol, atol=tol)
    # Location gradients scale with the level width and are sensitive to rounded locations.
    for got, want, scale in zip(grads16, grads, (1, 20, 1)):
        torch.testing.assert_close(got.float(), want, rtol=tol * scale, atol=tol * scale)


@requires_compiled
@requires_cuda
def test_cuda_autocast_runs():
    value, shapes, starts, loc, weights = [t.cuda() for t in make_inputs([(5, 7)], dim=8)]
    proj = torch.nn.Linear(8, 8).cuda()
    with torch.autocast("cuda", dtype=torch.float16):
        v = proj(value)
        out = multi_scale_deformable_attention(v, shapes, starts, loc, weights)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
