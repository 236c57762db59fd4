"""The multi-scale deformable attention op: one entry point, the compiled kernel or a reference path.

``multi_scale_deformable_attention`` is the only function callers use. It dispatches to the
compiled kernels registered under ``torch.ops.deformable_detr`` (CPU, and CUDA when built with it)
when ``deformable_detr._C`` is importable, and to ``ms_deform_attn_reference`` (pure PyTorch,
``grid_sample`` per level) otherwise, warning once. The compiled op has an autograd formula and a
fake kernel, so ``torch.compile`` and ``torch.export`` trace through it.

Input metadata (ranks, sizes, dtypes, devices) is checked here in Python, which is cheap and
traceable; the checks that read the values of ``spatial_shapes`` and ``level_start_index`` run
inside the kernel, so the compiled path needs no host synchronisation in Python.
"""

import logging
import warnings

import torch
import torch.nn.functional as F

__all__ = ["multi_scale_deformable_attention", "ms_deform_attn_reference"]

logger = logging.getLogger(__name__)

_HALF_DTYPES = (torch.float16, torch.bfloat16)

try:
    from deformable_detr import _C  # noqa: F401 (loading it registers torch.ops.deformable_detr)

    _COMPILED_IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover - depends on the build
    _C = None
    _COMPILED_IMPORT_ERROR = e

_FALLBACK_WARNED = set()


def _check_metadata(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights
):
    """Raise ValueError naming the first argument whose rank, size, dtype or device is wrong."""
    args = {
        "value": value,
        "spatial_shapes": spatial_shapes,
        "level_start_index": level_start_index,
        "sampling_locations": sampling_locations,
        "attention_weights": attention_weights,
    }
    for name, t in args.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if value.dim() != 4:
        raise ValueError(f"value must have shape (N, S, M, D), got {tuple(value.shape)}")
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(
            f"spatial_shapes must have shape (L, 2), got {tuple(spatial_shapes.shape)}"
        )
    num_levels = spatial_shapes.shape[0]
    if num_levels < 1:
        raise ValueError("spatial_shapes must describe at least one level, got shape (0, 2)")
    if level_start_index.dim() != 1 or level_start_index.shape[0] != num_levels:
        raise ValueError(
            f"level_start_index must have shape (L,) = ({num_levels},), "
            f"got {tuple(level_start_index.shape)}"
        )
    n, _, m, _ = value.shape
    loc = sampling_locations.shape
    if (
        sampling_locations.dim() != 6
        or loc[0] != n
        or loc[2] != m
        or loc[3] != num_levels
        or loc[5] != 2
    ):
        raise ValueError(
            f"sampling_locations must have shape (N, Lq, M, L, P, 2) = ({n}, Lq, {m}, "
            f"{num_levels}, P, 2), got {tuple(loc)}"
        )
    if attention_weights.shape != loc[:5]:
        raise ValueError(
            f"attention_weights must have shape (N, Lq, M, L, P) = {tuple(loc[:5])}, "
            f"got {tuple(attention_weights.shape)}"
        )
    for name in ("spatial_shapes", "level_start_index"):
        if args[name].dtype != torch.int64:
            raise ValueError(f"{name} must be int64, got {args[name].dtype}")
    if not value.dtype.is_floating_point:
        raise ValueError(f"value must be a floating-point tensor, got {value.dtype}")
    if sampling_locations.dtype != attention_weights.dtype:
        raise ValueError(
            "sampling_locations and attention_weights must have the same dtype, got "
            f"{sampling_locations.dtype} and {attention_weights.dtype}"
        )
    loc_dtype = sampling_locations.dtype
    if loc_dtype != value.dtype and not (
        value.dtype in _HALF_DTYPES and loc_dtype == torch.float32
    ):
        allowed = " or torch.float32" if value.dtype in _HALF_DTYPES else ""
        raise ValueError(
            f"sampling_locations and attention_weights must have the dtype of value "
            f"({value.dtype}){allowed}, got {loc_dtype}"
        )
    for name, t in args.items():
        if t.device != value.device:
            raise ValueError(
                f"{name} is on {t.device} but value is on {value.device}: all inputs must be on "
                "the same device"
            )


def _check_levels(shapes, starts, num_rows):
    """Raise ValueError unless the (H, W) list and start list describe ``num_rows`` rows exactly."""
    total = 0
    for lvl, ((h, w), start) in enumerate(zip(shapes, starts)):
        if h <= 0 or w <= 0:
            raise ValueError(f"spatial_shapes[{lvl}] = ({h}, {w}) must be positive sizes")
        if start != total:
            raise ValueError(
                f"level_start_index[{lvl}] = {start} but the levels before it hold {total} rows "
                "(level_start_index must be the exclusive cumulative sum of H * W)"
            )
        total += h * w
    if total != num_rows:
        raise ValueError(
            f"value has S = {num_rows} rows but spatial_shapes describe sum(H * W) = {total}"
        )


def _promote_locations(value, sampling_locations, attention_weights):
    # Under autocast, or with a 16-bit value, locations and weights may arrive one in the value's
    # dtype and one in float32: both then go to float32, which keeps sub-pixel precision.
    if (
        sampling_locations.dtype != attention_weights.dtype
        and value.dtype in _HALF_DTYPES
        and {sampling_locations.dtype, attention_weights.dtype} == {value.dtype, torch.float32}
    ):
        return sampling_locations.float(), attention_weights.float()
    return sampling_locations, attention_weights


