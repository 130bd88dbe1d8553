"""From stitched probabilities to defect regions and a class mask.

A pixel is a defect where its defect score reaches the threshold (sigmoid heads: the largest class probability;
softmax heads: 1 - p(background), so weak votes for several defect classes still add up). Defect pixels are
grouped into 8-connected regions, and each region takes the class with the largest probability mass over its
pixels: a thin scratch whose pixels waver between "scratch" and "crack" becomes one scratch, not a dotted line of
alternating fragments.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import cv2
import numpy as np

STRIP_ROWS = 1024  # rows handled at once, so no full-size temporary beyond the outputs themselves


def score_to_u8(threshold: float) -> int:
    """The uint8 probability level corresponding to a threshold in [0, 1]."""
    return int(round(min(max(threshold, 0.0), 1.0) * 255))


def defect_channels(head: str, num_channels: int) -> list[int]:
    """Probability channels that are defect classes (a softmax head's channel 0 is background)."""
    return list(range(1, num_channels)) if head == "softmax" else list(range(num_channels))


def defect_score(probs: np.ndarray, head: str) -> np.ndarray:
    """(H, W) uint8 defect score from (C, H, W) uint8 probabilities, strip by strip."""
    c, h, w = probs.shape
    score = np.empty((h, w), np.uint8)
    for y0 in range(0, h, STRIP_ROWS):
        p = probs[:, y0 : y0 + STRIP_ROWS]
        if head == "softmax":
            score[y0 : y0 + STRIP_ROWS] = 255 - p[0]
        else:
            score[y0 : y0 + STRIP_ROWS] = p.max(0) if c > 1 else p[0]
    return score


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


REGION_FIELDS = [f.name for f in fields(Region)]


def segment(
    probs: np.ndarray, head: str, threshold: float, class_names: dict[int, str], *, min_area: int = 1
) -> tuple[np.ndarray, list[Region]]:
    """(class-index mask, regions) from (C, H, W) uint8 probabilities.

    Mask values are class ids (softmax: channel index; sigmoid: channel + 1); 0 is background. Regions smaller
    than `min_area` px are left out of both. Statistics are computed on the foreground pixels only (usually
    well under 1% of the image), never as full-size float arrays.
    """
    channels = defect_channels(head, probs.shape[0])
    class_ids = np.array([c if head == "softmax" else c + 1 for c in channels])
    score = defect_score(probs, head)
    binary = (score >= score_to_u8(threshold)).view(np.uint8)
    mask = np.zeros(score.shape, np.uint8)
    if not binary.any():
        return mask, []
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(binary, connectivity=8, ltype=cv2.CV_32S)
    del binary
    ys, xs = np.nonzero(labels)
    labs = labels[ys, xs]
    del labels
    # class vote: probability mass of each defect class per region
    votes = np.stack([np.bincount(labs, weights=probs[c][ys, xs], minlength=n) for c in channels], axis=1)
    region_class = np.zeros(n, np.uint8)
    region_class[1:] = class_ids[votes[1:].argmax(1)]
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area
    keep[0] = False
    region_class[~keep] = 0
    mask[ys, xs] = region_class[labs]

    vals = score[ys, xs].astype(np.float64) / 255.0
    sums = np.bincount(labs, weights=vals, minlength=n)
    maxima = np.zeros(n)
    np.maximum.at(maxima, labs, vals)
    regions = []
    for lab in np.flatnonzero(keep):
        x, y, w, h, area = (int(v) for v in stats[lab])
        cid = int(region_class[lab])
        regions.append(Region(
            id=0, class_id=cid, class_name=class_names[cid], x=x, y=y, width=w, height=h, area_px=area,
            centroid_x=round(float(centroids[lab, 0]), 2), centroid_y=round(float(centroids[lab, 1]), 2),
            score_max=round(float(maxima[lab]), 4), score_mean=round(float(sums[lab] / area), 4),
        ))
    regions.sort(key=lambda r: (r.y, r.x))
    for i, r in enumerate(regions, 1):
        r.id = i
    return mask, regions
