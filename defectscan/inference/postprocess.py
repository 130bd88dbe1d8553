"""From stitched probabilities to defect regions and a class mask.

A pixel is a defect where its defect score reaches the threshold (sigmoid heads: the largest class probability;
softmax heads: 1 - p(background), so weak votes for several defect classes still add up). Defect pixels are
grouped into 8-connected regions, and each region takes the class with the largest probability mass over its
pixels: a thin scratch whose pixels waver between "scratch" and "crack" becomes one scratch, not a dotted line of
alternating fragments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import cv2
import numpy as np

from defectscan.components import StripComponents
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




class StripSegmenter:
    """The mask rule, applied to probabilities that arrive as row strips, top to bottom, in memory that does not
    grow with the image beyond 1 bit per pixel and a few numbers per region.

    Pass 1 (`add`): each strip is thresholded and labelled (8-connected); labels touching the previous strip's
    last row are linked; per label it keeps sums (area, coordinates, score, class votes), minima and maxima.
    `finish` joins linked labels into regions (exactly the regions of labelling the whole image at once) and
    decides each region's class. Pass 2 (`mask_rows`): each strip is labelled again from its stored bits (same
    input, same labels; checked) and painted with its region's class.
    """

    # per-label statistics, one column each; votes (one column per defect channel) follow
    X0, Y0, X1, Y1, AREA, SUM_X, SUM_Y, SCORE_SUM, SCORE_MAX = range(9)

    def __init__(self, classes: ClassMap, threshold: float, *, min_area: int = 1) -> None:
        self.classes, self.level, self.min_area = classes, score_to_u8(threshold), min_area
        self.height = 0
        self.components = StripComponents()
        self.strips: list[tuple[int, int, int, np.ndarray | None, int, int, int]] = []
        self.stats: list[np.ndarray] = []
        self.label_class: np.ndarray | None = None

    def add(self, probs: np.ndarray) -> np.ndarray:
        """Take the next (C, rows, W) uint8 probability strip; returns its (rows, W) uint8 defect score."""
        if self.label_class is not None:
            raise RuntimeError("StripSegmenter.add after finish")
        _, rows, width = probs.shape
        y0 = self.height
        self.height += rows
        score = defect_score(probs, self.classes.head)
        binary = (score >= self.level).view(np.uint8)
        strip = self.components.add(binary)
        if strip.labels is None:
            self.strips.append((y0, rows, width, None, strip.offset, 1, 0))
            return score
        n, labels = strip.n, strip.labels
        ys, xs = np.nonzero(labels)
        labs = labels[ys, xs]
        per_label = lambda weights: np.bincount(labs, weights=weights, minlength=n)[1:]  # noqa: E731
        values = score[ys, xs]
        maxima = np.zeros(n)
        np.maximum.at(maxima, labs, values)
        st = strip.stats[1:].astype(np.float64)
        left, top = st[:, cv2.CC_STAT_LEFT], st[:, cv2.CC_STAT_TOP] + y0
        area = st[:, cv2.CC_STAT_AREA]
        self.stats.append(np.column_stack([
            left, top, left + st[:, cv2.CC_STAT_WIDTH], top + st[:, cv2.CC_STAT_HEIGHT], area,
            per_label(xs), per_label(ys) + y0 * area, per_label(values), maxima[1:],
            *(per_label(probs[c][ys, xs]) for c in self.classes.defect_channels),
        ]))
        self.strips.append((y0, rows, width, np.packbits(binary), strip.offset, n, int(labels.sum(dtype=np.int64))))
        return score

    def finish(self) -> list[Region]:
        """Join the strips' labels into regions; returns the region table (ids in reading order of their boxes)."""
        count = self.components.count
        self.label_class = np.zeros(count + 1, np.uint8)
        if count == 0:
            return []
        regions_n, region_of = self.components.finish()
        st = np.concatenate(self.stats)
        total = lambda col: np.bincount(region_of, weights=st[:, col], minlength=regions_n)  # noqa: E731
        lo = np.full((regions_n, 2), np.inf)
        np.minimum.at(lo, region_of, st[:, [self.X0, self.Y0]])
        hi = np.zeros((regions_n, 3))
        np.maximum.at(hi, region_of, st[:, [self.X1, self.Y1, self.SCORE_MAX]])
        first_label = np.full(regions_n, count)
        np.minimum.at(first_label, region_of, np.arange(count))  # raster order of a region's first pixel
        area = total(self.AREA)
        votes = np.stack([total(col) for col in range(self.SCORE_MAX + 1, st.shape[1])], axis=1)
        class_ids = np.array([self.classes.class_id(c) for c in self.classes.defect_channels], np.uint8)
        region_class = np.where(area >= self.min_area, class_ids[votes.argmax(1)], 0).astype(np.uint8)
        self.label_class[1:] = region_class[region_of]
        sum_x, sum_y, score_sum = total(self.SUM_X), total(self.SUM_Y), total(self.SCORE_SUM)
        names = self.classes.defect_names
        regions = []
        for k in sorted(np.flatnonzero(region_class), key=lambda k: (lo[k, 1], lo[k, 0], first_label[k])):
            a, cid = int(area[k]), int(region_class[k])
            regions.append(Region(
                id=len(regions) + 1, class_id=cid, class_name=names[cid], x=int(lo[k, 0]), y=int(lo[k, 1]),
                width=int(hi[k, 0] - lo[k, 0]), height=int(hi[k, 1] - lo[k, 1]), area_px=a,
                centroid_x=round(sum_x[k] / a, 2), centroid_y=round(sum_y[k] / a, 2),
                score_max=round(hi[k, 2] / 255.0, 4), score_mean=round(score_sum[k] / 255.0 / a, 4),
            ))
        return regions

    def segment_strips(self, strips: Iterable[tuple[int, np.ndarray]],
                       on_strip: Callable[[int, np.ndarray, np.ndarray], None] | None = None) -> list[Region]:
        """Pass 1 over (y0, (C, rows, W) probabilities) strips, top to bottom, then `finish`. `on_strip(y0, probs,
        score)` sees each strip with its (rows, W) defect score before the next one is asked for."""
        for y0, block in strips:
            score = self.add(block)
            if on_strip is not None:
                on_strip(y0, block, score)
        return self.finish()

    def mask_rows(self) -> Iterator[tuple[int, np.ndarray]]:
        """(y0, (rows, W) uint8 class-id mask) per strip, top to bottom, after `finish`."""
        if self.label_class is None:
            raise RuntimeError("StripSegmenter.mask_rows before finish")
        for y0, rows, width, bits, offset, n, checksum in self.strips:
            if bits is None:
                yield y0, np.zeros((rows, width), np.uint8)
                continue
            binary = np.unpackbits(bits, count=rows * width).reshape(rows, width)
            m, labels, _, _ = _label(binary)
            if m != n or int(labels.sum(dtype=np.int64)) != checksum:
                raise RuntimeError("connected-component labels differ between two passes over the same strip")
            lut = np.concatenate([[0], self.label_class[offset + 1 : offset + n]]).astype(np.uint8)
            yield y0, lut[labels]

    def paint(self, mask: np.ndarray) -> None:
        """Write every mask strip into the (H, W) uint8 array `mask`, after `finish`."""
        for y0, rows in self.mask_rows():
            mask[y0 : y0 + len(rows)] = rows


