"""timm feature extractors (Swin, ConvNeXt, ...) as Detectron2 backbones, and their config keys.

``build_timm_backbone`` (``MODEL.BACKBONE.NAME``) builds ``TimmBackbone``: a timm model created with
``features_only=True`` whose stages come out as ``res2``..``res5``-like features named by stride
(``res{log2(stride)}``, as Detectron2's ResNet names them), in NCHW whatever layout the timm model
produces. The keys live under ``cfg.MODEL.TIMM`` (:func:`add_timm_backbone_config`).

A picture's features must not depend on the rest of the batch. The backbone adapter already runs
every image size separately; here each image is zero-padded on its own to a multiple of the
coarsest stride used (patchify stems and 2x2 downsampling drop the remainder otherwise), and every
output is cut back to ``ceil(size / stride)``, the extent a ResNet gives. The backbone therefore
reports no size divisibility: the padding depends only on the image's own size, no feature cell
made only of padding reaches the transformer, and the padding masks stay those of the image.
Swin additionally pads each stage to whole attention windows inside timm, again per image.

timm is imported only when such a backbone is built, and nothing is downloaded: the model is
created with ``pretrained=False`` and ImageNet weights come from a local file
(``MODEL.TIMM.WEIGHTS``, or a ``MODEL.WEIGHTS`` file made by the converter of
``deformable_detr.checkpoint.timm_weights``).
"""

import logging
import math

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import configurable
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

__all__ = ["TimmBackbone", "add_timm_backbone_config", "build_timm_backbone", "timm_model_kwargs"]

logger = logging.getLogger(__name__)

# Arguments a timm model family needs to run on any image size, by the module defining it.
# Swin: strict_img_size=False builds the shifted-window masks for the actual size on every
# forward; always_partition=True keeps 7x7 windows with a shift in every stage, as Swin detectors
# do, instead of shrinking them to the feature size of the 224 px ImageNet input (which would
# turn off the shift of the last stage for every larger image).
_FAMILY_KWARGS = {
    "timm.models.swin_transformer": {"strict_img_size": False, "always_partition": True},
}


def add_timm_backbone_config(cfg):
    """Add the keys of the timm backbones (``cfg.MODEL.TIMM``) to ``cfg`` in place.

    Args:
        cfg (CfgNode): a Detectron2 config.
    """
    cfg.MODEL.TIMM = CN()
    _C = cfg.MODEL.TIMM
    # timm model name, e.g. "swin_tiny_patch4_window7_224" or "convnext_tiny"; read when
    # MODEL.BACKBONE.NAME is "build_timm_backbone". Always created with random weights.
    _C.NAME = ""
    # Stages to output, as timm feature indices (timm's out_indices). Each comes out named by its
    # stride, res{log2(stride)}: for Swin and ConvNeXt indices 0..3 are res2..res5 (strides 4..32).
    # MODEL.DEFORMABLE_DETR.IN_FEATURES picks among them.
    _C.OUT_INDICES = [1, 2, 3]
    # Same meaning as MODEL.BACKBONE.FREEZE_AT for ResNet: 0 trains everything, 1 freezes the stem
    # (patch embedding), k >= 2 the stem and every stage up to res{k}. Frozen parts get no gradient
    # and stay in eval mode (no dropout or stochastic depth).
    _C.FREEZE_AT = 0
    # Stochastic depth rate of the timm model (its drop_path_rate), active in training only.
    _C.DROP_PATH_RATE = 0.0
    # Local timm / HF-hub ImageNet weights of NAME (model.safetensors, or a .pth / .bin state
    # dict), loaded into the backbone when it is built. "" keeps the random initialisation, e.g.
    # when MODEL.WEIGHTS provides the weights (a detector checkpoint, or this file converted with
    # deformable_detr.checkpoint.timm_weights).
    _C.WEIGHTS = ""


def _import_timm(model_name):
    try:
        import timm
    except ImportError as e:
        raise ImportError(
            f"MODEL.BACKBONE.NAME 'build_timm_backbone' (MODEL.TIMM.NAME = {model_name!r}) needs "
            "the timm package: pip install timm"
        ) from e
    return timm


def timm_model_kwargs(model_name):
    """Arguments of ``timm.create_model`` that let ``model_name`` run on any image size.

    Args:
        model_name (str): a timm model name.

    Returns:
        dict: keyword arguments for ``timm.create_model`` (empty for most convolutional models).
    """
    timm = _import_timm(model_name)
    if not timm.models.is_model(model_name):
        raise ValueError(
            f"MODEL.TIMM.NAME = {model_name!r} is not a timm model name (timm.list_models() lists "
            "them)"
        )
    module = timm.models.model_entrypoint(model_name).__module__
    return dict(_FAMILY_KWARGS.get(module, {}))


def _stride_name(stride, model_name):
    level = math.log2(stride)
    if stride < 2 or level != int(level):
        raise ValueError(
            f"MODEL.TIMM.NAME = {model_name!r} has a feature of stride {stride}; only powers of two "
            "can be named res2..res5 like Detectron2's ResNet"
        )
    return f"res{int(level)}"


