"""Streaming tiled inference: slice a huge image into overlapping tiles, run the network on batches of tiles,
and stitch the probabilities into one full-resolution map in bounded memory.

Layout along one axis (image length L, tile t, overlap o, step s = t - o, pad p = o // 2)::

    tile k covers image pixels [k*s - p, k*s - p + t)      (outside the image: reflection)
    tile k owns   image pixels [k*s, (k+1)*s)              (the first from 0, the last up to L)

so every owned pixel has at least `p` pixels of context on each side inside its tile, and all tile origins lie on
one grid of pitch `s`. With `s` and `t` multiples of the network's output stride (32 for most encoders), every
tile sees the same pooling grid as a single pass over the whole reflection-padded image.

Stitch modes:

* ``center`` (overlap-tile): each output pixel comes from the one tile that owns it, where it lies furthest from
  the tile border. For a convolutional network whose effective receptive field is within ``p = overlap // 2``
  this reproduces whole-image inference exactly; it is also the fastest and needs no float accumulator.
  Use it for CNNs with enough overlap, and whenever exactness versus whole-image inference matters.
* ``gaussian``: every tile contributes with a Gaussian weight peaking at its centre (sigma = sigma_scale * t),
  normalised by the summed weights. It hides seams when the margin is smaller than the receptive field or when
  the network's output depends on absolute tile position (global attention, padding artefacts). It needs a float
  accumulator of one tile-row strip (C x t x W), never of the whole image.
"""

from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Sequence

import numpy as np
import torch
from torch import nn

from defectscan.errors import DefectscanError
from defectscan.images import ImageSource
from defectscan.runtime import autocast, resolve_amp, resolve_device

