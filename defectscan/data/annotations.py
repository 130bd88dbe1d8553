"""Vector annotations (LabelMe shapes, COCO polygons and RLE) rasterised to class-index masks.

Convention: a pixel belongs to a polygon when its centre lies inside it or on its boundary (even-odd rule), with
exact arithmetic on fractional vertices (no rounding to a pixel grid first, unlike OpenCV's `fillPoly`, which also
paints pixels that the outline merely touches). Where the pixel centres are: LabelMe puts pixel (col x, row y) at
the point (x, y); COCO treats pixel x as the interval [x, x + 1), so its centre is at x + 0.5 (`Shape.corner_origin`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import cv2
import numpy as np

SHIFT = 4  # OpenCV fixed-point bits for sub-pixel vertices
SHAPE_KINDS = ("polygon", "rectangle", "circle", "line", "linestrip", "point", "rle")


@dataclass
class Shape:
    """One annotated object: a label and its geometry in pixel coordinates (x, y)."""

    label: str
    kind: str
    points: list[tuple[float, float]] = field(default_factory=list)
    rle: dict[str, Any] | None = None  # COCO run-length encoding: {"size": [h, w], "counts": list | str}
    width: float = 1.0  # stroke width in px for line, linestrip and point shapes
    corner_origin: bool = False  # COCO: pixel x spans [x, x + 1), so its centre is at x + 0.5

    def problem(self) -> str | None:
        """Why this shape cannot be drawn, or None."""
        if self.kind not in SHAPE_KINDS:
            return f"unsupported shape type '{self.kind}'"
        if self.kind == "rle":
            return None if self.rle and "counts" in self.rle and "size" in self.rle else "RLE without counts/size"
        need = {"polygon": 3, "rectangle": 2, "circle": 2, "line": 2, "linestrip": 2, "point": 1}[self.kind]
        if len(self.points) < need:
            return f"{self.kind} with {len(self.points)} point(s) (needs {need})"
        if not np.all(np.isfinite(np.asarray(self.points, dtype=np.float64))):
            return f"{self.kind} with non-finite coordinates"
        if self.kind == "polygon" and abs(polygon_area(self.points)) < 1e-9:
            return "polygon with zero area"
        return None


def polygon_area(points: Sequence[Sequence[float]]) -> float:
    p = np.asarray(points, dtype=np.float64)
    x, y = p[:, 0], p[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def fill_polygon(mask: np.ndarray, points: Sequence[Sequence[float]], value: int, offset: float = 0.0) -> None:
    """Set the pixels whose centres (x + offset, y + offset) lie inside or on the polygon (even-odd rule)."""
    eps = 1e-9
    p = np.asarray(points, dtype=np.float64) - offset
    x0, y0 = p[:, 0], p[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    h, w = mask.shape
    top, bottom = max(0, math.ceil(y0.min() - eps)), min(h - 1, math.floor(y0.max() + eps))
    if top > bottom or x0.max() < -eps or x0.min() > w - 1 + eps:
        return
    rows = np.arange(top, bottom + 1, dtype=np.float64)[:, None]
    lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
    active = (lo <= rows) & (rows < hi)  # half-open, so a vertex shared by two edges is crossed once
    with np.errstate(divide="ignore", invalid="ignore"):
        xs = np.where(active, x0 + (rows - y0) * (x1 - x0) / (y1 - y0), np.inf)
    xs.sort(axis=1)
    for r, k in zip(*np.nonzero(active.sum(1, keepdims=True) > np.arange(0, active.shape[1], 2))):
        a, b = math.ceil(xs[r, 2 * k] - eps), math.floor(xs[r, 2 * k + 1] + eps)
        if a <= b and b >= 0 and a < w:
            mask[top + r, max(a, 0) : min(b, w - 1) + 1] = value
    # centres exactly on the outline (integer vertices): the half-open crossing rule leaves some out
    for ax, ay, bx, by in zip(x0, y0, x1, y1):
        if abs(ay - by) < eps:
            if abs(ay - round(ay)) < eps and 0 <= round(ay) < h:
                a, b = math.ceil(min(ax, bx) - eps), math.floor(max(ax, bx) + eps)
                mask[int(round(ay)), max(a, 0) : min(b, w - 1) + 1] = value
            continue
        ys = np.arange(max(0, math.ceil(min(ay, by) - eps)), min(h - 1, math.floor(max(ay, by) + eps)) + 1)
        xs_edge = ax + (ys - ay) * (bx - ax) / (by - ay)
        on = (np.abs(xs_edge - np.round(xs_edge)) < 1e-7) & (xs_edge > -0.5) & (xs_edge < w - 0.5)
        mask[ys[on], np.round(xs_edge[on]).astype(np.intp)] = value


def _fixed(points: Sequence[Sequence[float]]) -> np.ndarray:
    return np.round(np.asarray(points, dtype=np.float64) * (1 << SHIFT)).astype(np.int32).reshape(-1, 1, 2)


def draw_shape(mask: np.ndarray, shape: Shape, value: int) -> None:
    """Paint `shape` into `mask` (H, W) uint8 with `value`, in place."""
    if shape.kind == "rle":
        mask[decode_rle(shape.rle, mask.shape)] = value
        return
    thickness = max(1, int(round(shape.width)))
    offset = 0.5 if shape.corner_origin else 0.0
    if shape.kind == "polygon":
        fill_polygon(mask, shape.points, value, offset)
    elif shape.kind == "rectangle":
        (x0, y0), (x1, y1) = shape.points[:2]
        fill_polygon(mask, [(x0, y0), (x1, y0), (x1, y1), (x0, y1)], value, offset)
    elif shape.kind == "circle":
        (cx, cy), (px, py) = shape.points[:2]
        radius = float(np.hypot(px - cx, py - cy))
        yy, xx = np.ogrid[: mask.shape[0], : mask.shape[1]]
        y0, y1 = max(0, int(cy - radius) - 1), min(mask.shape[0], int(cy + radius) + 2)
        x0, x1 = max(0, int(cx - radius) - 1), min(mask.shape[1], int(cx + radius) + 2)
        inside = (xx[:, x0:x1] - cx) ** 2 + (yy[y0:y1] - cy) ** 2 <= radius**2
        mask[y0:y1, x0:x1][inside] = value
    elif shape.kind in ("line", "linestrip"):
        cv2.polylines(mask, [_fixed(shape.points)], False, int(value), thickness, lineType=cv2.LINE_8, shift=SHIFT)
    elif shape.kind == "point":  # a dot of diameter `width`
        for x, y in shape.points:
            cv2.circle(mask, (int(round(x)), int(round(y))), thickness // 2, int(value), -1, lineType=cv2.LINE_8)


def rasterize(shapes: Sequence[Shape], size: tuple[int, int], class_index: dict[str, int]) -> np.ndarray:
    """Class-index mask (H, W) uint8. Shapes are painted in order, so later shapes win where they overlap."""
    mask = np.zeros(size, np.uint8)
    for shape in shapes:
        if shape.label in class_index and shape.problem() is None:
            draw_shape(mask, shape, class_index[shape.label])
    return mask


def _decode_counts_string(s: str) -> list[int]:
    """COCO's compressed RLE string (6-bit groups with continuation bit, delta-coded after the 3rd run)."""
    counts: list[int] = []
    i = 0
    data = s.encode("ascii") if isinstance(s, str) else bytes(s)
    while i < len(data):
        x, k, more = 0, 0, True
        while more:
            c = data[i] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            i += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def rle_problem(rle: dict[str, Any], shape: tuple[int, int] | None = None) -> str | None:
    """Why a COCO RLE cannot be decoded (for an image of `shape` (H, W) when known), or None."""
    size = rle.get("size")
    if not (isinstance(size, list) and len(size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        return f"RLE size {json.dumps(size)[:40]} is not [height, width]"
    h, w = size
    if shape is not None and (h, w) != tuple(shape):
        return f"RLE is for a {w}x{h} image, not {shape[1]}x{shape[0]}"
    counts = rle.get("counts")
    if isinstance(counts, str):
        try:
            counts = _decode_counts_string(counts)
        except (IndexError, UnicodeEncodeError):
            return "compressed RLE counts string is malformed"
    elif not (isinstance(counts, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in counts)):
        return "RLE counts are neither a list of whole numbers nor a compressed string"
    if any(c < 0 for c in counts):
        return "RLE has negative run lengths"
    if sum(counts) != h * w:
        return f"RLE runs cover {sum(counts)} pixels, the {w}x{h} image has {h * w}"
    return None


def decode_rle(rle: dict[str, Any], shape: tuple[int, int] | None = None) -> np.ndarray:
    """Boolean (H, W) mask from a COCO RLE (counts as a list or the compressed string; column-major runs)."""
    why = rle_problem(rle, shape)
    if why:
        raise ValueError(why)
    h, w = rle["size"]
    counts = rle["counts"]
    counts = _decode_counts_string(counts) if isinstance(counts, str) else counts
    values = np.zeros(len(counts), np.uint8)
    values[1::2] = 1  # runs alternate background, foreground, starting with background
    flat = np.repeat(values, counts)
    return flat.reshape(w, h).T.astype(bool)


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """Uncompressed COCO RLE of a boolean mask (used by tests and fixtures)."""
    flat = np.asarray(mask, dtype=bool).T.ravel()
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}
