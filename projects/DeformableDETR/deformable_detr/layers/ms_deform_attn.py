"""The multi-scale deformable attention module (projections, sampling locations, official init),
and ``record_sampling``, which keeps what the module hands to the op for inspection."""

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from .ms_deform_attn_func import multi_scale_deformable_attention
from .tracing import in_place_ok, is_tracing

__all__ = ["MultiScaleDeformableAttention", "SamplingRecord", "record_sampling"]


class MultiScaleDeformableAttention(nn.Module):
    """Multi-scale deformable attention (Zhu et al., 2020).

    Every query attends to ``num_points`` locations per head and per feature level, placed around
    its reference point by learned offsets and weighted by a softmax over all levels and points of
    its head. The submodules and their initialisation match the official checkpoints.
    """

    # The SamplingRecord that forward fills while ``record_sampling`` is active. A class default,
    # so that modules built or unpickled without it read None.
    _sampling_record = None

    def __init__(self, embed_dim=256, num_heads=8, num_levels=4, num_points=4):
        """
        Args:
            embed_dim (int): channels of the query, the value and the output.
            num_heads (int): attention heads; must divide ``embed_dim``.
            num_levels (int): feature levels of the value.
            num_points (int): sampling points per head and per level.
        """
        super().__init__()
        for name, v in (
            ("embed_dim", embed_dim),
            ("num_heads", num_heads),
            ("num_levels", num_levels),
            ("num_points", num_points),
        ):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(
                    f"MultiScaleDeformableAttention: {name} must be a positive int, got {v!r}"
                )
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"MultiScaleDeformableAttention: embed_dim ({embed_dim}) must be divisible by "
                f"num_heads ({num_heads})"
            )
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points

        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Official initialisation: every head starts looking in its own direction, with point ``p``
        at distance ``p + 1`` cells, and uniform attention weights."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (
            2.0 * math.pi / self.num_heads
        )
        directions = torch.stack([thetas.cos(), thetas.sin()], -1)
        # Normalise so the larger component is 1: the first point lands on a neighbouring cell.
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        grid = directions.view(self.num_heads, 1, 1, 2).repeat(
            1, self.num_levels, self.num_points, 1
        )
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query,
        reference_points,
        value,
        spatial_shapes,
        level_start_index,
        padding_mask=None,
    ):
        """
        Args:
            query (Tensor): (N, Lq, C) queries, position embedding already added.
            reference_points (Tensor): (N, Lq, L, 2) normalised (x, y) points or (N, Lq, L, 4)
                normalised (cx, cy, w, h) boxes, one per level, in the padded map's frame
                (top-left (0, 0), bottom-right (1, 1)).
            value (Tensor): (N, S, C) input features of all levels, flattened level after level.
            spatial_shapes (Tensor): (L, 2) int64, (H, W) of every level.
            level_start_index (Tensor): (L,) int64, start of every level in ``S``.
            padding_mask (Tensor or None): (N, S) bool, True at padded positions, whose values
                are zeroed so that they never contribute.

        Returns:
            Tensor: (N, Lq, C).
        """
        n, lq, _ = query.shape
        # The op checks value, spatial_shapes and level_start_index; reference points of the
        # wrong shape would broadcast silently into the sampling locations, so they are checked
        # here, on metadata only.
        if tuple(reference_points.shape) not in (
            (n, lq, self.num_levels, 2),
            (n, lq, self.num_levels, 4),
        ):
            raise ValueError(
                f"{type(self).__name__}: reference_points must be (N, Lq, num_levels, 2 or 4) = "
                f"({n}, {lq}, {self.num_levels}, 2 (points) or 4 (boxes)), "
                f"got {tuple(reference_points.shape)}"
            )
        s = value.shape[1]
        m, lvls, pts = self.num_heads, self.num_levels, self.num_points

        value = self.value_proj(value)
        if padding_mask is not None:
            # In place on the fresh projection in inference: no second (N, S, C) buffer.
            if in_place_ok(value):
                value = value.masked_fill_(padding_mask[..., None], 0.0)
            else:
                value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(n, s, m, self.embed_dim // m)

        # Offsets and attention logits come from one matrix product over the query; the slices
        # below are views of its output.
        num_offsets = self.sampling_offsets.out_features
        projected = F.linear(
            query,
            torch.cat([self.sampling_offsets.weight, self.attention_weights.weight]),
            torch.cat([self.sampling_offsets.bias, self.attention_weights.bias]),
        )
        offsets = projected[..., :num_offsets].view(n, lq, m, lvls, pts, 2)
        weights = projected[..., num_offsets:].view(n, lq, m, lvls * pts)
        # A 16-bit value takes float32 locations and weights (the op computes in float32 for it):
        # a 16-bit location would be off by up to a pixel on the largest level. The softmax and
        # the location arithmetic below write that dtype themselves (the references are brought
        # to it, the 16-bit offsets promote), so nothing is rounded to 16 bits and cast back.
        loc_dtype = torch.float32 if value.dtype in (torch.float16, torch.bfloat16) else value.dtype
        weights = F.softmax(weights, -1, dtype=loc_dtype).view(n, lq, m, lvls, pts)
        refs = reference_points.to(loc_dtype)

        # Offsets are in cells of each level (2-d) or in fractions of the half box size (4-d).
        # Eagerly, one fused pass computes reference + offset * scale; traced graphs keep the
        # plain operators, which every export format knows.
        fused = not is_tracing()
        if reference_points.shape[-1] == 2:
            normalizer = torch.stack([spatial_shapes[:, 1], spatial_shapes[:, 0]], -1)
            normalizer = normalizer[None, None, None, :, None, :]
            ref = refs[:, :, None, :, None, :]
            if fused:
                # One pass with a contiguous inner dimension of L * P * 2: references repeated
                # over the points (small) and the normaliser as one row. Broadcast over six
                # dimensions with an inner size of 2, the same arithmetic is several times slower.
                row = lvls * pts * 2
                ref = ref.expand(n, lq, 1, lvls, pts, 2).reshape(n, lq, 1, row)
                normalizer = normalizer.expand(1, 1, 1, lvls, pts, 2).reshape(row)
                locations = torch.addcdiv(
                    ref, offsets.reshape(n, lq, m, row), normalizer.to(ref.dtype)
                ).view(n, lq, m, lvls, pts, 2)
            else:
                locations = ref + offsets / normalizer
        else:
            ref_xy = refs[:, :, None, :, None, :2]
            half_wh = refs[:, :, None, :, None, 2:] * 0.5
            if fused:
                locations = torch.addcmul(ref_xy, offsets / pts, half_wh)
            else:
                locations = ref_xy + offsets / pts * half_wh
        if self._sampling_record is not None:
            self._sampling_record.update(
                locations, weights, reference_points, spatial_shapes, padding_mask
            )
        output = multi_scale_deformable_attention(
            value, spatial_shapes, level_start_index, locations, weights
        )
        return self.output_proj(output)

    def extra_repr(self):
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"num_levels={self.num_levels}, num_points={self.num_points}"
        )


