"""Streaming metrics agree with scikit-learn on the same (uint8) scores."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from defectscan.metrics import (ScoreHistogram, choose_threshold, confusion_matrix, iou_dice, read_validation_scores,
                                validation_scores)


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


def _image_histograms(n: int, seed: int, *, defect_mean: float, background_mean: float, spread: float = 40.0,
                      defective: int | None = None) -> list[ScoreHistogram]:
    """Per-image histograms of n images of 60 x 60 pixels, 5 % defect pixels in the first `defective` of them."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        positive = (rng.random((60, 60)) < 0.05) & (i < (n if defective is None else defective))
        scores = np.clip(rng.normal(np.where(positive, defect_mean, background_mean), spread), 0, 255)
        h = ScoreHistogram()
        h.add(scores.astype(np.uint8), positive)
        out.append(h)
    return out


def test_stable_f1_follows_the_evidence_and_keeps_the_default_without_it():
    # many images of a model whose scores sit high (background up to ~0.6): the evidence for a high threshold is
    # clear, so the one-standard-error rule ends close to the best-F1 threshold, not at 0.5
    many = _image_histograms(40, 0, defect_mean=230, background_mean=120)
    best = choose_threshold(many, "best_f1")
    stable = choose_threshold(many, "stable_f1")
    assert best.threshold > 0.6 and abs(stable.threshold - best.threshold) < 0.05 and stable.f1 > 0.95 * best.f1
    assert stable.best_f1_threshold == best.threshold and stable.f1_standard_error is not None
    # three images whose defects all score 200-255 and background 0-60: F1 is 1 at every level in between, best F1
    # takes the lowest of them, stable_f1 the trained 0.5
    rng = np.random.default_rng(1)
    flat = []
    for _ in range(3):
        positive = rng.random((60, 60)) < 0.05
        h = ScoreHistogram()
        h.add(np.where(positive, rng.integers(200, 256, positive.shape), rng.integers(0, 61, positive.shape))
              .astype(np.uint8), positive)
        flat.append(h)
    assert choose_threshold(flat, "best_f1").threshold == round(61 / 255, 6)
    stable = choose_threshold(flat, "stable_f1")
    assert stable.threshold == 0.5 and stable.f1 == 1.0 and "standard error" in stable.note
    # images that disagree (background near 0.25, 0.6, 0.4): the best threshold's gain is uncertain, so the more
    # standard errors are tolerated, the nearer the trained threshold; no tolerance is best F1
    disagree = [_image_histograms(1, seed, defect_mean=d, background_mean=b, spread=20)[0]
                for seed, d, b in [(5, 150, 60), (6, 235, 150), (7, 190, 100)]]
    best = choose_threshold(disagree, "best_f1")
    chosen = [choose_threshold(disagree, "stable_f1", tolerance=t) for t in (0.0, 0.25, 1.0, 4.0)]
    assert chosen[0].threshold == best.threshold and chosen[-1].threshold == 0.5
    distance = [abs(c.threshold - 0.5) for c in chosen]
    assert distance == sorted(distance, reverse=True) and all(c.f1 <= best.f1 for c in chosen)
    assert choose_threshold(disagree, "stable_f1") == chosen[1]  # seeded bootstrap: a resumed run chooses the same
    # one image with defects (beside clean ones) cannot estimate an error: the default is kept, saying so
    one = _image_histograms(4, 2, defect_mean=230, background_mean=120, defective=1)
    kept = choose_threshold(one, "stable_f1", default=0.4)
    assert kept.threshold == 0.4 and "too few" in kept.note and kept.best_f1_threshold > 0.6
    # the pooled rules are the pooled histogram's
    pooled = ScoreHistogram()
    for h in many:
        pooled.merge(h)
    assert choose_threshold(many, "recall", 0.9) == pooled.choose_threshold("recall", 0.9)
    with pytest.raises(ValueError, match="stable_f1 needs per-image"):
        pooled.choose_threshold("stable_f1")
    # a choice's IoU is the pooled pixel IoU at its threshold
    stable = choose_threshold(many, "stable_f1")
    level = int(round(stable.threshold * 255))
    tp, fn, fp = pooled.pos[level:].sum(), pooled.pos[:level].sum(), pooled.neg[level:].sum()
    assert stable.iou == pytest.approx(tp / (tp + fp + fn), abs=1e-5)


def test_validation_scores_round_trip_and_old_pooled_format():
    images = _image_histograms(3, 4, defect_mean=200, background_mean=60)
    back, pooled_only = read_validation_scores(json.loads(json.dumps(validation_scores(images))))
    assert not pooled_only and [h.to_dict() for h in back] == [h.to_dict() for h in images]
    old, pooled_only = read_validation_scores(images[0].to_dict())  # checkpoints made before per-image scores
    assert pooled_only and len(old) == 1 and old[0].to_dict() == images[0].to_dict()
