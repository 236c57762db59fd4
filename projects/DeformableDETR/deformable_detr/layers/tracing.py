"""When eager-only shortcuts step aside: under tracing, and (for in-place writes) under autograd."""

import torch

__all__ = ["is_tracing", "in_place_ok"]


def is_tracing():
    """True under ``torch.compile``, ``torch.export``, ``torch.jit.trace`` and scripting.

    Eager shortcuts (fused kernels, host reads of tensor values, skipping a mask that is all
    False) give way there to plain operators that every tracer and export format knows.

    Returns:
        bool
    """
    # torch.compiler.is_exporting is missing from older PyTorch releases.
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)()
    return (
        exporting
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch.jit.is_scripting()
    )


def in_place_ok(tensor):
    """Whether writing in place into ``tensor``, the fresh output of a layer, is free.

    True when no autograd graph is recorded for it (inference). Under autograd an in-place op on
    a view, and a linear layer's 3-d output is a view of its 2-d result, is replayed on the base
    in backward (a zeroed copy of the base, a clone, a strided copy: about 13 ms per encoder FFN
    of the quickstart training step), so out of place costs less there.

    Args:
        tensor (Tensor): the tensor that would be written.

    Returns:
        bool
    """
    return not (torch.is_grad_enabled() and tensor.requires_grad)
