"""Deterministic synthetic wafer-inspection images with pixel-exact defect masks.

Labelled defect data is scarce and proprietary, so the demo, the tests, the small default model and the
benchmarks all run on these images. Defect sizes are absolute pixel sizes that do not grow with the image,
so a big image holds many tiny defects that downscaling would erase: the regime tiled inference exists for.

Drawing order (later overwrites earlier in the mask): stain, scratch, particle, crack, edge_chip.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from defectscan.io.files import write_text
from defectscan.io.images import write_image

CLASSES: tuple[str, ...] = ("background", "scratch", "particle", "crack", "stain", "edge_chip")
SCRATCH, PARTICLE, CRACK, STAIN, EDGE_CHIP = 1, 2, 3, 4, 5

_BAND = 1024  # rows composited at once: bounds the float32 temporaries to a few hundred MB at 16384 px
# Expected defects per megapixel of wafer area at defect_density=1 (edge chips: per 1000 px of rim).
_RATE_PER_MPX = {STAIN: 0.6, SCRATCH: 3.0, PARTICLE: 12.0, CRACK: 1.5}
_CHIPS_PER_KPX_RIM = 0.3
_TINTS = ((0.82, 0.92, 1.08), (0.86, 1.04, 0.92), (1.0, 1.0, 1.0), (0.97, 0.88, 1.06))  # blue, green, grey, violet


@dataclass(frozen=True)
class _Wafer:
    """Wafer geometry as per-row integer tables, so the background render and defect clipping agree exactly."""

    size: int
    radius: int
    ring: int  # edge-exclusion width in px
    half: np.ndarray  # per row: max |2x-(size-1)| inside the wafer, -1 for rows off the wafer
    half_in: np.ndarray  # the same for the wafer without its edge-exclusion ring

    def inside(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Nominal-wafer membership of a crop (bool, y1-y0 x x1-x0)."""
        dx = np.abs(2 * np.arange(x0, x1, dtype=np.int64) - (self.size - 1))
        return dx[None, :] <= self.half[y0:y1, None]


def _half_widths(size: int, radius: float, last_row: int) -> np.ndarray:
    """Row-wise half chord of a centred disc in doubled coordinates (exact integers: no float drift)."""
    dy = 2 * np.arange(size, dtype=np.int64) - (size - 1)
    rhs = int(round(2 * radius)) ** 2 - dy * dy
    half = np.where(rhs >= 0, np.floor(np.sqrt(np.maximum(rhs, 0))), -1).astype(np.int64)
    half[last_row + 1 :] = -1
    return half


def _wafer_geometry(size: int, ring: int = 30) -> _Wafer:
    """Wafer disc of 94% of the image with a flat at the bottom (4% of the radius deep)."""
    radius = int(0.47 * size)
    last_row = int(np.floor((size - 1) / 2 + radius * 0.96))
    outer, inner = _half_widths(size, radius, last_row), _half_widths(size, radius - ring, last_row)
    return _Wafer(size, radius, ring, outer, inner)


@dataclass(frozen=True)
class _Look:
    """Per-wafer appearance, drawn from its own RNG stream so defects do not shift when the look changes."""

    tint: np.ndarray  # float32[3], RGB gain
    base: float  # die surface grey level
    bg: float  # grey outside the wafer
    ring_delta: float
    street_delta: float
    core_delta: float
    pitch: tuple[int, int]  # die pitch (y, x), independent of image size
    offset: tuple[int, int]
    street: int
    margin: int
    die_sigma: float
    noise_sigma: float
    illum: np.ndarray  # float32 (6, 6) low-resolution gain map


