"""Metrics that stream over images of any size: confusion matrices, uint8 score histograms, region statistics.

The engine's probability maps are uint8 (probability x 255), so a 256-bin histogram holds every score exactly:
curves and areas computed from the counts equal scikit-learn's on the same uint8 scores, at constant memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from defectscan.components import StripComponents

CHUNK = 1 << 22  # pixels per step of the pixel counts, and
STRIP_ROWS = 512  # rows per step of the region matching: temporaries stay this small on images of any size


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts, rows = ground truth, columns = prediction."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and target {target.shape} differ in shape")
    counts = np.zeros(num_classes * num_classes, np.int64)
    p, t = pred.reshape(-1), target.reshape(-1)
    for i in range(0, p.size, CHUNK):  # int64 indices of a whole 16384^2 image alone would take 2 GB
        idx = t[i : i + CHUNK].astype(np.int64) * num_classes + p[i : i + CHUNK]
        counts += np.bincount(idx, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def iou_dice(conf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class IoU and Dice from a confusion matrix; NaN for classes absent from both target and prediction."""
    tp = np.diag(conf).astype(np.float64)
    fp = conf.sum(0) - tp
    fn = conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (tp + fp + fn)
        dice = 2 * tp / (2 * tp + fp + fn)
    return iou, dice


POOLED_THRESHOLD_RULES = ("best_f1", "precision", "recall")  # need only the pooled histogram
THRESHOLD_RULES = ("stable_f1", *POOLED_THRESHOLD_RULES)


@dataclass(frozen=True)
class ThresholdChoice:
    """A decision threshold and the pixel-level operating point it gave on the images it was chosen on."""

    rule: str
    target: float | None
    threshold: float
    precision: float
    recall: float
    f1: float
    positives: int  # defect pixels it was chosen on
    negatives: int
    note: str = ""
    best_f1_threshold: float | None = None  # stable_f1: the raw best-F1 threshold it stayed away from
    f1_standard_error: float | None = None  # stable_f1: bootstrap (over images) error of F1(best) - F1(chosen)

    @property
    def iou(self) -> float:
        """Pooled defect IoU at the threshold: tp / (tp + fp + fn) = 1 / (1/precision + 1/recall - 1)."""
        return 1.0 / (1.0 / self.precision + 1.0 / self.recall - 1.0) if self.precision > 0 and self.recall > 0 else 0.0

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


