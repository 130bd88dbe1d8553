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

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Protocol, Sequence

import numpy as np
import torch

from defectscan.data.dataset import Sample, SegmentationDataset
from defectscan.distributed import SINGLE, Shard
from defectscan.errors import DefectscanError
from defectscan.evaluation.cost import count_flops, count_parameters, peak_memory_mb, reset_peak_rss
from defectscan.inference import Predictor, SegmentedImage, defect_score, score_to_u8
from defectscan.io.images import ImageSource, header_size
from defectscan.metrics import RegionMatcher, ScoreHistogram, confusion_matrix, iou_dice, pro_auc
from defectscan.reporting.overlays import MaskPreview, outcome_codes, render_outcomes
from defectscan.schemas import EvalOptions, Metrics


@dataclass
class Example:
    image: str
    dice: float
    errors: int
    preview: np.ndarray  # RGB
    index: int = 0  # position in the evaluated list: ties go to the earlier image, however the list was sharded


@dataclass
class ImageResult:
    """One image's contribution to an `Evaluation`: what `Evaluation.add` sums, kept whole so that processes
    sharing an evaluation can send theirs to one place and add them in image order (bit-identical sums)."""

    index: int
    conf: np.ndarray
    hist: dict[str, ScoreHistogram]  # per defect class and "any"
    regions: tuple[int, int, int]  # true regions, found, false-positive regions
    overlap_curve: np.ndarray
    pixels: int
    class_regions: dict[str, list[int]]  # multi-class models: [true, found, false positive] per class
    row: dict  # the per_image row


@dataclass
class Evaluation:
    classes: tuple[str, ...]  # background first
    threshold: float
    options: EvalOptions
    conf: np.ndarray  # (K, K) rows ground truth, columns prediction
    hist: dict[str, ScoreHistogram]  # per defect class, plus "any" (defect vs background)
    image_hists: list[ScoreHistogram] = field(default_factory=list)  # "any" per image: thresholds' sampling error
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

    def add(self, r: ImageResult) -> None:
        """Count one image (in image order: float sums then equal one process's)."""
        self.conf += r.conf
        for name, h in r.hist.items():
            self.hist[name].merge(h)
        self.image_hists.append(r.hist["any"])
        self.gt_regions += r.regions[0]
        self.found_regions += r.regions[1]
        self.fp_regions += r.regions[2]
        self.overlap_sum += r.overlap_curve
        self.pixels += r.pixels
        for name, counts in r.class_regions.items():
            total = self.class_regions.setdefault(name, [0, 0, 0])
            for j, c in enumerate(counts):
                total[j] += c
        self.per_image.append(r.row)

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
        defect_iou, defect_dice = _defect_scores(tp, fp, fn)
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
            "defect_iou": _r(defect_iou), "defect_dice": _r(defect_dice),
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
            "groups": self.group_summary(),
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

    def group_summary(self) -> dict | None:
        """Pixel scores of each image group on its own (any defect vs background, pooled as `defect_iou`); None
        unless the images carry two groups or more."""
        by_group: dict[str, list[dict]] = {}
        for r in self.per_image:
            by_group.setdefault(r.get("group") or "(none)", []).append(r)
        if len(by_group) < 2:
            return None
        out = {}
        for name in sorted(by_group):
            rows = by_group[name]
            tp, fp, fn = (sum(int(r[k]) for r in rows) for k in ("tp_px", "fp_px", "fn_px"))
            iou, dice = _defect_scores(tp, fp, fn)
            out[name] = {"images": len(rows), "defective": sum(bool(r["defective"]) for r in rows),
                         "defect_iou": _r(iou), "defect_dice": _r(dice),
                         "true_px": tp + fn, "false_positive_px": fp, "false_negative_px": fn}
        return out

    def speed(self) -> dict:
        lat = np.array([r["seconds"] for r in self.per_image]) if self.per_image else np.zeros(1)
        return {"megapixels_per_second": _r(self.pixels / 1e6 / max(self.inference_seconds, 1e-9)),
                "latency_mean_s": _r(lat.mean()), "latency_median_s": _r(np.median(lat)),
                "latency_max_s": _r(lat.max())}