def _label(binary: np.ndarray):
    return cv2.connectedComponentsWithStats(binary, connectivity=8, ltype=cv2.CV_32S)


def segment(
    probs: np.ndarray, classes: ClassMap, threshold: float, *, min_area: int = 1
) -> tuple[np.ndarray, list[Region], np.ndarray]:
    """(class-index mask, regions, defect score) from (C, H, W) uint8 probabilities: the mask rule of `infer`.

    Mask values are class ids (see `ClassMap`); 0 is background. Regions smaller than `min_area` px are left out
    of both. A pixel's region takes the class with the largest probability mass over the region (see module
    docstring). Works strip by strip (`StripSegmenter`): no full-size temporary beyond the outputs.
    """
    _, h, w = probs.shape
    seg = StripSegmenter(classes, threshold, min_area=min_area)
    mask, score = np.empty((h, w), np.uint8), np.empty((h, w), np.uint8)
    regions = seg.segment_strips(((y0, probs[:, y0 : y0 + STRIP_ROWS]) for y0 in range(0, h, STRIP_ROWS)),
                                 on_strip=_into(score))
    seg.paint(mask)
    return mask, regions, score


def _into(out: np.ndarray) -> Callable[[int, np.ndarray, np.ndarray], None]:
    """An `on_strip` that copies each strip's score into the (H, W) array `out`."""
    def copy(y0: int, probs: np.ndarray, score: np.ndarray) -> None:
        out[y0 : y0 + len(score)] = score
    return copy
