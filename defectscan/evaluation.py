"""Pixel metrics of a model over labeled images, through the same tiled inference and mask rule as `infer`.

Streaming: per image a confusion matrix and uint8 score histograms are accumulated, so memory does not grow with
the number of images.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from defectscan.data.dataset import Sample, SegmentationDataset
from defectscan.metrics import ScoreHistogram, confusion_matrix, iou_dice
from defectscan.models.factory import ModelSpec
from defectscan.postprocess import defect_channels, defect_score, segment
from defectscan.tiling import tiled_inference


@dataclass
class PixelMetrics:
    classes: tuple[str, ...]  # background first
    conf: np.ndarray  # (K, K) rows ground truth, columns prediction, K = len(classes)
    hist: dict[str, ScoreHistogram]  # per defect class, plus "any" (defect vs background)
    images: int = 0
    seconds: float = 0.0
    per_image: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        iou, dice = iou_dice(self.conf)
        tp = self.conf[1:, 1:].sum()
        fp, fn = self.conf[0, 1:].sum(), self.conf[1:, 0].sum()
        defect = list(self.classes[1:])
        out = {
            "images": self.images,
            "iou": {c: _r(v) for c, v in zip(self.classes, iou)},
            "dice": {c: _r(v) for c, v in zip(self.classes, dice)},
            "mean_iou": _r(np.nanmean(iou[1:])) if len(iou) > 1 else None,
            "mean_dice": _r(np.nanmean(dice[1:])) if len(dice) > 1 else None,
            "defect_iou": _r(tp / max(tp + fp + fn, 1)),  # any defect vs background, class ignored
            "defect_dice": _r(2 * tp / max(2 * tp + fp + fn, 1)),
            "pixel_ap": {c: _r(self.hist[c].average_precision()) for c in defect},
            "pixel_auroc": {c: _r(self.hist[c].auroc()) for c in defect},
            "defect_pixel_ap": _r(self.hist["any"].average_precision()),
            "seconds": round(self.seconds, 2),
        }
        return out


def _r(v: float) -> float | None:
    v = float(v)
    return None if np.isnan(v) else round(v, 4)


@torch.inference_mode()
def evaluate_pixels(
    model: torch.nn.Module,
    spec: ModelSpec,
    ds: SegmentationDataset,
    samples: Sequence[Sample],
    *,
    tile: int | None = None,
    overlap: int | None = None,
    stitch: str = "center",
    batch_size: int = 4,
    device: str = "auto",
    amp: str = "auto",
    min_area: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> PixelMetrics:
    """IoU/Dice (at the spec's threshold, regions under `min_area` dropped as `infer` does) and pixel AP/AUROC."""
    classes = ds.classes
    k = len(classes)
    metrics = PixelMetrics(classes, np.zeros((k, k), np.int64), {c: ScoreHistogram() for c in (*classes[1:], "any")})
    names = dict(enumerate(classes))
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    for i, sample in enumerate(samples):
        image = ds.load_image(sample)
        target = ds.load_mask(sample, image.shape[:2])
        probs = tiled_inference(model, image, tile=tile or spec.tile, overlap=spec.overlap if overlap is None else overlap,
                                stitch=stitch, batch_size=batch_size, device=device, head=spec.head, mean=spec.mean,
                                std=spec.std, amp=amp, align=spec.stride)
        pred, regions = segment(probs, spec.head, spec.threshold, names, min_area=min_area)
        conf = confusion_matrix(pred, target, k)
        metrics.conf += conf
        for c in defect_channels(spec.head, probs.shape[0]):
            class_id = c if spec.head == "softmax" else c + 1
            metrics.hist[classes[class_id]].add(probs[c], target == class_id)
        score = defect_score(probs, spec.head)
        metrics.hist["any"].add(score, target > 0)
        tp, fp, fn = int(conf[1:, 1:].sum()), int(conf[0, 1:].sum()), int(conf[1:, 0].sum())
        metrics.per_image.append({"image": sample.image.name, "defect_px": tp + fn, "predicted_px": tp + fp,
                                  "defect_iou": _r(tp / (tp + fp + fn)) if tp + fp + fn else None,
                                  "regions": len(regions), "max_score": round(int(score.max()) / 255, 4)})
        metrics.images += 1
        if progress:
            progress(i + 1, len(samples))
    metrics.seconds = time.perf_counter() - t0
    model.train(was_training)
    return metrics