class ScoreHistogram:
    """Counts of positive and negative pixels per uint8 score, accumulated over images."""

    def __init__(self, bins: int = 256) -> None:
        self.pos = np.zeros(bins, np.int64)
        self.neg = np.zeros(bins, np.int64)

    def add(self, scores: np.ndarray, positive: np.ndarray) -> None:
        """Count uint8 `scores`; a pixel is positive where `positive` (same shape, any dtype) is nonzero."""
        scores, positive = scores.reshape(-1), positive.reshape(-1)
        n = len(self.pos)
        for i in range(0, scores.size, CHUNK):
            s, p = scores[i : i + CHUNK], positive[i : i + CHUNK].astype(bool)
            self.pos += np.bincount(s[p], minlength=n)[:n]
            self.neg += np.bincount(s[~p], minlength=n)[:n]

    def _cumulative(self) -> tuple[np.ndarray, np.ndarray]:
        """True and false positives when predicting positive at score >= each distinct threshold, high to low."""
        keep = (self.pos + self.neg)[::-1] > 0
        return np.cumsum(self.pos[::-1])[keep], np.cumsum(self.neg[::-1])[keep]

    def average_precision(self) -> float:
        """Step-wise AP (sum over thresholds of recall gain x precision), as sklearn.metrics.average_precision_score."""
        total = int(self.pos.sum())
        if total == 0:
            return float("nan")
        tp, fp = self._cumulative()
        precision = tp / np.maximum(tp + fp, 1)
        recall = tp / total
        return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))

    def auroc(self) -> float:
        """Area under the ROC curve with ties handled as sklearn.metrics.roc_auc_score (trapezoids)."""
        if self.pos.sum() == 0 or self.neg.sum() == 0:
            return float("nan")
        tp, fp = self._cumulative()
        tpr = np.concatenate([[0.0], tp / self.pos.sum()])
        fpr = np.concatenate([[0.0], fp / self.neg.sum()])
        return float(np.trapezoid(tpr, fpr))

    def curve(self) -> dict[str, np.ndarray]:
        """Operating points for "defect where score >= level", one per level 0..255 (levels are uint8 scores)."""
        tp = np.cumsum(self.pos[::-1])[::-1].astype(np.float64)
        fp = np.cumsum(self.neg[::-1])[::-1].astype(np.float64)
        pos, neg = float(self.pos.sum()), float(self.neg.sum())
        fn = pos - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(tp + fp > 0, tp / (tp + fp), 1.0)
            recall = tp / pos if pos else np.full_like(tp, np.nan)
            f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
            fpr = fp / neg if neg else np.full_like(fp, np.nan)
        return {"level": np.arange(len(tp)), "precision": precision, "recall": recall, "f1": f1, "fpr": fpr}

    def best_f1(self) -> tuple[float, float]:
        """(best F1 over thresholds, its threshold in [0, 1]); NaN without positives."""
        if self.pos.sum() == 0:
            return float("nan"), float("nan")
        f1 = self.curve()["f1"]
        level = int(np.nanargmax(f1))
        return float(f1[level]), level / 255

    def choose_threshold(self, rule: str, target: float | None = None) -> ThresholdChoice:
        """The decision threshold "defect where score >= threshold" by `rule`: 'best_f1'; 'precision' (the lowest
        threshold, i.e. the most recall, whose precision reaches `target`); 'recall' (the highest threshold whose
        recall reaches `target`). A target no level reaches falls back to best F1, saying so in `note`."""
        if rule not in POOLED_THRESHOLD_RULES:
            raise ValueError(f"a pooled threshold rule is one of {', '.join(POOLED_THRESHOLD_RULES)}, got {rule!r} "
                             f"(stable_f1 needs per-image histograms: metrics.choose_threshold)")
        if self.pos.sum() == 0:
            raise ValueError("no defect pixels: a threshold cannot be chosen")
        c = self.curve()
        note = ""
        level = int(np.nanargmax(c["f1"]))
        if rule in ("precision", "recall"):
            if target is None or not 0.0 < target <= 1.0:
                raise ValueError(f"a {rule} target in (0, 1] is needed, got {target!r}")
            seen = (self.pos + self.neg)[::-1].cumsum()[::-1] > 0  # levels with at least one pixel at or above
            ok = np.flatnonzero((c[rule] >= target - 1e-12) & seen)
            if ok.size:
                level = int(ok[0] if rule == "precision" else ok[-1])
            else:
                note = f"no threshold reaches {rule} {target}; best F1 instead"
        return self.choice_at(rule, target, level, round(level / 255, 6), note)

    def to_dict(self) -> dict[str, list[int]]:
        return {"pos": self.pos.tolist(), "neg": self.neg.tolist()}

    def choice_at(self, rule: str, target: float | None, level: int, threshold: float, note: str = "",
                  **extra: float) -> ThresholdChoice:
        """The operating point of the threshold `threshold` (uint8 level `level`) as a `ThresholdChoice`."""
        c = self.curve()
        return ThresholdChoice(rule=rule, target=target, threshold=threshold, precision=float(c["precision"][level]),
                               recall=float(c["recall"][level]), f1=float(c["f1"][level]),
                               positives=int(self.pos.sum()), negatives=int(self.neg.sum()), note=note, **extra)

    @classmethod
    def from_dict(cls, d: dict) -> "ScoreHistogram":
        h = cls(len(d["pos"]))
        h.pos[:], h.neg[:] = d["pos"], d["neg"]
        return h

    def merge(self, other: "ScoreHistogram") -> None:
        self.pos += other.pos
        self.neg += other.neg


