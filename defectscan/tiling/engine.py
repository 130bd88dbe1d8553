"""Streaming tiled inference: slice a huge image into overlapping tiles, hand batches of tiles to any predict
function, and stitch the probabilities into full-resolution rows in bounded memory (`tiled_rows`), or into one
map (`tiled_inference`).

The engine knows nothing about the model: `predict` is any callable from a uint8 tile batch to probabilities
(a torch network wrapped by `defectscan.inference.TorchTiles`, an ONNX session, a remote service). It never
moves, converts or switches the mode of a caller's model.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterator, Protocol, Sequence, Union

import numpy as np
import torch

from defectscan.errors import DefectscanError
from defectscan.io.images import ImageSource
from defectscan.tiling.layout import plan_tiles
from defectscan.tiling.readers import TilePrefetcher
from defectscan.tiling.stitching import CenterStitcher, GaussianStitcher, StitchMode, check_stitch, quantize

Scores = Union[torch.Tensor, np.ndarray]


class TilePredictor(Protocol):
    """(B, th, tw, 3) uint8 RGB tiles on the CPU -> (B, C, th, tw) probabilities in [0, 1] (torch or numpy)."""

    def __call__(self, tiles: torch.Tensor) -> Scores: ...


def tiled_rows(
    predict: Callable[[torch.Tensor], Scores],
    image: ImageSource | np.ndarray,
    *,
    tile: int | Sequence[int] = 512,
    overlap: int | Sequence[int] = 64,
    stitch: StitchMode = "center",
    batch_size: int = 4,
    align: int = 32,
    out_dtype: type | np.dtype = np.uint8,
    sigma_scale: float = 0.125,
    pin_memory: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Run `predict` over `image` tile by tile and yield the stitched probabilities as (y0, (C, rows, W)) blocks,
    top to bottom, as soon as each is final: memory holds one tile row of output, whatever the image size.

    Args:
        predict: tiles (B, th, tw, 3) uint8 -> probabilities (B, C, th, tw); see `TilePredictor`.
        image: an `ImageSource` (read region by region) or an (H, W, 3) uint8 RGB array.
        tile, overlap: tile size and overlap in pixels; overlap is rounded up so steps are multiples of `align`.
        stitch: 'center' (exact overlap-tile) or 'gaussian' (weighted blending); see `defectscan.tiling.stitching`.
        batch_size: tiles per call of `predict`.
        align: output stride of the network; tile sizes and tile steps are multiples of it.
        out_dtype: uint8 (probability * 255, rounded), float16 or float32.
        sigma_scale: Gaussian sigma as a fraction of the tile size (gaussian mode).
        pin_memory: read tiles into pinned buffers (faster copies to a GPU); default: `predict.pin_memory` if set.
        progress: called as progress(done_tiles, total_tiles) after every batch.
    """
    check_stitch(stitch)
    if batch_size < 1:
        raise DefectscanError(f"batch size must be >= 1, got {batch_size}")
    source = image if isinstance(image, ImageSource) else ImageSource(np.asarray(image))
    layout = plan_tiles(source.height, source.width, tile, overlap, align)
    pin = bool(getattr(predict, "pin_memory", False)) if pin_memory is None else pin_memory

    ready: list[tuple[int, np.ndarray]] = []
    emit = lambda y0, block: ready.append((y0, block))  # noqa: E731
    stitcher: CenterStitcher | GaussianStitcher | None = None
    # center stitching keeps each pixel of one tile as it is: a GPU quantizes whole tiles and copies 4x fewer bytes
    quantize_on_device = np.dtype(out_dtype) if stitch == "center" else None
    pending: _HostBatch | None = None  # the previous batch: stitched on the CPU while the GPU computes this one
    done = 0
    for item in itertools.chain(TilePrefetcher(source, layout, batch_size, pin=pin), [None]):  # None: flush
        current = None
        if item is not None:
            chunk, batch = item
            probs = predict(batch)
            if isinstance(probs, np.ndarray):
                probs = torch.from_numpy(probs)
            if probs.ndim != 4 or probs.shape[0] != len(chunk) or probs.shape[-2:] != batch.shape[1:3]:
                raise DefectscanError(
                    f"predict returned shape {tuple(probs.shape)} for {len(chunk)} tiles of "
                    f"{tuple(batch.shape[1:3])}; tiled inference needs (tiles, classes, height, width) at full "
                    "resolution"
                )
            if stitcher is None:
                channels = probs.shape[1]
                stitcher = (CenterStitcher(layout, channels, out_dtype, emit) if stitch == "center"
                            else GaussianStitcher(layout, channels, out_dtype, emit, sigma_scale))
            current = _HostBatch(chunk, probs, quantize_on_device)
        if pending is not None:
            done += pending.stitch_into(stitcher)
            if progress is not None:
                progress(done, len(layout))
            if current is None:
                stitcher.finish()
            yield from ready
            ready.clear()
        pending = current


class _HostBatch:
    """One batch of `predict`'s probabilities on its way to the CPU stitcher. On a GPU the copy starts at once
    into pinned memory without waiting (quantized there first, for center stitching), and the engine stitches the
    batch only after it has queued the next one: the GPU is never idle while the CPU stitches. Elsewhere the
    probabilities are used as they are."""

    def __init__(self, chunk: list[tuple[int, int]], probs: torch.Tensor, quantize_to: np.dtype | None) -> None:
        self.chunk, self.ready = chunk, None
        if probs.device.type != "cuda":
            self.probs = probs
            return
        if quantize_to is not None:
            probs = quantize(probs, quantize_to)
        self.probs = torch.empty(probs.shape, dtype=probs.dtype, pin_memory=True)
        self.probs.copy_(probs, non_blocking=True)
        self.ready = torch.cuda.Event()
        self.ready.record(torch.cuda.current_stream(probs.device))

    def stitch_into(self, stitcher: CenterStitcher | GaussianStitcher) -> int:
        if self.ready is not None:
            self.ready.synchronize()
        for (iy, ix), p in zip(self.chunk, self.probs):
            stitcher.add(iy, ix, p)
        return len(self.chunk)


def tiled_inference(
    predict: Callable[[torch.Tensor], Scores],
    image: ImageSource | np.ndarray,
    *,
    out: np.ndarray | None = None,
    out_dtype: type | np.dtype = np.uint8,
    **options,
) -> np.ndarray:
    """The whole stitched (C, H, W) probability map of `tiled_rows` (same options) as one array.

    Args:
        out: optional preallocated (C, H, W) output, e.g. a `numpy.memmap` for images larger than RAM.
        out_dtype: uint8 (probability * 255, rounded), float16 or float32; ignored when `out` is given.
    """
    source = image if isinstance(image, ImageSource) else ImageSource(np.asarray(image))
    for y0, block in tiled_rows(predict, source, out_dtype=out.dtype if out is not None else out_dtype, **options):
        if out is None:
            out = np.empty((block.shape[0], *source.shape), dtype=out_dtype)
        elif out.shape != (block.shape[0], *source.shape):
            raise DefectscanError(f"output array has shape {out.shape}, expected {(block.shape[0], *source.shape)}")
        out[:, y0 : y0 + block.shape[1]] = block
    assert out is not None
    return out
