"""From stitched probabilities to defect regions and a class mask.

A pixel is a defect where its defect score reaches the threshold (sigmoid heads: the largest class probability;
softmax heads: 1 - p(background), so weak votes for several defect classes still add up). Defect pixels are
grouped into 8-connected regions, and each region takes the class with the largest probability mass over its
pixels: a thin scratch whose pixels waver between "scratch" and "crack" becomes one scratch, not a dotted line of
alternating fragments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from defectscan.schemas import Region

STRIP_ROWS = 1024  # rows handled at once, so no full-size temporary beyond the outputs themselves


def score_to_u8(threshold: float) -> int:
    """The uint8 probability level corresponding to a threshold in [0, 1]."""
    return int(round(min(max(threshold, 0.0), 1.0) * 255))


@dataclass(frozen=True)
class ClassMap:
    """Which output channel is which class: the one place that knows the rule.

    Class ids are those of masks: 0 background, then the defect classes 1..K. A softmax head has a channel per
    class, background first (channel c = class c); a sigmoid head has one channel per defect class
    (channel c = class c + 1).
    """

    head: str
    channel_names: tuple[str, ...]  # the model's `classes`, one per output channel

    @classmethod
    def of(cls, spec) -> "ClassMap":
        """The map of a `ModelSpec` (anything with `head` and `classes`)."""
        return cls(spec.head, tuple(spec.classes))

    @classmethod
    def for_classes(cls, classes: Sequence[str], head: str = "auto") -> "ClassMap":
        """The map of a new model for dataset classes (background first); 'auto': sigmoid for one defect class,
        softmax for several."""
        if head == "auto":
            head = "sigmoid" if len(classes) == 2 else "softmax"
        return cls(head, tuple(classes) if head == "softmax" else tuple(classes[1:]))

    @property
    def offset(self) -> int:
        return 0 if self.head == "softmax" else 1

    @property
    def defect_channels(self) -> list[int]:
        """Probability channels that are defect classes (a softmax head's channel 0 is background)."""
        return list(range(1 - self.offset, len(self.channel_names)))

    def class_id(self, channel: int) -> int:
        return channel + self.offset

    def channel(self, class_id: int) -> int:
        return class_id - self.offset

    @property
    def defect_names(self) -> dict[int, str]:
        """Defect class id -> name."""
        return {self.class_id(c): self.channel_names[c] for c in self.defect_channels}


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




def segment(
    probs: np.ndarray, classes: ClassMap, threshold: float, *, min_area: int = 1
) -> tuple[np.ndarray, list[Region], np.ndarray]:
    """(class-index mask, regions, defect score) from (C, H, W) uint8 probabilities: the mask rule of `infer`.

    Mask values are class ids (see `ClassMap`); 0 is background. Regions smaller than `min_area` px are left out
    of both. Statistics are computed on the foreground pixels only (usually well under 1% of the image), never as
    full-size float arrays.
    """
    channels = classes.defect_channels
    class_ids = np.array([classes.class_id(c) for c in channels])
    names = classes.defect_names
    score = defect_score(probs, classes.head)
    binary = (score >= score_to_u8(threshold)).view(np.uint8)
    mask = np.zeros(score.shape, np.uint8)
    if not binary.any():
        return mask, [], score
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
            id=0, class_id=cid, class_name=names[cid], x=x, y=y, width=w, height=h, area_px=area,
            centroid_x=round(float(centroids[lab, 0]), 2), centroid_y=round(float(centroids[lab, 1]), 2),
            score_max=round(float(maxima[lab]), 4), score_mean=round(float(sums[lab] / area), 4),
        ))
    regions.sort(key=lambda r: (r.y, r.x))
    for i, r in enumerate(regions, 1):
        r.id = i
    return mask, regions, score
