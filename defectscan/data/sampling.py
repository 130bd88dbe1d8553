"""Training crops from large images: defect-aware oversampling plus background crops, deterministic by index.

Sample `i` depends only on (seed, i), never on the order or process in which samples are drawn, so DataLoader
workers, a resumed run and an uninterrupted run all see the same crops.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import albumentations as A
import cv2
import numpy as np
import torch

from defectscan.errors import DefectscanError

MAX_POINTS_PER_CLASS = 50_000  # defect pixel coordinates kept per image and class to pick crop centres from


def build_augment(spec: Sequence[dict[str, Any]]) -> A.Compose | None:
    """`[{"HorizontalFlip": {"p": 0.5}}, ...]` -> an albumentations pipeline applied to image and mask alike."""
    transforms = []
    for i, entry in enumerate(spec):
        ((name, params),) = entry.items()
        cls = getattr(A, str(name), None)
        if cls is None or not isinstance(cls, type):
            raise DefectscanError(f"config 'augment[{i}]': albumentations has no transform '{name}'")
        try:
            transforms.append(cls(**(params or {})))
        except Exception as exc:  # albumentations validates parameters with pydantic
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DefectscanError(f"config 'augment[{i}]' ({name}): {msg}") from None
    return A.Compose(transforms) if transforms else None


def _pad_to(arr: np.ndarray, size: int) -> np.ndarray:
    h, w = arr.shape[:2]
    if h >= size and w >= size:
        return arr  # a memory-mapped image (data.cache) stays on disk
    arr = np.asarray(arr)
    bottom, right = max(0, size - h), max(0, size - w)
    if bottom >= h or right >= w:  # reflection needs the image to be larger than the pad
        return np.pad(arr, ((0, bottom), (0, right)) + ((0, 0),) * (arr.ndim - 2), mode="wrap")
    return cv2.copyMakeBorder(arr, 0, bottom, 0, right, cv2.BORDER_REFLECT_101)


def auto_defect_share(defective_images: int, images: int) -> float:
    """0.5 * sqrt(share of training images with any defect pixel): 0.5 when every image has a defect, 0.16 when
    one in ten has. Square-root oversampling of the rare kind (as in LVIS repeat-factor sampling) keeps defects
    in enough batches to learn them, while the crops still show how rarely a defect appears: half of all crops on
    defects from 5 % defective images teaches a model that defects are everywhere, and it flags every image."""
    return round(0.5 * float(np.sqrt(defective_images / max(1, images))), 4)


def group_weights(groups: Sequence[str | None] | None, n: int, balance: float) -> np.ndarray | None:
    """Per-image weight n_g^-balance (n_g: images in its group), or None when every image weighs the same (no
    groups, one group, or balance 0). Images without a group form a group of their own."""
    if not 0.0 <= balance <= 1.0:
        raise DefectscanError(f"sampling.balance_groups must be from 0 to 1 (got {balance})")
    if groups is None or balance == 0.0:
        return None
    if len(groups) != n:
        raise ValueError(f"{len(groups)} group names for {n} images")
    counts = Counter(groups)
    if len(counts) < 2:
        return None
    return np.array([counts[g] ** -balance for g in groups], dtype=np.float64)


def group_shares(groups: Sequence[str | None], weights: np.ndarray) -> dict[str, tuple[int, float]]:
    """Each group's image count and share of the image weight (its share of crops, before image sizes)."""
    out: dict[str, tuple[int, float]] = {}
    for g, v in zip(groups, weights):
        n, total = out.get(str(g), (0, 0.0))
        out[str(g)] = (n + 1, total + float(v))
    return {g: (n, v / float(weights.sum())) for g, (n, v) in sorted(out.items())}