def ms_deform_attn_reference(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights
):
    """Pure-PyTorch multi-scale deformable attention (bilinear sampling with ``grid_sample``).

    Args:
        value (Tensor): (N, S, M, D) values of all levels, flattened level after level.
        spatial_shapes (Tensor): (L, 2) int64, (H, W) of every level.
        level_start_index (Tensor): (L,) int64, start of every level in ``S``.
        sampling_locations (Tensor): (N, Lq, M, L, P, 2) normalised (x, y); points outside
            [0, 1] sample zeros.
        attention_weights (Tensor): (N, Lq, M, L, P).

    Returns:
        Tensor: (N, Lq, M * D), in the dtype of ``value``.
    """
    sampling_locations, attention_weights = _promote_locations(
        value, sampling_locations, attention_weights
    )
    _check_metadata(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    n, s, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    starts = [int(x) for x in level_start_index.tolist()]
    _check_levels(shapes, starts, s)
    out_dtype = value.dtype
    # grid_sample needs one dtype, and 16-bit support on the CPU is patchy: compute those in float32.
    if sampling_locations.dtype != value.dtype or (
        value.dtype in _HALF_DTYPES and value.device.type == "cpu"
    ):
        value = value.float()
        sampling_locations = sampling_locations.float()
        attention_weights = attention_weights.float()
    # grid_sample works in [-1, 1] with align_corners=False: pixel centres at (i + 0.5) / size.
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        v = value[:, starts[lvl] : starts[lvl] + h * w]
        v = v.permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(n * m, lq, num_points, 2)
        sampled.append(
            F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    # (N*M, D, Lq, L, P) weighted over levels and points.
    stacked = torch.stack(sampled, dim=-2)
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, num_levels, num_points)
    out = (stacked * weights).sum((-1, -2)).view(n, m * d, lq)
    return out.transpose(1, 2).contiguous().to(out_dtype)


def _compiled_device_types():
    if _C is None:
        return frozenset()
    # A build without CUDA registers only the CPU kernel.
    keys = {"cpu": "CPU", "cuda": "CUDA"}
    return frozenset(
        device
        for device, key in keys.items()
        if torch._C._dispatch_has_kernel_for_dispatch_key(
            "deformable_detr::ms_deform_attn_forward", key
        )
    )


# Computed once, so that tracing (torch.compile) sees a constant.
_COMPILED_DEVICE_TYPES = _compiled_device_types()


def _has_compiled_kernel(device_type):
    return _C is not None and device_type in _COMPILED_DEVICE_TYPES


def _warn_fallback(device_type):
    if device_type in _FALLBACK_WARNED:
        return
    _FALLBACK_WARNED.add(device_type)
    if _C is None:
        reason = f"deformable_detr._C could not be imported ({_COMPILED_IMPORT_ERROR})"
    else:
        reason = f"deformable_detr._C has no kernel for {device_type} tensors"
    msg = (
        f"multi_scale_deformable_attention: {reason}; using the slower PyTorch reference path. "
        "Build the extension with `pip install -e .` (or `python setup.py build_ext --inplace`)."
    )
    logger.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def multi_scale_deformable_attention(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights
):
    """Multi-scale deformable attention: bilinear samples of ``value`` summed with weights.

    Uses the compiled kernel when ``deformable_detr._C`` provides one for the inputs' device, and
    ``ms_deform_attn_reference`` otherwise (with a single warning). Differentiable with respect to
    ``value``, ``sampling_locations`` and ``attention_weights``.

    Args:
        value (Tensor): (N, S, M, D) values of all levels, flattened level after level
            (float32, float64, float16 or bfloat16).
        spatial_shapes (Tensor): (L, 2) int64, (H, W) of every level, on the device of ``value``.
        level_start_index (Tensor): (L,) int64, start of every level in ``S``.
        sampling_locations (Tensor): (N, Lq, M, L, P, 2) normalised (x, y): (0, 0) is the top-left
            corner of the level and (1, 1) the bottom-right; points outside sample zeros (like
            ``grid_sample`` with ``padding_mode="zeros", align_corners=False``). Same dtype as
            ``value``, or float32 when ``value`` is 16-bit.
        attention_weights (Tensor): (N, Lq, M, L, P), same dtype as ``sampling_locations``.

    Returns:
        Tensor: (N, Lq, M * D) in the dtype of ``value``.
    """
    sampling_locations, attention_weights = _promote_locations(
        value, sampling_locations, attention_weights
    )
    _check_metadata(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if _has_compiled_kernel(value.device.type):
        return torch.ops.deformable_detr.ms_deform_attn_forward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    _warn_fallback(value.device.type)
    return ms_deform_attn_reference(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


def _register_compiled_op():
    """Attach the autograd formula and the fake kernels to the compiled operators."""
    forward_name = "deformable_detr::ms_deform_attn_forward"
    backward_name = "deformable_detr::ms_deform_attn_backward"

    @torch.library.register_fake(forward_name)
    def _forward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_wts):
        n, _, m, d = value.shape
        return value.new_empty((n, sampling_locations.shape[1], m * d))

    @torch.library.register_fake(backward_name)
    def _backward_fake(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_wts
    ):
        # The kernels return contiguous gradients in the dtypes of their inputs.
        return (
            value.new_empty(value.shape),
            sampling_locations.new_empty(sampling_locations.shape),
            attention_wts.new_empty(attention_wts.shape),
        )

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_wts = (
            ctx.saved_tensors
        )
        grad_value, grad_locations, grad_weights = (
            torch.ops.deformable_detr.ms_deform_attn_backward(
                grad_output.contiguous(),
                value,
                spatial_shapes,
                level_start_index,
                sampling_locations,
                attention_wts,
            )
        )
        return grad_value, None, None, grad_locations, grad_weights

    torch.library.register_autograd(forward_name, _backward, setup_context=_setup_context)


if _C is not None:
    _register_compiled_op()