StitchMode = Literal["center", "gaussian"]
Head = Literal["sigmoid", "softmax", "none"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class AxisLayout:
    """Tile positions along one image axis."""

    length: int
    tile: int
    step: int
    pad: int
    count: int

    def origin(self, k: int) -> int:
        """Image coordinate of tile k's first pixel (negative for the first tile: reflection padding)."""
        return k * self.step - self.pad

    def owned(self, k: int) -> tuple[int, int]:
        """Image range [start, stop) that tile k writes in center mode."""
        start = 0 if k == 0 else k * self.step
        stop = self.length if k == self.count - 1 else (k + 1) * self.step
        return start, stop


@dataclass(frozen=True)
class TileLayout:
    rows: AxisLayout
    cols: AxisLayout

    @property
    def tile_shape(self) -> tuple[int, int]:
        return self.rows.tile, self.cols.tile

    @property
    def overlap(self) -> tuple[int, int]:
        return self.rows.tile - self.rows.step, self.cols.tile - self.cols.step

    def __len__(self) -> int:
        return self.rows.count * self.cols.count

    def tiles(self) -> Iterator[tuple[int, int]]:
        """(row index, column index) in raster order: gaussian stitching relies on row-major order."""
        for iy in range(self.rows.count):
            for ix in range(self.cols.count):
                yield iy, ix


def _axis_layout(length: int, tile: int, overlap: int, align: int) -> AxisLayout:
    step = ((tile - overlap) // align) * align
    if step <= 0:
        raise DefectscanError(
            f"overlap {overlap} leaves no room in tile {tile}: tile - overlap must be at least {align} (the model's stride)"
        )
    pad = (tile - step) // 2
    # Small images: a shorter tile (still a multiple of `align`) covers them with the same context, for less work.
    tile = min(tile, math.ceil((length + 2 * pad) / align) * align)
    count = 1 + max(0, math.ceil((length + 2 * pad - tile) / step))
    return AxisLayout(length=length, tile=tile, step=step, pad=pad, count=count)


def _as_pair(value: int | Sequence[int], what: str) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    pair = tuple(int(v) for v in value)
    if len(pair) != 2:
        raise DefectscanError(f"{what} must be one integer or (height, width), got {value!r}")
    return pair  # type: ignore[return-value]


def validate_tile(tile: int | Sequence[int], align: int, *, model_name: str = "this model") -> tuple[int, int]:
    """Check a tile size against the network's stride; returns (height, width)."""
    th, tw = _as_pair(tile, "tile")
    for side in (th, tw):
        if side <= 0 or side % align:
            lo = max(align, (side // align) * align)
            raise DefectscanError(
                f"tile size {side} does not fit {model_name}: it must be a positive multiple of {align} "
                f"(e.g. {lo} or {lo + align})"
            )
    return th, tw


def plan_tiles(
    height: int, width: int, tile: int | Sequence[int] = 512, overlap: int | Sequence[int] = 64, align: int = 32
) -> TileLayout:
    """Tile layout for an image; `overlap` is rounded up so the step between tiles is a multiple of `align`."""
    th, tw = validate_tile(tile, align)
    oy, ox = _as_pair(overlap, "overlap")
    if min(oy, ox) < 0 or oy >= th or ox >= tw:
        raise DefectscanError(f"overlap must be >= 0 and smaller than the tile, got overlap {overlap} for tile {tile}")
    if height <= 0 or width <= 0:
        raise DefectscanError(f"image is empty ({height}x{width})")
    return TileLayout(_axis_layout(height, th, oy, align), _axis_layout(width, tw, ox, align))


def _reflect(index: np.ndarray, n: int) -> np.ndarray:
    """Mirror indices into [0, n) without repeating the edge pixel (like numpy 'reflect'), for any distance."""
    if n == 1:
        return np.zeros_like(index)
    period = 2 * (n - 1)
    m = np.mod(index, period)
    return np.where(m >= n, period - m, m)


def read_tile(source: ImageSource, y0: int, x0: int, th: int, tw: int) -> np.ndarray:
    """Tile (th, tw, 3) uint8 whose top-left pixel is image (y0, x0); parts outside the image are reflected."""
    h, w = source.shape
    if y0 >= 0 and x0 >= 0 and y0 + th <= h and x0 + tw <= w:
        return source.read(y0, y0 + th, x0, x0 + tw)
    rows = _reflect(np.arange(y0, y0 + th), h)
    cols = _reflect(np.arange(x0, x0 + tw), w)
    return source.read_rows(rows, cols)


# ------------------------------------------------------------------------------------------------- prefetching
class _TilePrefetcher:
    """Reads batches of tiles in a background thread so slicing overlaps with the network's work.

    Batches are written into a ring of reusable (pinned, on CUDA) uint8 buffers; the ring is two longer than the
    queue, so a buffer is never refilled before the consumer has finished with the batch that used it.
    """

    def __init__(self, source: ImageSource, layout: TileLayout, batch_size: int, pin: bool, depth: int = 2) -> None:
        self.source, self.layout, self.batch_size = source, layout, batch_size
        th, tw = layout.tile_shape
        self.buffers = [
            torch.empty((batch_size, th, tw, 3), dtype=torch.uint8, pin_memory=pin) for _ in range(depth + 2)
        ]
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="defectscan-tile-reader", daemon=True)

    def _run(self) -> None:
        try:
            th, tw = self.layout.tile_shape
            tiles = list(self.layout.tiles())
            for b, start in enumerate(range(0, len(tiles), self.batch_size)):
                chunk = tiles[start : start + self.batch_size]
                buf = self.buffers[b % len(self.buffers)]
                view = buf.numpy()
                for i, (iy, ix) in enumerate(chunk):
                    view[i] = read_tile(self.source, self.layout.rows.origin(iy), self.layout.cols.origin(ix), th, tw)
                while not self.stop.is_set():
                    try:
                        self.queue.put((chunk, buf[: len(chunk)]), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return
            self.queue.put(None)
        except BaseException as exc:  # surfaced in the consumer thread
            self.queue.put(exc)

    def __iter__(self) -> Iterator[tuple[list[tuple[int, int]], torch.Tensor]]:
        self.thread.start()
        try:
            while True:
                item = self.queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.stop.set()
            self.thread.join(timeout=5)


# --------------------------------------------------------------------------------------------------- stitching
def _gaussian_1d(length: int, sigma_scale: float) -> np.ndarray:
    centre = (length - 1) / 2.0
    sigma = max(sigma_scale * length, 1e-3)
    g = np.exp(-((np.arange(length) - centre) ** 2) / (2 * sigma**2))
    return np.maximum(g / g.max(), 1e-6).astype(np.float32)


def _quantize(p: torch.Tensor, dtype: np.dtype) -> torch.Tensor:
    if dtype == np.uint8:
        return (p * 255.0 + 0.5).clamp_(0, 255).to(torch.uint8)
    return p.to(torch.float16 if dtype == np.float16 else torch.float32)


class _CenterStitcher:
    """Writes each tile's owned region straight into the output: no accumulator at all."""

    def __init__(self, layout: TileLayout, out: np.ndarray) -> None:
        self.layout, self.out = layout, out

    def add(self, iy: int, ix: int, probs: torch.Tensor) -> None:
        rows, cols = self.layout.rows, self.layout.cols
        (y0, y1), (x0, x1) = rows.owned(iy), cols.owned(ix)
        ly, lx = y0 - rows.origin(iy), x0 - cols.origin(ix)
        crop = probs[:, ly : ly + (y1 - y0), lx : lx + (x1 - x0)]
        self.out[:, y0:y1, x0:x1] = _quantize(crop, self.out.dtype).cpu().numpy()

    def finish(self) -> None:
        pass


class _GaussianStitcher:
    """Gaussian-weighted blending over a rolling strip one tile high.

    Weights are separable and the tiles form a full grid, so the normaliser (sum of weights) is the outer product
    of two 1-D sums: no full-size weight map. Rows above the next tile row's first row are final; they are
    normalised, written to the output and the strip shifts up.
    """

    def __init__(self, layout: TileLayout, out: np.ndarray, sigma_scale: float) -> None:
        self.layout, self.out = layout, out
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
        self.strip = np.zeros((out.shape[0], rows.tile, span_x), np.float32)
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
            self.out[:, y0 - rows.pad : y1 - rows.pad] = _quantize(torch.from_numpy(block), self.out.dtype).numpy()
        if not final:
            keep = rows.tile - rows.step
            self.strip[:, :keep] = self.strip[:, rows.step :]
            self.strip[:, keep:] = 0.0
            self.row += 1

    def finish(self) -> None:
        self._flush(final=True)


# ------------------------------------------------------------------------------------------------------ engine
def _activate(logits: torch.Tensor, head: Head) -> torch.Tensor:
    logits = logits.float()
    if head == "sigmoid":
        return torch.sigmoid(logits)
    if head == "softmax":
        return torch.softmax(logits, dim=1)
    return logits


_TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (3,), (2,), (2, 3))


@torch.inference_mode()
def predict_batch(
    model: nn.Module, x: torch.Tensor, head: Head, amp_dtype: torch.dtype | None, tta: bool
) -> torch.Tensor:
    """Probabilities (B, C, H, W) float32 for a normalised batch, averaged over flips when `tta`."""
    flips = _TTA_FLIPS if tta else ((),)
    total = None
    with autocast(x.device, amp_dtype):
        for dims in flips:
            xi = torch.flip(x, dims) if dims else x
            p = _activate(model(xi), head)
            p = torch.flip(p, dims) if dims else p
            total = p if total is None else total + p
    return total / len(flips)


def check_stitch(stitch: str) -> None:
    if stitch not in ("center", "gaussian"):
        raise DefectscanError(f"unknown stitch mode '{stitch}' (choose center or gaussian)")


def tiled_inference(
    model: nn.Module,
    image: ImageSource | np.ndarray,
    *,
    tile: int | Sequence[int] = 512,
    overlap: int | Sequence[int] = 64,
    stitch: StitchMode = "center",
    batch_size: int = 4,
    device: str | torch.device | None = "auto",
    head: Head = "sigmoid",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    amp: str = "auto",
    tta: bool = False,
    align: int = 32,
    out: np.ndarray | None = None,
    out_dtype: type | np.dtype = np.uint8,
    sigma_scale: float = 0.125,
    channels_last: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Run `model` over `image` tile by tile and return the stitched (C, H, W) probability map.

    Args:
        model: segmentation network mapping (B, 3, t, t) to (B, C, t, t) logits; used as is (call `.eval()`).
        image: an `ImageSource` (read region by region) or an (H, W, 3) uint8 RGB array.
        tile, overlap: tile size and overlap in pixels; overlap is rounded up so steps are multiples of `align`.
        stitch: 'center' (exact overlap-tile) or 'gaussian' (weighted blending); see the module docstring.
        batch_size: tiles per forward pass.
        device: 'auto', 'cpu', 'cuda', ... ; the model is moved there.
        head: 'sigmoid' (binary / multi-label), 'softmax' (multi-class) or 'none' (raw outputs).
        mean, std: per-channel input normalisation for pixel values scaled to [0, 1].
        amp: 'auto' (bf16/fp16 on CUDA, off on CPU), 'off', 'bf16' or 'fp16'.
        tta: average over horizontal/vertical flips (4x the compute).
        align: output stride of the network; tile sizes and tile steps are multiples of it.
        out: optional preallocated (C, H, W) output, e.g. a `numpy.memmap` for images larger than RAM.
        out_dtype: uint8 (probability * 255, rounded), float16 or float32; ignored when `out` is given.
        sigma_scale: Gaussian sigma as a fraction of the tile size (gaussian mode).
        channels_last: memory format of the input; default: on for CUDA, off on CPU.
        progress: called as progress(done_tiles, total_tiles) after every batch.
    """
    check_stitch(stitch)
    if batch_size < 1:
        raise DefectscanError(f"batch size must be >= 1, got {batch_size}")
    source = image if isinstance(image, ImageSource) else ImageSource(np.asarray(image))
    dev = resolve_device(device)
    amp_dtype = resolve_amp(amp, dev)
    channels_last = dev.type == "cuda" if channels_last is None else channels_last
    model = model.to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    layout = plan_tiles(source.height, source.width, tile, overlap, align)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
    scale, shift = 1.0 / (255.0 * std_t), mean_t / std_t  # (x/255 - mean)/std as one multiply-add

    stitcher: _CenterStitcher | _GaussianStitcher | None = None
    done = 0
    prefetcher = _TilePrefetcher(source, layout, batch_size, pin=dev.type == "cuda")
    for chunk, batch in prefetcher:
        x = batch.to(dev, non_blocking=True).permute(0, 3, 1, 2).float()
        x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        x = x.mul_(scale).sub_(shift)
        probs = predict_batch(model, x, head, amp_dtype, tta)
        if stitcher is None:
            if probs.shape[-2:] != x.shape[-2:]:
                raise DefectscanError(
                    f"model returned {tuple(probs.shape[-2:])} for a {tuple(x.shape[-2:])} tile; "
                    "tiled inference needs a full-resolution output"
                )
            if out is None:
                out = np.zeros((probs.shape[1], source.height, source.width), dtype=out_dtype)
            elif out.shape != (probs.shape[1], source.height, source.width):
                raise DefectscanError(f"output array has shape {out.shape}, expected {(probs.shape[1], *source.shape)}")
            stitcher = _CenterStitcher(layout, out) if stitch == "center" else _GaussianStitcher(layout, out, sigma_scale)
        for (iy, ix), p in zip(chunk, probs):
            stitcher.add(iy, ix, p)
        done += len(chunk)
        if progress is not None:
            progress(done, len(layout))
    assert stitcher is not None and out is not None  # a layout always has at least one tile
    stitcher.finish()
    return out
