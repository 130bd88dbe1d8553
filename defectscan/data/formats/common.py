"""What every dataset layout shares: finding files, split files, class lists, duplicate stems."""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Sequence


from defectscan.data.dataset import Problem, Sample, SegmentationDataset
from defectscan.errors import DefectscanError
from defectscan.io.images import SUPPORTED_SUFFIXES, max_pixels


FORMATS = ("folder", "labelme", "coco", "mvtec")
IMAGE_DIRS = ("images", "image", "imgs", "img")
MASK_DIRS = ("masks", "mask", "labels", "annotations", "gt", "ground_truth")
MASK_SUFFIXES = ("", "_mask", "_label", "_gt")
SPLIT_FILES = ("image_data.json", "split.json", "splits.json")
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
BACKGROUND = "background"


def files(root: Path, suffixes: Sequence[str]) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in suffixes and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def read_json(path: Path, problems: list[Problem]) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.append(Problem(str(path), f"unreadable JSON ({type(exc).__name__}: {exc})"))
        return None


def json_kind(data: Any) -> str | None:
    if isinstance(data, dict) and "shapes" in data:
        return "labelme"
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        return "coco"
    return None


def peek_json(path: Path) -> str | None:
    try:
        return json_kind(json.loads(path.read_text(encoding="utf-8")))
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
    jsons = [p for p in files(root, (".json",)) if p.name not in SPLIT_FILES and p.name != "classes.json"]
    kinds = Counter(k for k in map(peek_json, jsons[:50]) if k)
    if kinds:
        return kinds.most_common(1)[0][0]
    if find_dir(root, IMAGE_DIRS) and find_dir(root, MASK_DIRS):
        return "folder"
    raise DefectscanError(f"{root}: cannot tell the dataset format (expected images/ + masks/ folders, LabelMe or COCO "
                          f"JSON, or an MVTec AD category); name it with --format ({', '.join(FORMATS)})")


