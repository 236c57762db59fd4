"""The deformable transformer: encoder, decoder, iterative box refinement and two-stage proposals.

Parameter names follow the official checkpoints below ``transformer.``. The prediction heads are
owned by the meta-architecture and handed to ``forward``; they are never registered here, so the
state_dict holds each head once.
"""

import math

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import nn

from ..layers import MultiScaleDeformableAttention
from ..layers.fused import add_residual, linear_add, linear_relu
from ..layers.tracing import in_place_ok, is_tracing
from .heads import decode_boxes, upcast
from .position_encoding import sine_encoding

__all__ = [
    "DeformableTransformer",
    "DeformableTransformerEncoder",
    "DeformableTransformerEncoderLayer",
    "DeformableTransformerDecoder",
    "DeformableTransformerDecoderLayer",
]


def _relu(x):
    # ReLU, in place on the fresh FFN hidden state (the largest tensor of a layer) in inference.
    return F.relu(x, inplace=in_place_ok(x))


def _activation(name):
    if name == "relu":
        return _relu
    if name == "gelu":
        return F.gelu
    raise ValueError(f"DeformableTransformer: activation must be 'relu' or 'gelu', got {name!r}")


class DeformableTransformerEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention -> norm1, FFN -> norm2."""

    def __init__(
        self,
        d_model=256,
        dim_feedforward=1024,
        dropout=0.1,
        activation="relu",
        num_levels=4,
        nhead=8,
        num_points=4,
    ):
        """
        Args:
            d_model (int): channels.
            dim_feedforward (int): hidden size of the FFN.
            dropout (float): dropout after the attention, inside and after the FFN.
            activation (str): "relu" or "gelu".
            num_levels (int): feature levels.
            nhead (int): attention heads.
            num_points (int): sampling points per head and level.
        """
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(d_model, nhead, num_levels, num_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)

        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.activation = _activation(activation)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self,
        src,
        pos,
        reference_points,
        spatial_shapes,
        level_start_index,
        padding_mask,
    ):
        """
        Args:
            src (Tensor): (N, S, C) flattened features of all levels.
            pos (Tensor): (N, S, C) position + level embedding.
            reference_points (Tensor): (N, S, L, 2).
            spatial_shapes (Tensor): (L, 2) int64.
            level_start_index (Tensor): (L,) int64.
            padding_mask (Tensor or None): (N, S) bool, True at padding.

        Returns:
            Tensor: (N, S, C).
        """
        attn = self.self_attn(
            src + pos,
            reference_points,
            src,
            spatial_shapes,
            level_start_index,
            padding_mask,
        )
        src = self.norm1(add_residual(src, self.dropout1(attn)))
        if not self.training and self.activation is _relu:
            # Dropout is the identity in eval: bias, ReLU and the residual sum are done in the
            # matrix products (layers/fused.py).
            return self.norm2(linear_add(linear_relu(src, self.linear1), self.linear2, src))
        ffn = self.linear2(self.dropout2(self.activation(self.linear1(src))))
        return self.norm2(add_residual(src, self.dropout3(ffn)))


class DeformableTransformerDecoderLayer(nn.Module):
    """Post-norm decoder layer: self-attention -> norm2, deformable cross-attention -> norm1,
    FFN -> norm3 (the norms are numbered as in the official checkpoints)."""

    def __init__(
        self,
        d_model=256,
        dim_feedforward=1024,
        dropout=0.1,
        activation="relu",
        num_levels=4,
        nhead=8,
        num_points=4,
    ):
        """
        Args:
            d_model (int): channels.
            dim_feedforward (int): hidden size of the FFN.
            dropout (float): dropout on the attention maps of the self-attention, after each
                attention, inside and after the FFN.
            activation (str): "relu" or "gelu".
            num_levels (int): feature levels of the memory.
            nhead (int): attention heads.
            num_points (int): sampling points per head and level.
        """
        super().__init__()
        self.cross_attn = MultiScaleDeformableAttention(d_model, nhead, num_levels, num_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)

        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.activation = _activation(activation)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self,
        tgt,
        query_pos,
        reference_points,
        memory,
        spatial_shapes,
        level_start_index,
        padding_mask,
    ):
        """
        Args:
            tgt (Tensor): (N, Q, C) query content.
            query_pos (Tensor): (N, Q, C) query position.
            reference_points (Tensor): (N, Q, L, 2 or 4), already scaled by the valid ratios.
            memory (Tensor): (N, S, C) encoder output.
            spatial_shapes (Tensor): (L, 2) int64.
            level_start_index (Tensor): (L,) int64.
            padding_mask (Tensor or None): (N, S) bool, True at padding.

        Returns:
            Tensor: (N, Q, C).
        """
        q = k = tgt + query_pos
        attn = self.self_attn(q, k, tgt, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attn))

        attn = self.cross_attn(
            tgt + query_pos,
            reference_points,
            memory,
            spatial_shapes,
            level_start_index,
            padding_mask,
        )
        tgt = self.norm1(tgt + self.dropout1(attn))

        if not self.training and self.activation is _relu:
            return self.norm3(linear_add(linear_relu(tgt, self.linear1), self.linear2, tgt))
        ffn = self.linear2(self.dropout3(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(ffn))


class DeformableTransformerEncoder(nn.Module):
    """A stack of encoder layers sharing the same reference points."""

    def __init__(self, layers):
        """
        Args:
            layers (list[DeformableTransformerEncoderLayer]): the layers, applied in order.
        """
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.num_layers = len(self.layers)

    @staticmethod
    def get_reference_points(spatial_shapes, valid_ratios):
        """Centres of the cells of every level, in the padded map's normalised frame, seen from
        every level.

        Args:
            spatial_shapes (list[tuple[int, int]]): (H, W) of every level.
            valid_ratios (Tensor): (N, L, 2) valid (width, height) fraction of every level.

        Returns:
            Tensor: (N, S, L, 2) normalised (x, y).
        """
        device = valid_ratios.device
        points = []
        for lvl, (h, w) in enumerate(spatial_shapes):
            ys = torch.arange(h, dtype=torch.float32, device=device) + 0.5
            xs = torch.arange(w, dtype=torch.float32, device=device) + 0.5
            ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
            # Normalised by the valid extent first: positions are relative to the image, not the
            # padded canvas, then mapped back onto every level's canvas below.
            ref_y = ref_y.reshape(1, -1) / (valid_ratios[:, lvl, 1:2] * h)
            ref_x = ref_x.reshape(1, -1) / (valid_ratios[:, lvl, 0:1] * w)
            points.append(torch.stack((ref_x, ref_y), -1))
        reference_points = torch.cat(points, 1)
        return reference_points[:, :, None] * valid_ratios[:, None]

    def forward(
        self,
        src,
        pos,
        reference_points,
        spatial_shapes,
        level_start_index,
        padding_mask,
    ):
        """
        Args:
            src (Tensor): (N, S, C).
            pos (Tensor): (N, S, C) position + level embedding.
            reference_points (Tensor): (N, S, L, 2) from :meth:`get_reference_points`.
            spatial_shapes (Tensor): (L, 2) int64.
            level_start_index (Tensor): (L,) int64.
            padding_mask (Tensor or None): (N, S) bool, True at padding.

        Returns:
            Tensor: (N, S, C) memory.
        """
        output = src
        for layer in self.layers:
            output = layer(
                output,
                pos,
                reference_points,
                spatial_shapes,
                level_start_index,
                padding_mask,
            )
        return output


class DeformableTransformerDecoder(nn.Module):
    """A stack of decoder layers that predicts boxes after every layer and, with iterative box
    refinement, makes them the next layer's references."""

    def __init__(self, layers):
        """
        Args:
            layers (list[DeformableTransformerDecoderLayer]): the layers, applied in order.
        """
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.num_layers = len(self.layers)

    def forward(
        self,
        tgt,
        query_pos,
        reference_points,
        memory,
        spatial_shapes,
        level_start_index,
        valid_ratios,
        padding_mask,
        bbox_embed=None,
        refine=False,
    ):
        """
        Args:
            tgt (Tensor): (N, Q, C) initial query content.
            query_pos (Tensor): (N, Q, C) query position.
            reference_points (Tensor): (N, Q, 2 or 4) in [0, 1], relative to the valid image.
            memory (Tensor): (N, S, C).
            spatial_shapes (Tensor): (L, 2) int64.
            level_start_index (Tensor): (L,) int64.
            valid_ratios (Tensor): (N, L, 2).
            padding_mask (Tensor or None): (N, S) bool, True at padding.
            bbox_embed (nn.ModuleList or None): box heads: ``bbox_embed[i]`` predicts the boxes
                of layer ``i`` around that layer's references.
            refine (bool): iterative box refinement: the boxes of layer ``i`` are the references
                of layer ``i + 1``. Needs ``bbox_embed``.

        Returns:
            tuple[Tensor, Tensor, Tensor or None]: hidden states (num_layers, N, Q, C), the
            references after every layer (num_layers, N, Q, 2 or 4), and the boxes of every layer
            (num_layers, N, Q, 4) as normalised (cx, cy, w, h), or None without ``bbox_embed``.
        """
        if refine and bbox_embed is None:
            raise ValueError("DeformableTransformerDecoder: box refinement needs bbox_embed")
        # The references live in the valid image's frame; the attention samples in the padded
        # map's frame of each level.
        ratios = {2: valid_ratios[:, None], 4: torch.cat([valid_ratios, valid_ratios], -1)[:, None]}
        output = tgt
        hidden_states, references, boxes = [], [], []
        reference_input = None
        for lid, layer in enumerate(self.layers):
            if reference_input is None:
                reference_input = reference_points[:, :, None] * ratios[reference_points.shape[-1]]
            output = layer(
                output,
                query_pos,
                reference_input,
                memory,
                spatial_shapes,
                level_start_index,
                padding_mask,
            )
            if bbox_embed is not None:
                boxes.append(decode_boxes(upcast(bbox_embed[lid](output)), reference_points))
                if refine:
                    # Each layer's box loss trains its own head only: no gradient through the
                    # chain of references.
                    reference_points = boxes[-1].detach()
                    reference_input = None
            hidden_states.append(output)
            references.append(reference_points)
        boxes = torch.stack(boxes) if boxes else None
        return torch.stack(hidden_states), torch.stack(references), boxes