STABLE_F1_TOLERANCE = 0.25  # standard errors; chosen on non-test images, see scripts/threshold_rules.py


def choose_threshold(images: Sequence[ScoreHistogram], rule: str = "stable_f1", target: float | None = None, *,
                     default: float = 0.5, tolerance: float = STABLE_F1_TOLERANCE, resamples: int = 1000,
                     seed: int = 0) -> ThresholdChoice:
    """The decision threshold by `rule`, from per-image "any" histograms (see `ScoreHistogram.choose_threshold`
    for the pooled rules best_f1 / precision / recall).

    'stable_f1' is best F1 made robust to few images, in the spirit of the one-standard-error rule (Breiman et
    al., CART, 1984): among the thresholds whose F1 is within `tolerance` standard errors of the best, the one
    nearest `default` (the threshold the model was trained towards). The error of F1(best) - F1(t) is
    bootstrapped over images, the unit that varies between validation sets. On a few images of a well-calibrated
    model the F1 curve is flat and its argmax lands anywhere (0.98 from 3 images was measured); a badly
    calibrated model's gap is real and the rule follows it. With fewer than two images holding defects the error
    cannot be estimated and `default` is kept, saying so (best F1 from one image cost three models 0.05-0.09
    IoU on held-out images and gained two others 0.02-0.05 with a 10th percentile of 0.07). The tolerance 0.25
    had the smallest mean and worst regret among 0 (best F1), 0.25, 0.5 and 1 over five BSData models and 2 to
    20 calibration images, measured on images outside their test split (scripts/threshold_rules.py)."""
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"threshold rule must be one of {', '.join(THRESHOLD_RULES)}, got {rule!r}")
    pooled = ScoreHistogram(len(images[0].pos) if images else 256)
    for h in images:
        pooled.merge(h)
    if rule != "stable_f1":
        return pooled.choose_threshold(rule, target)
    best = pooled.choose_threshold("best_f1")
    best_level = int(round(best.threshold * 255))
    default_level = int(round(min(max(default, 0.0), 1.0) * 255))
    defective = sum(1 for h in images if h.pos.any())
    if defective < 2:
        return pooled.choice_at(rule, None, default_level, default, best_f1_threshold=best.threshold,
                                note=f"{defective} image(s) with defects: too few to estimate the error of a "
                                     f"threshold, {default} kept (best F1 {best.f1:.3f} at {best.threshold:.3f})")
    # per image, true and false positives for "defect where score >= level", every level
    tp = np.stack([np.cumsum(h.pos[::-1])[::-1] for h in images]).astype(np.float64)  # (n, levels)
    fp = np.stack([np.cumsum(h.neg[::-1])[::-1] for h in images]).astype(np.float64)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(len(images), np.full(len(images), 1 / len(images)), size=resamples).astype(np.float64)
    tp_b, fp_b, pos_b = weights @ tp, weights @ fp, weights @ tp[:, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        f1_b = 2 * tp_b / (tp_b + fp_b + pos_b[:, None])  # 2TP / (2TP + FP + FN), FN = positives - TP
    f1_b = f1_b[pos_b > 0]  # a resample without defect pixels has no F1
    f1 = pooled.curve()["f1"]
    n = len(images)  # the bootstrap variance of a mean over n images is (n - 1) / n of the unbiased one
    gap_se = np.nanstd(f1_b[:, [best_level]] - f1_b, axis=0, ddof=1) * np.sqrt(n / (n - 1))
    near = np.flatnonzero(f1[best_level] - f1 <= tolerance * gap_se + 1e-12)  # includes best_level (gap 0)
    level = int(near[np.argmin(np.abs(near - default_level) + 1e-3 * np.abs(near - best_level))])
    threshold = default if level == default_level else round(level / 255, 6)
    note = "" if level == best_level else (
        f"best F1 {best.f1:.3f} at {best.threshold:.3f}; {threshold:.3f} is within {tolerance:g} standard "
        f"error(s) ({gap_se[level]:.3f}) of it on {len(images)} images, nearer {default}")
    return pooled.choice_at(rule, None, level, threshold, note, best_f1_threshold=best.threshold,
                            f1_standard_error=round(float(gap_se[level]), 6))


def validation_scores(images: Sequence[ScoreHistogram]) -> dict:
    """Per-image "any" histograms as a checkpoint keeps them (JSON), for `choose_threshold` after training."""
    return {"per_image": {"pos": [h.pos.tolist() for h in images], "neg": [h.neg.tolist() for h in images]}}


def read_validation_scores(d: dict) -> tuple[list[ScoreHistogram], bool]:
    """(histograms, pooled only?) from `validation_scores`; checkpoints made before per-image scores hold one
    pooled histogram ({"pos", "neg"}), which only the pooled rules can use."""
    if "per_image" not in d:
        return [ScoreHistogram.from_dict(d)], True
    per = d["per_image"]
    return [ScoreHistogram.from_dict({"pos": p, "neg": n}) for p, n in zip(per["pos"], per["neg"])], False


@dataclass
class ImageRegions:
    """Region statistics of one image (defect vs background, every defect class counts as "defect")."""

    gt_regions: int
    found: int
    pred_regions: int
    false_positive_regions: int
    overlap_curve: np.ndarray  # (256,) sum over ground-truth regions of the fraction of the region scoring >= level


def region_stats(gt: np.ndarray, pred: np.ndarray, score: np.ndarray | None, *, criterion: str = "coverage",
                 threshold: float = 0.5, class_id: int | None = None) -> ImageRegions:
    """Match 8-connected ground-truth regions with the predicted mask (see `RegionMatcher`), for whole arrays.

    `gt` and `pred` are masks whose nonzero pixels count (with `class_id`: the pixels equal to it); `score` is the
    (H, W) uint8 defect score for the PRO overlap curve (None: all zeros). Temporaries stay the size of a strip.
    """
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
    select = (lambda m: m != 0) if class_id is None else (lambda m: m == class_id)  # noqa: E731
    matcher = RegionMatcher(criterion, threshold)
    for y0 in range(0, gt.shape[0], STRIP_ROWS):
        g = select(gt[y0 : y0 + STRIP_ROWS])
        matcher.add(g, select(pred[y0 : y0 + STRIP_ROWS]), None if score is None else score[y0 : y0 + STRIP_ROWS][g])
    return matcher.finish()


class RegionMatcher:
    """Ground-truth regions matched with predicted regions, fed as row strips top to bottom.

    A ground-truth region is found when `criterion` reaches `threshold`: "coverage" = share of its pixels
    predicted as defect; "iou" = IoU between the region and the union of the predicted regions touching it. A
    predicted region is a false positive when it touches no ground-truth pixel. The overlap curve is what PRO
    (per-region overlap, MVTec AD) needs: for each score level, the covered share of each region. Regions crossing
    strips are joined (`StripComponents`), so the result is that of labelling the whole image at once.
    """

    def __init__(self, criterion: str = "coverage", threshold: float = 0.5) -> None:
        if criterion not in ("coverage", "iou"):
            raise ValueError(f"region criterion must be 'coverage' or 'iou', got {criterion!r}")
        self.criterion, self.threshold = criterion, threshold
        self.gt_cc, self.pred_cc = StripComponents(), StripComponents()
        self.gt_area: list[np.ndarray] = []
        self.inter: list[np.ndarray] = []
        self.levels: list[np.ndarray] = []
        self.pred_area: list[np.ndarray] = []
        self.pairs: list[np.ndarray] = []
        self.scored = True

    def add(self, gt: np.ndarray, pred: np.ndarray, gt_scores: np.ndarray | None) -> None:
        """The next strip: (rows, W) bool truth and prediction, and the uint8 defect scores at the truth's pixels
        in raster order (`score[gt]`; None when there is no score, for counts only)."""
        gs, ps = self.gt_cc.add(gt), self.pred_cc.add(pred)
        if ps.labels is not None:
            self.pred_area.append(ps.stats[1:, cv2.CC_STAT_AREA])
        if gs.labels is None:
            return
        self.gt_area.append(gs.stats[1:, cv2.CC_STAT_AREA])
        both = gt & pred
        g_both = gs.labels[both]
        self.inter.append(np.bincount(g_both, minlength=gs.n)[1:])
        if gt_scores is None:
            self.scored = False
        else:
            cells = gs.labels[gt].astype(np.int64) * 256 + gt_scores
            self.levels.append(np.bincount(cells, minlength=gs.n * 256).reshape(gs.n, 256)[1:])
        if g_both.size:
            self.pairs.append(np.unique(np.stack([g_both + gs.offset, ps.labels[both] + ps.offset], 1), axis=0))

    def finish(self) -> ImageRegions:
        n_gt, gt_of = self.gt_cc.finish()
        n_pred, pred_of = self.pred_cc.finish()
        per_gt = lambda parts: np.bincount(gt_of, weights=np.concatenate(parts), minlength=n_gt) if parts else np.zeros(0)  # noqa: E731
        gt_area, inter = per_gt(self.gt_area), per_gt(self.inter)
        pred_area = np.bincount(pred_of, weights=np.concatenate(self.pred_area), minlength=n_pred) if self.pred_area else np.zeros(0)
        touched = np.zeros(n_pred, bool)
        pair_gt = pair_pred = np.zeros(0, np.int64)
        if self.pairs:
            linked = np.concatenate(self.pairs) - 1
            joined = np.unique(np.stack([gt_of[linked[:, 0]], pred_of[linked[:, 1]]], 1), axis=0)
            pair_gt, pair_pred = joined[:, 0], joined[:, 1]
            touched[pair_pred] = True
        if self.criterion == "coverage":
            value = inter / np.maximum(gt_area, 1)
        else:
            touching_area = np.bincount(pair_gt, weights=pred_area[pair_pred], minlength=n_gt)
            value = inter / np.maximum(gt_area + touching_area - inter, 1)
        overlap = np.zeros(256)
        if n_gt and self.scored:
            per_region = np.zeros((n_gt, 256), np.int64)
            np.add.at(per_region, gt_of, np.concatenate(self.levels))
            covered = np.cumsum(per_region[:, ::-1], axis=1)[:, ::-1] / gt_area[:, None]
            overlap = covered.sum(0)
        return ImageRegions(gt_regions=n_gt, found=int(np.sum(value >= self.threshold - 1e-12)), pred_regions=n_pred,
                            false_positive_regions=int(n_pred - touched.sum()), overlap_curve=overlap)


def pro_curve(overlap_sum: np.ndarray, regions: int, negatives: ScoreHistogram) -> tuple[np.ndarray, np.ndarray]:
    """(pixel FPR, mean per-region overlap) from the strictest score level to the loosest, starting at (0, 0)
    above the highest score. `overlap_sum` is the sum of `ImageRegions.overlap_curve` over images, `regions` the
    number of ground-truth regions, `negatives` the histogram whose negative counts give the FPR per level."""
    fpr = negatives.curve()["fpr"]
    pro = overlap_sum / regions
    return np.concatenate([[0.0], fpr[::-1]]), np.concatenate([[0.0], pro[::-1]])


def pro_auc(overlap_sum: np.ndarray, regions: int, negatives: ScoreHistogram, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve for FPR in [0, fpr_limit] (MVTec AD's PRO score)."""
    if regions == 0 or negatives.neg.sum() == 0:
        return float("nan")
    x, y = pro_curve(overlap_sum, regions, negatives)
    keep = x <= fpr_limit
    xs, ys = x[keep], y[keep]
    if xs[-1] < fpr_limit and keep.sum() < len(x):  # close the area at the limit by linear interpolation
        j = int(keep.sum())
        t = (fpr_limit - x[j - 1]) / (x[j] - x[j - 1])
        xs = np.append(xs, fpr_limit)
        ys = np.append(ys, y[j - 1] + t * (y[j] - y[j - 1]))
    return float(np.trapezoid(ys, xs) / fpr_limit)
