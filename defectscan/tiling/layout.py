"""Where tiles go: positions along each axis, ownership for center stitching, tile-size checks.

Layout along one axis (image length L, tile t, overlap o, step s = t - o, pad p = o // 2)::

    tile k covers image pixels [k*s - p, k*s - p + t)      (outside the image: reflection)
    tile k owns   image pixels [k*s, (k+1)*s)              (the first from 0, the last up to L)

so every owned pixel has at least `p` pixels of context on each side inside its tile, and all tile origins lie on
one grid of pitch `s`. With `s` and `t` multiples of the network's output stride (32 for most encoders), every
tile sees the same pooling grid as a single pass over the whole reflection-padded image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from defectscan.errors import DefectscanError


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


