"""ViTAEv2: a vision transformer with convolutional inductive bias, as a 4-level segmentation encoder.

Written from the paper (Zhang et al., "ViTAEv2: Vision Transformer Advanced by Exploring Inductive Bias for Image
Recognition and Beyond", IJCV 2023) and the architecture fact sheet in shared/docs/vitae.md. Each of the four
stages is

    ReductionCell  (B, Cin, H, W) -> (B, C, H/s, W/s)
        PRM: parallel dilated convolutions (stride s), concatenated  -> tokens (B, N, |D|*E)
        attention on the tokens (window 7x7 or global)               -> (B, N, C)
        + PCM: a parallel 3-conv branch on the input map              (locality)
        + MLP
    NormalCell x depth  (B, N, C) -> (B, N, C)
        attention (window or global) beside a parallel conv branch (PCM), then MLP

with strides 4, 2, 2, 2 (outputs at 1/4 ... 1/32). The dilated pyramid gives scale invariance, the conv branches
locality; there is no position embedding (position comes from the convolutions), so any input whose sides are
multiples of the output stride works, and weights do not depend on the tile size.

Variants (`VARIANTS`): `vitae_s` is the published ViTAEv2-S (window attention in stages 1-2, global in 3-4);
`*_win` variants use 7x7 windows in all four stages, so cost grows linearly with tile area (needed for large
tiles); `vitae_t` is our small CPU-friendly design. Parameter names follow the official checkpoints
(`layers.{i}.RC...`, `layers.{i}.NC.{k}...`), so ImageNet weights load with `load_official_weights`.

Deliberate differences from the official code: the stochastic-depth rate grows linearly over all normal cells
of all stages (the official slicing restarts per stage and never reaches the set rate), `train()` returns the
module, and the conv branches may use GroupNorm instead of BatchNorm (`pcm_norm="group"`) for training on tiny
batches. Defaults reproduce the published network.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import nn

from defectscan.models.encoders.layers import conv_with_in_channels

WINDOW = 7


@dataclass(frozen=True)
class ViTAEConfig:
    token_dims: tuple[int, int, int, int]  # C per stage (output channels)
    embed_dims: tuple[int, int, int, int]  # E: width of each PRM branch and of the RC conv branch
    depths: tuple[int, int, int, int]  # normal cells per stage
    nc_heads: tuple[int, int, int, int]
    rc_heads: tuple[int, int, int, int]
    nc_groups: tuple[int, int, int, int]  # groups of the NC conv branch
    rc_groups: tuple[int, int, int, int]
    attention: tuple[str, str, str, str] = ("window", "window", "global", "global")
    kernels: tuple[int, int, int, int] = (7, 3, 3, 3)
    dilations: tuple[tuple[int, ...], ...] = ((1, 2, 3, 4), (1, 2, 3), (1, 2), (1, 2))
    strides: tuple[int, int, int, int] = (4, 2, 2, 2)
    nc_mlp_ratio: float = 4.0
    rc_mlp_ratio: float = 1.0
    drop_path: float = 0.0
    pcm_norm: str = "batch"  # batch (published) or group


_S = ViTAEConfig(
    token_dims=(64, 128, 256, 512), embed_dims=(64, 64, 128, 256), depths=(2, 2, 8, 2),
    nc_heads=(1, 2, 4, 8), rc_heads=(1, 1, 2, 4), nc_groups=(1, 32, 64, 128), rc_groups=(1, 16, 32, 64),
)
# Our small variant for CPUs and tiny datasets: 3/4 of S's widths in stage 1, half of them later, 1-1-3-1 cells.
_T = ViTAEConfig(
    token_dims=(48, 96, 192, 384), embed_dims=(32, 32, 64, 128), depths=(1, 1, 3, 1),
    nc_heads=(1, 2, 4, 8), rc_heads=(1, 1, 2, 4), nc_groups=(1, 16, 32, 64), rc_groups=(1, 8, 16, 32),
)
_ALL_WINDOW = ("window", "window", "window", "window")
VARIANTS: dict[str, ViTAEConfig] = {
    "vitae_s": _S,
    "vitae_s_win": replace(_S, attention=_ALL_WINDOW),
    "vitae_t": _T,
    "vitae_t_win": replace(_T, attention=_ALL_WINDOW),
}


def _norm2d(kind: str, channels: int) -> nn.Module:
    if kind not in ("batch", "group"):
        raise ValueError(f"pcm_norm must be batch or group, not {kind!r}")
    if kind == "group":  # independent of the batch size; groups of 8 channels
        return nn.GroupNorm(channels // 8 if channels % 8 == 0 else 1, channels)
    return nn.BatchNorm2d(channels)


def parallel_conv_branch(widths: Sequence[int], strides: Sequence[int], groups: int, norm: str) -> nn.Sequential:
    """PCM: conv3x3 -> norm -> SiLU -> conv3x3 -> norm -> SiLU -> conv3x3 through `widths` (c0, c1, c2, c3).

    Reduction cells use (Cin, E, E, C), normal cells (C, 4C, C, C). Indices 0, 1, 3, 4, 6 hold parameters, as in
    the official checkpoints."""
    c0, c1, c2, c3 = widths
    s0, s1, s2 = strides
    return nn.Sequential(
        nn.Conv2d(c0, c1, 3, s0, 1, groups=groups), _norm2d(norm, c1), nn.SiLU(inplace=True),
        nn.Conv2d(c1, c2, 3, s1, 1, groups=groups), _norm2d(norm, c2), nn.SiLU(inplace=True),
        nn.Conv2d(c2, c3, 3, s2, 1, groups=groups),
    )


class Attention(nn.Module):
    """Multi-head self-attention (B, N, in_dim) -> (B, N, dim); `value_skip` adds the values (merged heads) to
    the output, the residual path of the global reduction cell, whose input and output widths differ."""

    def __init__(self, in_dim: int, dim: int, heads: int, qkv_bias: bool = True, value_skip: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads, self.dim, self.value_skip = heads, dim, value_skip
        self.qkv = nn.Linear(in_dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, self.dim)
        out = self.proj(out)
        if self.value_skip:
            out = out + v.transpose(1, 2).reshape(b, n, self.dim)
        return out


def attend(attn: Attention, tokens: torch.Tensor, size: tuple[int, int], window: bool) -> torch.Tensor:
    """Global attention over all tokens, or attention inside non-overlapping 7x7 windows.

    Windows: the (h, w) map is zero-padded to multiples of 7, centred as in the published model (no masking, no
    shift), attended window by window, and cropped back. (B, h*w, Cin) -> (B, h*w, C)."""
    if not window:
        return attn(tokens)
    b, _, c_in = tokens.shape
    h, w = size
    ph, pw = (-h) % WINDOW, (-w) % WINDOW
    top, left = ph // 2, pw // 2
    x = tokens.view(b, h, w, c_in)
    if ph or pw:
        x = F.pad(x, (0, 0, left, pw - left, top, ph - top))
    hp, wp = h + ph, w + pw
    nh, nw = hp // WINDOW, wp // WINDOW
    windows = x.view(b, nh, WINDOW, nw, WINDOW, c_in).permute(0, 1, 3, 2, 4, 5).reshape(-1, WINDOW * WINDOW, c_in)
    out = attn(windows)
    c = out.shape[-1]
    out = out.view(b, nh, nw, WINDOW, WINDOW, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
    return out[:, top : top + h, left : left + w].reshape(b, h * w, c)


class PyramidReduction(nn.Module):
    """PRM: one strided conv + GELU per dilation, concatenated. (B, Cin, H, W) -> (B, |D|*E, H/s, W/s)."""

    def __init__(self, c_in: int, embed: int, kernel: int, stride: int, dilations: Sequence[int]) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride
        self.convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c_in, embed, kernel, stride, self._padding(d), dilation=d), nn.GELU())
            for d in dilations
        )

    def _padding(self, dilation: int) -> int:
        # keeps every branch at ceil(H / stride) for H divisible by the stride, whatever the dilation
        return math.ceil(((self.kernel - 1) * dilation + 1 - self.stride) / 2)

    def set_stride(self, stride: int) -> None:
        self.stride = stride
        for branch in self.convs:
            conv = branch[0]
            conv.stride = (stride, stride)
            p = self._padding(conv.dilation[0])
            conv.padding = (p, p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.convs], dim=1)


class _RCAttention(nn.Module):
    """The reduction cell's attention sub-block; names match the official `RC.attn.*` keys."""

    def __init__(self, in_dim: int, dim: int, heads: int, mlp_ratio: float, window: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(in_dim, eps=1e-5)
        # global RC: bias-free qkv and the values as residual; window RC: biased qkv, no residual
        self.attn = Attention(in_dim, dim, heads, qkv_bias=window, value_skip=not window)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))


