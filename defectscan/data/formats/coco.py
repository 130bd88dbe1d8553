"""COCO JSON annotations (polygons, RLE and compressed RLE)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


from defectscan.data.annotations import Shape
from defectscan.data.dataset import Problem, Sample, SegmentationDataset
from defectscan.io.images import SUPPORTED_SUFFIXES
from defectscan.data.formats.common import SPLIT_NAMES, files, duplicate_stems, resolve_image, finish_vector, annotation_files


def _coco_shapes(ann: dict, label: str, path: Path, problems: list[Problem]) -> list[Shape]:
    seg = ann.get("segmentation")
    if isinstance(seg, dict):
        return [Shape(label=label, kind="rle", rle=seg)]
    shapes = []
    for poly in seg or []:
        pts = [(float(poly[i]), float(poly[i + 1])) for i in range(0, len(poly) - 1, 2)]
        shape = Shape(label=label, kind="polygon", points=pts, corner_origin=True)
        why = shape.problem()
        if why:
            problems.append(Problem(str(path), f"annotation {ann.get('id')}: {why}; skipped", fatal=False))
            continue
        shapes.append(shape)
    if not seg:
        problems.append(Problem(str(path), f"annotation {ann.get('id')} has no segmentation (box only); skipped",
                                fatal=False))
    return shapes


def load_coco(root: Path, classes: Sequence[str] | None) -> SegmentationDataset:
    """COCO instance JSON(s). Every image a JSON lists is labeled (no annotations = defect-free); image files
    that no JSON lists are unlabeled. A JSON named like *train*/*val*/*test* sets the split of its images."""
    problems: list[Problem] = []
    by_stem = duplicate_stems([p.resolve() for p in files(root, SUPPORTED_SUFFIXES)], problems)
    annotated: dict[str, Sample] = {}
    for path, data in annotation_files(root, "coco", problems):
        split = next((v for k, v in SPLIT_NAMES.items() if k in path.stem.lower().replace("-", "_").split("_")), None)
        categories = {c["id"]: str(c["name"]) for c in data.get("categories") or []}
        images: dict[Any, Sample] = {}
        for entry in data["images"]:
            name = str(entry.get("file_name", ""))
            stem = Path(name.replace("\\", "/")).stem
            base = [path.parent / name, path.parent / "images" / name, root / name, root / "images" / name]
            image = resolve_image(base, stem, by_stem)
            if image is None:
                problems.append(Problem(str(path), f"image '{name}' (id {entry.get('id')}) not found"))
                continue
            if image.stem in annotated:
                problems.append(Problem(str(path), f"image {image.name} listed twice"))
                continue
            size = (int(entry["height"]), int(entry["width"])) if entry.get("height") and entry.get("width") else None
            images[entry.get("id")] = annotated[image.stem] = Sample(
                image=image, stem=image.stem, label="shapes", annotation=path, size=size, split=split)
        for ann in data["annotations"]:
            sample = images.get(ann.get("image_id"))
            if sample is None:
                if ann.get("image_id") not in {e.get("id") for e in data["images"]}:
                    problems.append(Problem(str(path), f"annotation {ann.get('id')} refers to unknown image id "
                                            f"{ann.get('image_id')}"))
                continue
            label = categories.get(ann.get("category_id"))
            if label is None:
                problems.append(Problem(str(path), f"annotation {ann.get('id')}: unknown category id {ann.get('category_id')}"))
                continue
            sample.shapes.extend(_coco_shapes(ann, label, path, problems))
    return finish_vector(root, "coco", by_stem, annotated, classes, problems)
