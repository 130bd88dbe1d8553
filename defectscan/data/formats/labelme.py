"""LabelMe JSON annotations (one file per image, polygons and other shapes)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


from defectscan.data.annotations import Shape
from defectscan.data.dataset import Problem, Sample, SegmentationDataset
from defectscan.io.images import SUPPORTED_SUFFIXES
from defectscan.data.formats.common import files, duplicate_stems, resolve_image, finish_vector, annotation_files


def _labelme_shapes(data: dict, path: Path, problems: list[Problem]) -> list[Shape]:
    shapes = []
    for i, raw in enumerate(data.get("shapes") or []):
        kind = raw.get("shape_type") or "polygon"
        shape = Shape(label=str(raw.get("label", "")), kind=kind,
                      points=[tuple(map(float, p)) for p in raw.get("points") or []])
        why = shape.problem() or ("shape without a label" if not shape.label else None)
        if why:
            problems.append(Problem(str(path), f"shape {i} ('{shape.label}'): {why}; skipped", fatal=False))
            continue
        shapes.append(shape)
    return shapes


def load_labelme(root: Path, classes: Sequence[str] | None) -> SegmentationDataset:
    problems: list[Problem] = []
    by_stem = duplicate_stems([p.resolve() for p in files(root, SUPPORTED_SUFFIXES)], problems)
    annotated: dict[str, Sample] = {}
    for path, data in annotation_files(root, "labelme", problems):
        image_path = data.get("imagePath") or ""
        stem = path.stem
        image = resolve_image([path.parent / image_path] if image_path else [], stem, by_stem)
        if image is None and image_path:
            image = by_stem.get(Path(image_path.replace("\\", "/")).stem)
        if image is None:
            problems.append(Problem(str(path), f"annotated image '{image_path or stem}' not found"))
            continue
        if image.stem in annotated:
            problems.append(Problem(str(path), f"second annotation for {image.name} (also {annotated[image.stem].annotation})"))
            continue
        size = None
        if data.get("imageHeight") and data.get("imageWidth"):
            size = (int(data["imageHeight"]), int(data["imageWidth"]))
        annotated[image.stem] = Sample(image=image, stem=image.stem, label="shapes", annotation=path, size=size,
                                       shapes=_labelme_shapes(data, path, problems))
    return finish_vector(root, "labelme", by_stem, annotated, classes, problems)