class ReductionCell(nn.Module):
    """(B, Cin, H, W) -> tokens (B, H/s * W/s, C) and their map size."""

    def __init__(self, c_in: int, dim: int, embed: int, heads: int, kernel: int, stride: int,
                 dilations: Sequence[int], groups: int, window: bool, mlp_ratio: float, norm: str) -> None:
        super().__init__()
        self.window = window
        self.PRM = PyramidReduction(c_in, embed, kernel, stride, dilations)
        self.PCM = parallel_conv_branch((c_in, embed, embed, dim), self._pcm_strides(stride), groups, norm)
        self.attn = _RCAttention(embed * len(dilations), dim, heads, mlp_ratio, window)

    @staticmethod
    def _pcm_strides(stride: int) -> tuple[int, int, int]:
        return {4: (2, 2, 1), 2: (2, 1, 1), 1: (1, 1, 1)}[stride]

    def set_stride(self, stride: int) -> None:
        """Change the downsampling without changing any parameter shape (output stride 16 for DeepLab)."""
        self.PRM.set_stride(stride)
        for conv, s in zip((self.PCM[0], self.PCM[3], self.PCM[6]), self._pcm_strides(stride)):
            conv.stride = (s, s)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        pyramid = self.PRM(x)
        b, _, h, w = pyramid.shape
        tokens = pyramid.flatten(2).transpose(1, 2)
        a = attend(self.attn.attn, self.attn.norm1(tokens), (h, w), self.window)
        conv = self.PCM(x)
        if conv.shape[-2:] != (h, w):
            raise ValueError(f"ViTAE: input {tuple(x.shape[-2:])} gives misaligned branches; sides must be "
                             f"multiples of the encoder's output stride")
        y = a + conv.flatten(2).transpose(1, 2)
        y = y + self.attn.mlp(self.attn.norm2(y))
        return y, (h, w)


