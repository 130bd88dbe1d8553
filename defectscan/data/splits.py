"""Deterministic train/val/test splits and nested labeled subsets.

The dataset's own split wins where it has one (BSData's image_data.json, MVTec's train/test folders, COCO files
named *train*/*test*); otherwise labeled images are split with a seed, stratified by defect presence. Unlabeled
images never enter a split. Subsets of the training images for learning curves are prefixes of one seeded,
stratified order, so the 5-image subset is inside the 10-image one, and so on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from defectscan.data.dataset import Sample, SegmentationDataset
from defectscan.errors import DefectscanError


@dataclass
class Splits:
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    source: str  # "dataset" when the dataset's own split file decided, else "seeded"

    def summary(self) -> str:
        return f"train {len(self.train)}, val {len(self.val)}, test {len(self.test)} ({self.source} split)"


def _stratified_order(samples: list[Sample], seed: int) -> list[Sample]:
    """A seeded order in which every prefix keeps the defect/defect-free ratio as close as possible."""
    rng = np.random.default_rng(seed)
    ordered = sorted(samples, key=lambda s: s.stem)
    groups = [[s for s in ordered if s.has_defect], [s for s in ordered if not s.has_defect]]
    groups = [[g[i] for i in rng.permutation(len(g))] for g in groups]
    total = len(ordered)
    out: list[Sample] = []
    taken = [0, 0]
    for k in range(1, total + 1):
        # take from the group that is furthest behind its share of the first k picks
        lag = [len(g) * k / total - t if t < len(g) else -np.inf for g, t in zip(groups, taken)]
        j = int(np.argmax(lag))
        out.append(groups[j][taken[j]])
        taken[j] += 1
    return out


def _take(order: list[Sample], fraction: float, minimum: int) -> tuple[list[Sample], list[Sample]]:
    n = int(round(len(order) * fraction))
    n = max(minimum, n) if fraction > 0 else 0
    n = min(n, len(order) - 1) if len(order) > 1 else 0
    return order[:n], order[n:]


def split_dataset(ds: SegmentationDataset, val_fraction: float = 0.15, test_fraction: float = 0.2,
                  seed: int = 0) -> Splits:
    """Train/val/test over the labeled images. Fractions apply only where the dataset has no split of its own."""
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise DefectscanError(f"bad split fractions val={val_fraction}, test={test_fraction}")
    labeled = ds.labeled
    if not labeled:
        raise DefectscanError(f"{ds.root}: no labeled images to split")
    if any(s.split for s in labeled):
        train = [s for s in labeled if s.split == "train"]
        val = [s for s in labeled if s.split == "val"]
        test = [s for s in labeled if s.split == "test"]
        unsplit = [s for s in labeled if s.split is None]
        if unsplit:  # labeled images the split file does not mention: kept out of test, so test stays the dataset's
            train += unsplit
        source = "dataset"
        if not val and val_fraction > 0:
            val, train = _take(_stratified_order(train, seed), val_fraction, 1)
    else:
        order = _stratified_order(labeled, seed)
        test, rest = _take(order, test_fraction, 1)
        val, train = _take(rest, val_fraction / (1 - test_fraction), 1)
        source = "seeded"
    if not train:
        raise DefectscanError(f"{ds.root}: no labeled training images after the split")
    key = lambda s: s.stem  # noqa: E731
    return Splits(sorted(train, key=key), sorted(val, key=key), sorted(test, key=key), source)


def labeled_subset(train: list[Sample], count: int | None = None, fraction: float | None = None,
                   seed: int = 0) -> list[Sample]:
    """The first `count` (or `fraction`) training images of a seeded stratified order: nested across sizes."""
    if count is not None and fraction is not None:
        raise DefectscanError("give either a number of labeled images or a fraction, not both")
    if count is None and fraction is None:
        return list(train)
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise DefectscanError(f"labeled fraction must be in (0, 1], got {fraction}")
        count = max(1, int(round(fraction * len(train))))
    if count < 1:
        raise DefectscanError(f"number of labeled images must be >= 1, got {count}")
    if count > len(train):
        raise DefectscanError(f"asked for {count} labeled images but the training split has {len(train)}")
    return sorted(_stratified_order(train, seed)[:count], key=lambda s: s.stem)


def label_budget(splits: Splits, count: int | None = None, fraction: float | None = None, subset_seed: int = 0,
                 val_fraction: float = 0.15, split_seed: int = 0) -> tuple[Splits, list[Sample]]:
    """(splits, training images) under a label budget: `count` (or `fraction`) of the non-test labeled images, in
    all. Validation comes out of the budget (`val_fraction` of it, rounded; none when that rounds to 0), because
    a user who has labeled 20 images has 20 to train and validate on: validating a 20-label run on 49 other
    labeled images would pick its epoch and threshold with labels it does not have. The budget is a nested
    subset (`labeled_subset`) of the dataset's train and val images together; the test split never changes.
    Without a budget the splits are returned as they are."""
    if count is None and fraction is None:
        return splits, list(splits.train)
    key = lambda s: s.stem  # noqa: E731
    pool = sorted(splits.train + splits.val, key=key)
    chosen = labeled_subset(pool, count, fraction, subset_seed)
    n_val = min(int(round(len(chosen) * val_fraction)), len(chosen) - 1)
    order = _stratified_order(chosen, split_seed)
    val, train = order[:n_val], order[n_val:]
    val_stems = {s.stem for s in val}
    return (Splits([s for s in pool if s.stem not in val_stems], sorted(val, key=key), splits.test, splits.source),
            sorted(train, key=key))
