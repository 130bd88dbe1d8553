"""Stitching tile predictions into one map.

Both emit finished rows in order, as soon as no later tile can change them, so a caller can write them out (or
segment them) strip by strip and never hold the whole map.

* ``center`` (overlap-tile): each output pixel comes from the one tile that owns it, where it lies furthest from
  the tile border. For a convolutional network whose effective receptive field is within ``p = overlap // 2``
  this reproduces whole-image inference exactly; it is also the fastest and needs no float accumulator.
* ``gaussian``: every tile contributes with a Gaussian weight peaking at its centre (sigma = sigma_scale * t),
  normalised by the summed weights. It hides seams when the margin is smaller than the receptive field or when
  the network's output depends on absolute tile position (global attention, padding artefacts). It needs a float
  accumulator of one tile-row strip (C x t x W), never of the whole image.
"""

from __future__ import annotations

from typing import Callable, Literal

import numpy as np
import torch

from defectscan.errors import DefectscanError
from defectscan.tiling.layout import TileLayout

StitchMode = Literal["center", "gaussian"]
STITCH_MODES = ("center", "gaussian")


def check_stitch(stitch: str) -> None:
    if stitch not in STITCH_MODES:
        raise DefectscanError(f"unknown stitch mode '{stitch}' (choose center or gaussian)")


def _gaussian_1d(length: int, sigma_scale: float) -> np.ndarray:
    centre = (length - 1) / 2.0
    sigma = max(sigma_scale * length, 1e-3)
    g = np.exp(-((np.arange(length) - centre) ** 2) / (2 * sigma**2))
    return np.maximum(g / g.max(), 1e-6).astype(np.float32)


def quantize(p: torch.Tensor, dtype: np.dtype) -> torch.Tensor:
    """Probabilities in [0, 1] -> the output dtype (uint8: probability * 255, rounded); a tensor already in that
    dtype was quantized before (on the GPU, by the engine) and is returned as it is."""
    if dtype == np.uint8:
        return p if p.dtype == torch.uint8 else (p * 255.0 + 0.5).clamp_(0, 255).to(torch.uint8)
    return p.to(torch.float16 if dtype == np.float16 else torch.float32)


Emit = Callable[[int, np.ndarray], None]  # (first image row, (C, rows, W) final block), called in row order


class CenterStitcher:
    """Each tile writes its owned region into a strip one tile row high; the strip is final, and emitted, when the
    next tile row starts. No float accumulator, and never more than one strip of the output in memory."""

    def __init__(self, layout: TileLayout, channels: int, dtype: np.dtype, emit: Emit) -> None:
        self.layout, self.channels, self.dtype, self.emit = layout, channels, np.dtype(dtype), emit
        self.row, self.strip = -1, None

    def add(self, iy: int, ix: int, probs: torch.Tensor) -> None:
        rows, cols = self.layout.rows, self.layout.cols
        if iy != self.row:
            self._flush()
            y0, y1 = rows.owned(iy)
            self.row, self.strip = iy, np.empty((self.channels, y1 - y0, cols.length), self.dtype)
        (y0, y1), (x0, x1) = rows.owned(iy), cols.owned(ix)
        ly, lx = y0 - rows.origin(iy), x0 - cols.origin(ix)
        crop = probs[:, ly : ly + (y1 - y0), lx : lx + (x1 - x0)]
        self.strip[:, :, x0:x1] = quantize(crop, self.dtype).cpu().numpy()

    def _flush(self) -> None:
        if self.strip is not None:
            self.emit(self.layout.rows.owned(self.row)[0], self.strip)
            self.strip = None

    def finish(self) -> None:
        self._flush()


class GaussianStitcher:
    """Gaussian-weighted blending over a rolling strip one tile high.

    Weights are separable and the tiles form a full grid, so the normaliser (sum of weights) is the outer product
    of two 1-D sums: no full-size weight map. Rows above the next tile row's first row are final; they are
    normalised, emitted and the strip shifts up.
    """

    def __init__(self, layout: TileLayout, channels: int, dtype: np.dtype, emit: Emit, sigma_scale: float) -> None:
        self.layout, self.dtype, self.emit = layout, np.dtype(dtype), emit
        rows, cols = layout.rows, layout.cols
        self.gy, self.gx = _gaussian_1d(rows.tile, sigma_scale), _gaussian_1d(cols.tile, sigma_scale)
        self.weight = torch.from_numpy(np.outer(self.gy, self.gx))
        span_y = (rows.count - 1) * rows.step + rows.tile
        span_x = (cols.count - 1) * cols.step + cols.tile
        self.norm_y = np.zeros(span_y, np.float32)
        for k in range(rows.count):
            self.norm_y[k * rows.step : k * rows.step + rows.tile] += self.gy
        self.norm_x = np.zeros(span_x, np.float32)
        for k in range(cols.count):
            self.norm_x[k * cols.step : k * cols.step + cols.tile] += self.gx
        self.strip = np.zeros((channels, rows.tile, span_x), np.float32)
        self.row = 0

    def add(self, iy: int, ix: int, probs: torch.Tensor) -> None:
        while iy > self.row:
            self._flush(final=False)
        if self.weight.device != probs.device:
            self.weight = self.weight.to(probs.device)
        x0 = ix * self.layout.cols.step
        self.strip[:, :, x0 : x0 + self.layout.cols.tile] += (probs.float() * self.weight).cpu().numpy()

    def _flush(self, final: bool) -> None:
        rows, cols = self.layout.rows, self.layout.cols
        top = self.row * rows.step  # strip row 0 in padded coordinates
        n = rows.tile if final else rows.step
        # padded coordinate c <-> image coordinate c - pad; keep only rows/cols inside the image
        y0, y1 = max(top, rows.pad), min(top + n, rows.pad + rows.length)
        x0, x1 = cols.pad, cols.pad + cols.length
        if y1 > y0:
            norm = self.norm_y[y0:y1, None] * self.norm_x[None, x0:x1]
            block = self.strip[:, y0 - top : y1 - top, x0:x1] / norm
            self.emit(y0 - rows.pad, quantize(torch.from_numpy(block), self.dtype).numpy())
        if not final:
            keep = rows.tile - rows.step
            self.strip[:, :keep] = self.strip[:, rows.step :]
            self.strip[:, keep:] = 0.0
            self.row += 1

    def finish(self) -> None:
        self._flush(final=True)


