"""Plain ViT with a simple feature pyramid (ViTDet), as a 4-level segmentation encoder.

The no-inductive-bias reference beside the CNNs, Swin and ViTAE: timm's ViT-S/16 (12 blocks of global attention,
384 channels, 22 M parameters) on any tile whose sides are multiples of 32 (its 14 x 14 position embeddings are
interpolated to the tile's patch grid at every forward, `dynamic_img_size`), then ViTDet's simple pyramid (Li et
al., "Exploring Plain Vision Transformer Backbones for Object Detection", ECCV 2022): from the last block's
stride-16 map alone,

    (B, 384, H/16, W/16) -> deconv 2x, LN, GELU, deconv 2x   -> (B,  96, H/4,  W/4)
                         -> deconv 2x                         -> (B, 192, H/8,  W/8)
                         -> identity                          -> (B, 384, H/16, W/16)
                         -> max-pool 2x                       -> (B, 384, H/32, W/32)

each level then projected by 1x1 conv + LN + 3x3 conv + LN (channels `VitVariant.dims`). So every decoder
(Unet, FPN, UPerNet, Segformer) takes it, like smp's own encoders. Output stride 16 for DeepLabV3+ is not offered.

Attention is global over the tile: cost grows with the square of the token count (a 512 px tile: 1024 tokens).
Weights: timm ViT checkpoints (`load_timm_weights`: ImageNet files from the hub, position embeddings resampled
when their grid differs), our own encoder state dicts (e.g. from self-supervised pretraining), or ImageNet through
timm's hub download (`imagenet_weights`, needs internet). The pyramid is always new.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import LayerNorm2d, resample_abs_pos_embed
from torch import nn

from defectscan.models.encoders.layers import conv_with_in_channels

try:
    from segmentation_models_pytorch.encoders._base import EncoderMixin
except ImportError:  # pragma: no cover - smp is a hard dependency; keep the backbone importable without it
    EncoderMixin = object  # type: ignore[assignment,misc]


@dataclass(frozen=True)
class VitVariant:
    timm_name: str
    dims: tuple[int, int, int, int]  # pyramid channels at strides 4, 8, 16, 32


VARIANTS: dict[str, VitVariant] = {
    "vit_s": VitVariant("vit_small_patch16_224", (96, 192, 384, 384)),
}


class SimplePyramid(nn.Module):
    """(B, C, H/16, W/16) -> [(B, d4, H/4, W/4), (B, d8, H/8, W/8), (B, d16, H/16, W/16), (B, d32, H/32, W/32)]."""

    def __init__(self, dim: int, dims: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.scales = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), LayerNorm2d(dim // 2), nn.GELU(),
                          nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2)),
            nn.ConvTranspose2d(dim, dim // 2, 2, stride=2),
            nn.Identity(),
            nn.MaxPool2d(2),
        ])
        self.proj = nn.ModuleList([
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), LayerNorm2d(c_out),
                          nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), LayerNorm2d(c_out))
            for c_in, c_out in zip((dim // 4, dim // 2, dim, dim), dims)
        ])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [proj(scale(x)) for scale, proj in zip(self.scales, self.proj)]


class VitEncoder(nn.Module, EncoderMixin):
    """ViT + simple pyramid as an smp encoder: returns [x, empty (1/2), 1/4, 1/8, 1/16, 1/32] like smp's own
    transformer encoders. `overrides` go to timm's VisionTransformer (e.g. drop_path_rate)."""

    def __init__(self, variant: str, out_channels: list[int], depth: int = 5, output_stride: int = 32,
                 **overrides: Any) -> None:
        if depth != 5:
            raise ValueError("ViT encoders have a fixed depth of 5 (four pyramid levels)")
        if output_stride != 32:
            raise ValueError("ViT encoders run at output stride 32 only")
        super().__init__()
        v = VARIANTS[variant]
        self.variant = variant
        self.vit = timm.create_model(v.timm_name, pretrained=False, num_classes=0, global_pool="",
                                     dynamic_img_size=True, **overrides)
        self.pyramid = SimplePyramid(self.vit.embed_dim, v.dims)
        self._depth = depth
        self._in_channels = 3
        self._out_channels = out_channels
        self._output_stride = output_stride

    def make_dilated(self, output_stride: int) -> None:
        raise ValueError("ViT encoders run at output stride 32 only")

    def set_in_channels(self, in_channels: int, pretrained: bool = True) -> None:
        if in_channels == 3:
            return
        self._in_channels = in_channels
        self._out_channels = [in_channels] + list(self._out_channels[1:])
        self.vit.patch_embed.proj = conv_with_in_channels(self.vit.patch_embed.proj, in_channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b, _, h, w = x.shape
        if h % 32 or w % 32:
            raise ValueError(f"ViT input sides must be multiples of 32, got {h} x {w}")
        tokens = self.vit.forward_intermediates(x, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True)
        return [x, x.new_empty((b, 0, h // 2, w // 2)), *self.pyramid(tokens[-1])]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # noqa: D102
        state_dict = {k: v for k, v in state_dict.items() if not _is_classifier_key(k)}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _is_classifier_key(key: str) -> bool:
    return key.startswith(("head.", "vit.head.", "fc_norm.", "vit.fc_norm."))


def register_smp_encoders() -> None:
    """Add every variant to smp's encoder registry (idempotent)."""
    from segmentation_models_pytorch.encoders import encoders

    for name, v in VARIANTS.items():
        encoders.setdefault(name, {"encoder": VitEncoder, "pretrained_settings": {},
                                   "params": {"variant": name, "out_channels": [3, 0, *v.dims]}})


def rebuilt(old: VitEncoder, encoder_kwargs: dict[str, Any], in_channels: int) -> VitEncoder:
    """smp passes no options to registered encoders: one built with them (same output channels)."""
    new = VitEncoder(old.variant, list(old._out_channels), **encoder_kwargs)
    new.set_in_channels(in_channels, pretrained=False)
    return new


def _timm_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm ViT state dict (or one saved from a wrapper: `module.`, `backbone.`, `encoder.` prefixes) as our
    encoder's keys (`vit.*`); keys already in our layout (`vit.*`, `pyramid.*`) pass unchanged."""
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "backbone.", "encoder."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k if k.startswith(("vit.", "pyramid.")) else "vit." + k] = v
    return out


def load_timm_weights(encoder: VitEncoder, path: str | Path) -> tuple[list[str], list[str]]:
    """Load a ViT checkpoint file into `encoder`; returns (missing, unexpected) keys. Missing pyramid keys do not
    count (timm checkpoints have no pyramid); position embeddings of another grid are resampled."""
    from defectscan.models.weights import load_state_file

    state = _timm_layout(load_state_file(Path(path)))
    return _load(encoder, state)


def _load(encoder: VitEncoder, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    own = encoder.state_dict()
    pos = state.get("vit.pos_embed")
    if pos is not None and pos.shape != own["vit.pos_embed"].shape:
        prefix = 0 if encoder.vit.no_embed_class else encoder.vit.num_prefix_tokens
        state["vit.pos_embed"] = resample_abs_pos_embed(pos, list(encoder.vit.patch_embed.grid_size),
                                                        num_prefix_tokens=prefix)
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    unexpected = sorted(k for k in set(state) - set(fitting) if not _is_classifier_key(k[len("vit."):]))
    missing = sorted(k for k in set(own) - set(fitting) if not k.startswith("pyramid."))
    nn.Module.load_state_dict(encoder, fitting, strict=False)
    return missing, unexpected


def imagenet_weights(encoder: VitEncoder) -> None:
    """ImageNet weights through timm's hub download (internet needed; the tool's machines have none)."""
    src = timm.create_model(VARIANTS[encoder.variant].timm_name, pretrained=True, num_classes=0, global_pool="")
    missing, _ = _load(encoder, {"vit." + k: v for k, v in src.state_dict().items()})
    if missing:
        raise ValueError(f"{len(missing)} ViT weights missing from timm's ImageNet checkpoint (e.g. {missing[0]})")
