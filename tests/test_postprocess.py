"""Masks from probabilities and the defect region table."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from defectscan.inference.postprocess import ClassMap, StripSegmenter, defect_score, segment

SOFTMAX = ClassMap("softmax", ("background", "scratch", "particle"))
BINARY = ClassMap("sigmoid", ("defect",))


def test_defect_score_per_head():
    probs = np.array([[[0, 127, 128, 255]]], np.uint8)
    assert (defect_score(probs, "sigmoid") == probs[0]).all()
    two = np.stack([probs[0], 255 - probs[0]])
    assert (defect_score(two, "sigmoid") == np.maximum(probs[0], 255 - probs[0])).all()
    # softmax: 1 - p(background) counts weak votes for several defect classes together
    soft = np.zeros((3, 1, 2), np.uint8)
    soft[:, 0, 0] = (102, 89, 64)
    soft[:, 0, 1] = (200, 30, 25)
    assert defect_score(soft, "softmax").tolist() == [[153, 55]]


def test_sigmoid_binary_threshold():
    probs = np.array([[[0, 127, 128, 255, 255]]], np.uint8)
    mask, regions, _ = segment(probs, BINARY, 0.5)
    assert mask.tolist() == [[0, 0, 1, 1, 1]]
    assert [(r.x, r.width, r.area_px) for r in regions] == [(2, 3, 3)]


def softmax_probs(h, w):
    p = np.zeros((3, h, w), np.uint8)
    p[0] = 255
    return p


def test_region_takes_class_with_most_probability_mass():
    probs = softmax_probs(10, 20)
    # one thin line whose pixels alternate between the two defect classes, scratch slightly stronger overall
    for x in range(2, 18):
        a, b = (150, 80) if x % 2 == 0 else (70, 140)
        probs[:, 5, x] = (255 - a - b, a, b)
    mask, regions = segment(probs, SOFTMAX, 0.5)[:2]
    assert len(regions) == 1 and regions[0].class_name == "scratch"
    assert (mask[5, 2:18] == 1).all() and mask.sum() == 16


def test_regions_have_correct_stats_and_small_ones_are_removed():
    probs = softmax_probs(20, 30)

    def put(ys, xs, cls, score):
        probs[0][ys, xs] = 255 - score
        probs[cls][ys, xs] = score

    put(slice(2, 5), slice(3, 9), 1, 200)  # 18 px scratch
    put(3, 4, 1, 250)
    put(slice(10, 12), slice(20, 21), 2, 220)  # 2 px particle: below min_area
    put(slice(15, 18), slice(25, 27), 2, 130)  # 6 px particle
    mask, regions = segment(probs, SOFTMAX, 0.5, min_area=4)[:2]
    assert [(r.class_name, r.x, r.y, r.width, r.height, r.area_px) for r in regions] == [
        ("scratch", 3, 2, 6, 3, 18), ("particle", 25, 15, 2, 3, 6)]
    r = regions[0]
    assert r.score_max == round(250 / 255, 4)
    assert abs(r.score_mean - (17 * 200 + 250) / 18 / 255) < 1e-4
    assert (r.centroid_x, r.centroid_y) == (5.5, 3.0)
    assert [r.id for r in regions] == [1, 2]
    assert mask[10:12, 20].sum() == 0  # dropped from the mask too, so mask and table agree
    assert (mask[15:18, 25:27] == 2).all() and np.count_nonzero(mask) == 24


def test_no_defects():
    mask, regions = segment(softmax_probs(8, 8), SOFTMAX, 0.5)[:2]
    assert regions == [] and not mask.any()


def test_class_map_is_the_one_channel_rule():
    assert SOFTMAX.defect_channels == [1, 2] and SOFTMAX.defect_names == {1: "scratch", 2: "particle"}
    assert [SOFTMAX.class_id(c) for c in (1, 2)] == [1, 2] and SOFTMAX.channel(2) == 2
    multi = ClassMap("sigmoid", ("scratch", "particle"))
    assert multi.defect_channels == [0, 1] and multi.defect_names == {1: "scratch", 2: "particle"}
    assert multi.channel(1) == 0 and multi.class_id(1) == 2
    # a new model for dataset classes (background first): one defect class -> sigmoid without background
    assert ClassMap.for_classes(("background", "pit")) == ClassMap("sigmoid", ("pit",))
    assert ClassMap.for_classes(("background", "a", "b")) == ClassMap("softmax", ("background", "a", "b"))
    assert ClassMap.for_classes(("background", "a", "b"), "sigmoid") == ClassMap("sigmoid", ("a", "b"))


def _whole_image_reference(probs, classes, threshold, min_area):
    """The mask rule written naively: one labelling of the whole image, one loop per region."""
    score = defect_score(probs, classes.head)
    binary = (score >= round(threshold * 255)).astype(np.uint8)
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(binary, connectivity=8, ltype=cv2.CV_32S)
    mask, rows = np.zeros(score.shape, np.uint8), []
    for lab in range(1, n):
        inside = labels == lab
        if inside.sum() < min_area:
            continue
        votes = [probs[c][inside].sum() for c in classes.defect_channels]
        cid = classes.class_id(classes.defect_channels[int(np.argmax(votes))])
        mask[inside] = cid
        x, y, w, h, area = stats[lab]
        rows.append((y, x, cid, w, h, area, round(centroids[lab, 0], 2), round(centroids[lab, 1], 2),
                     round(score[inside].max() / 255, 4), score[inside].mean() / 255))
    return mask, sorted(rows, key=lambda r: r[:2])


@pytest.mark.parametrize("strip_rows", [1, 3, 17, 1000])
def test_strip_segmentation_equals_whole_image_labelling(strip_rows):
    """Regions that cross strip borders (U shapes joined only below, diagonal touches) come out as one region with
    the same box, area, centroid, score and class as labelling the whole image at once; so does the mask."""
    rng = np.random.default_rng(strip_rows)
    field = cv2.GaussianBlur(rng.standard_normal((90, 120, 2)).astype(np.float32), (0, 0), 2.0)
    evidence = 1 / (1 + np.exp(-(3 * field / field.std() - 3)))  # blobs of two classes, touching here and there
    probs = np.zeros((3, 90, 120), np.uint8)
    probs[1:] = (evidence.transpose(2, 0, 1) * 127).round()
    probs[0] = 255 - probs[1] - probs[2]
    seg = StripSegmenter(SOFTMAX, 0.45, min_area=3)
    for y0 in range(0, 90, strip_rows):
        seg.add(probs[:, y0 : y0 + strip_rows])
    regions = seg.finish()
    mask = np.concatenate([m for _, m in seg.mask_rows()])
    ref_mask, ref = _whole_image_reference(probs, SOFTMAX, 0.45, 3)
    assert len(ref) > 5 and (mask == ref_mask).all()
    got = [(r.y, r.x, r.class_id, r.width, r.height, r.area_px, r.centroid_x, r.centroid_y, r.score_max)
           for r in regions]
    assert got == [r[:9] for r in ref]
    assert np.allclose([r.score_mean for r in regions], [r[9] for r in ref], atol=6e-5)
    assert [r.id for r in regions] == list(range(1, len(regions) + 1))
    assert (segment(probs, SOFTMAX, 0.45, min_area=3)[0] == ref_mask).all()


@pytest.mark.parametrize("n", [0, 1, 3])
def test_region_tables_are_written_region_by_region_as_whole_file_dumps_would_be(tmp_path, n):
    import json

    from defectscan.inference.writers import write_region_tables
    from defectscan.io.files import csv_text
    from defectscan.schemas import REGION_FIELDS, Region

    regions = [Region(i + 1, 1, "scratch", i, 2 * i, 3, 4, 12, i + 0.5, 2.25, 0.9, 0.75) for i in range(n)]
    head = {"image": "a.png", "classes": {"1": "scratch"}, "tile": [512, 512], "regions": n}
    write_region_tables(tmp_path / "d.json", tmp_path / "d.csv", head, regions)
    rows = [r.to_dict() for r in regions]
    assert (tmp_path / "d.json").read_text() == json.dumps({**head, "defects": rows}, indent=2) + "\n"
    assert (tmp_path / "d.csv").read_text() == csv_text(rows, fieldnames=list(REGION_FIELDS))
