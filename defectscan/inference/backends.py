"""Networks as the tiling engine's `predict`: uint8 tiles in, probabilities out.

`TorchTiles` is the one place where a torch model's input is normalised, its logits activated, and precision
(autocast), memory format and flip TTA are applied; `TileBackend` is what it shares with the ONNX Runtime
backend (`onnx_backend.OnnxTiles`).
"""

from __future__ import annotations

import abc
import contextlib
from typing import Literal, Sequence

import torch
from torch import nn

from defectscan.runtime import autocast, exact_float32, precision_name, resolve_amp, resolve_device

Head = Literal["sigmoid", "softmax", "none"]
_TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (3,), (2,), (2, 3))


def activate(logits: torch.Tensor, head: Head) -> torch.Tensor:
    logits = logits.float()
    if head == "sigmoid":
        return torch.sigmoid(logits)
    if head == "softmax":
        return torch.softmax(logits, dim=1)
    return logits


def _weights_channels_last(model: nn.Module) -> bool:
    for p in model.parameters():
        if p.ndim == 4 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1:  # a real conv kernel: formats differ
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


class TileBackend(abc.ABC):
    """What every tile predictor shares: (B, th, tw, C) uint8 tiles -> normalised float input -> logits (from
    `forward`, the backend's own) -> activated probabilities, averaged over flips with TTA.

    Subclasses set `device`, `head`, `tta`, `scale` / `shift` (via `_set_normalisation`) and implement `forward`
    and `precision`. `fixed_size`: the only (height, width) the backend takes, or None for any multiple of the
    model's stride.
    """

    device: torch.device
    head: Head
    tta: bool
    channels_last: bool = False
    fixed_size: tuple[int, int] | None = None
    fallback_note: str | None = None  # set when the backend had to change how it runs mid-run (ONNX providers)

    def _set_normalisation(self, mean: Sequence[float], std: Sequence[float]) -> None:
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.scale, self.shift = 1.0 / (255.0 * std_t), mean_t / std_t  # (x/255 - mean)/std as one multiply-add

    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"

    @property
    @abc.abstractmethod
    def precision(self) -> str:
        """What the forward passes compute in: recorded in every output."""

    def normalise(self, tiles: torch.Tensor) -> torch.Tensor:
        """(B, th, tw, C) uint8 -> (B, C, th, tw) float32 network input on the backend's device."""
        x = tiles.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        return x.mul_(self.scale).sub_(self.shift)

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised (B, C, th, tw) input -> (B, K, th, tw) logits."""

    def _context(self):
        return contextlib.nullcontext()

    @torch.inference_mode()
    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        x = self.normalise(tiles)
        flips = _TTA_FLIPS if self.tta else ((),)
        total = None
        with self._context():
            for dims in flips:
                xi = torch.flip(x, dims) if dims else x
                p = activate(self.forward(xi), self.head)
                p = torch.flip(p, dims) if dims else p
                total = p if total is None else total + p
        return total / len(flips)


class TorchTiles(TileBackend):
    """A torch segmentation network as a tile predictor: (B, th, tw, 3) uint8 -> (B, C, th, tw) float32.

    The model is used where it is and as it is: nothing here moves it, changes its mode or its memory format
    (callers put it in eval mode). `device` defaults to the device of the model's parameters, `channels_last` to
    the memory format of its convolution weights (inputs in another format than the weights cost a conversion).
    `trained_in` (the precision the model was trained in) lets `amp='auto'` pick bf16 where that is safe
    (`runtime.resolve_amp`).
    """

    def __init__(self, model: nn.Module, *, head: Head = "sigmoid", mean: Sequence[float], std: Sequence[float],
                 amp: str = "auto", tta: bool = False, channels_last: bool | None = None,
                 device: str | torch.device | None = None, trained_in: str | None = None) -> None:
        if device is None:
            param = next(model.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
        self.model, self.head, self.tta = model, head, tta
        self.device = resolve_device(device)
        self.amp_dtype = resolve_amp(amp, self.device, trained_in=trained_in)
        exact_float32(self.device, self.amp_dtype)
        self.channels_last = _weights_channels_last(model) if channels_last is None else channels_last
        self._set_normalisation(mean, std)

    @property
    def precision(self) -> str:
        return precision_name(self.amp_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _context(self):
        return autocast(self.device, self.amp_dtype)