class NormalCell(nn.Module):
    """(B, N, C) -> (B, N, C): attention beside a conv branch on the un-normalised map, then an MLP."""

    def __init__(self, dim: int, heads: int, groups: int, window: bool, mlp_ratio: float, drop_path: float,
                 norm: str) -> None:
        super().__init__()
        self.window = window
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, dim, heads)
        self.PCM = parallel_conv_branch((dim, hidden, dim, dim), (1, 1, 1), groups, norm)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, hidden)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        b, n, c = x.shape
        a = attend(self.attn, self.norm1(x), size, self.window)
        conv = self.PCM(x.transpose(1, 2).reshape(b, c, *size)).flatten(2).transpose(1, 2)
        x = x + self.drop_path(a) + self.drop_path(conv)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Stage(nn.Module):
    """One reduction cell and its normal cells. (B, Cin, H, W) -> (B, C, H/s, W/s)."""

    def __init__(self, c_in: int, i: int, cfg: ViTAEConfig, drop_paths: Sequence[float]) -> None:
        super().__init__()
        window = cfg.attention[i] == "window"
        dim = cfg.token_dims[i]
        self.RC = ReductionCell(c_in, dim, cfg.embed_dims[i], cfg.rc_heads[i], cfg.kernels[i], cfg.strides[i],
                                cfg.dilations[i], cfg.rc_groups[i], window, cfg.rc_mlp_ratio, cfg.pcm_norm)
        self.NC = nn.ModuleList(
            NormalCell(dim, cfg.nc_heads[i], cfg.nc_groups[i], window, cfg.nc_mlp_ratio, dp, cfg.pcm_norm)
            for dp in drop_paths
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens, (h, w) = self.RC(x)
        for cell in self.NC:
            tokens = cell(tokens, (h, w))
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, h, w)


