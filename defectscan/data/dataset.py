"""A segmentation dataset in memory-light form: which images exist, how each is labeled, which split it is in.

Pixels are loaded on demand (`load_image`, `load_mask`), so a dataset of huge images costs nothing to list.
Class index 0 is always the background; `classes[1:]` are the defect classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Mapping, Sequence

import numpy as np

from defectscan.data.annotations import Shape, rasterize
from defectscan.errors import DefectscanError
from defectscan.io.images import ImageSource, check_pixel_limit, imread_unchanged, open_image, read_image

Label = Literal["mask", "shapes", "good", "none"]
# Mask value of pixels no loss sees: pseudo-labels leave the pixels the teacher was unsure of at this value.
IGNORE_INDEX = 255


@dataclass
class Problem:
    """Something wrong with the dataset. Fatal problems stop `data check` (exit 1) and training."""

    path: str
    message: str
    fatal: bool = True

    def __str__(self) -> str:
        return f"{'error' if self.fatal else 'warning'}: {self.path}: {self.message}"


@dataclass
class Sample:
    """One image and its annotation.

    `label` says how it is annotated: a mask file, vector shapes, `good` (known defect-free, e.g. MVTec's
    train/good) or `none` (unlabeled: its defect status is unknown, so it is never used as a negative).
    """

    image: Path
    stem: str
    label: Label = "none"
    mask_path: Path | None = None
    shapes: list[Shape] = field(default_factory=list)
    annotation: Path | None = None  # the file the annotation came from (LabelMe/COCO JSON, mask)
    size: tuple[int, int] | None = None  # (H, W) declared by the annotation, checked against the image
    split: str | None = None  # from the dataset's own split file: train, val or test
    group: str | None = None  # sub-type (MVTec defect type, BSData image type); evaluate scores each on its own
    has_defect: bool | None = None  # known without decoding pixels for shapes/good; filled by a mask scan

    @property
    def labeled(self) -> bool:
        return self.label != "none"


@dataclass
class SegmentationDataset:
    root: Path
    format: str
    classes: tuple[str, ...]  # classes[0] is the background
    samples: list[Sample]
    problems: list[Problem] = field(default_factory=list)
    binary_masks: bool = False  # mask files store defects as 255 (or any non-zero value) rather than class indices
    # Set by `seen_as`: the classes the files use, and their index -> index in `classes`
    file_classes: tuple[str, ...] | None = None
    label_lut: np.ndarray | None = None

    def seen_as(self, classes: Sequence[str], mapping: Mapping[str, str]) -> "SegmentationDataset":
        """The dataset in another class list (a model's): `mapping` takes each of its defect classes to one of
        `classes` (background first); masks are translated as they load."""
        target = {c: i for i, c in enumerate(classes)}
        lut = np.zeros(256, np.uint8)
        for i, name in enumerate(self.classes[1:], start=1):
            lut[i] = target[mapping[name]]
        return replace(self, classes=tuple(classes), file_classes=self.classes, label_lut=lut)

    @property
    def labeled(self) -> list[Sample]:
        return [s for s in self.samples if s.labeled]

    @property
    def unlabeled(self) -> list[Sample]:
        return [s for s in self.samples if not s.labeled]

    @property
    def fatal_problems(self) -> list[Problem]:
        return [p for p in self.problems if p.fatal]

    @property
    def file_class_index(self) -> dict[str, int]:
        """Class name -> its value in the dataset's own files (its classes before any `seen_as`)."""
        return {c: i for i, c in enumerate(self.file_classes or self.classes)}

    def require_usable(self) -> None:
        """Raise a one-line error when the dataset cannot be trained on."""
        fatal = self.fatal_problems
        if fatal:
            more = f" (and {len(fatal) - 1} more; run `defectscan data check {self.root}`)" if len(fatal) > 1 else ""
            raise DefectscanError(f"{fatal[0].path}: {fatal[0].message}{more}")
        if not self.labeled:
            raise DefectscanError(f"{self.root}: no labeled images found (format {self.format})")

    def load_image(self, sample: Sample) -> np.ndarray:
        """uint8 RGB (H, W, 3)."""
        return read_image(sample.image)

    def open_source(self, sample: Sample) -> ImageSource:
        """The image for tiled reading, region by region (a huge PNG is decoded row by row, never whole)."""
        return open_image(sample.image)

    def load_mask(self, sample: Sample, shape: tuple[int, int] | None = None) -> np.ndarray:
        """Class-index mask (H, W) uint8. `shape` is the image's (H, W) when the caller already knows it."""
        mask = self._load_file_mask(sample, shape)
        return mask if self.label_lut is None else self.label_lut[mask]

    def _load_file_mask(self, sample: Sample, shape: tuple[int, int] | None) -> np.ndarray:
        classes = self.file_classes or self.classes
        if sample.label == "none":
            raise DefectscanError(f"{sample.image}: image is unlabeled")
        if sample.label == "good":
            if shape is None:
                shape = self.load_image(sample).shape[:2]
            return np.zeros(shape, np.uint8)
        if sample.label == "shapes":
            if shape is not None and sample.size is not None and tuple(sample.size) != tuple(shape):
                raise DefectscanError(f"{sample.annotation}: annotation is for a {sample.size[1]}x{sample.size[0]} "
                                      f"image, {sample.image.name} is {shape[1]}x{shape[0]}")
            size = shape or sample.size  # the real image's size wins over a declared one
            if size is None:
                size = self.load_image(sample).shape[:2]
            try:
                return rasterize(sample.shapes, size, self.file_class_index)
            except ValueError as exc:  # an RLE that does not fit the image
                raise DefectscanError(f"{sample.annotation}: {sample.image.name}: {exc}") from None
        mask = read_mask_file(sample.mask_path)
        if self.binary_masks:
            mask = (mask > 0).astype(np.uint8)
        elif mask.max(initial=0) >= len(classes):
            raise DefectscanError(f"{sample.mask_path}: label value {int(mask.max())} but only "
                                  f"{len(classes)} classes ({', '.join(classes)})")
        if shape is not None and mask.shape != tuple(shape):
            raise DefectscanError(f"{sample.mask_path}: mask is {mask.shape[1]}x{mask.shape[0]}, "
                                  f"image is {shape[1]}x{shape[0]}")
        return mask


def read_mask_file(path: Path | None) -> np.ndarray:
    """A mask image as (H, W) uint8; colour masks must be grey (all channels equal)."""
    if path is None or not Path(path).is_file():
        raise DefectscanError(f"{path}: mask file not found")
    check_pixel_limit(Path(path))
    mask = imread_unchanged(Path(path))
    if mask is None:
        raise DefectscanError(f"{path}: cannot decode mask")
    if mask.ndim == 3:
        if mask.shape[2] == 4:
            mask = mask[:, :, :3]
        if not (np.array_equal(mask[:, :, 0], mask[:, :, 1]) and np.array_equal(mask[:, :, 0], mask[:, :, 2])):
            raise DefectscanError(f"{path}: colour mask; expected a single-channel class-index or 0/255 mask")
        mask = mask[:, :, 0]
    if mask.dtype != np.uint8:
        if mask.max(initial=0) > 255 or mask.min(initial=0) < 0:
            raise DefectscanError(f"{path}: mask values outside 0..255")
        mask = mask.astype(np.uint8)
    return mask
