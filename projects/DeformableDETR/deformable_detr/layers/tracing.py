"""Whether the code is being traced, so that eager-only shortcuts step aside."""

import torch

__all__ = ["is_tracing"]


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
