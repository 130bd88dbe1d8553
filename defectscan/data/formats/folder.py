"""Image + mask folders (class-index or 0/255 masks, optional classes.json)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from defectscan.data.dataset import Problem, Sample, SegmentationDataset, read_mask_file
from defectscan.errors import DefectscanError
from defectscan.io.images import SUPPORTED_SUFFIXES
from defectscan.data.formats.common import IMAGE_DIRS, MASK_DIRS, MASK_SUFFIXES, BACKGROUND, files, find_dir, with_classes, duplicate_stems, classes_file, read_split_file


def load_folder(root: Path, classes: Sequence[str] | None) -> SegmentationDataset:
    problems: list[Problem] = []
    image_dir, mask_dir = find_dir(root, IMAGE_DIRS), find_dir(root, MASK_DIRS)
    if image_dir is None or mask_dir is None:
        raise DefectscanError(f"{root}: the folder format needs an images/ and a masks/ sub-folder")
    by_stem = duplicate_stems(files(image_dir, SUPPORTED_SUFFIXES), problems)
    masks: dict[str, Path] = {}
    for path in files(mask_dir, SUPPORTED_SUFFIXES):
        if path.stem in masks:
            problems.append(Problem(str(path), f"duplicate mask stem '{path.stem}' (also {masks[path.stem]})"))
        masks[path.stem] = path
    splits, groups = read_split_file(root)
    samples, used, values, mask_of = [], set(), {}, {}
    for stem, image in by_stem.items():
        mask = next((masks[stem + s] for s in MASK_SUFFIXES if stem + s in masks), None)
        sample = Sample(image=image, stem=stem, split=splits.get(stem), group=groups.get(stem))
        if mask is not None:
            used.add(mask.stem)
            mask_of[stem] = mask
            sample.label, sample.mask_path, sample.annotation = "mask", mask, mask
            if mask.suffix.lower() in (".jpg", ".jpeg"):
                problems.append(Problem(str(mask), "JPEG mask: lossy compression changes label values"))
            try:
                values[stem] = np.unique(read_mask_file(mask))
                sample.has_defect = bool((values[stem] > 0).any())
            except DefectscanError as exc:
                problems.append(Problem(str(mask), str(exc).split(": ", 1)[-1]))
        samples.append(sample)
    for stem, path in masks.items():
        if stem not in used:
            problems.append(Problem(str(path), "mask without a matching image", fatal=False))
    all_values = np.unique(np.concatenate(list(values.values()))) if values else np.zeros(0, np.uint8)
    binary = bool(len(all_values)) and set(all_values.tolist()) <= {0, 255}
    given = list(classes) if classes else classes_file(root)
    if given:
        names = with_classes([], given)
        binary = binary and len(names) == 2
    elif binary or set(all_values.tolist()) <= {0, 1}:
        names = (BACKGROUND, "defect")
    elif 255 in all_values:  # 0/255 masks with stray values: a 7 must not create classes class_1..class_255
        names, binary = (BACKGROUND, "defect"), True
        for stem, v in values.items():
            stray = sorted(set(v.tolist()) - {0, 255})
            if stray:
                problems.append(Problem(str(mask_of[stem]), f"unexpected mask value(s) {', '.join(map(str, stray))} "
                                        "(masks here are 0/255; if the values are class indices, list the classes "
                                        "in classes.json)"))
    else:
        names = (BACKGROUND, *(f"class_{v}" for v in range(1, int(all_values.max()) + 1)))
    if not binary:
        for stem, v in values.items():
            if v.max(initial=0) >= len(names):
                problems.append(Problem(str(mask_of[stem]), f"unknown label value {int(v.max())} "
                                        f"(classes: {', '.join(f'{i}={c}' for i, c in enumerate(names))})"))
    return SegmentationDataset(root, "folder", names, samples, problems, binary_masks=binary)


def load_unlabeled_images(root: Path, classes: Sequence[str] | None = None) -> SegmentationDataset:
    """Every image under `root` (sub-folders included), all unlabeled: what self-supervised pretraining reads
    when a folder holds only images. Not auto-detected (`--format images`, or pretraining's fallback)."""
    problems: list[Problem] = []
    by_stem = duplicate_stems(files(root, SUPPORTED_SUFFIXES), problems)
    samples = [Sample(image=image, stem=stem) for stem, image in by_stem.items()]
    return SegmentationDataset(root, "images", (BACKGROUND, *(classes or ("defect",))), samples, problems)
