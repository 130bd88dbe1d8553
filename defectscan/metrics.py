"""Metrics that stream over images of any size: confusion matrices, uint8 score histograms, region statistics.

The engine's probability maps are uint8 (probability x 255), so a 256-bin histogram holds every score exactly:
curves and areas computed from the counts equal scikit-learn's on the same uint8 scores, at constant memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts, rows = ground truth, columns = prediction."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {pred.shape} and target {target.shape} differ in shape")
    idx = target.astype(np.int64).ravel() * num_classes + pred.astype(np.int64).ravel()
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_dice(conf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class IoU and Dice from a confusion matrix; NaN for classes absent from both target and prediction."""
    tp = np.diag(conf).astype(np.float64)
    fp = conf.sum(0) - tp
    fn = conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (tp + fp + fn)
        dice = 2 * tp / (2 * tp + fp + fn)
    return iou, dice


class ScoreHistogram:
    """Counts of positive and negative pixels per uint8 score, accumulated over images."""

    def __init__(self, bins: int = 256) -> None:
        self.pos = np.zeros(bins, np.int64)
        self.neg = np.zeros(bins, np.int64)

    def add(self, scores: np.ndarray, positive: np.ndarray) -> None:
        s = scores.ravel().astype(np.intp)
        p = positive.ravel().astype(bool)
        n = len(self.pos)
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

    def merge(self, other: "ScoreHistogram") -> None:
        self.pos += other.pos
        self.neg += other.neg


@dataclass
class ImageRegions:
    """Region statistics of one image (defect vs background, every defect class counts as "defect")."""

    gt_regions: int
    found: int
    pred_regions: int
    false_positive_regions: int
    overlap_curve: np.ndarray  # (256,) sum over ground-truth regions of the fraction of the region scoring >= level


def region_stats(gt: np.ndarray, pred: np.ndarray, score: np.ndarray | None, *, criterion: str = "coverage",
                 threshold: float = 0.5) -> ImageRegions:
    """Match 8-connected ground-truth regions with the predicted mask.

    A ground-truth region is found when `criterion` reaches `threshold`: "coverage" = share of its pixels
    predicted as defect; "iou" = IoU between the region and the union of the predicted regions touching it.
    A predicted region is a false positive when it touches no ground-truth defect pixel. The overlap curve is
    what PRO (per-region overlap, MVTec AD) needs: for each score level, the covered share of each region;
    without a `score` it is all zeros (counts only).
    """
    if criterion not in ("coverage", "iou"):
        raise ValueError(f"region criterion must be 'coverage' or 'iou', got {criterion!r}")
    gt = gt.astype(bool)
    pred = pred.astype(bool)
    n_gt, gt_labels = cv2.connectedComponents(gt.view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    n_pred, pred_labels = cv2.connectedComponents(pred.view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    gt_area = np.bincount(gt_labels.ravel(), minlength=n_gt)[1:].astype(np.float64)
    pred_area = np.bincount(pred_labels.ravel(), minlength=n_pred)[1:].astype(np.float64)
    both = gt & pred
    inter = np.bincount(gt_labels[both], minlength=n_gt)[1:].astype(np.float64)
    pairs = np.unique(gt_labels[both].astype(np.int64) * n_pred + pred_labels[both])
    pair_gt, pair_pred = pairs // n_pred, pairs % n_pred
    touched = np.zeros(n_pred, bool)
    touched[pair_pred] = True
    if criterion == "coverage":
        value = inter / np.maximum(gt_area, 1)
    else:
        touching_area = np.bincount(pair_gt, weights=pred_area[pair_pred - 1], minlength=n_gt)[1:]
        value = inter / np.maximum(gt_area + touching_area - inter, 1)
    if n_gt > 1 and score is not None:
        counts = np.bincount(gt_labels[gt].astype(np.int64) * 256 + score[gt], minlength=n_gt * 256)
        per_region = counts.reshape(n_gt, 256)[1:]
        covered = np.cumsum(per_region[:, ::-1], axis=1)[:, ::-1] / gt_area[:, None]
        overlap = covered.sum(0)
    else:
        overlap = np.zeros(256)
    return ImageRegions(gt_regions=n_gt - 1, found=int(np.sum(value >= threshold - 1e-12)), pred_regions=n_pred - 1,
                        false_positive_regions=int(n_pred - 1 - touched[1:].sum()), overlap_curve=overlap)


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