def _random_look(rng: np.random.Generator) -> _Look:
    """Vary tone, die layout and lighting by seed so a model cannot key on one wafer's appearance."""
    tint = np.asarray(_TINTS[rng.integers(len(_TINTS))]) + rng.uniform(-0.03, 0.03, 3)
    pitch = (int(rng.integers(220, 421)), int(rng.integers(220, 421)))
    ax = np.linspace(-1, 1, 6)
    yy, xx = np.meshgrid(ax, ax, indexing="ij")
    illum = (1 + rng.uniform(-0.06, 0.06) * xx + rng.uniform(-0.06, 0.06) * yy
             - rng.uniform(0.04, 0.12) * (xx**2 + yy**2) / 2 + rng.normal(0, 0.02, (6, 6)))
    return _Look(
        tint=tint.astype(np.float32), base=float(rng.uniform(110, 170)), bg=float(rng.uniform(15, 35)),
        ring_delta=float(rng.choice([-1, 1]) * rng.uniform(6, 14)),
        street_delta=float(rng.choice([-1, 1]) * rng.uniform(12, 30)),
        core_delta=float(rng.choice([-1, 1]) * rng.uniform(3, 8)),
        pitch=pitch, offset=(int(rng.integers(pitch[0])), int(rng.integers(pitch[1]))),
        street=int(rng.integers(3, 9)), margin=int(rng.integers(12, 41)),
        die_sigma=float(rng.uniform(1.0, 3.0)), noise_sigma=float(rng.uniform(1.5, 3.0)),
        illum=illum.astype(np.float32),
    )


def _grid_axis(n: int, pitch: int, offset: int, street: int, margin: int) -> tuple[np.ndarray, ...]:
    """Die index, street flag and die-core flag along one axis; the 2-D grid is their outer combination."""
    pos = np.arange(n) + offset
    rel = pos % pitch
    return pos // pitch, rel < street, (rel >= street + margin) & (rel < pitch - margin)


def _render_surface(image: np.ndarray, wafer: _Wafer, look: _Look, rng: np.random.Generator) -> None:
    """Composite background, dies, ring, lighting and noise band by band to keep peak memory small."""
    size = wafer.size
    ridx, rstreet, rcore = _grid_axis(size, look.pitch[0], look.offset[0], look.street, look.margin)
    cidx, cstreet, ccore = _grid_axis(size, look.pitch[1], look.offset[1], look.street, look.margin)
    die_var = rng.normal(0, look.die_sigma, (ridx[-1] + 1, cidx[-1] + 1)).astype(np.float32)
    n = look.illum.shape[0]
    # Separable cubic upscale: horizontal once, vertical per band as a (band x n) @ (n x size) product.
    illum_w = cv2.resize(look.illum, (size, n), interpolation=cv2.INTER_CUBIC)
    row_w = cv2.resize(np.eye(n, dtype=np.float32), (n, size), interpolation=cv2.INTER_CUBIC)
    dx = np.abs(2 * np.arange(size, dtype=np.int64) - (size - 1))
    for y0 in range(0, size, _BAND):
        y1 = min(size, y0 + _BAND)
        gain = row_w[y0:y1] @ illum_w
        v = gain * np.float32(look.base)
        v += die_var[ridx[y0:y1]][:, cidx]
        v += np.float32(look.street_delta) * (rstreet[y0:y1, None] | cstreet[None, :])
        v += np.float32(look.core_delta) * (rcore[y0:y1, None] & ccore[None, :])
        ring = dx[None, :] > wafer.half_in[y0:y1, None]
        np.copyto(v, gain * np.float32(look.base + look.ring_delta), where=ring)
        v[dx[None, :] > wafer.half[y0:y1, None]] = look.bg
        v += rng.standard_normal(v.shape, dtype=np.float32) * np.float32(look.noise_sigma)
        _to_rgb(v, look.tint, image[y0:y1])


def _to_rgb(grey: np.ndarray, tint: np.ndarray, out: np.ndarray) -> None:
    """Tinted uint8 RGB from float grey, channel by channel to avoid a 3x float temporary."""
    tmp = np.empty_like(grey)
    for c in range(3):
        np.multiply(grey, tint[c], out=tmp)
        tmp += 0.5
        np.clip(tmp, 0, 255, out=tmp)
        out[..., c] = tmp


def _box(points: np.ndarray, pad: float, size: int) -> tuple[int, int, int, int]:
    """Clipped bounding box (y0, y1, x0, x1) around x,y points, so defects are drawn on small local crops."""
    x0, y0 = np.floor(points.min(axis=0) - pad).astype(int)
    x1, y1 = np.ceil(points.max(axis=0) + pad).astype(int) + 1
    return max(y0, 0), min(y1, size), max(x0, 0), min(x1, size)


