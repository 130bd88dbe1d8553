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


def test_iou_dice_from_confusion():
    target = np.array([[0, 1, 1], [2, 2, 0]])
    pred = np.array([[0, 1, 0], [2, 1, 0]])
    iou, dice = iou_dice(confusion_matrix(pred, target, 3))
    np.testing.assert_allclose(iou, [2 / 3, 1 / 3, 1 / 2])
    np.testing.assert_allclose(dice, [4 / 5, 2 / 4, 2 / 3])