def _r(v: float | None) -> float | None:
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) else round(v, 4)


def _defect_scores(tp: int, fp: int, fn: int) -> tuple[float | None, float | None]:
    """(IoU, Dice) of any defect vs background from pixel counts; None when neither truth nor prediction has one."""
    if not tp + fp + fn:
        return None, None
    return tp / (tp + fp + fn), 2 * tp / (2 * tp + fp + fn)


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
    mask_sink: Callable[[Sample, tuple[int, int]], ContextManager[RowSink]] | None = None,
    shard: Shard = SINGLE,
) -> Evaluation:
    """Run `predictor` over `samples` and accumulate every metric. `mask_sink(sample, (H, W))` opens where each
    image's class mask goes (e.g. a `PngRowWriter`): it receives the mask's rows top to bottom. The predictor's
    model is switched to eval mode for the pass and back to its previous mode afterwards.

    With a `shard` of several processes (torchrun), this process scores its share of `samples` (`Shard.take`)
    and every process returns the whole evaluation: the per-image results are gathered and added in image order,
    so every count, sum and example equals one process's. `seconds` is then this process's wall time and
    `inference_seconds` the sum over processes.

    Per image, memory holds the decoded image, the ground truth (1 byte per pixel) and the scores at its defect
    pixels; the class mask and the score exist only strip by strip."""
    opts = options or EvalOptions()
    classes = ds.classes
    model_classes = list(predictor.class_names.values())
    if list(classes[1:]) != model_classes:
        raise DefectscanError(f"{ds.root}: dataset classes {list(classes[1:])} differ from the model's {model_classes}")
    ev = _empty_evaluation(classes, predictor.threshold, opts)
    model, spec = predictor.model, predictor.spec
    device = predictor.tiles.device
    was_training = model is not None and model.training  # None: an exported graph (ONNX Runtime)
    if model is not None:
        model.eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if opts.cost:
        reset_peak_rss()
    seam_at = _seam_images(samples, opts)
    mine = shard.take(samples)
    results: list[ImageResult] = []  # several processes: kept until they are gathered
    seam: list[tuple[int, dict]] = []
    t_start = time.perf_counter()
    if progress:
        progress(0, len(mine))  # the inputs are checked: the bar may appear
    try:
        for done, (index, sample) in enumerate(mine, 1):
            source = ds.open_source(sample)
            target = ds.load_mask(sample, source.shape)
            metrics = ImageMetrics(ev, predictor, target, keep_score=index in seam_at)
            image = predictor.segment_rows(source, on_strip=metrics.add_probabilities)
            with mask_sink(sample, source.shape) if mask_sink else contextlib.nullcontext() as sink:
                metrics.add_masks(image, sink)
            ev.inference_seconds += image.seconds
            result = metrics.finish(index, sample, source, image)
            if shard.world == 1:
                ev.add(result)
            else:
                results.append(result)
            if index in seam_at:
                seam.append((index, _seam_check(predictor, source.to_rgb8(), metrics.score, sample.image.name)))
            if progress:
                progress(done, len(mine))
        if shard.world > 1:
            ev = _gathered(ev, shard.gather((results, ev.best, ev.worst, seam, ev.inference_seconds)))
        else:
            ev.seam = [row for _, row in seam]
        ev.seconds = time.perf_counter() - t_start
        if opts.cost:
            th, tw = predictor.tile
            if model is not None:
                x = torch.zeros(1, spec.in_channels, th, tw, device=device)
                ev.cost = {"device": str(device), "parameters": count_parameters(model), "tile": [th, tw],
                           "gflops_per_tile": float(f"{count_flops(model, x) / 1e9:.4g}"), **peak_memory_mb(device)}
            else:  # FLOPs are counted on torch modules; the graph's weights are counted from its initialisers
                ev.cost = {"device": f"{device} ({predictor.precision})", "parameters": predictor.tiles.parameters,
                           "tile": [th, tw], **peak_memory_mb(device)}
            if shard.world > 1:
                ev.cost["processes"] = shard.world  # peak memory: this process's
    finally:
        if model is not None:
            model.train(was_training)
    return ev