class CropDataset(torch.utils.data.Dataset):
    """Map-style dataset over an unbounded index space: item i is a (3, crop, crop) uint8 image and its
    (crop, crop) class-index mask.

    With probability `defect_share` (`auto`: `auto_defect_share`) the crop is centred (with jitter of a quarter
    crop) on a defect pixel: first a defect class uniformly among those present, then an image containing it, then
    one of its pixels, so rare classes are not drowned by common ones. Otherwise the crop is uniform over the
    training pixels.

    `scale` (lo, hi) zooms each crop by a factor drawn log-uniformly from [lo, hi]: a window of crop / factor px
    (at most the image's shorter side) is resized to crop px, so one defect is seen at several pixel sizes. Images
    taken by two cameras or at two magnifications then train one model; the tiles at inference stay at 1:1.
    (1, 1) draws no factor: crops are the same as without the option.

    `groups` names each image's sub-type (camera, product type; `Sample.group`) and `balance_groups` (b in [0, 1])
    reweights images so a group of n images gets a share of crops (defect-centred and background alike) in
    proportion to n^(1 - b): 0 weighs every image alike (a group of 3 among 20 gets ~15 % of the crops), 1 gives
    every group the same share, 0.5 the square root in between (as repeat-factor sampling does for rare classes).
    Off by default: on BSData's 20-label preset 0.5 did not lift the small group on held-out images (README).
    """

    def __init__(self, images: list, masks: list, num_classes: int, crop: int,
                 defect_share: float | str, seed: int, augment: A.Compose | None = None,
                 scale: tuple[float, float] = (1.0, 1.0), groups: Sequence[str | None] | None = None,
                 balance_groups: float = 0.0) -> None:
        if not images:
            raise DefectscanError("no training images")
        lo, hi = (float(v) for v in scale)
        if not 0 < lo <= hi:
            raise DefectscanError(f"sampling.scale must be two factors 0 < lo <= hi (got {list(scale)})")
        self.images = [_pad_to(im, crop) for im in images]
        self.masks = [_pad_to(m, crop) for m in masks]
        self.crop, self.seed, self.augment = crop, seed, augment
        self.log_scale = None if lo == hi == 1.0 else (float(np.log(lo)), float(np.log(hi)))
        rng = np.random.default_rng(seed)
        self.points: dict[int, list[tuple[int, np.ndarray]]] = {}  # class -> [(image index, flat indices)]
        for k, m in enumerate(self.masks):
            flat = np.asarray(m).ravel()
            for c in range(1, num_classes):
                idx = np.flatnonzero(flat == c)
                if idx.size:
                    if idx.size > MAX_POINTS_PER_CLASS:
                        idx = np.sort(rng.choice(idx, MAX_POINTS_PER_CLASS, replace=False))
                    self.points.setdefault(c, []).append((k, idx))
        self.classes_present = sorted(self.points)
        defective = len({k for found in self.points.values() for k, _ in found})
        self.defect_share = (auto_defect_share(defective, len(self.masks)) if defect_share == "auto"
                             else float(defect_share))
        self.image_weight = group_weights(groups, len(self.masks), balance_groups)
        # the defect-crop image draw for each class: None keeps the unweighted draw (and its random stream)
        self.point_p: dict[int, np.ndarray | None] = {c: None for c in self.points}
        if self.image_weight is not None:
            for c, found in self.points.items():
                w = self.image_weight[[k for k, _ in found]]
                self.point_p[c] = w / w.sum()
        areas = np.array([m.size for m in self.masks], dtype=np.float64)
        if self.image_weight is not None:
            areas = areas * self.image_weight
        self.area_p = areas / areas.sum()

    def __len__(self) -> int:
        return 2**62  # indices are drawn by the trainer's sampler, not enumerated

    def _window(self, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """(image index, top, left, side) of a square window; side is the crop unless zoomed."""
        c = self.crop
        if self.log_scale is not None:
            c = int(round(c / np.exp(rng.uniform(*self.log_scale))))
        if self.classes_present and rng.random() < self.defect_share:
            cls = self.classes_present[rng.integers(len(self.classes_present))]
            p_img = self.point_p[cls]
            j = rng.integers(len(self.points[cls])) if p_img is None else rng.choice(len(p_img), p=p_img)
            k, idx = self.points[cls][j]
            w = self.masks[k].shape[1]
            p = int(idx[rng.integers(idx.size)])
            cy, cx = divmod(p, w)
            cy += int(rng.integers(-c // 4, c // 4 + 1))
            cx += int(rng.integers(-c // 4, c // 4 + 1))
            h, w = self.masks[k].shape
            c = min(c, h, w)
            return k, int(np.clip(cy - c // 2, 0, h - c)), int(np.clip(cx - c // 2, 0, w - c)), c
        k = int(rng.choice(len(self.masks), p=self.area_p))
        h, w = self.masks[k].shape
        c = min(c, h, w)
        return k, int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1)), c

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, int(i)])
        k, y, x, side = self._window(rng)
        # copies: a memory-mapped image is read-only, and the crop must not pin its pages
        image = np.array(self.images[k][y : y + side, x : x + side])
        mask = np.array(self.masks[k][y : y + side, x : x + side])
        if side != self.crop:
            size = (self.crop, self.crop)
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA if side > self.crop else cv2.INTER_LINEAR)
            mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)  # class indices are never blended
        if self.augment is not None:
            self.augment.set_random_seed(int(rng.integers(2**31)))
            out = self.augment(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        if image.shape[:2] != (self.crop, self.crop):
            raise DefectscanError(f"augmentation changed the crop size to {image.shape[:2]}; "
                                  f"use size-preserving transforms")
        return (torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1),
                torch.from_numpy(np.ascontiguousarray(mask)))


class IndexRange(torch.utils.data.Sampler):
    """Sample indices first..last-1: a run's crops are numbered globally, so a resumed epoch continues the list.

    Under torchrun (`world` processes), the range is cut into global batches of `batch` crops and rank r takes
    the r-th equal part of each: crop i is the same image region whatever the number of processes, and the
    processes together see exactly the batches one process would."""

    def __init__(self, first: int, last: int, batch: int = 1, rank: int = 0, world: int = 1) -> None:
        if batch % world:
            raise ValueError(f"a batch of {batch} cannot be split equally over {world} processes")
        self.first, self.last, self.batch, self.rank, self.world = first, last, batch, rank, world

    def __iter__(self):
        part = self.batch // self.world
        for start in range(self.first, self.last, self.batch):
            yield from range(start + self.rank * part, min(start + (self.rank + 1) * part, self.last))

    def __len__(self) -> int:
        return sum(1 for _ in self)


class MixedCrops(torch.utils.data.Dataset):
    """Crops from two sources by index: item i comes from `extra` with probability `share`, else from `base`.

    For self-training: `base` holds the labeled images, `extra` the pseudo-labeled ones, so the labeled images keep
    a fixed share of every batch however many unlabeled images there are. The draw depends only on (seed, i), so
    crops stay deterministic by index (workers, resumed runs)."""

    def __init__(self, base: CropDataset, extra: CropDataset, share: float, seed: int) -> None:
        if not 0.0 <= share <= 1.0:
            raise DefectscanError(f"share of pseudo-labeled crops must be in [0, 1], got {share}")
        self.base, self.extra, self.share, self.seed = base, extra, share, seed

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        # a stream of its own ([seed, i, 1]), so base crop i is the same crop it would be without the extra source
        take_extra = np.random.default_rng([self.seed, int(i), 1]).random() < self.share
        return (self.extra if take_extra else self.base)[i]