class ViTAE(nn.Module):
    """The 4-stage ViTAEv2 backbone. (B, in_chans, H, W) -> [(B, C1, H/4, W/4), ..., (B, C4, H/32, W/32)]."""

    def __init__(self, cfg: ViTAEConfig, in_chans: int = 3) -> None:
        super().__init__()
        self.cfg = cfg
        total = sum(cfg.depths)
        rates = torch.linspace(0, cfg.drop_path, total).tolist() if total else []
        starts = [sum(cfg.depths[:i]) for i in range(4)]
        channels = (in_chans, *cfg.token_dims[:3])
        self.layers = nn.ModuleList(
            Stage(channels[i], i, cfg, rates[starts[i] : starts[i] + cfg.depths[i]]) for i in range(4)
        )
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def reduction(self) -> int:
        """Current total downsampling (32, or 16 after `set_output_stride(16)`)."""
        return math.prod(layer.RC.PRM.stride for layer in self.layers)

    def set_output_stride(self, output_stride: int) -> None:
        if output_stride not in (16, 32):
            raise ValueError(f"ViTAE supports output stride 16 or 32, not {output_stride}")
        self.layers[3].RC.set_stride(2 if output_stride == 32 else 1)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        r = self.reduction
        if x.shape[-2] % r or x.shape[-1] % r:
            raise ValueError(f"ViTAE needs input sides that are multiples of {r}, got "
                             f"{x.shape[-1]}x{x.shape[-2]} (choose a tile size that is a multiple of {r})")
        features = []
        for layer in self.layers:
            x = layer(x)
            features.append(x)
        return features

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_features(x)


def create_vitae(name: str, **overrides: Any) -> ViTAE:
    """A ViTAE backbone by variant name, e.g. create_vitae('vitae_s', drop_path=0.1, pcm_norm='group')."""
    if name not in VARIANTS:
        raise KeyError(f"unknown ViTAE variant '{name}' (available: {', '.join(VARIANTS)})")
    in_chans = overrides.pop("in_chans", 3)
    return ViTAE(replace(VARIANTS[name], **overrides), in_chans=in_chans)


# --- segmentation-models-pytorch encoder ------------------------------------------------------------------------

try:
    from segmentation_models_pytorch.encoders._base import EncoderMixin
except ImportError:  # pragma: no cover - smp is a hard dependency; keep the backbone importable without it
    EncoderMixin = object  # type: ignore[assignment,misc]


