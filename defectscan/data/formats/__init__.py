"""Dataset layouts: image + mask folders, LabelMe JSON, COCO JSON, MVTec AD. See datasets/README.md.

Each loader lists images and their annotations without decoding pixels (masks of the folder layout excepted:
their values are scanned once to learn the classes) and records every problem it finds instead of stopping at
the first, so that `defectscan data check` can report them all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from defectscan.data.dataset import SegmentationDataset
from defectscan.errors import DefectscanError
from defectscan.data.formats.coco import load_coco
from defectscan.data.formats.common import FORMATS, detect_format
from defectscan.data.formats.folder import load_folder, load_unlabeled_images
from defectscan.data.formats.labelme import load_labelme
from defectscan.data.formats.mvtec import load_mvtec

LOADERS: dict[str, Callable[[Path, Sequence[str] | None], SegmentationDataset]] = {
    "folder": load_folder, "labelme": load_labelme, "coco": load_coco, "mvtec": load_mvtec,
    "images": load_unlabeled_images,  # unlabeled images only (pretraining); never auto-detected
}

__all__ = ["FORMATS", "detect_format", "load_coco", "load_dataset", "load_folder", "load_labelme", "load_mvtec"]


def load_dataset(root: str | Path, format: str = "auto", classes: Sequence[str] | None = None) -> SegmentationDataset:
    """List a dataset. `classes` names the defect classes (background implied); default: from the data."""
    root = Path(root)
    if not root.is_dir():
        raise DefectscanError(f"{root}: no such dataset directory")
    fmt = detect_format(root) if format == "auto" else format
    if fmt not in LOADERS:
        raise DefectscanError(f"unknown dataset format '{format}' (choose auto, {', '.join(LOADERS)})")
    ds = LOADERS[fmt](root, classes)
    if not ds.samples:
        raise DefectscanError(f"{root}: no images found ({fmt} format)")
    return ds