def _empty_evaluation(classes: Sequence[str], threshold: float, opts: EvalOptions) -> Evaluation:
    k = len(classes)
    return Evaluation(tuple(classes), threshold, opts, np.zeros((k, k), np.int64),
                      {c: ScoreHistogram() for c in (*classes[1:], "any")})


def _seam_images(samples: Sequence[Sample], opts: EvalOptions) -> set[int]:
    """Indices of the images also run untiled: the first `seam_images` whose header says they fit
    `seam_max_pixels` (decided before scoring, so that every process of a sharded run agrees)."""
    chosen: set[int] = set()
    for i, sample in enumerate(samples):
        if len(chosen) >= opts.seam_images:
            break
        size = header_size(sample.image)
        if size is not None and size[0] * size[1] <= opts.seam_max_pixels:
            chosen.add(i)
    return chosen


def _gathered(local: Evaluation, parts: list[tuple]) -> Evaluation:
    """The whole evaluation from every process's (results, best, worst, seam rows, inference seconds)."""
    ev = _empty_evaluation(local.classes, local.threshold, local.options)
    for r in sorted((r for part in parts for r in part[0]), key=lambda r: r.index):
        ev.add(r)
    k = local.options.examples
    ev.best = sorted((e for part in parts for e in part[1]), key=lambda e: (-e.dice, e.errors, e.index))[:k]
    ev.worst = sorted((e for part in parts for e in part[2]), key=lambda e: (e.dice, -e.errors, e.index))[:k]
    ev.seam = [row for _, row in sorted((x for part in parts for x in part[3]), key=lambda x: x[0])]
    ev.inference_seconds = sum(part[4] for part in parts)
    return ev


class RowSink(Protocol):
    def write(self, rows: np.ndarray) -> None: ...


