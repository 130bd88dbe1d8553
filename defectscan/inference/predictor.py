"""`Predictor`: a model plus run-time options -> per-image probabilities, class mask, regions.

The one path from an image to a result: `infer`, `evaluate` and validation during training all go through it,
so the normalisation (`TorchTiles`), the mask rule (`StripSegmenter`) and the channel -> class mapping (`ClassMap`) are
the same everywhere.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from defectscan.errors import DefectscanError
from defectscan.inference.backends import TileBackend, TorchTiles
from defectscan.inference.postprocess import ClassMap, StripSegmenter
from defectscan.io.images import ImageSource
from defectscan.models import ModelSpec, default_checkpoint, describe, load_checkpoint
from defectscan.models.factory import center_stitch_caveat, prefers_channels_last
from defectscan.runtime import emulated_bf16_note, resolve_device
from defectscan.schemas import InferOptions, Region
from defectscan.tiling import plan_tiles, tiled_inference, tiled_rows, validate_tile


@dataclass
class Prediction:
    probs: np.ndarray | None  # (C, H, W) uint8, probability * 255; None when not kept
    mask: np.ndarray  # (H, W) uint8 class id
    regions: list[Region]
    score: np.ndarray  # (H, W) uint8 defect score the mask thresholds
    tiles: int
    seconds: float
    summary: dict = field(default_factory=dict)


class Predictor:
    """A model with its spec and options; `predict` one image at a time (`write_prediction` streams one image's
    outputs to files).

    Built from a checkpoint (`from_checkpoint`: the predictor owns the model and puts it on the device), or around
    a caller's model (training validation: the model is used where it is and in the mode the caller set).
    """

    def __init__(self, model: nn.Module | None, spec: ModelSpec, options: InferOptions | None = None, *,
                 checkpoint: Path | None = None, meta: dict | None = None, tiles: TileBackend | None = None) -> None:
        self.model, self.spec, self.checkpoint, self.meta = model, spec, checkpoint, meta or {}
        self.options = opts = options or InferOptions()
        self.classes = ClassMap.of(spec)
        self.tile = validate_tile(opts.tile or spec.tile, spec.stride, model_name=describe(spec))
        self.overlap = spec.overlap if opts.overlap is None else opts.overlap
        self.threshold = spec.threshold if opts.threshold is None else opts.threshold  # both validated in [0, 1]
        self.stitch = opts.stitch or spec.stitch
        plan_tiles(self.tile[0], self.tile[1], self.tile, self.overlap, spec.stride)  # checks the overlap now
        self.tiles = tiles or TorchTiles(model, head=spec.head, mean=spec.mean, std=spec.std, amp=opts.amp,
                                         tta=opts.tta, trained_in=self.meta.get("extra", {}).get("precision"))
        self._reported_notes: set[str] = set()

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path | None = None, options: InferOptions | None = None) -> "Predictor":
        """Load a checkpoint (default: the bundled model) onto the options' device, in eval mode; an exported
        `.onnx` model (with its sidecar) runs under ONNX Runtime instead (`model` is then None)."""
        options = options or InferOptions()
        path = Path(checkpoint) if checkpoint else default_checkpoint()
        if path.suffix == ".onnx":
            from defectscan.inference.onnx_backend import OnnxTiles, read_onnx_model

            spec, meta = read_onnx_model(path)
            if options.amp not in ("auto", "off"):
                raise DefectscanError(f"--amp {options.amp}: an ONNX model computes in the precision it was exported "
                                      f"in ({meta.get('precision', 'float32')})")
            tiles = OnnxTiles(path, meta, spec, tta=options.tta, device=options.device)
            if tiles.fixed_size and options.tile not in (None, spec.tile):
                raise DefectscanError(f"--tile {options.tile}: {path.name} was exported for {spec.tile} px tiles only")
            return cls(None, spec, options, checkpoint=path, meta=meta, tiles=tiles)
        model, spec, meta = load_checkpoint(path)
        device = resolve_device(options.device)
        model = model.to(device).eval()
        if prefers_channels_last(spec, device.type):
            model = model.to(memory_format=torch.channels_last)
        return cls(model, spec, options, checkpoint=path, meta=meta)

    @property
    def precision(self) -> str:
        """What the forward passes compute in (float32, mixed bfloat16, mixed float16): recorded in every output."""
        return self.tiles.precision

    @property
    def class_names(self) -> dict[int, str]:
        """Defect class id -> name."""
        return self.classes.defect_names

    @property
    def notes(self) -> list[str]:
        notes = []
        caveat = center_stitch_caveat(self.spec)
        if self.stitch == "center" and caveat:
            notes.append(f"{caveat}: center stitching is not exact; consider --stitch gaussian")
        if isinstance(self.tiles, TorchTiles) and (bf16 := emulated_bf16_note(self.tiles.device, self.tiles.amp_dtype)):
            notes.append(bf16)
        if self.tiles.fallback_note:  # an ONNX Runtime provider gave way during the run
            notes.append(self.tiles.fallback_note)
        return notes

    def unreported_notes(self) -> list[str]:
        """The `notes` no earlier call returned: what to say before a run, then what the run added (an ONNX Runtime
        provider that gave way), each once."""
        new = [note for note in self.notes if note not in self._reported_notes]
        self._reported_notes.update(new)
        return new

    def probabilities(self, image: ImageSource | np.ndarray, *, tile: tuple[int, int] | None = None,
                      overlap: int | None = None, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
        """(C, H, W) uint8 probabilities through the tiling engine (tile/overlap: other than the options')."""
        return tiled_inference(self.tiles, image, tile=tile or self.tile,
                               overlap=self.overlap if overlap is None else overlap, **self._engine, progress=progress)

    def probability_rows(self, image: ImageSource | np.ndarray,
                         progress: Callable[[int, int], None] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """The same probabilities as (y0, (C, rows, W) uint8) strips, top to bottom, as the engine finishes them."""
        return tiled_rows(self.tiles, image, tile=self.tile, overlap=self.overlap, **self._engine, progress=progress)

    @property
    def _engine(self) -> dict:
        """Tiling-engine options every call shares."""
        return {"stitch": self.stitch, "batch_size": self.options.batch_size, "align": self.spec.stride}

    def summary(self, shape: tuple[int, int], seconds: float, regions: list[Region]) -> dict:
        """Per-image figures of defects.json, the infer table and summary.csv."""
        h, w = shape
        return {
            "width": w, "height": h, "tiles": len(plan_tiles(h, w, self.tile, self.overlap, self.spec.stride)),
            "seconds": round(seconds, 3), "megapixels_per_second": round(h * w / 1e6 / max(seconds, 1e-9), 3),
            "regions": len(regions),
            "regions_per_class": {n: sum(r.class_id == c for r in regions) for c, n in self.class_names.items()},
            "defect_area_fraction": round(sum(r.area_px for r in regions) / (h * w), 8),  # = mask pixels
        }

    def segment_rows(self, source: ImageSource | np.ndarray, progress: Callable[[int, int], None] | None = None, *,
                     on_strip: Callable[[int, np.ndarray, np.ndarray], None] | None = None) -> SegmentedImage:
        """Run the engine and pass 1 of the mask rule over its probability strips as they are finished.

        `on_strip(y0, (C, rows, W) probabilities, (rows, W) defect score)` sees each strip before it is dropped;
        the returned `SegmentedImage` has the regions and gives the class mask in the same strips (`mask_rows`).
        Memory: one tile row of probabilities and 1 bit per pixel, whatever the callers keep.
        """
        source = source if isinstance(source, ImageSource) else ImageSource(np.asarray(source))
        t0 = time.perf_counter()
        seg = StripSegmenter(self.classes, self.threshold, min_area=self.options.min_area)
        callers = 0.0  # time spent in on_strip: the caller's work, not the prediction's

        def timed(y0: int, block: np.ndarray, score: np.ndarray) -> None:
            nonlocal callers
            t = time.perf_counter()
            on_strip(y0, block, score)
            callers += time.perf_counter() - t

        regions = seg.segment_strips(self.probability_rows(source, progress=progress), timed if on_strip else None)
        return SegmentedImage(regions, seg, time.perf_counter() - t0 - callers)

    def predict(self, source: ImageSource | np.ndarray, progress: Callable[[int, int], None] | None = None, *,
                keep_probs: bool = True) -> Prediction:
        """Probabilities (unless `keep_probs` is False), mask, regions and score of one image, in memory.

        See `segment_rows` to consume the same results strip by strip, and `write_prediction` for huge images: it
        streams every output to files.
        """
        source = source if isinstance(source, ImageSource) else ImageSource(np.asarray(source))
        h, w = source.shape
        probs = np.empty((len(self.spec.classes), h, w), np.uint8) if keep_probs else None
        score, mask = np.empty((h, w), np.uint8), np.empty((h, w), np.uint8)

        def keep(y0: int, block: np.ndarray, strip_score: np.ndarray) -> None:
            if probs is not None:
                probs[:, y0 : y0 + block.shape[1]] = block
            score[y0 : y0 + block.shape[1]] = strip_score

        image = self.segment_rows(source, progress, on_strip=keep)
        for y0, rows in image.mask_rows():
            mask[y0 : y0 + len(rows)] = rows
        summary = self.summary(source.shape, image.seconds, image.regions)
        return Prediction(probs, mask, image.regions, score, summary["tiles"], image.seconds, summary)


class SegmentedImage:
    """One image after pass 1 of the mask rule: its regions, and its class mask strip by strip (`mask_rows`, the
    engine's strips again). `seconds` is the inference and mask-rule time so far, callers' work left out; it
    grows by the time spent making mask rows."""

    def __init__(self, regions: list[Region], segmenter: StripSegmenter, seconds: float) -> None:
        self.regions, self.seconds = regions, seconds
        self._segmenter = segmenter

    def mask_rows(self) -> Iterator[tuple[int, np.ndarray]]:
        """(y0, (rows, W) uint8 class-id mask) per strip, top to bottom."""
        rows = self._segmenter.mask_rows()
        while True:
            t = time.perf_counter()
            item = next(rows, None)
            self.seconds += time.perf_counter() - t
            if item is None:
                return
            yield item
