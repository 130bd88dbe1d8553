"""A model over labeled images, through the same tiled inference and mask rule as `infer`: every metric in one pass.

Streaming: per image a confusion matrix, uint8 score histograms and region statistics are accumulated, so memory
does not grow with the number of pixels (only per-image rows and a few example previews are kept).

Levels of the metrics:
- pixel: IoU/Dice at the model's threshold (class mask as `infer` makes it), best-F1 threshold, AP and AUROC per
  defect class from the score histograms;
- region (every defect class counts as "defect"): recall of 8-connected ground-truth regions, false-positive
  regions per image and per megapixel, PRO up to an FPR limit;
- image (defect present?): score = the image's highest defect score; a prediction is "defective" when `infer`
  would report at least one region.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from defectscan.data.dataset import Sample, SegmentationDataset
from defectscan.errors import DefectscanError
from defectscan.evaluation.cost import count_flops, count_parameters, peak_memory_mb, reset_peak_rss
from defectscan.inference import Predictor, defect_score, score_to_u8
from defectscan.io.images import ImageSource
from defectscan.metrics import ScoreHistogram, confusion_matrix, iou_dice, pro_auc, region_stats
from defectscan.reporting.overlays import outcome_preview
from defectscan.schemas import EvalOptions, Metrics


@dataclass
class Example:
    image: str
    dice: float
    errors: int
    preview: np.ndarray  # RGB


@dataclass
class Evaluation:
    classes: tuple[str, ...]  # background first
    threshold: float
    options: EvalOptions
    conf: np.ndarray  # (K, K) rows ground truth, columns prediction
    hist: dict[str, ScoreHistogram]  # per defect class, plus "any" (defect vs background)
    seconds: float = 0.0  # wall time of the whole pass
    inference_seconds: float = 0.0  # tiled inference + mask rule only
    pixels: int = 0
    gt_regions: int = 0
    found_regions: int = 0
    fp_regions: int = 0
    overlap_sum: np.ndarray = field(default_factory=lambda: np.zeros(256))
    # per defect class (multi-class models): [true regions, found, false-positive regions], same criterion
    class_regions: dict[str, list[int]] = field(default_factory=dict)
    per_image: list[dict] = field(default_factory=list)  # one row per image; image-level metrics come from it
    best: list[Example] = field(default_factory=list)
    worst: list[Example] = field(default_factory=list)
    seam: list[dict] = field(default_factory=list)
    cost: dict = field(default_factory=dict)

    @property
    def images(self) -> int:
        return len(self.per_image)

    @property
    def image_scores(self) -> list[float]:
        """Each image's highest defect score (uint8 levels / 255, so rounding to 4 decimals keeps their order)."""
        return [r["max_score"] for r in self.per_image]

    # ---- summaries -------------------------------------------------------------------------------------------
    def metrics(self) -> Metrics:
        """Everything measured, as metrics.json's `metrics`."""
        return Metrics.model_validate(self._summary())

    def _summary(self) -> dict:
        iou, dice = iou_dice(self.conf)
        tp = self.conf[1:, 1:].sum()
        fp, fn = self.conf[0, 1:].sum(), self.conf[1:, 0].sum()
        defect = list(self.classes[1:])
        best = {c: self.hist[c].best_f1() for c in (*defect, "any")}
        out = {
            "images": self.images,
            "threshold": self.threshold,
            "iou": {c: _r(v) for c, v in zip(self.classes, iou)},
            "dice": {c: _r(v) for c, v in zip(self.classes, dice)},
            "mean_iou": _r(np.nanmean(iou[1:])) if len(iou) > 1 and not np.isnan(iou[1:]).all() else None,
            "mean_dice": _r(np.nanmean(dice[1:])) if len(dice) > 1 and not np.isnan(dice[1:]).all() else None,
            # any defect vs background, class ignored; undefined when neither truth nor prediction has a defect
            "defect_iou": _r(tp / (tp + fp + fn)) if tp + fp + fn else None,
            "defect_dice": _r(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else None,
            "best_f1": {c: _r(best[c][0]) for c in defect},
            "best_f1_threshold": {c: _r(best[c][1]) for c in defect},
            "pixel_ap": {c: _r(self.hist[c].average_precision()) for c in defect},
            "pixel_auroc": {c: _r(self.hist[c].auroc()) for c in defect},
            "macro_pixel_ap": _nanmean(self.hist[c].average_precision() for c in defect),
            "defect_pixel_ap": _r(self.hist["any"].average_precision()),
            "defect_pixel_auroc": _r(self.hist["any"].auroc()),
            "defect_best_f1": _r(best["any"][0]),
            "defect_best_f1_threshold": _r(best["any"][1]),
            "confusion": {"classes": list(self.classes), "rows_truth_cols_prediction": self.conf.tolist()},
            "region": self.region_summary(),
            "area": self.area_summary(),
            "region_per_class": self.class_region_summary(),
            "image_level": self.image_summary(),
            "seconds": round(self.seconds, 2),
        }
        if self.cost or self.seam:
            out["cost"] = {**self.cost, **self.speed(), "seam_check": self.seam}
        return out

    def _region_counts(self, gt: int, found: int, fp: int) -> dict:
        """Recall and false positives per megapixel from region counts (metrics.json orders the keys)."""
        mp = self.pixels / 1e6
        return {"gt_regions": gt, "found": found, "recall": _r(found / gt) if gt else None,
                "false_positive_regions": fp, "fp_regions_per_megapixel": _r(fp / mp) if mp else None}

    def region_summary(self) -> dict:
        return {
            "criterion": f"{self.options.region_criterion} >= {self.options.region_threshold}",
            **self._region_counts(self.gt_regions, self.found_regions, self.fp_regions),
            "fp_regions_per_image": _r(self.fp_regions / self.images) if self.images else None,
            "pro_fpr_limit": self.options.pro_fpr_limit,
            "pro": _r(pro_auc(self.overlap_sum, self.gt_regions, self.hist["any"], self.options.pro_fpr_limit)),
        }

    def area_summary(self) -> dict:
        pixels = max(int(self.conf.sum()), 1)
        true, predicted = int(self.conf[1:, :].sum()), int(self.conf[:, 1:].sum())
        background, fp = int(self.conf[0, :].sum()), int(self.conf[0, 1:].sum())
        return {"true_fraction": round(true / pixels, 6), "predicted_fraction": round(predicted / pixels, 6),
                "predicted_to_true": _r(predicted / true) if true else None,
                "false_positive_fraction": round(fp / max(background, 1), 6),
                "false_positive_per_megapixel": round(fp / (pixels / 1e6), 1)}

    def class_region_summary(self) -> dict | None:
        """Region recall and false positives of each defect class on its own (a region of class c is found by
        predicted pixels of class c); None for single-class models, where it equals `region`."""
        if len(self.classes) <= 2:
            return None
        return {c: self._region_counts(*counts) for c, counts in self.class_regions.items()}

    def image_summary(self) -> dict:
        from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

        y = np.array([r["defective"] for r in self.per_image], bool)
        flagged = [r["flagged"] for r in self.per_image]
        both = 0 < y.sum() < len(y)
        return {
            "defective": int(y.sum()), "clean": int((~y).sum()),
            "auroc": _r(roc_auc_score(y, self.image_scores)) if both else None,
            "ap": _r(average_precision_score(y, self.image_scores)) if y.any() else None,
            "f1": _r(f1_score(y, flagged, zero_division=0.0)) if y.any() else None,
            "flagged": int(np.sum(flagged)),
        }

    def speed(self) -> dict:
        lat = np.array([r["seconds"] for r in self.per_image]) if self.per_image else np.zeros(1)
        return {"megapixels_per_second": _r(self.pixels / 1e6 / max(self.inference_seconds, 1e-9)),
                "latency_mean_s": _r(lat.mean()), "latency_median_s": _r(np.median(lat)),
                "latency_max_s": _r(lat.max())}


def _r(v: float) -> float | None:
    v = float(v)
    return None if math.isnan(v) else round(v, 4)


def _nanmean(values) -> float | None:
    vals = [v for v in values if not math.isnan(v)]
    return _r(sum(vals) / len(vals)) if vals else None


def _keep_example(pool: list[Example], k: int, ex_key: tuple, key: Callable[[Example], tuple]) -> bool:
    return k > 0 and (len(pool) < k or ex_key < max(key(e) for e in pool))


@torch.inference_mode()
def evaluate(
    predictor: Predictor,
    ds: SegmentationDataset,
    samples: Sequence[Sample],
    options: EvalOptions | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
    on_image: Callable[[Sample, np.ndarray], None] | None = None,
) -> Evaluation:
    """Run `predictor` over `samples` and accumulate every metric; `on_image(sample, class_mask)` sees each
    prediction (e.g. to save it) before it is dropped. The predictor's model is switched to eval mode for the
    pass and back to its previous mode afterwards."""
    opts = options or EvalOptions()
    classes = ds.classes
    model_classes = list(predictor.class_names.values())
    if list(classes[1:]) != model_classes:
        raise DefectscanError(f"{ds.root}: dataset classes {list(classes[1:])} differ from the model's {model_classes}")
    k = len(classes)
    ev = Evaluation(classes, predictor.threshold, opts, np.zeros((k, k), np.int64),
                    {c: ScoreHistogram() for c in (*classes[1:], "any")})
    model, spec = predictor.model, predictor.spec
    device = predictor.tiles.device
    was_training = model.training
    model.eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if opts.cost:
        reset_peak_rss()
    t_start = time.perf_counter()
    try:
        for i, sample in enumerate(samples):
            source = ds.open_source(sample)
            target = ds.load_mask(sample, source.shape)
            pred = predictor.predict(source, keep_probs=False, on_rows=_class_score_counter(ev, predictor, target))
            ev.inference_seconds += pred.seconds
            _accumulate(ev, predictor, sample, source, target, pred)
            if opts.seam_images and len(ev.seam) < opts.seam_images and target.size <= opts.seam_max_pixels:
                ev.seam.append(_seam_check(predictor, source.to_rgb8(), pred.score, sample.image.name))
            if on_image:
                on_image(sample, pred.mask)
            if progress:
                progress(i + 1, len(samples))
        ev.seconds = time.perf_counter() - t_start
        if opts.cost:
            th, tw = predictor.tile
            x = torch.zeros(1, spec.in_channels, th, tw, device=device)
            ev.cost = {"device": str(device), "parameters": count_parameters(model), "tile": [th, tw],
                       "gflops_per_tile": float(f"{count_flops(model, x) / 1e9:.4g}"), **peak_memory_mb(device)}
    finally:
        model.train(was_training)
    return ev


def _class_score_counter(ev: Evaluation, predictor: Predictor, target: np.ndarray) -> Callable[[int, np.ndarray], None]:
    """Adds each probability strip to its class's score histogram as the engine finishes it (no (C, H, W) map)."""
    classes = predictor.classes

    def add(y0: int, block: np.ndarray) -> None:
        truth = target[y0 : y0 + block.shape[1]]
        for class_id, name in classes.defect_names.items():
            ev.hist[name].add(block[classes.channel(class_id)], truth == class_id)

    return add


def _accumulate(ev: Evaluation, predictor: Predictor, sample: Sample, source: ImageSource, target: np.ndarray,
                pred) -> None:
    """Add one image's `Prediction` to the running metrics (masks are read strip by strip, no full-size copies)."""
    opts, classes = ev.options, predictor.classes
    conf = confusion_matrix(pred.mask, target, len(ev.classes))
    ev.conf += conf
    score = pred.score
    ev.hist["any"].add(score, target)
    rs = region_stats(target, pred.mask, score, criterion=opts.region_criterion, threshold=opts.region_threshold)
    ev.gt_regions += rs.gt_regions
    ev.found_regions += rs.found
    ev.fp_regions += rs.false_positive_regions
    ev.overlap_sum += rs.overlap_curve
    ev.pixels += target.size
    if len(ev.classes) > 2:
        for class_id, name in classes.defect_names.items():
            counts = ev.class_regions.setdefault(name, [0, 0, 0])
            if conf[class_id].sum() or conf[:, class_id].sum():  # the class is in the truth or the prediction
                rc = region_stats(target, pred.mask, None, criterion=opts.region_criterion,  # counts, no PRO curve
                                  threshold=opts.region_threshold, class_id=class_id)
                counts[0] += rc.gt_regions
                counts[1] += rc.found
                counts[2] += rc.false_positive_regions
    max_score = int(score.max()) / 255
    tp, fp, fn = int(conf[1:, 1:].sum()), int(conf[0, 1:].sum()), int(conf[1:, 0].sum())
    dice = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    ev.per_image.append({
        "image": sample.image.name, "width": source.width, "height": source.height,
        "gt_defect_px": tp + fn, "predicted_px": tp + fp, "tp_px": tp, "fp_px": fp, "fn_px": fn,
        "defect_iou": _r(tp / (tp + fp + fn)) if tp + fp + fn else None, "defect_dice": _r(dice) if dice is not None else None,
        "gt_regions": rs.gt_regions, "found_regions": rs.found, "pred_regions": rs.pred_regions,
        "fp_regions": rs.false_positive_regions, "max_score": round(max_score, 4),
        "defective": tp + fn > 0, "flagged": bool(pred.regions), "seconds": round(pred.seconds, 3)})
    if dice is not None:  # images where truth and prediction are both empty show nothing worth a preview
        _offer_example(ev, opts, sample, source, target, pred.mask, dice, fp + fn)


def _offer_example(ev: Evaluation, opts: EvalOptions, sample: Sample, source: ImageSource, target: np.ndarray,
                   mask: np.ndarray, dice: float, errors: int) -> None:
    """Keep previews of the `opts.examples` best and worst images (bounded memory, rendered only when kept)."""
    best_key = lambda e: (-e.dice, e.errors)  # noqa: E731 - smaller is better
    worst_key = lambda e: (e.dice, -e.errors)  # noqa: E731 - smaller is worse
    keep_best = _keep_example(ev.best, opts.examples, (-dice, errors), best_key)
    keep_worst = _keep_example(ev.worst, opts.examples, (dice, -errors), worst_key)
    if not (keep_best or keep_worst):
        return
    ex = Example(sample.image.name, dice, errors, outcome_preview(source, target, mask, opts.preview_side))
    for keep, pool, key in ((keep_best, ev.best, best_key), (keep_worst, ev.worst, worst_key)):
        if keep:
            pool.append(ex)
            pool.sort(key=key)
            del pool[opts.examples:]


def _seam_check(predictor: Predictor, image: np.ndarray, tiled_score: np.ndarray, name: str) -> dict:
    """The same image as one whole tile (padded to the stride): how far tiled output is from untiled output."""
    h, w = image.shape[:2]
    stride = predictor.spec.stride
    whole_tile = (math.ceil(h / stride) * stride, math.ceil(w / stride) * stride)
    try:
        whole = predictor.probabilities(image, tile=whole_tile, overlap=0)
    except (torch.OutOfMemoryError, MemoryError):  # a check, not the evaluation: skip it rather than fail
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"image": name, "skipped": "out of memory for the whole image in one pass"}
    a = tiled_score.astype(np.int16)
    b = defect_score(whole, predictor.spec.head).astype(np.int16)
    diff = np.abs(a - b)
    level = score_to_u8(predictor.threshold)
    return {"image": name, "max_abs_diff": round(int(diff.max()) / 255, 4), "mean_abs_diff": round(float(diff.mean()) / 255, 6),
            "mask_disagreement": round(float(np.mean((a >= level) != (b >= level))), 8)}
