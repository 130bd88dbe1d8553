"""What `infer` writes per image, and which files it reads: probability maps, mask, overlay, defect tables."""

from __future__ import annotations

import contextlib
import csv
import json
import time
from pathlib import Path
from typing import Callable, Iterable

import cv2
import numpy as np

from defectscan.errors import DefectscanError
from defectscan.io.files import atomic_dir, csv_text, write_text
from defectscan.io.images import SUPPORTED_SUFFIXES, ImageSource, open_image
from defectscan.io.png import PngRowWriter
from defectscan.models import describe
from defectscan.reporting.overlays import MaskPreview, render_overlay
from defectscan.schemas import REGION_FIELDS, Region


def write_prediction(predictor, image_path: Path, source: ImageSource, out_dir: Path,
                     progress: Callable[[int, int], None] | None = None) -> dict:
    """Run `predictor` on one image and write its outputs as one atomic directory: prob_<class>.png per class,
    mask.png, overlay.jpg, defects.json and defects.csv. Returns the summary (defects.json without the defects).

    Everything streams: probability rows are PNG-encoded and segmented as the tiling engine finishes them, and the
    mask is painted strip by strip after the regions are joined, so memory holds the decoded image, one tile row
    of probabilities and 1 bit per pixel, not full-size maps. `seconds` counts until every file is written.
    """
    p, opts = predictor, predictor.options
    names = p.class_names
    h, w = source.shape
    t0 = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        with contextlib.ExitStack() as files:
            probs = {p.classes.channel(c): files.enter_context(PngRowWriter(tmp / f"prob_{_safe(n)}.png", h, w))
                     for c, n in names.items()}

            def write_probs(y0: int, block: np.ndarray, score: np.ndarray) -> None:
                for channel, png in probs.items():
                    png.write(block[channel])

            image = p.segment_rows(source, progress, on_strip=write_probs)
        regions = image.regions
        preview = MaskPreview(h, w, opts.preview_size)
        with PngRowWriter(tmp / "mask.png", h, w) as png:
            for y0, mask in image.mask_rows():
                png.write(mask * np.uint8(255) if len(names) == 1 else mask)
                preview.add(y0, mask)
        overlay = render_overlay(source, preview, regions, class_names=names)
        _imwrite(tmp / "overlay.jpg", overlay[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
        summary = p.summary((h, w), time.perf_counter() - t0, regions)
        head = {
            "image": str(image_path), "model": describe(p.spec), "checkpoint": str(p.checkpoint),
            "threshold": p.threshold, "tile": list(p.tile), "overlap": p.overlap,
            "stitch": p.stitch, "tta": opts.tta, "min_area_px": opts.min_area, "precision": p.precision,
            "mask_encoding": "0/255" if len(names) == 1 else "class index",
            "classes": {str(c): n for c, n in names.items()},
            **summary,
        }
        write_region_tables(tmp / "defects.json", tmp / "defects.csv", head, regions)
    return summary


def infer_one(predictor, image_path: Path, out_dir: Path, *, progress: Callable[[int, int], None] | None = None,
              on_open: Callable[[], None] | None = None) -> tuple[dict | None, str | None]:
    """Open one image and write its outputs (`write_prediction`): (summary, None), or (None, why it failed) for
    an image defectscan refuses (unreadable, truncated, too large...), so one bad file never stops a batch.
    `on_open` runs once the image is open (a huge PNG can take minutes to decode)."""
    try:
        source = open_image(image_path)
        if on_open is not None:
            on_open()
        return write_prediction(predictor, image_path, source, out_dir, progress=progress), None
    except DefectscanError as exc:
        return None, str(exc)


def write_region_tables(json_path: Path, csv_path: Path, head: dict, regions: list[Region]) -> None:
    """defects.json (`head` plus a "defects" list) and defects.csv, written region by region: a noisy model can
    find hundreds of thousands of regions, whose dicts and whole-file strings would cost more than the image.
    The JSON text is exactly `json.dumps({**head, "defects": [...]}, indent=2)`."""
    with open(csv_path, "w", encoding="utf-8", newline="") as fh:
        rows = csv.DictWriter(fh, fieldnames=list(REGION_FIELDS), lineterminator="\n", restval="")
        rows.writeheader()
        for r in regions:
            rows.writerow(r.to_dict())
    text = json.dumps({**head, "defects": []}, indent=2)
    with open(json_path, "w", encoding="utf-8") as fh:
        if not regions:
            fh.write(text + "\n")
            return
        fh.write(text[: -len("[]\n}")] + "[\n")
        for i, r in enumerate(regions):
            item = json.dumps(r.to_dict(), indent=2).replace("\n", "\n    ")
            fh.write(("    " if i == 0 else ",\n    ") + item)
        fh.write("\n  ]\n}\n")


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def _imwrite(path: Path, img: np.ndarray, params: list[int] | None = None) -> None:
    if not cv2.imwrite(str(path), np.ascontiguousarray(img), params or []):
        raise DefectscanError(f"{path}: could not write output")


BATCH_SUMMARY = "summary.csv"


def batch_row(image: Path, output: str, class_names: list[str], summary: dict | None = None,
              error: str | None = None) -> dict:
    """One row of the batch summary (`summary.csv`): an image's outcome, its defect counts, or why it failed."""
    s = summary or {}
    return {"image": str(image), "output": output if summary is not None else "", "status": "failed" if error else "ok",
            "width": s.get("width"), "height": s.get("height"), "tiles": s.get("tiles"), "seconds": s.get("seconds"),
            "regions": s.get("regions"), **{f"regions_{c}": s.get("regions_per_class", {}).get(c) for c in class_names},
            "defect_area_fraction": s.get("defect_area_fraction"), "error": error or ""}


def write_batch_summary(out: Path, rows: list[dict]) -> Path:
    """`summary.csv` in the output directory: one row per input image of the run, failures included."""
    write_text(out / BATCH_SUMMARY, csv_text(rows))
    return out / BATCH_SUMMARY


def collect_images(inputs: Iterable[str | Path], *, recursive: bool = False, exclude: Path | None = None) -> list[Path]:
    """Expand directories into their supported image files (sorted; sub-folders too when `recursive`, leaving out
    hidden files and folders and the output folder `exclude`, so a run never reads its own or earlier results).

    Files are kept as given, even when missing or unsupported: opening each one reports its own error, so one bad
    file does not stop the others. A directory without images is an error, with a hint where images may be.
    """
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if not p.is_dir():
            paths.append(p)
            continue
        skip = exclude.resolve() if exclude is not None else None
        files = p.rglob("*") if recursive else p.iterdir()
        found = sorted(f for f in files if f.is_file() and f.suffix.lower() in SUPPORTED_SUFFIXES
                       and not any(part.startswith(".") for part in f.relative_to(p).parts)
                       and not (skip is not None and f.resolve().is_relative_to(skip)))
        if not found:
            subdirs = sorted(d.name for d in p.iterdir() if d.is_dir())
            hint = (f"; did you mean {p / 'images'}?" if "images" in subdirs
                    else "; add --recursive to search its sub-folders" if subdirs and not recursive else "")
            raise DefectscanError(f"{p}: directory contains no images ({', '.join(SUPPORTED_SUFFIXES)}){hint}")
        paths.extend(found)
    return paths


def output_names(paths: list[Path]) -> list[str]:
    """One output directory name per image: the stem, made unique (stem_2, stem_3, ...) against every name already
    given, so `a`, `a` and a real `a_2` never share a folder."""
    names: list[str] = []
    used: set[str] = set()
    for p in paths:
        name, n = p.stem, 1
        while name in used:
            n += 1
            name = f"{p.stem}_{n}"
        used.add(name)
        names.append(name)
    return names


