"""MVTec AD categories (train/good, test/<defect>, ground_truth/<defect>/*_mask.png)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


from defectscan.data.dataset import Problem, Sample, SegmentationDataset
from defectscan.errors import DefectscanError
from defectscan.io.images import SUPPORTED_SUFFIXES
from defectscan.data.formats.common import files, with_classes


def load_mvtec(root: Path, classes: Sequence[str] | None) -> SegmentationDataset:
    """MVTec AD category: train/good (defect-free), test/<type>/ with ground_truth/<type>/<stem>_mask.png."""
    problems: list[Problem] = []
    samples = []
    for path in files(root / "train", SUPPORTED_SUFFIXES):
        label = "good" if path.parent.name == "good" else "none"
        samples.append(Sample(image=path, stem=f"train_{path.parent.name}_{path.stem}", label=label, split="train",
                              group=path.parent.name, has_defect=False if label == "good" else None))
    for path in files(root / "test", SUPPORTED_SUFFIXES):
        kind = path.parent.name
        stem = f"test_{kind}_{path.stem}"
        if kind == "good":
            samples.append(Sample(image=path, stem=stem, label="good", split="test", group=kind, has_defect=False))
            continue
        mask = root / "ground_truth" / kind / f"{path.stem}_mask.png"
        if not mask.is_file():
            problems.append(Problem(str(path), f"no ground-truth mask ({mask.relative_to(root)})"))
            samples.append(Sample(image=path, stem=stem, split="test", group=kind))
            continue
        samples.append(Sample(image=path, stem=stem, label="mask", mask_path=mask, annotation=mask, split="test",
                              group=kind, has_defect=True))
    names = with_classes([], classes or ["defect"])
    if len(names) != 2:
        raise DefectscanError("MVTec AD masks are binary: give one defect class name at most")
    return SegmentationDataset(root, "mvtec", names, samples, problems, binary_masks=True)