class ImageMetrics:
    """One image's contribution to an `Evaluation`, fed as the predictor makes it: probability strips with their
    defect scores (`add_probabilities`, pass 1), then the class mask (`add_masks`, pass 2), then `finish`."""

    def __init__(self, ev: Evaluation, predictor: Predictor, target: np.ndarray, *, keep_score: bool = False) -> None:
        self.ev, self.classes, self.target = ev, predictor.classes, target
        k = len(ev.classes)
        self.conf = np.zeros((k, k), np.int64)
        self.truth_px = np.zeros(k, np.int64)
        self.max_score = 0
        self.hist = {name: ScoreHistogram() for name in (*ev.classes[1:], "any")}  # this image's scores
        self.gt_scores: dict[int, np.ndarray] = {}  # y0 -> scores at the strip's defect pixels (what PRO needs)
        self.score = np.empty(target.shape, np.uint8) if keep_score else None  # the seam check's whole map
        opts = ev.options
        self.regions = RegionMatcher(opts.region_criterion, opts.region_threshold)
        self.class_regions: dict[int, RegionMatcher] = {}  # multi-class models, made when pass 2 starts
        # outcome pictures for the best/worst examples (none kept, e.g. training validation: not drawn at all)
        self.outcomes = MaskPreview(*target.shape, opts.preview_side) if opts.examples else None

    def add_probabilities(self, y0: int, probs: np.ndarray, score: np.ndarray) -> None:
        truth = self.target[y0 : y0 + len(score)]
        for class_id, name in self.classes.defect_names.items():
            self.hist[name].add(probs[self.classes.channel(class_id)], truth == class_id)
        self.hist["any"].add(score, truth)
        self.max_score = max(self.max_score, int(score.max()))
        self.gt_scores[y0] = score[truth != 0]
        self.truth_px += np.bincount(truth.ravel(), minlength=len(self.truth_px))
        if self.score is not None:
            self.score[y0 : y0 + len(score)] = score

    def add_masks(self, image: SegmentedImage, sink: RowSink | None = None) -> None:
        """Pass 2: the image's class-mask strips (also written to `sink`)."""
        ev, criterion = self.ev, (self.ev.options.region_criterion, self.ev.options.region_threshold)
        if len(ev.classes) > 2:  # region counts per class where it is in the truth or the prediction
            predicted = {r.class_id for r in image.regions}
            self.class_regions = {c: RegionMatcher(*criterion) for c in self.classes.defect_names
                                  if self.truth_px[c] or c in predicted}
        for y0, mask in image.mask_rows():
            truth = self.target[y0 : y0 + len(mask)]
            self.conf += confusion_matrix(mask, truth, len(self.conf))
            self.regions.add(truth != 0, mask != 0, self.gt_scores.pop(y0))
            for class_id, matcher in self.class_regions.items():
                matcher.add(truth == class_id, mask == class_id, None)  # counts, no PRO curve
            if self.outcomes is not None:
                self.outcomes.add(y0, outcome_codes(truth, mask))
            if sink is not None:
                sink.write(mask)

    def finish(self, index: int, sample: Sample, source: ImageSource, image: SegmentedImage) -> ImageResult:
        """The image's result (`Evaluation.add` counts it); offers it as a best/worst example on the way."""
        conf = self.conf
        rs = self.regions.finish()
        class_regions: dict[str, list[int]] = {}
        if len(self.ev.classes) > 2:
            for class_id, name in self.classes.defect_names.items():
                counts = class_regions[name] = [0, 0, 0]
                if class_id in self.class_regions:
                    rc = self.class_regions[class_id].finish()
                    counts[:] = rc.gt_regions, rc.found, rc.false_positive_regions
        tp, fp, fn = int(conf[1:, 1:].sum()), int(conf[0, 1:].sum()), int(conf[1:, 0].sum())
        iou, dice = _defect_scores(tp, fp, fn)
        row = {
            "image": sample.image.name, "group": sample.group or "", "width": source.width, "height": source.height,
            "gt_defect_px": tp + fn, "predicted_px": tp + fp, "tp_px": tp, "fp_px": fp, "fn_px": fn,
            "defect_iou": _r(iou), "defect_dice": _r(dice),
            "gt_regions": rs.gt_regions, "found_regions": rs.found, "pred_regions": rs.pred_regions,
            "fp_regions": rs.false_positive_regions, "max_score": round(self.max_score / 255, 4),
            "defective": tp + fn > 0, "flagged": bool(image.regions), "seconds": round(image.seconds, 3)}
        if dice is not None and self.outcomes is not None:  # both empty: nothing worth a preview
            _offer_example(self.ev, index, sample, source, self.outcomes, dice, fp + fn)
        return ImageResult(index, conf, self.hist, (rs.gt_regions, rs.found, rs.false_positive_regions),
                           rs.overlap_curve, int(self.target.size), class_regions, row)


def _offer_example(ev: Evaluation, index: int, sample: Sample, source: ImageSource, outcomes: MaskPreview,
                   dice: float, errors: int) -> None:
    """Keep previews of the `examples` best and worst images (bounded memory, rendered only when kept)."""
    opts = ev.options
    best_key = lambda e: (-e.dice, e.errors)  # noqa: E731 - smaller is better
    worst_key = lambda e: (e.dice, -e.errors)  # noqa: E731 - smaller is worse
    keep_best = _keep_example(ev.best, opts.examples, (-dice, errors), best_key)
    keep_worst = _keep_example(ev.worst, opts.examples, (dice, -errors), worst_key)
    if not (keep_best or keep_worst):
        return
    ex = Example(sample.image.name, dice, errors, render_outcomes(source, outcomes), index)
    for keep, pool, key in ((keep_best, ev.best, best_key), (keep_worst, ev.worst, worst_key)):
        if keep:
            pool.append(ex)
            pool.sort(key=key)
            del pool[opts.examples:]


def _seam_check(predictor: Predictor, image: np.ndarray, tiled_score: np.ndarray, name: str) -> dict:
    """The same image as one whole tile (padded to the stride): how far tiled output is from untiled output."""
    if predictor.tiles.fixed_size:
        return {"image": name, "skipped": "the ONNX graph takes fixed-size tiles only"}
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
