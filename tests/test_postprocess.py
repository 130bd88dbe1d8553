"""Masks from probabilities and the defect region table."""

from __future__ import annotations

import numpy as np

from defectscan.postprocess import class_mask, find_regions


def test_sigmoid_mask_thresholds_score():
    probs = np.array([[[0, 127, 128, 255]]], np.uint8)
    mask, score = class_mask(probs, "sigmoid", 0.5)
    assert mask.tolist() == [[0, 0, 1, 1]]
    assert (score == probs[0]).all()


def test_softmax_mask_uses_total_defect_probability_and_best_defect_class():
    # background 0.4, two defect classes 0.35 / 0.25: defect score 0.6 -> class 1 although no class beats bg
    probs = np.zeros((3, 1, 2), np.uint8)
    probs[:, 0, 0] = (102, 89, 64)
    probs[:, 0, 1] = (200, 30, 25)
    mask, score = class_mask(probs, "softmax", 0.5)
    assert mask.tolist() == [[1, 0]]
    assert score.tolist() == [[153, 55]]


def test_regions_have_correct_stats_and_small_ones_are_removed():
    mask = np.zeros((20, 30), np.uint8)
    score = np.zeros((20, 30), np.uint8)
    mask[2:5, 3:9] = 1  # 18 px
    score[2:5, 3:9] = 200
    score[3, 4] = 250
    mask[10:12, 20:21] = 2  # 2 px, below min_area
    mask[15:18, 25:27] = 2  # 6 px
    score[15:18, 25:27] = 100
    regions = find_regions(mask, score, {1: "scratch", 2: "particle"}, min_area=4)
    assert [(r.class_name, r.x, r.y, r.width, r.height, r.area_px) for r in regions] == [
        ("scratch", 3, 2, 6, 3, 18), ("particle", 25, 15, 2, 3, 6)]
    r = regions[0]
    assert r.score_max == round(250 / 255, 4)
    assert abs(r.score_mean - (17 * 200 + 250) / 18 / 255) < 1e-4
    assert (r.centroid_x, r.centroid_y) == (5.5, 3.0)
    assert [r.id for r in regions] == [1, 2]
    assert mask[10:12, 20].sum() == 0  # dropped from the mask too, so mask and table agree
