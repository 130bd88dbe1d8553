"""From stitched probabilities to a class mask and a table of defect regions, strip by strip where it matters."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

STRIP_ROWS = 1024  # rows handled at once, so no full-size temporary beyond the outputs themselves


def score_to_u8(threshold: float) -> int:
    """The uint8 probability level corresponding to a threshold in [0, 1]."""
    return int(round(min(max(threshold, 0.0), 1.0) * 255))


def class_mask(probs: np.ndarray, head: str, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(mask, score) from (C, H, W) uint8 probabilities.

    mask: uint8 class index per pixel (0 = background; for a softmax head the index into the model's classes,
    for a sigmoid head channel + 1). score: uint8 defect score per pixel, 1 - p(background) for softmax (so
    that many weak votes for different defect classes still count as a defect), max channel for sigmoid.
    A pixel is a defect where score >= threshold; its class is the most probable defect class.
    """
    c, h, w = probs.shape
    thr = score_to_u8(threshold)
    mask = np.zeros((h, w), np.uint8)
    score = np.zeros((h, w), np.uint8)
    for y0 in range(0, h, STRIP_ROWS):
        p = probs[:, y0 : y0 + STRIP_ROWS]
        if head == "softmax":
            s = 255 - p[0]
            cls = p[1:].argmax(0).astype(np.uint8) + 1 if c > 2 else np.ones_like(s)
        else:
            s = p.max(0) if c > 1 else p[0]
            cls = p.argmax(0).astype(np.uint8) + 1 if c > 1 else np.ones_like(s)
        score[y0 : y0 + STRIP_ROWS] = s
        mask[y0 : y0 + STRIP_ROWS] = np.where(s >= thr, cls, 0)
    return mask, score


@dataclass
class Region:
    id: int
    class_id: int
    class_name: str
    x: int
    y: int
    width: int
    height: int
    area_px: int
    centroid_x: float
    centroid_y: float
    score_max: float
    score_mean: float

    def to_dict(self) -> dict:
        return asdict(self)


REGION_FIELDS = [f for f in Region.__dataclass_fields__]


def find_regions(
    mask: np.ndarray, score: np.ndarray, class_names: dict[int, str], *, min_area: int = 1
) -> list[Region]:
    """8-connected regions per class; regions smaller than `min_area` are removed from `mask` in place.

    Scores are read only at foreground pixels (usually well under 1% of the image), not over the whole map.
    """
    regions: list[Region] = []
    for cid, name in class_names.items():
        binary = (mask == cid).view(np.uint8)
        if not binary.any():
            continue
        n, labels, stats, centroids = cv2.connectedComponentsWithStats(binary, connectivity=8, ltype=cv2.CV_32S)
        ys, xs = np.nonzero(labels)
        labs = labels[ys, xs]
        vals = score[ys, xs].astype(np.float64) / 255.0
        order = np.argsort(labs, kind="stable")
        labs, vals = labs[order], vals[order]
        starts = np.flatnonzero(np.r_[True, labs[1:] != labs[:-1]])
        maxima = np.maximum.reduceat(vals, starts)
        sums = np.add.reduceat(vals, starts)
        small = [i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] < min_area]
        if small:
            drop = np.zeros(n, bool)
            drop[small] = True
            sel = drop[labels[ys, xs]]
            mask[ys[sel], xs[sel]] = 0
        for j, lab in enumerate(labs[starts]):
            x, y, w, h, area = (int(v) for v in stats[lab])
            if area < min_area:
                continue
            regions.append(Region(
                id=0, class_id=int(cid), class_name=name, x=x, y=y, width=w, height=h, area_px=area,
                centroid_x=round(float(centroids[lab, 0]), 2), centroid_y=round(float(centroids[lab, 1]), 2),
                score_max=round(float(maxima[j]), 4), score_mean=round(float(sums[j] / area), 4),
            ))
    regions.sort(key=lambda r: (r.y, r.x))
    for i, r in enumerate(regions, 1):
        r.id = i
    return regions
