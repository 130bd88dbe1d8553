"""Pictures people look at: downscaled overlays with defects outlined, so even a 3-px defect stays visible."""

from __future__ import annotations

import cv2
import numpy as np

from defectscan.io.images import ImageSource
from defectscan.schemas import Region

# RGB colours per class id (1-based); background has none
PALETTE = [
    (255, 48, 48), (255, 214, 0), (230, 60, 255), (0, 220, 255), (255, 140, 0), (80, 255, 80),
    (70, 110, 255), (255, 120, 170), (170, 255, 200), (200, 160, 90),
]


def class_color(class_id: int) -> tuple[int, int, int]:
    return PALETTE[(class_id - 1) % len(PALETTE)]


def preview_factor(height: int, width: int, max_side: int) -> int:
    """Integer downscale factor: block averages are exact and can be computed strip by strip."""
    return max(1, -(-max(height, width) // max_side))


def downscale(source: ImageSource, factor: int, strip_rows: int = 2048) -> np.ndarray:
    """Block-averaged RGB preview, read strip by strip (the source may be a memory-mapped image)."""
    h, w = source.shape
    if factor == 1:
        return source.to_rgb8()
    oh, ow = -(-h // factor), -(-w // factor)
    out = np.zeros((oh, ow, 3), np.uint8)
    step = max(1, strip_rows // factor) * factor
    for y0 in range(0, h, step):
        strip = source.read(y0, min(h, y0 + step), 0, w)
        rows = -(-strip.shape[0] // factor)
        out[y0 // factor : y0 // factor + rows] = cv2.resize(strip, (ow, rows), interpolation=cv2.INTER_AREA)
    return out


class MaskPreview:
    """Per-class masks at preview scale, built from a class-id mask strip by strip (`add`), so the full-size mask
    need never exist: a preview pixel has a class when any pixel of its block has it (a 1-px defect stays visible)."""

    def __init__(self, height: int, width: int, max_side: int) -> None:
        self.factor = preview_factor(height, width, max_side)
        self.shape = (-(-height // self.factor), -(-width // self.factor))
        self.col_starts = np.arange(0, width, self.factor)
        self.layers: dict[int, np.ndarray] = {}

    def add(self, y0: int, mask_rows: np.ndarray) -> None:
        """Rows [y0, y0 + len(mask_rows)) of the (H, W) uint8 class-id mask, in any order and any strip height."""
        present = np.flatnonzero(np.bincount(mask_rows.ravel(), minlength=1))
        for cid in present[present > 0]:
            m = mask_rows == cid
            if self.factor > 1:
                m = np.logical_or.reduceat(m, self.col_starts, axis=1)
                block = np.arange(y0, y0 + len(m)) // self.factor
                m = np.logical_or.reduceat(m, np.flatnonzero(np.r_[True, np.diff(block) > 0]), axis=0)
            top = y0 // self.factor
            layer = self.layers.setdefault(int(cid), np.zeros(self.shape, bool))
            layer[top : top + len(m)] |= m


def render_overlay(
    source: ImageSource,
    mask: np.ndarray | MaskPreview,
    regions: list[Region],
    *,
    class_names: dict[int, str] | None = None,
    max_side: int = 2048,
    alpha: float = 0.45,
    min_visible: int = 12,
) -> np.ndarray:
    """RGB preview: defect pixels tinted and outlined per class; regions under `min_visible` preview px boxed.

    `mask` is the (H, W) class-id mask or a `MaskPreview` already fed with it (then `max_side` is the preview's).
    """
    if not isinstance(mask, MaskPreview):
        preview = MaskPreview(*source.shape, max_side)
        preview.add(0, mask)
        mask = preview
    factor = mask.factor
    base = downscale(source, factor)
    tint = base.copy()
    contours = []
    for cid in sorted({r.class_id for r in regions}):
        m = mask.layers.get(cid)
        if m is None:
            continue
        color = class_color(cid)
        tint[m] = color
        cs, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        contours.append((cs, color))
    out = cv2.addWeighted(tint, alpha, base, 1 - alpha, 0)
    for cs, color in contours:
        cv2.drawContours(out, cs, -1, color, 1, lineType=cv2.LINE_AA)
    for r in regions:  # box what is too small to see at preview scale; larger regions show by tint and outline
        if max(r.width, r.height) / factor >= min_visible:
            continue
        cx, cy = (r.x + r.width / 2) / factor, (r.y + r.height / 2) / factor
        half = min_visible / 2 + 2
        cv2.rectangle(out, (int(cx - half), int(cy - half)), (int(cx + half), int(cy + half)),
                      class_color(r.class_id), 1, lineType=cv2.LINE_AA)
    if class_names:
        _draw_legend(out, class_names, regions)
    return out


TP_COLOR, FP_COLOR, FN_COLOR = (40, 220, 60), (255, 40, 40), (40, 140, 255)  # outcome colours, RGB


def outcome_preview(image: np.ndarray | ImageSource, gt: np.ndarray, pred: np.ndarray, max_side: int = 900,
                    alpha: float = 0.55, strip_rows: int = 1024) -> np.ndarray:
    """RGB preview with true positives, false positives and misses in distinct colours, outlined so that
    defects a few pixels wide stay visible after downscaling. `gt` and `pred` are masks whose nonzero pixels are
    defects; they are read strip by strip, so no full-size temporary is made."""
    source = image if isinstance(image, ImageSource) else ImageSource(image)
    outcomes = MaskPreview(*source.shape, max_side)
    for y0 in range(0, source.height, strip_rows):
        outcomes.add(y0, outcome_codes(gt[y0 : y0 + strip_rows], pred[y0 : y0 + strip_rows]))
    return render_outcomes(source, outcomes, alpha)


def outcome_codes(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """uint8 per pixel: 1 true positive, 2 false positive, 3 miss, 0 neither (masks: nonzero pixels are defects);
    feed strips of them to a `MaskPreview` for `render_outcomes`."""
    g, p = gt != 0, pred != 0
    return np.where(p, np.where(g, 1, 2), np.where(g, 3, 0)).astype(np.uint8)


def render_outcomes(source: ImageSource, outcomes: MaskPreview, alpha: float = 0.55) -> np.ndarray:
    """The picture of `outcome_preview` from a `MaskPreview` fed with `outcome_codes` strips."""
    base = downscale(source, outcomes.factor)
    tint = base.copy()
    outlines = []
    for code, color in ((1, TP_COLOR), (2, FP_COLOR), (3, FN_COLOR)):
        small = outcomes.layers.get(code)
        if small is None:
            continue
        tint[small] = color
        cs, _ = cv2.findContours(cv2.dilate(small.astype(np.uint8), np.ones((3, 3), np.uint8)), cv2.RETR_EXTERNAL,
                                 cv2.CHAIN_APPROX_SIMPLE)
        outlines.append((cs, color))
    out = cv2.addWeighted(tint, alpha, base, 1 - alpha, 0)
    for cs, color in outlines:
        cv2.drawContours(out, cs, -1, color, 1, lineType=cv2.LINE_AA)
    return out


def _draw_legend(img: np.ndarray, class_names: dict[int, str], regions: list[Region]) -> None:
    counts = {cid: 0 for cid in class_names}
    for r in regions:
        counts[r.class_id] = counts.get(r.class_id, 0) + 1
    scale = max(0.4, min(img.shape[:2]) / 1400)
    line = int(22 * scale / 0.6)
    rows = [(cid, f"{name}: {counts[cid]}") for cid, name in class_names.items()]
    width = int(max(len(t) for _, t in rows) * 11 * scale / 0.6) + line + 12
    cv2.rectangle(img, (4, 4), (8 + width, 8 + line * len(rows)), (20, 20, 20), -1)
    for i, (cid, text) in enumerate(rows):
        y = 8 + i * line
        cv2.rectangle(img, (10, y + 4), (10 + line - 8, y + line - 4), class_color(cid), -1)
        cv2.putText(img, text, (14 + line, y + line - 6), cv2.FONT_HERSHEY_SIMPLEX, scale, (235, 235, 235), 1, cv2.LINE_AA)
