"""LabelMe JSON annotations (one file per image, polygons and other shapes)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


from defectscan.data.annotations import Shape
from defectscan.data.dataset import Problem, Sample, SegmentationDataset
from defectscan.io.images import SUPPORTED_SUFFIXES
from defectscan.data.formats.common import (annotation_files, declared_size, duplicate_stems, excerpt, files,
                                            finish_vector, point_pairs, resolve_image)


def _labelme_shapes(data: dict, path: Path, problems: list[Problem]) -> list[Shape]:
    raw_shapes = data.get("shapes") or []
    if not isinstance(raw_shapes, list):
        problems.append(Problem(str(path), f"'shapes' is a {type(raw_shapes).__name__}, expected a list of shapes"))
        return []
    shapes = []
    for i, raw in enumerate(raw_shapes):
        if not isinstance(raw, dict):
            problems.append(Problem(str(path), f"shape {i} is a {type(raw).__name__}, expected an object"))
            continue
        points = point_pairs(raw.get("points") or [])
        if points is None:
            problems.append(Problem(str(path), f"shape {i} ('{raw.get('label', '')}'): points "
                                    f"{excerpt(raw.get('points'))} are not [x, y] number pairs"))
            continue
        shape = Shape(label=str(raw.get("label", "")), kind=str(raw.get("shape_type") or "polygon"), points=points)
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
        if not isinstance(image_path, str):
            problems.append(Problem(str(path), f"imagePath {excerpt(image_path)} is not a file name"))
            continue
        stem = path.stem
        image = resolve_image(root, image_path or stem, [path.parent / image_path] if image_path else [],
                              Path(image_path.replace("\\", "/")).stem if image_path else stem, by_stem, str(path),
                              problems)
        if image is None:
            continue
        if image.stem in annotated:
            problems.append(Problem(str(path), f"second annotation for {image.name} (also {annotated[image.stem].annotation})"))
            continue
        size = declared_size(data.get("imageHeight"), data.get("imageWidth"), str(path), problems)
        annotated[image.stem] = Sample(image=image, stem=image.stem, label="shapes", annotation=path, size=size,
                                       shapes=_labelme_shapes(data, path, problems))
    return finish_vector(root, "labelme", by_stem, annotated, classes, problems)