def _apply(image: np.ndarray, mask: np.ndarray, wafer: _Wafer, box: tuple[int, int, int, int],
           foot: np.ndarray, cls: int, delta: np.ndarray | None) -> np.ndarray:
    """Label foot ∩ wafer as cls and add delta (RGB, broadcastable to the crop) there; returns the selection."""
    y0, y1, x0, x1 = box
    sel = (foot > 0) & wafer.inside(y0, y1, x0, x1)
    mask[y0:y1, x0:x1][sel] = cls
    if delta is not None and sel.any():
        region = image[y0:y1, x0:x1]
        d = np.broadcast_to(delta, region.shape)[sel]
        region[sel] = np.clip(region[sel] + d + 0.5, 0, 255).astype(np.uint8)
    return sel


def _random_point(rng: np.random.Generator, wafer: _Wafer, margin: float) -> np.ndarray:
    """Uniform x,y inside the wafer at least `margin` px from the rim (where edge chips cannot swallow it)."""
    c = (wafer.size - 1) / 2
    r_max = max(wafer.radius - margin, 0.3 * wafer.radius)
    while True:
        r, a = r_max * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
        p = np.array([c + r * np.cos(a), c + r * np.sin(a)])
        if wafer.half[int(round(p[1]))] >= 0:
            return p


def _thin_lines(box: tuple[int, int, int, int], lines: list[np.ndarray], width: int) -> np.ndarray:
    """Footprint of x,y polylines exactly `width` px wide (cv2's thickness=2 draws 3 px, 3 draws 5 px)."""
    foot = np.zeros((box[1] - box[0], box[3] - box[2]), np.uint8)
    local = [np.round(ln - [box[2], box[0]]).astype(np.int32) for ln in lines]
    cv2.polylines(foot, local, False, 1, 1, cv2.LINE_8)
    return cv2.dilate(foot, np.ones((width, width), np.uint8)) if width > 1 else foot