class TimmBackbone(Backbone):
    """A timm ``features_only`` model as a Detectron2 backbone.

    Attributes:
        model (nn.Module): the timm feature extractor (``FeatureListNet``); its state dict keys are
            timm's with the top-level sequential containers flattened (``layers.0`` ->
            ``layers_0``). BatchNorm layers, if any, are ``FrozenBatchNorm2d``.
    """

    # Padding each image to a multiple of the stride inside forward has size bounds that
    # torch.export's shape solver cannot prove: only fixed-size exports work (see export.py).
    supports_dynamic_export = False

    @configurable
    def __init__(self, *, model_name, out_indices, freeze_at=0, drop_path_rate=0.0, in_channels=3):
        """
        Args:
            model_name (str): timm model name.
            out_indices (list[int]): timm feature indices to output, increasing.
            freeze_at (int): 0 trains everything; 1 freezes the stem; k >= 2 the stem and the
                stages up to the one of stride ``2**k``.
            drop_path_rate (float): stochastic depth rate of the timm model.
            in_channels (int): image channels.
        """
        super().__init__()
        out_indices = [int(i) for i in out_indices]
        if not out_indices or out_indices != sorted(set(out_indices)) or out_indices[0] < 0:
            raise ValueError(
                f"MODEL.TIMM.OUT_INDICES = {out_indices} must be non-negative, increasing timm "
                "feature indices, e.g. [1, 2, 3]"
            )
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"MODEL.TIMM.DROP_PATH_RATE = {drop_path_rate} must be in [0, 1)")
        timm = _import_timm(model_name)
        kwargs = timm_model_kwargs(model_name)
        pretrained_cfg = timm.models.get_pretrained_cfg(model_name)
        if pretrained_cfg is not None and pretrained_cfg.fixed_input_size and not kwargs:
            raise ValueError(
                f"MODEL.TIMM.NAME = {model_name!r} takes images of one fixed size only; the "
                "timm backbones run on every image's own size (supported with any size: Swin and "
                "the convolutional families such as ConvNeXt)"
            )
        try:
            model = timm.create_model(
                model_name,
                pretrained=False,
                features_only=True,
                out_indices=tuple(out_indices),
                drop_path_rate=drop_path_rate,
                in_chans=in_channels,
                **kwargs,
            )
        except (AssertionError, IndexError) as e:
            raise ValueError(
                f"MODEL.TIMM.OUT_INDICES = {out_indices} are not feature indices of "
                f"MODEL.TIMM.NAME = {model_name!r} ({e})"
            ) from e
        # Batch statistics would make an image's features depend on the images it is batched
        # with; detection fine-tuning keeps ImageNet statistics, as the ResNet path does.
        self.model = FrozenBatchNorm2d.convert_frozen_batchnorm(model)
        self.model_name = model_name

        info = model.feature_info
        self._channels_last_out = str(getattr(model, "output_fmt", "NCHW")).endswith("NHWC")
        all_names = [_stride_name(f["reduction"], model_name) for f in info.info]
        if len(set(all_names)) != len(all_names):
            raise ValueError(
                f"MODEL.TIMM.NAME = {model_name!r} has several features of one stride "
                f"({[f['reduction'] for f in info.info]}); they cannot be named by stride"
            )
        self._out_features = [all_names[i] for i in out_indices]
        self._out_strides = {all_names[i]: int(info.info[i]["reduction"]) for i in out_indices}
        self._out_channels = {all_names[i]: int(info.info[i]["num_chs"]) for i in out_indices}
        self._pad_to = max(self._out_strides.values())

        self._frozen = self._frozen_modules(freeze_at, info.info, all_names)
        for name in self._frozen:
            for p in self.model.get_submodule(name).parameters():
                p.requires_grad_(False)

    def _frozen_modules(self, freeze_at, feature_info, names):
        """Names of the top-level modules of ``self.model`` that FREEZE_AT freezes."""
        if freeze_at < 0:
            raise ValueError(f"MODEL.TIMM.FREEZE_AT = {freeze_at} must be >= 0")
        if freeze_at == 0:
            return []
        children = [n for n, _ in self.model.named_children()]
        # flatten_sequential renames "layers.1" to "layers_1" in the feature extractor.
        module_of = {name: f["module"].replace(".", "_") for name, f in zip(names, feature_info)}
        if freeze_at == 1:
            first = next(
                (module_of[n] for n, f in zip(names, feature_info) if f["reduction"] >= 4), None
            )
            if first not in children:
                raise ValueError(f"MODEL.TIMM.FREEZE_AT = 1: no stem found in {self.model_name!r}")
            return children[: children.index(first)]
        target = f"res{freeze_at}"
        if target not in module_of or module_of[target] not in children:
            raise ValueError(
                f"MODEL.TIMM.FREEZE_AT = {freeze_at} asks to freeze up to {target}, which "
                f"{self.model_name!r} with MODEL.TIMM.OUT_INDICES does not compute "
                f"(stages: {[n for n in names if module_of[n] in children]})"
            )
        return children[: children.index(module_of[target]) + 1]

    @classmethod
    def from_config(cls, cfg, input_shape=None):
        t = cfg.MODEL.TIMM
        if not t.NAME:
            raise ValueError(
                "MODEL.TIMM.NAME is empty: MODEL.BACKBONE.NAME 'build_timm_backbone' needs a timm "
                "model name, e.g. 'swin_tiny_patch4_window7_224' (configs/swin_t.yaml)"
            )
        channels = input_shape.channels if input_shape is not None else len(cfg.MODEL.PIXEL_MEAN)
        return {
            "model_name": t.NAME,
            "out_indices": list(t.OUT_INDICES),
            "freeze_at": t.FREEZE_AT,
            "drop_path_rate": t.DROP_PATH_RATE,
            "in_channels": channels,
        }

    def train(self, mode=True):
        super().train(mode)
        for name in self._frozen:
            self.model.get_submodule(name).eval()
        return self

    def forward(self, x):
        """
        Args:
            x (Tensor): (N, C, H, W) images of one size, unpadded.

        Returns:
            dict[str, Tensor]: every output feature, (N, channels, ceil(H / stride),
            ceil(W / stride)).
        """
        h, w = x.shape[-2:]
        d = self._pad_to
        # A zero canvas, with no Python branch on the size, so a traced or exported model runs
        # the same graph at the sample's size. (A dynamic-size torch.export still fails: it
        # cannot prove bounds such as h <= 32 * ceil(h / 32) from the floor divisions.)
        size = (x.shape[0], x.shape[1], (h + d - 1) // d * d, (w + d - 1) // d * d)
        canvas = torch.zeros(size, dtype=x.dtype, device=x.device)
        if x.is_contiguous(memory_format=torch.channels_last):
            # The caller's layout: the adapter passes channels-last images on the CPU.
            canvas = canvas.contiguous(memory_format=torch.channels_last)
        canvas[:, :, :h, :w] = x
        feats = self.model(canvas)
        out = {}
        for name, f in zip(self._out_features, feats):
            if self._channels_last_out:
                f = f.permute(0, 3, 1, 2)
            s = self._out_strides[name]
            out[name] = f[:, :, : (h + s - 1) // s, : (w + s - 1) // s]
        return out

    def output_shape(self):
        return {
            name: ShapeSpec(channels=self._out_channels[name], stride=self._out_strides[name])
            for name in self._out_features
        }


def _check_pixel_stats(cfg, pretrained_cfg):
    """Warn when MODEL.PIXEL_MEAN / PIXEL_STD are not the normalisation the weights expect."""
    mean, std = pretrained_cfg.get("mean"), pretrained_cfg.get("std")
    if not mean or not std or len(mean) != len(cfg.MODEL.PIXEL_MEAN):
        return
    order = slice(None, None, -1) if cfg.INPUT.FORMAT == "BGR" else slice(None)
    want_mean = [255.0 * v for v in mean][order]
    want_std = [255.0 * v for v in std][order]
    close = all(abs(a - b) < 1e-2 for a, b in zip(cfg.MODEL.PIXEL_MEAN, want_mean)) and all(
        abs(a - b) < 1e-2 for a, b in zip(cfg.MODEL.PIXEL_STD, want_std)
    )
    if not close:
        logger.warning(
            "MODEL.PIXEL_MEAN %s / PIXEL_STD %s differ from the normalisation of the %s weights "
            "(%s order: mean %s, std %s)",
            list(cfg.MODEL.PIXEL_MEAN),
            list(cfg.MODEL.PIXEL_STD),
            cfg.MODEL.TIMM.NAME,
            cfg.INPUT.FORMAT,
            [round(v, 3) for v in want_mean],
            [round(v, 3) for v in want_std],
        )


@BACKBONE_REGISTRY.register()
def build_timm_backbone(cfg, input_shape=None):
    """
    A timm feature extractor (``MODEL.TIMM.*``); when ``MODEL.TIMM.WEIGHTS`` is set, its weights
    are read from that local file.

    Returns:
        TimmBackbone: the backbone.
    """
    backbone = TimmBackbone(cfg, input_shape)
    path = cfg.MODEL.TIMM.WEIGHTS
    if path:
        from ..checkpoint.timm_weights import convert_timm_state_dict, load_timm_state_dict

        state_dict, _ = convert_timm_state_dict(
            load_timm_state_dict(path),
            cfg.MODEL.TIMM.NAME,
            out_indices=cfg.MODEL.TIMM.OUT_INDICES,
            source=path,
            prefix="",
        )
        backbone.load_state_dict(state_dict)
        logger.info("Loaded %s weights from %s", cfg.MODEL.TIMM.NAME, path)
        _check_pixel_stats(cfg, backbone.model.pretrained_cfg)
    return backbone