def find_dir(root: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        if (root / name).is_dir():
            return root / name
    return None


def split_of(name: str | None) -> str | None:
    if name is None:
        return None
    split = SPLIT_NAMES.get(str(name).lower())
    if split is None:
        raise DefectscanError(f"unknown split name '{name}' (use train, val or test)")
    return split


def read_split_file(root: Path) -> tuple[dict[str, str | None], dict[str, str]]:
    """(stem -> split, stem -> image group) from the dataset's own split file, if it has one.

    Two layouts: BSData's `image_data.json` ({"images": [{"filename", "train_test_split", "type"}]}; an entry's
    `group`, or else its `type`, names the group: BSData's two image types) and a plain `split.json`
    ({"train": [names], "val": [...], "test": [...]}, no groups). `evaluate` scores each group on its own.
    """
    for name in SPLIT_FILES:
        path = root / name
        if not path.is_file():
            continue
        problems: list[Problem] = []
        data = read_json(path, problems)
        if problems:
            raise DefectscanError(str(problems[0]))
        if isinstance(data, dict) and isinstance(data.get("images"), list):
            entries = [e for e in data["images"] if isinstance(e, dict) and "filename" in e]
            splits = {Path(e["filename"]).stem: split_of(e.get("train_test_split")) for e in entries}
            groups = {Path(e["filename"]).stem: _group_name(e) for e in entries}
            return splits, {stem: g for stem, g in groups.items() if g is not None}
        if isinstance(data, dict) and set(data) <= set(SPLIT_NAMES):
            return {Path(n).stem: split_of(k) for k, names in data.items() for n in names}, {}
        raise DefectscanError(f"{path}: not a split file this tool understands")
    return {}, {}


def _group_name(entry: dict) -> str | None:
    if entry.get("group") not in (None, ""):
        return str(entry["group"])
    return f"type {entry['type']}" if entry.get("type") not in (None, "") else None


def with_classes(found: Sequence[str], given: Sequence[str] | None) -> tuple[str, ...]:
    """Class tuple with the background first; `given` (defect classes) wins over what the data shows."""
    names = list(given) if given else sorted(set(found) - {BACKGROUND})
    if names and names[0] == BACKGROUND:
        names = names[1:]
    if len(set(names)) != len(names):
        raise DefectscanError(f"duplicate class names in {names}")
    return (BACKGROUND, *names)


def duplicate_stems(images: list[Path], problems: list[Problem]) -> dict[str, Path]:
    by_stem: dict[str, Path] = {}
    for path in images:
        if path.stem in by_stem:
            problems.append(Problem(str(path), f"duplicate image stem '{path.stem}' (also {by_stem[path.stem]})"))
            continue
        by_stem[path.stem] = path
    return by_stem


def is_number(value: Any) -> bool:
    """A JSON number (bools are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def excerpt(value: Any, length: int = 60) -> str:
    """A JSON value shortened for a one-line problem message."""
    text = json.dumps(value, default=str)
    return text if len(text) <= length else text[: length - 3] + "..."


def _classes_from_indexed(path: Path, pairs: list[tuple[int, str]]) -> list[str]:
    """Names ordered by their index; the indices must run 0..N or 1..N (index 0 may be the background)."""
    if not pairs:
        raise DefectscanError(f"{path}: no classes in it")
    pairs.sort()
    indices = [i for i, _ in pairs]
    start = indices[0] if indices else 0
    if start not in (0, 1) or indices != list(range(start, start + len(indices))):
        raise DefectscanError(f"{path}: class indices {indices} must run 0..N or 1..N without gaps (they are the mask "
                              "values)")
    names = [n for _, n in pairs]
    if start == 0 and names[0].lower() != BACKGROUND:
        raise DefectscanError(f"{path}: index 0 is '{names[0]}', but mask value 0 is the background")
    return names[1:] if start == 0 else names


def classes_file(root: Path) -> list[str] | None:
    """Defect class names from `classes.json` (`[names]`, `{"classes": [names]}` or `{"1": name, ...}`) or
    `classes.txt` (one name per line, or `index name` lines as many tools export). Malformed: a one-line error."""
    for name in ("classes.json", "classes.txt"):
        path = root / name
        if not path.is_file():
            continue
        if name.endswith(".txt"):
            try:
                lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            except (OSError, UnicodeDecodeError) as exc:
                raise DefectscanError(f"{path}: unreadable ({type(exc).__name__})") from None
            indexed = [re.fullmatch(r"(\d+)[\s:,]+(\S.*)", line) for line in lines]
            if lines and all(indexed):
                return _classes_from_indexed(path, [(int(m[1]), m[2].strip()) for m in indexed])
            return lines
        problems: list[Problem] = []
        data = read_json(path, problems)
        if problems:
            raise DefectscanError(f"{path}: {problems[0].message}")
        names = data.get("classes", data) if isinstance(data, dict) else data
        if isinstance(names, dict) and names and all(str(k).isdecimal() for k in names):
            names = _classes_from_indexed(path, [(int(k), v) for k, v in names.items()]) if all(
                isinstance(v, str) for v in names.values()) else None
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
            raise DefectscanError(f"{path}: expected a list of class names, {{\"classes\": [names]}} or "
                                  f"{{\"1\": name, ...}}; got {excerpt(data)}")
        return [n.strip() for n in names]
    return None


def point_pairs(raw: Any) -> list[tuple[float, float]] | None:
    """[[x, y], ...] as float pairs; None when it is not a list of two-number pairs."""
    if not isinstance(raw, list):
        return None
    pts = []
    for p in raw:
        if not (isinstance(p, (list, tuple)) and len(p) == 2 and all(is_number(v) for v in p)):
            return None
        pts.append((float(p[0]), float(p[1])))
    return pts


def declared_size(height: Any, width: Any, where: str, problems: list[Problem]) -> tuple[int, int] | None:
    """(H, W) an annotation declares, None when it declares none; a malformed value is a fatal problem."""
    if height is None and width is None:
        return None
    def whole(v: Any) -> int | None:
        ok = is_number(v) and math.isfinite(v) and v == int(v) and v > 0
        return int(v) if ok else None
    h, w = whole(height), whole(width)
    if h is None or w is None:
        problems.append(Problem(where, f"declared image size {json.dumps(width)} x {json.dumps(height)} is not two "
                                "positive whole numbers"))
        return None
    if h * w > max_pixels():  # a mask of that size would be allocated before the image is ever read
        problems.append(Problem(where, f"declared image size {w} x {h} is over the pixel limit "
                                f"({max_pixels() / 1e6:,.0f} MP; see --max-pixels)"))
        return None
    return h, w


def resolve_image(root: Path, written: str, candidates: Sequence[Path], stem: str, by_stem: dict[str, Path],
                  where: str, problems: list[Problem]) -> Path | None:
    """The dataset image an annotation names (`written`, looked for at `candidates`, else the dataset image whose
    stem is `stem`), never a file outside the dataset; a missing image is a problem.

    Containment is judged on the path as written (normalised, symlinks not followed), so a dataset whose images are
    symlinks to elsewhere still works. A path that leaves the dataset folder (`../../x.png`, an absolute path from
    another machine) is reported: the dataset's image of the same name is used with a warning when there is one.
    """
    inside = Path(os.path.abspath(root))
    outside = bool(re.match(r"^[A-Za-z]:[\\/]", written))  # a Windows drive path from another machine
    for c in candidates:
        if not Path(os.path.normpath(os.path.abspath(c))).is_relative_to(inside):
            outside = True
        elif c.is_file() and c.suffix.lower() in SUPPORTED_SUFFIXES:
            return c.resolve()
    same_name = by_stem.get(stem)
    if outside and same_name is None:
        problems.append(Problem(where, f"image path '{written}' leaves the dataset folder {root} and no image of that "
                                "name is inside it; annotation paths must stay inside the dataset"))
    elif outside:
        problems.append(Problem(where, f"image path '{written}' leaves the dataset folder; using {same_name.name}, "
                                "the dataset's image of that name", fatal=False))
    elif same_name is None:
        problems.append(Problem(where, f"annotated image '{written}' not found"))
    return same_name


def finish_vector(root: Path, fmt: str, by_stem: dict[str, Path], annotated: dict[str, Sample],
                   classes: Sequence[str] | None, problems: list[Problem]) -> SegmentationDataset:
    """Shared tail of the LabelMe and COCO loaders: classes, unknown labels, unlabeled images, splits."""
    found = sorted({s.label for sample in annotated.values() for s in sample.shapes})
    names = with_classes(found, classes)
    for sample in annotated.values():
        unknown = sorted({s.label for s in sample.shapes} - set(names))
        if unknown:
            problems.append(Problem(str(sample.annotation), f"unknown label(s) {', '.join(unknown)} "
                                    f"(classes: {', '.join(names[1:])})"))
        sample.has_defect = any(s.label in names for s in sample.shapes)
    splits, groups = read_split_file(root)
    samples = []
    for stem, image in by_stem.items():
        sample = annotated.get(stem) or Sample(image=image, stem=stem)
        sample.split = splits.get(stem, sample.split)
        sample.group = groups.get(stem, sample.group)
        samples.append(sample)
    return SegmentationDataset(root, fmt, names, samples, problems)


def annotation_files(root: Path, kind: str, problems: list[Problem]) -> Iterator[tuple[Path, dict]]:
    """(path, parsed JSON) for every annotation file of `kind` under root; other JSON files are passed over."""
    for path in files(root, (".json",)):
        if path.name in SPLIT_FILES or path.name == "classes.json":
            continue
        data = read_json(path, problems)
        if data is None:
            continue
        if json_kind(data) != kind:
            if kind == "labelme":
                problems.append(Problem(str(path), "JSON file is not a LabelMe annotation; ignored", fatal=False))
            continue
        yield path, data