class DeformableTransformer(nn.Module):
    """Encoder-decoder transformer of Deformable DETR, with the iterative box refinement and
    two-stage variants.

    The prediction heads (``class_embed``, ``bbox_embed``) belong to the caller and are passed to
    :meth:`forward`: the decoder predicts the boxes of layer ``i`` with ``bbox_embed[i]`` (and,
    with box refinement, makes them the references of the next layer); in two-stage mode
    ``class_embed[num_decoder_layers]`` and ``bbox_embed[num_decoder_layers]`` score and regress
    the encoder proposals.
    """

    @configurable
    def __init__(
        self,
        *,
        d_model=256,
        nhead=8,
        num_encoder_layers=6,
        num_decoder_layers=6,
        dim_feedforward=1024,
        dropout=0.1,
        activation="relu",
        num_feature_levels=4,
        dec_n_points=4,
        enc_n_points=4,
        two_stage=False,
        two_stage_num_proposals=300,
        with_box_refine=False,
    ):
        """
        Args:
            d_model (int): channels of features and queries.
            nhead (int): attention heads (deformable and decoder self-attention).
            num_encoder_layers (int): encoder depth.
            num_decoder_layers (int): decoder depth (>= 1).
            dim_feedforward (int): hidden size of the FFNs.
            dropout (float): dropout probability.
            activation (str): "relu" or "gelu".
            num_feature_levels (int): feature levels given to :meth:`forward`.
            dec_n_points (int): sampling points per head and level in the decoder.
            enc_n_points (int): sampling points per head and level in the encoder.
            two_stage (bool): queries come from the top-scoring encoder proposals instead of
                learned embeddings.
            two_stage_num_proposals (int): proposals kept in two-stage mode (all the tokens when
                the feature maps have fewer).
            with_box_refine (bool): refine the reference boxes after every decoder layer.
        """
        super().__init__()
        if d_model % nhead != 0:
            raise ValueError(
                f"DeformableTransformer: d_model ({d_model}) must be divisible by nhead ({nhead})"
            )
        if num_decoder_layers < 1:
            raise ValueError(
                f"DeformableTransformer: num_decoder_layers must be >= 1, got {num_decoder_layers}"
            )
        if num_encoder_layers < 0:
            raise ValueError(
                f"DeformableTransformer: num_encoder_layers must be >= 0, got {num_encoder_layers}"
            )
        if two_stage and two_stage_num_proposals < 1:
            raise ValueError(
                f"DeformableTransformer: two_stage_num_proposals must be >= 1, "
                f"got {two_stage_num_proposals}"
            )
        _activation(activation)

        self.d_model = d_model
        self.nhead = nhead
        self.num_feature_levels = num_feature_levels
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        self.with_box_refine = with_box_refine

        layer_args = dict(
            d_model=d_model,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            activation=activation,
            num_levels=num_feature_levels,
            nhead=nhead,
        )
        self.encoder = DeformableTransformerEncoder(
            [
                DeformableTransformerEncoderLayer(num_points=enc_n_points, **layer_args)
                for _ in range(num_encoder_layers)
            ]
        )
        self.decoder = DeformableTransformerDecoder(
            [
                DeformableTransformerDecoderLayer(num_points=dec_n_points, **layer_args)
                for _ in range(num_decoder_layers)
            ]
        )
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.DEFORMABLE_DETR
        return {
            "d_model": c.HIDDEN_DIM,
            "nhead": c.NHEADS,
            "num_encoder_layers": c.ENC_LAYERS,
            "num_decoder_layers": c.DEC_LAYERS,
            "dim_feedforward": c.DIM_FEEDFORWARD,
            "dropout": c.DROPOUT,
            "activation": "relu",
            "num_feature_levels": c.NUM_FEATURE_LEVELS,
            "dec_n_points": c.DEC_N_POINTS,
            "enc_n_points": c.ENC_N_POINTS,
            "two_stage": c.TWO_STAGE,
            "two_stage_num_proposals": c.TWO_STAGE_NUM_PROPOSALS,
            "with_box_refine": c.WITH_BOX_REFINE,
        }

    @torch.no_grad()
    def reset_parameters(self):
        """Official initialisation: xavier on every matrix, then the deformable attention's own
        init, the reference point projection and a normal level embedding."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MultiScaleDeformableAttention):
                m.reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    @staticmethod
    def valid_sizes(mask):
        """The valid (unpadded) extent of one level.

        Args:
            mask (Tensor): (N, H, W) bool, True at padding.

        Returns:
            tuple[Tensor, Tensor]: valid height and width, each (N,) int64.
        """
        # Rows / columns not padded, read along the first column / row as the official code does.
        not_mask = ~mask
        return not_mask[:, :, 0].sum(1), not_mask[:, 0, :].sum(1)

    @staticmethod
    def valid_ratios(spatial_shapes, valid_sizes):
        """The fraction of every level's padded map that the image covers.

        Args:
            spatial_shapes (list[tuple[int, int]]): (H, W) of every level.
            valid_sizes (list[tuple[Tensor, Tensor]]): :meth:`valid_sizes` of every level.

        Returns:
            Tensor: (N, L, 2) float32 valid (width, height) fractions.
        """
        return torch.stack(
            [
                torch.stack([valid_w.float() / w, valid_h.float() / h], -1)
                for (h, w), (valid_h, valid_w) in zip(spatial_shapes, valid_sizes)
            ],
            1,
        )

    def gen_encoder_output_proposals(self, memory, padding_mask, spatial_shapes, valid_sizes):
        """One proposal per encoder token: a box centred on its cell, sized by its level.

        Args:
            memory (Tensor): (N, S, C).
            padding_mask (Tensor): (N, S) bool, True at padding.
            spatial_shapes (list[tuple[int, int]]): (H, W) of every level.
            valid_sizes (list[tuple[Tensor, Tensor]]): valid (H, W), each (N,), of every level.

        Returns:
            tuple[Tensor, Tensor]: the projected memory (N, S, C) with padded and out-of-range
            tokens zeroed before the projection, and the proposals (N, S, 4) as logits of
            normalised (cx, cy, w, h), +inf where padded or out of range.
        """
        n = memory.shape[0]
        proposals = []
        for lvl, ((h, w), (valid_h, valid_w)) in enumerate(zip(spatial_shapes, valid_sizes)):
            ys = torch.arange(h, dtype=torch.float32, device=memory.device)
            xs = torch.arange(w, dtype=torch.float32, device=memory.device)
            grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
            grid = torch.stack([grid_x, grid_y], -1)
            size = torch.stack([valid_w, valid_h], -1).view(n, 1, 1, 2)
            grid = (grid.unsqueeze(0).expand(n, -1, -1, -1) + 0.5) / size
            wh = torch.ones_like(grid) * 0.05 * (2.0**lvl)
            proposals.append(torch.cat((grid, wh), -1).view(n, -1, 4))
        proposals = torch.cat(proposals, 1)
        valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        proposals = torch.log(proposals / (1 - proposals))
        invalid = padding_mask.unsqueeze(-1) | ~valid
        proposals = proposals.masked_fill(invalid, float("inf"))
        output_memory = memory.masked_fill(invalid, 0.0)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        return output_memory, proposals

    def forward(
        self,
        srcs,
        masks,
        pos_embeds,
        query_embed=None,
        class_embed=None,
        bbox_embed=None,
    ):
        """
        Args:
            srcs (list[Tensor]): per level (N, C, H_l, W_l) features.
            masks (list[Tensor]): per level (N, H_l, W_l) bool, True at padding.
            pos_embeds (list[Tensor]): per level (N, C, H_l, W_l) position encodings.
            query_embed (Tensor or None): (Q, 2C) learned queries, position then content; None in
                two-stage mode.
            class_embed (nn.ModuleList or None): class heads; index ``num_decoder_layers`` scores
                the encoder proposals (two-stage only).
            bbox_embed (nn.ModuleList or None): box heads, one per decoder layer (and one for the
                encoder proposals in two-stage mode); needed for box refinement and two-stage.

        Returns:
            tuple: ``hs`` (num_decoder_layers, N, Q, C); ``init_reference`` (N, Q, 2 or 4) in
            [0, 1]; ``inter_references`` (num_decoder_layers, N, Q, 2 or 4) in [0, 1], the
            references after each layer; ``boxes`` (num_decoder_layers, N, Q, 4), every layer's
            normalised (cx, cy, w, h) boxes (None without ``bbox_embed``);
            ``enc_class`` (N, S, num_classes) and ``enc_coord_unact`` (N, S, 4) (logits of the
            encoder proposals' boxes) in two-stage mode, else None.
        """
        shapes = [tuple(src.shape[-2:]) for src in srcs]
        src_flatten = torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], 1)
        mask_flatten = torch.cat([mask.flatten(1) for mask in masks], 1)
        # The level embedding in the position's dtype: under autocast a float32 parameter would
        # turn the 16-bit positions, and every query made from them, into float32 tensors that
        # each linear layer casts back.
        lvl_pos_embed_flatten = torch.cat(
            [
                pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].to(pos.dtype).view(1, 1, -1)
                for lvl, pos in enumerate(pos_embeds)
            ],
            1,
        )
        device = src_flatten.device
        # torch.tensor (not as_tensor) keeps symbolic sizes symbolic under torch.export.
        spatial_shapes = torch.tensor(shapes, dtype=torch.long, device=device)
        level_start_index = torch.cat(
            (spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1])
        )
        valid_sizes = [self.valid_sizes(mask) for mask in masks]
        valid_ratios = self.valid_ratios(shapes, valid_sizes)

        # Zeroing the value at padded tokens is a pass over it in every attention layer: a batch
        # without padding skips it (one host read per forward; traced graphs keep the mask).
        attn_mask = mask_flatten
        if not is_tracing() and not bool(mask_flatten.any()):
            attn_mask = None

        enc_reference_points = self.encoder.get_reference_points(shapes, valid_ratios)
        memory = self.encoder(
            src_flatten,
            lvl_pos_embed_flatten,
            enc_reference_points,
            spatial_shapes,
            level_start_index,
            attn_mask,
        )

        n, _, c = memory.shape
        enc_class = enc_coord_unact = None
        if self.two_stage:
            num_dec = self.decoder.num_layers
            output_memory, output_proposals = self.gen_encoder_output_proposals(
                memory, mask_flatten, shapes, valid_sizes
            )
            enc_class = class_embed[num_dec](output_memory)
            enc_coord_unact = upcast(bbox_embed[num_dec](output_memory)) + output_proposals

            # Unlike the official code, padded tokens can never be picked, so the chosen
            # proposals do not depend on the rest of the batch.
            scores = enc_class[..., 0].masked_fill(mask_flatten, float("-inf"))
            k = min(self.two_stage_num_proposals, scores.shape[1])
            topk_index = torch.topk(scores, k, dim=1)[1]
            topk_coords_unact = torch.gather(
                enc_coord_unact, 1, topk_index.unsqueeze(-1).expand(-1, -1, 4)
            ).detach()
            reference_points = topk_coords_unact.sigmoid()
            # As the official model: d_model / 2 sine features per coordinate of 2 * pi * box.
            embedding = sine_encoding(reference_points * (2 * math.pi), c // 2).flatten(2)
            pos_trans_out = self.pos_trans_norm(self.pos_trans(embedding))
            query_pos, tgt = torch.split(pos_trans_out, c, dim=2)
        else:
            query_pos, tgt = torch.split(query_embed, c, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(n, -1, -1)
            tgt = tgt.unsqueeze(0).expand(n, -1, -1)
            reference_points = upcast(self.reference_points(query_pos)).sigmoid()

        hs, inter_references, boxes = self.decoder(
            tgt,
            query_pos,
            reference_points,
            memory,
            spatial_shapes,
            level_start_index,
            valid_ratios,
            attn_mask,
            bbox_embed=bbox_embed,
            refine=self.with_box_refine,
        )
        return hs, reference_points, inter_references, boxes, enc_class, enc_coord_unact
