"""COCO JSON annotations (polygons, RLE and compressed RLE).

Every malformed piece (a category without a name, a segmentation that is neither polygons nor an RLE, an RLE whose
runs do not cover its image or that is for another size) is a problem naming the file and the annotation id; the
rest of the file still loads, so `data check` lists every problem at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


from defectscan.data.annotations import Shape, rle_problem
from defectscan.data.dataset import Problem, Sample, SegmentationDataset
from defectscan.io.images import SUPPORTED_SUFFIXES
from defectscan.data.formats.common import (SPLIT_NAMES, annotation_files, declared_size, duplicate_stems, excerpt,
                                            files, finish_vector, is_number, resolve_image)


def _coco_shapes(ann: dict, label: str, size: tuple[int, int] | None, where: str,
                 problems: list[Problem]) -> list[Shape]:
    seg = ann.get("segmentation")
    what = f"annotation {ann.get('id')}"
    if isinstance(seg, dict):
        why = rle_problem(seg, size)
        if why:
            problems.append(Problem(where, f"{what}: {why}"))
            return []
        return [Shape(label=label, kind="rle", rle=seg)]
    if not seg:
        problems.append(Problem(where, f"{what} has no segmentation (box only); skipped", fatal=False))
        return []
    if not isinstance(seg, list) or not all(isinstance(poly, list) for poly in seg):
        problems.append(Problem(where, f"{what}: segmentation {excerpt(seg)} is neither a list of polygons "
                                "nor an RLE object"))
        return []
    shapes = []
    for poly in seg:
        if not all(is_number(v) for v in poly):
            problems.append(Problem(where, f"{what}: polygon {excerpt(poly)} holds non-numbers"))
            continue
        pts = [(float(poly[i]), float(poly[i + 1])) for i in range(0, len(poly) - 1, 2)]
        shape = Shape(label=label, kind="polygon", points=pts, corner_origin=True)
        why = shape.problem()
        if why:
            problems.append(Problem(where, f"{what}: {why}; skipped", fatal=False))
            continue
        shapes.append(shape)
    return shapes


def _is_id(value: Any) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _categories(data: dict, where: str, problems: list[Problem]) -> dict[Any, str]:
    categories = {}
    raw = data.get("categories") or []
    if not isinstance(raw, list):
        problems.append(Problem(where, "'categories' is not a list"))
        return {}
    for i, c in enumerate(raw):
        if (not isinstance(c, dict) or not _is_id(c.get("id")) or not isinstance(c.get("name"), str)
                or not c["name"].strip()):
            problems.append(Problem(where, f"category {i} ({excerpt(c)}) needs an id and a name"))
            continue
        categories[c["id"]] = c["name"].strip()
    return categories


def load_coco(root: Path, classes: Sequence[str] | None) -> SegmentationDataset:
    """COCO instance JSON(s). Every image a JSON lists is labeled (no annotations = defect-free); image files
    that no JSON lists are unlabeled. A JSON named like *train*/*val*/*test* sets the split of its images."""
    problems: list[Problem] = []
    by_stem = duplicate_stems([p.resolve() for p in files(root, SUPPORTED_SUFFIXES)], problems)
    annotated: dict[str, Sample] = {}
    for path, data in annotation_files(root, "coco", problems):
        where = str(path)
        if not isinstance(data["images"], list) or not isinstance(data["annotations"], list):
            problems.append(Problem(where, "'images' and 'annotations' must be lists"))
            continue
        split = next((v for k, v in SPLIT_NAMES.items() if k in path.stem.lower().replace("-", "_").split("_")), None)
        categories = _categories(data, where, problems)
        images: dict[Any, Sample] = {}
        for i, entry in enumerate(data["images"]):
            if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str) or not _is_id(entry.get("id")):
                problems.append(Problem(where, f"image entry {i} ({excerpt(entry)}) needs a file_name and a "
                                        "number or text id"))
                continue
            name = entry["file_name"]
            base = [path.parent / name, path.parent / "images" / name, root / name, root / "images" / name]
            image = resolve_image(root, name, base, Path(name.replace("\\", "/")).stem, by_stem,
                                  f"{where} (image id {entry.get('id')})", problems)
            if image is None:
                continue
            if image.stem in annotated:
                problems.append(Problem(where, f"image {image.name} listed twice"))
                continue
            size = declared_size(entry.get("height"), entry.get("width"), f"{where} (image id {entry.get('id')})",
                                 problems)
            images[entry.get("id")] = annotated[image.stem] = Sample(
                image=image, stem=image.stem, label="shapes", annotation=path, size=size, split=split)
        known_ids = {e.get("id") for e in data["images"] if isinstance(e, dict) and _is_id(e.get("id"))}
        for ann in data["annotations"]:
            if not isinstance(ann, dict) or not _is_id(ann.get("image_id")) or not _is_id(ann.get("category_id")):
                problems.append(Problem(where, f"annotation {excerpt(ann)} needs an image_id and a category_id "
                                        "(numbers or text)"))
                continue
            sample = images.get(ann.get("image_id"))
            if sample is None:
                if ann.get("image_id") not in known_ids:
                    problems.append(Problem(where, f"annotation {ann.get('id')} refers to unknown image id "
                                            f"{ann.get('image_id')}"))
                continue
            label = categories.get(ann.get("category_id"))
            if label is None:
                problems.append(Problem(where, f"annotation {ann.get('id')}: unknown category id {ann.get('category_id')}"))
                continue
            sample.shapes.extend(_coco_shapes(ann, label, sample.size, where, problems))
    return finish_vector(root, "coco", by_stem, annotated, classes, problems)
