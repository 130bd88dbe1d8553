"""`defectscan infer`: checkpoint + image files -> probability maps, masks, overlays and defect tables."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import cv2
import numpy as np

from defectscan.errors import DefectscanError
from defectscan.images import SUPPORTED_SUFFIXES, ImageSource, atomic_dir, csv_text, open_image
from defectscan.models import default_checkpoint, load_checkpoint
from defectscan.models.factory import center_stitch_caveat, describe
from defectscan.postprocess import REGION_FIELDS, Region, segment
from defectscan.reporting import render_overlay
from defectscan.tiling import plan_tiles, tiled_inference, validate_tile


@dataclass
class InferenceOptions:
    """Run-time choices; None means "as recorded in the checkpoint"."""

    tile: int | None = None
    overlap: int | None = None
    stitch: str = "center"
    batch_size: int = 4
    device: str = "auto"
    threshold: float | None = None
    tta: bool = False
    amp: str = "auto"
    min_area: int = 4
    preview_size: int = 2048


@dataclass
class Prediction:
    probs: np.ndarray  # (C, H, W) uint8, probability * 255
    mask: np.ndarray  # (H, W) uint8 class index
    regions: list[Region]
    tiles: int
    seconds: float
    summary: dict = field(default_factory=dict)


class Predictor:
    """A loaded checkpoint plus options; `predict` one image at a time, `write` the outputs atomically."""

    def __init__(self, checkpoint: str | Path | None = None, options: InferenceOptions | None = None) -> None:
        self.checkpoint = Path(checkpoint) if checkpoint else default_checkpoint()
        self.options = opts = options or InferenceOptions()
        self.model, self.spec, self.meta = load_checkpoint(self.checkpoint)
        self.tile = validate_tile(opts.tile or self.spec.tile, self.spec.stride, model_name=describe(self.spec))
        self.overlap = self.spec.overlap if opts.overlap is None else opts.overlap
        self.threshold = self.spec.threshold if opts.threshold is None else opts.threshold
        if not 0.0 <= self.threshold <= 1.0:
            raise DefectscanError(f"threshold must be within [0, 1], got {self.threshold}")
        plan_tiles(self.tile[0], self.tile[1], self.tile, self.overlap, self.spec.stride)  # checks the overlap now
        if self.spec.head == "softmax":
            self.class_names = {i: n for i, n in enumerate(self.spec.classes) if i > 0}
        else:
            self.class_names = {i + 1: n for i, n in enumerate(self.spec.classes)}

    @property
    def notes(self) -> list[str]:
        caveat = center_stitch_caveat(self.spec)
        if self.options.stitch == "center" and caveat:
            return [f"{caveat}: center stitching is not exact; consider --stitch gaussian"]
        return []

    def predict(self, source: ImageSource, progress: Callable[[int, int], None] | None = None) -> Prediction:
        opts = self.options
        t0 = time.perf_counter()
        layout = plan_tiles(source.height, source.width, self.tile, self.overlap, self.spec.stride)
        probs = tiled_inference(
            self.model, source, tile=self.tile, overlap=self.overlap, stitch=opts.stitch,  # type: ignore[arg-type]
            batch_size=opts.batch_size, device=opts.device, head=self.spec.head, mean=self.spec.mean,
            std=self.spec.std, amp=opts.amp, tta=opts.tta, align=self.spec.stride, progress=progress,
        )
        mask, regions = segment(probs, self.spec.head, self.threshold, self.class_names, min_area=opts.min_area)
        seconds = time.perf_counter() - t0
        h, w = source.shape
        defect_px = int(np.count_nonzero(mask))
        summary = {
            "width": w, "height": h, "tiles": len(layout), "seconds": round(seconds, 3),
            "megapixels_per_second": round(h * w / 1e6 / max(seconds, 1e-9), 3),
            "regions": len(regions),
            "regions_per_class": {n: sum(r.class_id == c for r in regions) for c, n in self.class_names.items()},
            "defect_area_fraction": round(defect_px / (h * w), 8),
        }
        return Prediction(probs, mask, regions, len(layout), seconds, summary)

    def write(self, image_path: Path, source: ImageSource, pred: Prediction, out_dir: Path) -> Path:
        """Write all outputs for one image into `out_dir` as one atomic directory swap."""
        with atomic_dir(out_dir) as tmp:
            for cid, name in self.class_names.items():
                channel = cid if self.spec.head == "softmax" else cid - 1
                _imwrite(tmp / f"prob_{_safe(name)}.png", pred.probs[channel])
            mask = pred.mask * np.uint8(255) if len(self.class_names) == 1 else pred.mask
            _imwrite(tmp / "mask.png", mask)
            overlay = render_overlay(source, pred.mask, pred.regions, class_names=self.class_names,
                                     max_side=self.options.preview_size)
            _imwrite(tmp / "overlay.jpg", overlay[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
            table = {
                "image": str(image_path), "model": describe(self.spec), "checkpoint": str(self.checkpoint),
                "threshold": self.threshold, "tile": list(self.tile), "overlap": self.overlap,
                "stitch": self.options.stitch, "tta": self.options.tta, "min_area_px": self.options.min_area,
                "mask_encoding": "0/255" if len(self.class_names) == 1 else "class index",
                "classes": {str(c): n for c, n in self.class_names.items()},
                **pred.summary,
                "defects": [r.to_dict() for r in pred.regions],
            }
            (tmp / "defects.json").write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
            (tmp / "defects.csv").write_text(_regions_csv(pred.regions), encoding="utf-8")
        return out_dir


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def _imwrite(path: Path, img: np.ndarray, params: list[int] | None = None) -> None:
    if not cv2.imwrite(str(path), np.ascontiguousarray(img), params or []):
        raise DefectscanError(f"{path}: could not write output")


def _regions_csv(regions: Iterable[Region]) -> str:
    return csv_text([r.to_dict() for r in regions], fieldnames=list(REGION_FIELDS))


def collect_images(inputs: Iterable[str | Path]) -> list[Path]:
    """Expand directories (their supported image files, sorted) and check that every input exists."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in SUPPORTED_SUFFIXES)
            if not found:
                raise DefectscanError(f"{p}: directory contains no images ({', '.join(SUPPORTED_SUFFIXES)})")
            paths.extend(found)
        elif not p.exists():
            raise DefectscanError(f"{p}: no such file or directory")
        elif p.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise DefectscanError(f"{p}: unsupported image format '{p.suffix}' (supported: {', '.join(SUPPORTED_SUFFIXES)})")
        else:
            paths.append(p)
    return paths


def output_names(paths: list[Path]) -> list[str]:
    """One output directory name per image: the stem, made unique when two inputs share it."""
    names, seen = [], {}
    for p in paths:
        n = seen.get(p.stem, 0)
        seen[p.stem] = n + 1
        names.append(p.stem if n == 0 else f"{p.stem}_{n + 1}")
    return names


__all__ = ["InferenceOptions", "Prediction", "Predictor", "collect_images", "open_image", "output_names"]