class ViTAEEncoder(ViTAE, EncoderMixin):
    """ViTAE as an smp encoder: returns [x, empty (1/2), 1/4, 1/8, 1/16, 1/32] like smp's own transformer
    encoders, so Unet, FPN, UPerNet, DeepLabV3+ and Segformer decoders all accept it."""

    def __init__(self, variant: str, out_channels: list[int], depth: int = 5, output_stride: int = 32,
                 **overrides: Any) -> None:
        if depth != 5:
            raise ValueError("ViTAE encoders have a fixed depth of 5 (four stages)")
        ViTAE.__init__(self, replace(VARIANTS[variant], **overrides))
        self.variant = variant
        self._depth = depth
        self._in_channels = 3
        self._out_channels = out_channels
        self._output_stride = output_stride

    def make_dilated(self, output_stride: int) -> None:
        self.set_output_stride(output_stride)
        self._output_stride = output_stride

    def set_in_channels(self, in_channels: int, pretrained: bool = True) -> None:
        if in_channels == 3:
            return
        self._in_channels = in_channels
        self._out_channels = [in_channels] + list(self._out_channels[1:])
        rc = self.layers[0].RC
        for branch in rc.PRM.convs:  # every first-stage conv reads the image
            branch[0] = conv_with_in_channels(branch[0], in_channels)
        rc.PCM[0] = conv_with_in_channels(rc.PCM[0], in_channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b, _, h, w = x.shape
        empty = x.new_empty((b, 0, h // 2, w // 2))
        return [x, empty, *self.forward_features(x)]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # noqa: D102
        state_dict = {k: v for k, v in state_dict.items() if not _is_classification_key(k)}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _is_classification_key(key: str) -> bool:
    return key.startswith("head.") or key.endswith("relative_position_index") or key.startswith("norm.")


def rebuilt(old: ViTAEEncoder, encoder_kwargs: dict[str, Any], in_channels: int) -> ViTAEEncoder:
    """smp passes no options to registered encoders: one built with them (same output channels)."""
    bad = sorted(set(encoder_kwargs) - set(VARIANTS[old.variant].__dataclass_fields__))
    if bad:
        raise ValueError(f"unknown ViTAE option(s) {', '.join(bad)} (e.g. drop_path, pcm_norm)")
    new = ViTAEEncoder(old.variant, list(old._out_channels), **encoder_kwargs)
    new.set_in_channels(in_channels, pretrained=False)
    if old.reduction != 32:
        new.make_dilated(old.reduction)
    return new


def register_smp_encoders() -> None:
    """Add every variant to smp's encoder registry (idempotent)."""
    from segmentation_models_pytorch.encoders import encoders

    for name, cfg in VARIANTS.items():
        encoders.setdefault(name, {
            "encoder": ViTAEEncoder,
            "pretrained_settings": {},
            "params": {"variant": name, "out_channels": [3, 0, *cfg.token_dims]},
        })


# --- official ImageNet checkpoints --------------------------------------------------------------------------------

def official_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Backbone weights from an official ViTAEv2 checkpoint (.pth), in our (identical) key layout.

    Takes the EMA weights when present (as the official segmentation code does), strips `module.`/`backbone.`
    prefixes and drops what only the classifier uses (`head.*`, `relative_position_index` buffers)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        raw = load_file(str(path))
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
        except Exception as exc:
            raise ValueError(f"{path}: not a readable weights file ({type(exc).__name__})") from None
    if isinstance(raw, dict):
        for key in ("state_dict_ema", "state_dict", "model"):
            if isinstance(raw.get(key), dict):
                raw = raw[key]
                break
    out = {}
    for k, v in raw.items():
        if not isinstance(v, torch.Tensor):
            continue
        for prefix in ("module.", "backbone.", "encoder."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if not _is_classification_key(k):
            out[k] = v
    return out


def load_official_weights(model: ViTAE, path: str | Path) -> tuple[list[str], list[str]]:
    """Load an official checkpoint into `model`; returns (missing, unexpected) keys after shape checks.

    Tensors whose shapes do not fit (e.g. another variant) count as unexpected and are not loaded."""
    state = official_state_dict(path)
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    unexpected = sorted(set(state) - set(fitting))
    missing = sorted(set(own) - set(fitting))
    # The all-window variants add a qkv bias where the published global reduction cells have none; a zero bias
    # is exactly "no bias", so ViTAEv2-S weights initialise them completely.
    zero_bias = [k for k in missing if k.endswith("RC.attn.attn.qkv.bias") and k[: -len("bias")] + "weight" in fitting]
    for k in zero_bias:
        fitting[k] = torch.zeros_like(own[k])
    if zero_bias:
        warnings.warn(f"{path}: {len(zero_bias)} qkv bias(es) absent from the checkpoint set to zero "
                      f"({', '.join(zero_bias)})", stacklevel=2)
    missing = [k for k in missing if k not in zero_bias]
    ViTAE.load_state_dict(model, fitting, strict=False)
    return missing, unexpected
