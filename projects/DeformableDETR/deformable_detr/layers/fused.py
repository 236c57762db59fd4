"""Linear layers with their ReLU or residual sum done in the matrix product (CPU inference).

On a CPU, ``F.linear`` with a bias first copies the bias into every row of the output and then
accumulates the product into it, and a ReLU or a residual sum after it is one more pass over the
output; for the encoder's (N * S, C) activations each of these passes costs about as much as the
product itself in bfloat16. oneDNN's fused linear (``torch.ops.mkldnn._linear_pointwise``, the
kernel PyTorch's own compiler uses for these patterns on CPUs) applies bias, ReLU and residual
sum while the product is written. It has no autograd formula and is not an operator that export
formats know, so it is used only in eager inference on CPU tensors of float32 or bfloat16, and
plain operators everywhere else (training, tracing, GPUs, other dtypes, PyTorch builds without
it).
"""

import torch
import torch.nn.functional as F

from .tracing import in_place_ok, is_tracing

__all__ = ["add_residual", "linear_relu", "linear_add"]

_FUSED_DTYPES = (torch.float32, torch.bfloat16)


def _fused_op():
    mkldnn = getattr(torch.ops, "mkldnn", None)
    try:
        return mkldnn._linear_pointwise if mkldnn is not None else None
    except (AttributeError, RuntimeError):
        return None


_LINEAR_POINTWISE = _fused_op() if torch.backends.mkldnn.is_available() else None


def _fused_dtype(x, linear):
    """The dtype the fused kernel would run ``linear`` on ``x`` in, or None when it must not."""
    if (
        _LINEAR_POINTWISE is None
        or x.device.type != "cpu"
        or linear.bias is None
        or is_tracing()
        or (
            torch.is_grad_enabled()
            and (x.requires_grad or any(p.requires_grad for p in linear.parameters()))
        )
    ):
        return None
    # Under autocast a linear layer runs in the autocast dtype, as F.linear would.
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    if dtype not in _FUSED_DTYPES or linear.weight.dtype not in _FUSED_DTYPES:
        return None
    return dtype


def _operands(x, linear, dtype):
    return x.to(dtype), linear.weight.to(dtype), linear.bias.to(dtype)


def add_residual(x, branch):
    """``x + branch``, written into ``branch`` (the fresh output of a layer) in inference when
    that keeps the result's dtype: the encoder's (N, S, C) sums then need no new buffer."""
    if (
        in_place_ok(branch)
        and branch.dtype == torch.promote_types(x.dtype, branch.dtype)
        and branch.shape == x.shape
    ):
        return branch.add_(x)
    return x + branch


def linear_relu(x, linear):
    """``relu(linear(x))``, fused on CPUs in inference, else with the ReLU in place in inference.

    Args:
        x (Tensor): (..., in_features).
        linear (nn.Linear): with a bias.

    Returns:
        Tensor: (..., out_features), in the dtype ``linear(x)`` would have.
    """
    dtype = _fused_dtype(x, linear)
    if dtype is None:
        y = linear(x)
        return F.relu(y, inplace=in_place_ok(y))
    x, weight, bias = _operands(x, linear, dtype)
    return _LINEAR_POINTWISE(x, weight, bias, "relu", [], "")


def linear_add(x, linear, residual):
    """``residual + linear(x)``: fused on CPUs in inference when the sum keeps the dtype of
    ``linear(x)``, else :func:`add_residual`.

    Args:
        x (Tensor): (..., in_features).
        linear (nn.Linear): with a bias.
        residual (Tensor): (..., out_features).

    Returns:
        Tensor: the sum, in the dtype the unfused sum would have.
    """
    dtype = _fused_dtype(x, linear)
    if dtype is None or residual.dtype != dtype or residual.shape[:-1] != x.shape[:-1]:
        return add_residual(residual, linear(x))
    x, weight, bias = _operands(x, linear, dtype)
    return _LINEAR_POINTWISE.binary(x, residual.contiguous(), weight, bias, "add")
