"""Streaming metrics agree with scikit-learn on the same (uint8) scores."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from defectscan.metrics import ScoreHistogram, confusion_matrix, iou_dice


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_histogram_ap_and_auroc_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(5000) < 0.05
    scores = np.clip(rng.normal(80 + 90 * labels, 40), 0, 255).astype(np.uint8)  # many ties, as in uint8 maps
    hist = ScoreHistogram()
    for part in np.array_split(np.arange(5000), 7):  # accumulated over several "images"
        hist.add(scores[part], labels[part])
    assert hist.average_precision() == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert hist.auroc() == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_histogram_without_positives_is_nan():
    hist = ScoreHistogram()
    hist.add(np.array([3, 4], np.uint8), np.array([False, False]))
    assert np.isnan(hist.average_precision()) and np.isnan(hist.auroc())


def test_threshold_choice_by_rule_against_brute_force():
    rng = np.random.default_rng(3)
    positive = rng.random(20_000) < 0.1
    scores = np.clip(rng.normal(np.where(positive, 170, 80), 45), 0, 255).astype(np.uint8)
    h = ScoreHistogram()
    h.add(scores, positive)

    def at(level):  # precision, recall, F1 of "defect where score >= level", counted directly
        pred = scores >= level
        tp, fp, fn = int((pred & positive).sum()), int((pred & ~positive).sum()), int((~pred & positive).sum())
        return (tp / (tp + fp) if tp + fp else 1.0), tp / (tp + fn), 2 * tp / (2 * tp + fp + fn)

    table = {level: at(level) for level in range(256)}
    best = max(range(256), key=lambda lv: (table[lv][2], -lv))
    c = h.choose_threshold("best_f1")
    assert c.threshold == round(best / 255, 6) and c.f1 == pytest.approx(table[best][2])
    seen = [lv for lv in range(256) if (scores >= lv).any()]
    c = h.choose_threshold("precision", 0.8)  # the loosest threshold reaching the precision: the most recall
    want = min(lv for lv in seen if table[lv][0] >= 0.8)
    assert c.threshold == round(want / 255, 6) and c.precision >= 0.8 and c.recall == pytest.approx(table[want][1])
    c = h.choose_threshold("recall", 0.9)  # the strictest threshold keeping the recall
    want = max(lv for lv in range(256) if table[lv][1] >= 0.9)
    assert c.threshold == round(want / 255, 6) and c.recall >= 0.9 and not c.note
    confident_miss = ScoreHistogram.from_dict(h.to_dict())
    confident_miss.add(np.array([255], np.uint8), np.array([False]))  # a background pixel scored 255
    c = confident_miss.choose_threshold("precision", 1.0)  # no threshold is free of false positives: best F1, said so
    assert c.threshold == confident_miss.choose_threshold("best_f1").threshold and "best F1 instead" in c.note
    with pytest.raises(ValueError, match="target"):
        h.choose_threshold("recall")
    with pytest.raises(ValueError, match="no defect pixels"):
        ScoreHistogram().choose_threshold("best_f1")
    assert ScoreHistogram.from_dict(h.to_dict()).choose_threshold("best_f1") == h.choose_threshold("best_f1")


def test_iou_dice_from_confusion():
    target = np.array([[0, 1, 1], [2, 2, 0]])
    pred = np.array([[0, 1, 0], [2, 1, 0]])
    iou, dice = iou_dice(confusion_matrix(pred, target, 3))
    np.testing.assert_allclose(iou, [2 / 3, 1 / 3, 1 / 2])
    np.testing.assert_allclose(dice, [4 / 5, 2 / 4, 2 / 3])


def _whole_image_region_stats(gt, pred, score, criterion, threshold):
    """The reference: both masks labelled whole at once (the implementation before strips)."""
    import cv2

    n_gt, gl = cv2.connectedComponents(gt.view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    n_pred, pl = cv2.connectedComponents(pred.view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    gt_area = np.bincount(gl.ravel(), minlength=n_gt)[1:].astype(float)
    pred_area = np.bincount(pl.ravel(), minlength=n_pred)[1:].astype(float)
    both = gt & pred
    inter = np.bincount(gl[both], minlength=n_gt)[1:].astype(float)
    pairs = np.unique(gl[both].astype(np.int64) * n_pred + pl[both])
    touched = np.zeros(n_pred, bool)
    touched[pairs % n_pred] = True
    if criterion == "coverage":
        value = inter / np.maximum(gt_area, 1)
    else:
        touching = np.bincount(pairs // n_pred, weights=pred_area[pairs % n_pred - 1], minlength=n_gt)[1:]
        value = inter / np.maximum(gt_area + touching - inter, 1)
    counts = np.bincount(gl[gt].astype(np.int64) * 256 + score[gt], minlength=n_gt * 256).reshape(n_gt, 256)[1:]
    overlap = (np.cumsum(counts[:, ::-1], axis=1)[:, ::-1] / gt_area[:, None]).sum(0)
    return n_gt - 1, int(np.sum(value >= threshold - 1e-12)), n_pred - 1, int(n_pred - 1 - touched[1:].sum()), overlap


@pytest.mark.parametrize("criterion", ["coverage", "iou"])
@pytest.mark.parametrize("strip_rows", [1, 7, 512])
def test_strip_region_stats_equal_whole_image_labelling(monkeypatch, criterion, strip_rows):
    import cv2

    from defectscan import metrics

    monkeypatch.setattr(metrics, "STRIP_ROWS", strip_rows)
    rng = np.random.default_rng(strip_rows)
    # blobs and thin diagonal lines: regions that cross strip borders, join below them (U shapes) and touch diagonally
    gt = cv2.GaussianBlur(rng.random((120, 150)), (0, 0), 3) > 0.52
    gt[np.arange(100), np.arange(100)] = True
    pred = cv2.GaussianBlur(rng.random((120, 150)), (0, 0), 3) > 0.51
    pred[5:110, 70] = True
    score = rng.integers(0, 256, gt.shape, dtype=np.uint8)
    level = 0.3 if criterion == "coverage" else 0.05
    got = metrics.region_stats(gt.view(np.uint8) * 3, pred, score, criterion=criterion, threshold=level)
    n_gt, found, n_pred, fp, overlap = _whole_image_region_stats(gt, pred, score, criterion, level)
    assert (got.gt_regions, got.found, got.pred_regions, got.false_positive_regions) == (n_gt, found, n_pred, fp)
    assert n_gt > 5 and n_pred > 5 and 0 < found < n_gt and fp > 0  # the case is not degenerate
    np.testing.assert_allclose(got.overlap_curve, overlap, rtol=1e-12)
    per_class = metrics.region_stats(gt.view(np.uint8) * 3, pred.view(np.uint8) * 3, None, class_id=3)
    assert (per_class.gt_regions, per_class.pred_regions) == (n_gt, n_pred)
    assert metrics.region_stats(gt.view(np.uint8) * 3, pred, None, class_id=2).gt_regions == 0


def test_chunked_pixel_counts_equal_one_pass(monkeypatch):
    from defectscan import metrics

    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, (50, 70), dtype=np.uint8)
    pred = rng.integers(0, 4, (50, 70), dtype=np.uint8)
    scores = rng.integers(0, 256, (50, 70), dtype=np.uint8)
    whole, hist = confusion_matrix(pred, target, 4), ScoreHistogram()
    hist.add(scores, target)
    monkeypatch.setattr(metrics, "CHUNK", 333)
    chunked = ScoreHistogram()
    chunked.add(scores, target)
    assert np.array_equal(confusion_matrix(pred, target, 4), whole) and whole.sum() == target.size
    assert np.array_equal(chunked.pos, hist.pos) and np.array_equal(chunked.neg, hist.neg)
    assert hist.pos.sum() == np.count_nonzero(target)
