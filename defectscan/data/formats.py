"""Dataset layouts: image + mask folders, LabelMe JSON, COCO JSON, MVTec AD. See datasets/README.md.

Each loader lists images and their annotations without decoding pixels (masks of the folder layout excepted:
their values are scanned once to learn the classes) and records every problem it finds instead of stopping at
the first, so that `defectscan data check` can report them all.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from defectscan.data.annotations import Shape
from defectscan.data.dataset import Problem, Sample, SegmentationDataset, read_mask_file
from defectscan.errors import DefectscanError
from defectscan.images import SUPPORTED_SUFFIXES

FORMATS = ("folder", "labelme", "coco", "mvtec")
IMAGE_DIRS = ("images", "image", "imgs", "img")
MASK_DIRS = ("masks", "mask", "labels", "annotations", "gt", "ground_truth")
MASK_SUFFIXES = ("", "_mask", "_label", "_gt")
SPLIT_FILES = ("image_data.json", "split.json", "splits.json")
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
BACKGROUND = "background"


def _files(root: Path, suffixes: Sequence[str]) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in suffixes and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def _read_json(path: Path, problems: list[Problem]) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.append(Problem(str(path), f"unreadable JSON ({type(exc).__name__}: {exc})"))
        return None


def _json_kind(data: Any) -> str | None:
    if isinstance(data, dict) and "shapes" in data:
        return "labelme"
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        return "coco"
    return None


def _peek_json(path: Path) -> str | None:
    try:
        return _json_kind(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def detect_format(root: Path) -> str:
    """Guess the layout of `root`; a clear error when it is none of the known ones."""
    if (root / "train" / "good").is_dir() and (root / "test").is_dir():
        return "mvtec"
    categories = [d.name for d in sorted(root.iterdir()) if (d / "train" / "good").is_dir()] if root.is_dir() else []
    if categories:
        raise DefectscanError(f"{root}: an MVTec AD root with {len(categories)} categories; point to one of them, "
                              f"e.g. {root / categories[0]}")
    jsons = [p for p in _files(root, (".json",)) if p.name not in SPLIT_FILES and p.name != "classes.json"]
    kinds = Counter(k for k in map(_peek_json, jsons[:50]) if k)
    if kinds:
        return kinds.most_common(1)[0][0]
    if _find_dir(root, IMAGE_DIRS) and _find_dir(root, MASK_DIRS):
        return "folder"
    raise DefectscanError(f"{root}: cannot tell the dataset format (expected images/ + masks/ folders, LabelMe or COCO "
                          f"JSON, or an MVTec AD category); name it with --format ({', '.join(FORMATS)})")


def _find_dir(root: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        if (root / name).is_dir():
            return root / name
    return None


def _split_of(name: str | None) -> str | None:
    if name is None:
        return None
    split = SPLIT_NAMES.get(str(name).lower())
    if split is None:
        raise DefectscanError(f"unknown split name '{name}' (use train, val or test)")
    return split


def read_split_file(root: Path) -> dict[str, str | None]:
    """Stem -> split from the dataset's own split file, if it has one.

    Two layouts: BSData's `image_data.json` ({"images": [{"filename", "train_test_split"}]}) and a plain
    `split.json` ({"train": [names], "val": [...], "test": [...]}).
    """
    for name in SPLIT_FILES:
        path = root / name
        if not path.is_file():
            continue
        problems: list[Problem] = []
        data = _read_json(path, problems)
        if problems:
            raise DefectscanError(str(problems[0]))
        if isinstance(data, dict) and isinstance(data.get("images"), list):
            return {Path(e["filename"]).stem: _split_of(e.get("train_test_split"))
                    for e in data["images"] if isinstance(e, dict) and "filename" in e}
        if isinstance(data, dict) and set(data) <= set(SPLIT_NAMES):
            return {Path(n).stem: _split_of(k) for k, names in data.items() for n in names}
        raise DefectscanError(f"{path}: not a split file this tool understands")
    return {}


def _with_classes(found: Sequence[str], given: Sequence[str] | None) -> tuple[str, ...]:
    """Class tuple with the background first; `given` (defect classes) wins over what the data shows."""
    names = list(given) if given else sorted(set(found) - {BACKGROUND})
    if names and names[0] == BACKGROUND:
        names = names[1:]
    if len(set(names)) != len(names):
        raise DefectscanError(f"duplicate class names in {names}")
    return (BACKGROUND, *names)


def _duplicate_stems(images: list[Path], problems: list[Problem]) -> dict[str, Path]:
    by_stem: dict[str, Path] = {}
    for path in images:
        if path.stem in by_stem:
            problems.append(Problem(str(path), f"duplicate image stem '{path.stem}' (also {by_stem[path.stem]})"))
            continue
        by_stem[path.stem] = path
    return by_stem


def _classes_file(root: Path) -> list[str] | None:
    for name in ("classes.json", "classes.txt"):
        path = root / name
        if path.is_file():
            if name.endswith(".json"):
                data = json.loads(path.read_text())
                return list(data["classes"] if isinstance(data, dict) else data)
            return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return None


def load_folder(root: Path, classes: Sequence[str] | None) -> SegmentationDataset:
    problems: list[Problem] = []
    image_dir, mask_dir = _find_dir(root, IMAGE_DIRS), _find_dir(root, MASK_DIRS)
    if image_dir is None or mask_dir is None:
        raise DefectscanError(f"{root}: the folder format needs an images/ and a masks/ sub-folder")
    by_stem = _duplicate_stems(_files(image_dir, SUPPORTED_SUFFIXES), problems)
    masks: dict[str, Path] = {}
    for path in _files(mask_dir, SUPPORTED_SUFFIXES):
        if path.stem in masks:
            problems.append(Problem(str(path), f"duplicate mask stem '{path.stem}' (also {masks[path.stem]})"))
        masks[path.stem] = path
    splits = read_split_file(root)
    samples, used, values, mask_of = [], set(), {}, {}
    for stem, image in by_stem.items():
        mask = next((masks[stem + s] for s in MASK_SUFFIXES if stem + s in masks), None)
        sample = Sample(image=image, stem=stem, split=splits.get(stem))
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
    given = list(classes) if classes else _classes_file(root)
    if given:
        names = _with_classes([], given)
        binary = binary and len(names) == 2
    elif binary or set(all_values.tolist()) <= {0, 1}:
        names = (BACKGROUND, "defect")
    else:
        names = (BACKGROUND, *(f"class_{v}" for v in range(1, int(all_values.max()) + 1)))
    if not binary:
        for stem, v in values.items():
            if v.max(initial=0) >= len(names):
                problems.append(Problem(str(mask_of[stem]), f"unknown label value {int(v.max())} "
                                        f"(classes: {', '.join(f'{i}={c}' for i, c in enumerate(names))})"))
    return SegmentationDataset(root, "folder", names, samples, problems, binary_masks=binary)


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


def _resolve_image(candidates: Sequence[Path], stem: str, by_stem: dict[str, Path]) -> Path | None:
    for c in candidates:
        if c.is_file() and c.suffix.lower() in SUPPORTED_SUFFIXES:
            return c.resolve()
    return by_stem.get(stem)


def _finish_vector(root: Path, fmt: str, by_stem: dict[str, Path], annotated: dict[str, Sample],
                   classes: Sequence[str] | None, problems: list[Problem]) -> SegmentationDataset:
    """Shared tail of the LabelMe and COCO loaders: classes, unknown labels, unlabeled images, splits."""
    found = sorted({s.label for sample in annotated.values() for s in sample.shapes})
    names = _with_classes(found, classes)
    for sample in annotated.values():
        unknown = sorted({s.label for s in sample.shapes} - set(names))
        if unknown:
            problems.append(Problem(str(sample.annotation), f"unknown label(s) {', '.join(unknown)} "
                                    f"(classes: {', '.join(names[1:])})"))
        sample.has_defect = any(s.label in names for s in sample.shapes)
    splits = read_split_file(root)
    samples = []
    for stem, image in by_stem.items():
        sample = annotated.get(stem) or Sample(image=image, stem=stem)
        sample.split = splits.get(stem, sample.split)
        samples.append(sample)
    return SegmentationDataset(root, fmt, names, samples, problems)


def _annotation_files(root: Path, kind: str, problems: list[Problem]) -> Iterator[tuple[Path, dict]]:
    """(path, parsed JSON) for every annotation file of `kind` under root; other JSON files are passed over."""
    for path in _files(root, (".json",)):
        if path.name in SPLIT_FILES or path.name == "classes.json":
            continue
        data = _read_json(path, problems)
        if data is None:
            continue
        if _json_kind(data) != kind:
            if kind == "labelme":
                problems.append(Problem(str(path), "JSON file is not a LabelMe annotation; ignored", fatal=False))
            continue
        yield path, data


def load_labelme(root: Path, classes: Sequence[str] | None) -> SegmentationDataset:
    problems: list[Problem] = []
    by_stem = _duplicate_stems([p.resolve() for p in _files(root, SUPPORTED_SUFFIXES)], problems)
    annotated: dict[str, Sample] = {}
    for path, data in _annotation_files(root, "labelme", problems):
        image_path = data.get("imagePath") or ""
        stem = path.stem
        image = _resolve_image([path.parent / image_path] if image_path else [], stem, by_stem)
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
    return _finish_vector(root, "labelme", by_stem, annotated, classes, problems)


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
    by_stem = _duplicate_stems([p.resolve() for p in _files(root, SUPPORTED_SUFFIXES)], problems)
    annotated: dict[str, Sample] = {}
    for path, data in _annotation_files(root, "coco", problems):
        split = next((v for k, v in SPLIT_NAMES.items() if k in path.stem.lower().replace("-", "_").split("_")), None)
        categories = {c["id"]: str(c["name"]) for c in data.get("categories") or []}
        images: dict[Any, Sample] = {}
        for entry in data["images"]:
            name = str(entry.get("file_name", ""))
            stem = Path(name.replace("\\", "/")).stem
            base = [path.parent / name, path.parent / "images" / name, root / name, root / "images" / name]
            image = _resolve_image(base, stem, by_stem)
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
    return _finish_vector(root, "coco", by_stem, annotated, classes, problems)


def load_mvtec(root: Path, classes: Sequence[str] | None) -> SegmentationDataset:
    """MVTec AD category: train/good (defect-free), test/<type>/ with ground_truth/<type>/<stem>_mask.png."""
    problems: list[Problem] = []
    samples = []
    for path in _files(root / "train", SUPPORTED_SUFFIXES):
        label = "good" if path.parent.name == "good" else "none"
        samples.append(Sample(image=path, stem=f"train_{path.parent.name}_{path.stem}", label=label, split="train",
                              group=path.parent.name, has_defect=False if label == "good" else None))
    for path in _files(root / "test", SUPPORTED_SUFFIXES):
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
    names = _with_classes([], classes or ["defect"])
    if len(names) != 2:
        raise DefectscanError("MVTec AD masks are binary: give one defect class name at most")
    return SegmentationDataset(root, "mvtec", names, samples, problems, binary_masks=True)


LOADERS: dict[str, Callable[[Path, Sequence[str] | None], SegmentationDataset]] = {
    "folder": load_folder, "labelme": load_labelme, "coco": load_coco, "mvtec": load_mvtec,
}


def load_dataset(root: str | Path, format: str = "auto", classes: Sequence[str] | None = None) -> SegmentationDataset:
    """List a dataset. `classes` names the defect classes (background implied); default: from the data."""
    root = Path(root)
    if not root.is_dir():
        raise DefectscanError(f"{root}: no such dataset directory")
    fmt = detect_format(root) if format == "auto" else format
    if fmt not in LOADERS:
        raise DefectscanError(f"unknown dataset format '{format}' (choose auto, {', '.join(FORMATS)})")
    ds = LOADERS[fmt](root, classes)
    if not ds.samples:
        raise DefectscanError(f"{root}: no images found ({fmt} format)")
    return ds