def _draw_scratch(
    image: np.ndarray, mask: np.ndarray, wafer: _Wafer, look: _Look, rng: np.random.Generator
) -> None:
    """Long smooth cubic Bezier, 1-3 px wide, 15-60 levels brighter or darker."""
    p0 = _random_point(rng, wafer, wafer.ring + 45)
    length = rng.uniform(100, min(1500, 2 * wafer.radius))
    a = rng.uniform(0, 2 * np.pi)
    d, nrm = np.array([np.cos(a), np.sin(a)]), np.array([-np.sin(a), np.cos(a)])
    p1 = p0 + length / 3 * d + rng.uniform(-0.3, 0.3) * length * nrm
    p2 = p0 + 2 * length / 3 * d + rng.uniform(-0.3, 0.3) * length * nrm
    p3 = p0 + length * d
    t = np.linspace(0, 1, max(8, int(length / 4)))[:, None]
    pts = (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3
    thick = int(rng.integers(1, 4))
    delta = rng.choice([-1, 1]) * rng.uniform(15, 60) * look.tint
    box = _box(pts, thick + 1, wafer.size)
    _apply(image, mask, wafer, box, _thin_lines(box, [pts], thick), SCRATCH, delta)


def _draw_particle(
    image: np.ndarray, mask: np.ndarray, wafer: _Wafer, look: _Look, rng: np.random.Generator
) -> None:
    """Small dark or bright blob, radius 2-12 px, sometimes a union of 2-3 discs; strongest at its centre."""
    c, r = _random_point(rng, wafer, wafer.ring + 45), rng.uniform(2, 12)
    discs = [(c, r)] + [(c + rng.uniform(-0.8, 0.8, 2) * r, r * rng.uniform(0.4, 0.8))
                        for _ in range(int(rng.integers(0, 3)))]
    box = _box(c[None], 2 * r + 2, wafer.size)
    foot = np.zeros((box[1] - box[0], box[3] - box[2]), np.uint8)
    for pc, pr in discs:
        centre = tuple(int(v) for v in np.round(pc - [box[2], box[0]]))
        cv2.circle(foot, centre, max(1, int(round(pr))), 1, -1, cv2.LINE_8)
    amp = -rng.uniform(40, 110) if rng.uniform() < 0.7 else rng.uniform(30, 80)
    yy, xx = np.ogrid[box[0] : box[1], box[2] : box[3]]
    prof = 0.6 + 0.4 * np.exp(-((yy - c[1]) ** 2 + (xx - c[0]) ** 2) / r**2)
    _apply(image, mask, wafer, box, foot, PARTICLE, (amp * prof)[..., None] * look.tint)


def _jagged(rng: np.random.Generator, start: np.ndarray, heading: float, length: float) -> np.ndarray:
    """Polyline of short random-angle steps around a slowly drifting heading: the look of a crack."""
    pts, total = [start], 0.0
    while total < length:
        heading += rng.normal(0, 0.25)
        a, step = heading + rng.uniform(-0.9, 0.9), rng.uniform(3, 10)
        pts.append(pts[-1] + step * np.array([np.cos(a), np.sin(a)]))
        total += step
    return np.array(pts)


def _draw_crack(
    image: np.ndarray, mask: np.ndarray, wafer: _Wafer, look: _Look, rng: np.random.Generator
) -> None:
    """Dark jagged line, 1-2 px wide, 60-400 px long, with 1-2 branches."""
    heading, length = rng.uniform(0, 2 * np.pi), rng.uniform(60, 400)
    main = _jagged(rng, _random_point(rng, wafer, wafer.ring + 45), heading, length)
    lines = [main]
    for _ in range(int(rng.integers(1, 3))):
        fork = main[rng.integers(1, len(main) - 1)]
        turn = rng.choice([-1, 1]) * rng.uniform(0.5, 1.3)
        lines.append(_jagged(rng, fork, heading + turn, length * rng.uniform(0.25, 0.6)))
    thick = int(rng.integers(1, 3))
    box = _box(np.concatenate(lines), thick + 1, wafer.size)
    _apply(image, mask, wafer, box, _thin_lines(box, lines, thick), CRACK, -rng.uniform(30, 80) * look.tint)


def _draw_stain(
    image: np.ndarray, mask: np.ndarray, wafer: _Wafer, look: _Look, rng: np.random.Generator
) -> None:
    """Large faint irregular blob (radius 40-250 px): smoothed noise inside a disc, thresholded; 4-15 levels."""
    r = rng.uniform(40, max(40.0, min(250.0, 0.4 * wafer.radius)))
    c = _random_point(rng, wafer, wafer.ring)
    box = _box(c[None], r + 1, wafer.size)
    h, w = box[1] - box[0], box[3] - box[2]
    g = rng.standard_normal((6, 6)).astype(np.float32)
    g = cv2.resize(g / np.abs(g).max(), (w, h), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.ogrid[box[0] : box[1], box[2] : box[3]]
    d2 = (((yy - c[1]) ** 2 + (xx - c[0]) ** 2) / r**2).astype(np.float32)
    field = 1 - d2 + 0.45 * g  # >= 0.55 at the centre, so the blob is never empty
    foot = (field > 0.4) & (d2 <= 1)
    amp = rng.uniform(4, 15) * (0.6 + 0.4 * np.clip((field - 0.4) / 0.4, 0, 1))
    colour = (rng.uniform(0.6, 1.3, 3) * look.tint).astype(np.float32)
    _apply(image, mask, wafer, box, foot, STAIN, -amp[..., None] * colour)


def _draw_edge_chip(
    image: np.ndarray, mask: np.ndarray, wafer: _Wafer, look: _Look, rng: np.random.Generator
) -> None:
    """Irregular bite (radius 5-40 px) out of the round rim, showing background; mask = lost wafer area."""
    c = (wafer.size - 1) / 2
    for _ in range(50):  # retries only when the bite misses the wafer (tiny bite, rounding) or hits the flat
        a = rng.uniform(0, 2 * np.pi)
        if c + wafer.radius * np.sin(a) > c + 0.9 * wafer.radius:
            continue
        r = rng.uniform(5, 40)
        centre = c + (wafer.radius + rng.uniform(-0.2, 0.3) * r) * np.array([np.cos(a), np.sin(a)])
        k = int(rng.integers(10, 18))
        ang = np.linspace(0, 2 * np.pi, k, endpoint=False) + rng.uniform(0, 2 * np.pi / k, k)
        poly = centre + (r * rng.uniform(0.6, 1.0, k))[:, None] * np.stack([np.cos(ang), np.sin(ang)], 1)
        box = _box(poly, 1, wafer.size)
        foot = np.zeros((box[1] - box[0], box[3] - box[2]), np.uint8)
        cv2.fillPoly(foot, [np.round(poly - [box[2], box[0]]).astype(np.int32)], 1, cv2.LINE_8)
        sel = _apply(image, mask, wafer, box, foot, EDGE_CHIP, None)
        if sel.any():
            grey = look.bg + rng.standard_normal(int(sel.sum())).astype(np.float32) * np.float32(look.noise_sigma)
            fill = np.empty((grey.size, 3), np.uint8)
            _to_rgb(grey, look.tint, fill)
            image[box[0] : box[1], box[2] : box[3]][sel] = fill
            return


def _count(rng: np.random.Generator, expected: float) -> int:
    """Poisson count, but at least one so every class shows up on every wafer (unless density is 0)."""
    return 0 if expected <= 0 else max(1, int(rng.poisson(expected)))


def generate_wafer(size: int, seed: int = 0, *, defect_density: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic brightfield wafer scan and its pixel mask, byte-identical for the same arguments.

    Returns (image HxWx3 uint8 RGB, mask HxW uint8 with values indexing CLASSES), H = W = size. Defect sizes
    are fixed in pixels and their number scales with wafer area times `defect_density` (at least one per
    class when defect_density > 0; none at 0). Sizes below ~1024 px may clip the larger defects.
    """
    if size < 64:
        raise ValueError(f"size must be >= 64, got {size}")
    look_rng, noise_rng, defect_rng = np.random.default_rng(seed).spawn(3)
    look = _random_look(look_rng)
    wafer = _wafer_geometry(size, ring=int(look_rng.integers(20, 51)))
    image = np.empty((size, size, 3), np.uint8)
    _render_surface(image, wafer, look, noise_rng)
    mask = np.zeros((size, size), np.uint8)
    area_mpx = np.pi * wafer.radius**2 / 1e6
    for cls, draw in ((STAIN, _draw_stain), (SCRATCH, _draw_scratch), (PARTICLE, _draw_particle),
                      (CRACK, _draw_crack)):
        for _ in range(_count(defect_rng, _RATE_PER_MPX[cls] * area_mpx * defect_density)):
            draw(image, mask, wafer, look, defect_rng)
    rim_kpx = 2 * np.pi * wafer.radius / 1000
    for _ in range(_count(defect_rng, _CHIPS_PER_KPX_RIM * rim_kpx * defect_density)):
        _draw_edge_chip(image, mask, wafer, look, defect_rng)
    return image, mask


def wafer_name(size: int, seed: int) -> str:
    """File stem of a synthetic wafer: size and seed decide the image, so calls with other sizes or seeds add to
    the same dataset folder and the same call again rewrites the same files."""
    return f"wafer_{size}px_s{seed}"


def write_dataset(out_dir: str | Path, *, size: int, count: int, seed: int, split: str | None = None,
                  progress: Callable[[int], None] | None = None) -> list[tuple[Path, Path]]:
    """Materialise `count` wafers (image i uses seed + i) as PNG pairs for training and demos.

    Layout: out_dir/images/<wafer_name>.png (RGB), out_dir/masks/<wafer_name>.png (class indices) and
    out_dir/classes.json. `split` ('train', 'val' or 'test') also records the wafers in out_dir/split.json, the
    dataset's own split (images it does not list train). `progress` receives the number of wafers written so far.
    """
    if split not in (None, "train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    write_text(out / "classes.json", json.dumps({"classes": list(CLASSES)}, indent=2) + "\n")
    pairs = []
    for i in range(count):
        image, mask = generate_wafer(size, seed + i)
        name = wafer_name(size, seed + i)
        img_path, mask_path = out / "images" / f"{name}.png", out / "masks" / f"{name}.png"
        write_image(img_path, image)  # atomic: readers never see a half-written PNG
        del image
        write_image(mask_path, mask, rgb=False)
        pairs.append((img_path, mask_path))
        if progress is not None:
            progress(i + 1)
    if split is not None:
        _record_split(out / "split.json", [p.stem for p, _ in pairs], split)
    return pairs


def _record_split(path: Path, stems: list[str], split: str) -> None:
    """Add `stems` to `split` in a split.json ({"train": [...], "val": [...], "test": [...]}), out of the others."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    names = {k: [n for n in data.get(k, []) if n not in stems] for k in ("train", "val", "test")}
    names[split] += stems
    write_text(path, json.dumps({k: v for k, v in names.items() if v}, indent=1) + "\n")
