"""Sine position encodings: of feature maps, computed from their padding masks, and of any
values (``sine_encoding``, which the two-stage proposals use too)."""

import math
from functools import partial

import torch
from detectron2.config import configurable
from torch import nn

from ..layers.tracing import is_tracing

__all__ = ["PositionEmbeddingSine", "sine_encoding"]


def sine_encoding(positions, num_feats, temperature=10000):
    """The sine/cosine encoding of "Attention is all you need", of every value of ``positions``.

    Args:
        positions (Tensor): (...) float positions.
        num_feats (int): features per position (even).
        temperature (float): base of the frequency progression.

    Returns:
        Tensor: (..., num_feats), sin on even features and cos on odd ones, feature ``i`` at the
        frequency ``temperature ** (-2 * (i // 2) / num_feats)``.
    """
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=positions.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos = positions[..., None] / dim_t
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """The sine/cosine position encoding of "Attention is all you need", in two dimensions.

    Positions are counted over the valid (non-padded) pixels only and, when normalised, divided by
    the valid extent, so an image gets the same encoding whatever padding the batch adds.
    """

    @configurable
    def __init__(self, num_pos_feats=128, temperature=10000, normalize=True, scale=2 * math.pi):
        """
        Args:
            num_pos_feats (int): features per axis (even); the output has twice as many channels.
            temperature (float): base of the frequency progression.
            normalize (bool): divide positions by the valid height/width and multiply by ``scale``.
            scale (float): range of the normalised positions.
        """
        super().__init__()
        if not isinstance(num_pos_feats, int) or num_pos_feats <= 0 or num_pos_feats % 2:
            raise ValueError(
                f"PositionEmbeddingSine: num_pos_feats must be a positive even int, "
                f"got {num_pos_feats!r}"
            )
        if temperature <= 0:
            raise ValueError(f"PositionEmbeddingSine: temperature must be > 0, got {temperature}")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale

    @classmethod
    def from_config(cls, cfg):
        return {"num_pos_feats": cfg.MODEL.DEFORMABLE_DETR.HIDDEN_DIM // 2}

    def forward(self, mask):
        """
        Args:
            mask (Tensor): (N, H, W) bool, True at padded pixels.

        Returns:
            Tensor: (N, 2 * num_pos_feats, H, W) float32, the y encoding then the x encoding.
        """
        if mask.dim() != 3 or mask.dtype != torch.bool:
            raise ValueError(
                f"PositionEmbeddingSine: mask must be a bool tensor (N, H, W), "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + eps) * self.scale

        encode = partial(sine_encoding, num_feats=self.num_pos_feats, temperature=self.temperature)
        if mask.device.type == "cpu" and not is_tracing():
            # A feature map has few distinct positions (about H + W per image): encode each once
            # and gather. The same elementwise formula on the same values gives the same bits,
            # without computing 2 * num_pos_feats sines and cosines per pixel.
            unique_y, index_y = torch.unique(y_embed, return_inverse=True)
            unique_x, index_x = torch.unique(x_embed, return_inverse=True)
            table = encode(torch.cat((unique_y, unique_x)))
            # One gather writes the output: (N, H, W, 2) rows of the table, y then x.
            index = torch.stack((index_y, index_x + unique_y.shape[0]), dim=-1)
            pos = table[index].flatten(3)
        else:
            pos = torch.cat((encode(y_embed), encode(x_embed)), dim=3)
        return pos.permute(0, 3, 1, 2)

    def extra_repr(self):
        return (
            f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, "
            f"normalize={self.normalize}, scale={self.scale}"
        )