class SamplingRecord:
    """Where a :class:`MultiScaleDeformableAttention` sampled in its last forward pass, as handed
    to the op (detached, not copied). Every field is None until the module runs.

    Attributes:
        sampling_locations (Tensor): (N, Lq, M, L, P, 2) normalised (x, y) in the padded map's
            frame of each level (top-left (0, 0), bottom-right (1, 1)).
        attention_weights (Tensor): (N, Lq, M, L, P), summing to 1 over (L, P) for every head.
        reference_points (Tensor): (N, Lq, L, 2) points or (N, Lq, L, 4) boxes, as given to the
            module (already scaled into each level's padded frame).
        spatial_shapes (Tensor): (L, 2) int64, (H, W) of every level.
        padding_mask (Tensor or None): (N, S) bool, True at padded positions; None when the
            caller passed none (nothing padded).
        calls (int): forward passes recorded; the fields hold the last one.
    """

    def __init__(self):
        self.sampling_locations = None
        self.attention_weights = None
        self.reference_points = None
        self.spatial_shapes = None
        self.padding_mask = None
        self.calls = 0

    def update(self, locations, weights, reference_points, spatial_shapes, padding_mask):
        """Keep the arguments of one forward pass (called by the module)."""
        self.sampling_locations = locations.detach()
        self.attention_weights = weights.detach()
        self.reference_points = reference_points.detach()
        self.spatial_shapes = spatial_shapes.detach()
        self.padding_mask = None if padding_mask is None else padding_mask.detach()
        self.calls += 1


@contextlib.contextmanager
def record_sampling(module):
    """Record the sampling locations and attention weights ``module`` passes to the op.

    Off by default; while the context is active every forward pass of ``module`` overwrites the
    yielded record. The previous state (off, or an enclosing record) comes back on exit, also
    when the body raises. Example::

        attn = model.transformer.decoder.layers[-1].cross_attn
        with record_sampling(attn) as record:
            model(inputs)
        record.sampling_locations  # (N, Lq, M, L, P, 2)

    Args:
        module (MultiScaleDeformableAttention): the attention module to watch.

    Yields:
        SamplingRecord: filled by the module's forward passes inside the context.
    """
    if not isinstance(module, MultiScaleDeformableAttention):
        raise TypeError(
            f"record_sampling needs a MultiScaleDeformableAttention, got {type(module).__name__}"
        )
    previous = module._sampling_record
    record = SamplingRecord()
    module._sampling_record = record
    try:
        yield record
    finally:
        module._sampling_record = previous
