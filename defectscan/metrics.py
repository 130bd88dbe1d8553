"""Pixel metrics accumulated as a confusion matrix, so they stream over images of any size."""

from __future__ import annotations

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
    """Counts of positive and negative pixels per uint8 score (probability x 255), accumulated over images.

    The engine's probability maps are uint8, so 256 bins hold them exactly: average precision and AUROC from
    these counts equal scikit-learn's on the same uint8 scores, at constant memory for any number of pixels.
    """

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

    def merge(self, other: "ScoreHistogram") -> None:
        self.pos += other.pos
        self.neg += other.neg
