"""The compiled op under torch.compile and torch.export (fake kernel and autograd registration)."""

import pytest
import torch
from torch import nn

from deformable_detr.layers import ms_deform_attn_func as func
from deformable_detr.layers import ms_deform_attn_reference, multi_scale_deformable_attention

pytestmark = pytest.mark.skipif(
    func._C is None, reason=f"deformable_detr._C is not built ({func._COMPILED_IMPORT_ERROR})"
)

LEVELS = ((4, 6), (2, 3))


def make_inputs(batch=2, queries=5, heads=2, dim=4, points=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(LEVELS, dtype=torch.int64)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    value = torch.randn(batch, int(sizes.sum()), heads, dim, generator=gen)
    loc = torch.rand(batch, queries, heads, len(LEVELS), points, 2, generator=gen) * 1.2 - 0.1
    weights = torch.rand(batch, queries, heads, len(LEVELS), points, generator=gen)
    return value, shapes, starts, loc, weights


class TinyAttention(nn.Module):
    """A value projection, the op and an output projection: enough for tracing."""

    def __init__(self, heads=2, dim=4):
        super().__init__()
        self.heads, self.dim = heads, dim
        self.value_proj = nn.Linear(heads * dim, heads * dim)
        self.output_proj = nn.Linear(heads * dim, heads * dim)

    def forward(self, x, shapes, starts, loc, weights):
        n, s, _ = x.shape
        value = self.value_proj(x).view(n, s, self.heads, self.dim)
        out = multi_scale_deformable_attention(value, shapes, starts, loc, weights)
        return self.output_proj(out)


def test_opcheck_registrations():
    # Schema, fake kernel, autograd registration and AOT dispatch of the operator.
    value, shapes, starts, loc, weights = make_inputs()
    args = (value.requires_grad_(), shapes, starts, loc.requires_grad_(), weights.requires_grad_())
    torch.library.opcheck(torch.ops.deformable_detr.ms_deform_attn_forward.default, args)
    grad = torch.randn(2, 5, 8)
    torch.library.opcheck(
        torch.ops.deformable_detr.ms_deform_attn_backward.default,
        (grad, value.detach(), shapes, starts, loc.detach(), weights.detach()),
    )


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    value, shapes, starts, loc, weights = make_inputs(queries=7)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = [mode.from_tensor(t) for t in (value, shapes, starts, loc, weights)]
        out = torch.ops.deformable_detr.ms_deform_attn_forward(*fake)
        grads = torch.ops.deformable_detr.ms_deform_attn_backward(torch.empty(2, 7, 8), *fake)
    assert out.shape == (2, 7, 8)
    assert [g.shape for g in grads] == [value.shape, loc.shape, weights.shape]


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_fullgraph_forward_backward(backend):
    torch.manual_seed(0)
    model = TinyAttention()
    value, shapes, starts, loc, weights = make_inputs()
    x = value.flatten(2)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)

    loc_e = loc.clone().requires_grad_()
    out_e = model(x, shapes, starts, loc_e, weights)
    out_e.square().sum().backward()
    grads_e = [p.grad.clone() for p in model.parameters()] + [loc_e.grad]
    model.zero_grad()

    loc_c = loc.clone().requires_grad_()
    out_c = compiled(x, shapes, starts, loc_c, weights)
    out_c.square().sum().backward()
    grads_c = [p.grad.clone() for p in model.parameters()] + [loc_c.grad]

    torch.testing.assert_close(out_c, out_e)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b)
    # The compiled graph calls the custom op, not the reference path.
    ref = ms_deform_attn_reference(
        model.value_proj(x).view(2, -1, 2, 4), shapes, starts, loc, weights
    )
    torch.testing.assert_close(out_c, model.output_proj(ref), rtol=1e-5, atol=1e-5)


def test_torch_compile_inductor_forward():
    pytest.importorskip("torch._inductor")
    model = TinyAttention()
    value, shapes, starts, loc, weights = make_inputs()
    x = value.flatten(2)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="inductor", fullgraph=True)
        with torch.no_grad():
            out = compiled(x, shapes, starts, loc, weights)
    except Exception as e:  # a machine without a working C++ toolchain for inductor
        if "CppCompileError" in type(e).__name__ or "InvalidCxxCompiler" in type(e).__name__:
            pytest.skip(f"inductor cannot compile here: {e}")
        raise
    with torch.no_grad():
        torch.testing.assert_close(out, model(x, shapes, starts, loc, weights))


def test_torch_export_contains_op_and_runs():
    torch.manual_seed(0)
    model = TinyAttention().eval()
    value, shapes, starts, loc, weights = make_inputs()
    x = value.flatten(2)
    exported = torch.export.export(model, (x, shapes, starts, loc, weights))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert any("deformable_detr.ms_deform_attn_forward" in t for t in targets), targets
    # The exported program runs on new inputs of the same shapes.
    value2, _, _, loc2, weights2 = make_inputs(seed=3)
    x2 = value2.flatten(2)
    with torch.no_grad():
        torch.testing.assert_close(
            exported.module()(x2, shapes, starts, loc2, weights2),
            model(x2, shapes, starts, loc2, weights2),
        )


def test_torch_export_dynamic_queries():
    model = TinyAttention().eval()
    value, shapes, starts, loc, weights = make_inputs(queries=5)
    x = value.flatten(2)
    queries = torch.export.Dim("queries", min=2, max=1024)
    exported = torch.export.export(
        model,
        (x, shapes, starts, loc, weights),
        dynamic_shapes=(None, None, None, {1: queries}, {1: queries}),
    )
    _, _, _, loc9, weights9 = make_inputs(queries=9, seed=5)
    with torch.no_grad():
        out = exported.module()(x, shapes, starts, loc9, weights9)
        torch.testing.assert_close(out, model(x, shapes, starts, loc9, weights9))
