"""`defectscan data check`: decode every image and annotation once, gather statistics and every problem."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from defectscan.data.dataset import Problem, SegmentationDataset
from defectscan.errors import DefectscanError
from defectscan.io.images import open_image


@dataclass
class ClassStats:
    pixels: int = 0
    images: int = 0
    regions: int = 0
    region_areas: list[int] = field(default_factory=list)


@dataclass
class DatasetReport:
    root: Path
    format: str
    classes: tuple[str, ...]
    images: int
    labeled: int
    good: int  # labeled defect-free by the format (MVTec good)
    unlabeled: int
    splits: dict[str, int]
    sizes: Counter  # (W, H) -> count
    defect_fractions: list[float]  # per labeled image: share of pixels that are defects
    classes_stats: dict[str, ClassStats]
    unlabeled_examples: list[str]
    problems: list[Problem]

    @property
    def fatal(self) -> bool:
        return any(p.fatal for p in self.problems)


def check_dataset(ds: SegmentationDataset, progress: Callable[[int, int], None] | None = None) -> DatasetReport:
    problems = list(ds.problems)
    if not ds.labeled:
        problems.append(Problem(str(ds.root), f"no labeled images (format {ds.format}): nothing to train or evaluate on"))
    stats = {c: ClassStats() for c in ds.classes[1:]}
    sizes: Counter = Counter()
    fractions: list[float] = []
    for k, sample in enumerate(ds.samples):
        if progress:
            progress(k, len(ds.samples))
        try:
            image = open_image(sample.image)
        except DefectscanError as exc:
            problems.append(Problem(str(sample.image), str(exc).split(": ", 1)[-1]))
            continue
        h, w = image.shape
        sizes[(w, h)] += 1
        if not sample.labeled:
            continue
        if sample.size is not None and tuple(sample.size) != (h, w):
            problems.append(Problem(str(sample.annotation), f"annotation is for a {sample.size[1]}x{sample.size[0]} "
                                    f"image, {sample.image.name} is {w}x{h}"))
            continue
        try:
            mask = ds.load_mask(sample, (h, w))
        except DefectscanError as exc:
            problem = Problem(str(sample.annotation or sample.mask_path), str(exc).split(": ", 1)[-1])
            if problem not in problems:  # the loader may have reported it already
                problems.append(problem)
            continue
        fractions.append(float(np.count_nonzero(mask)) / mask.size)
        counts = np.bincount(mask.ravel(), minlength=len(ds.classes))
        for i, name in enumerate(ds.classes[1:], start=1):
            if counts[i] == 0:
                continue
            st = stats[name]
            st.pixels += int(counts[i])
            st.images += 1
            n, _, cc, _ = cv2.connectedComponentsWithStats((mask == i).view(np.uint8), connectivity=8)
            st.regions += n - 1
            st.region_areas.extend(cc[1:, cv2.CC_STAT_AREA].tolist())
    if progress:
        progress(len(ds.samples), len(ds.samples))
    splits = Counter(s.split or "unsplit" for s in ds.labeled)
    return DatasetReport(
        root=ds.root, format=ds.format, classes=ds.classes, images=len(ds.samples), labeled=len(ds.labeled),
        good=sum(s.label == "good" for s in ds.samples), unlabeled=len(ds.unlabeled), splits=dict(splits),
        sizes=sizes, defect_fractions=fractions, classes_stats=stats,
        unlabeled_examples=[s.image.name for s in ds.unlabeled[:5]], problems=problems,
    )
