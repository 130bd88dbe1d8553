"""Dataset layouts, rasterisation, splits and `data check` (tiny fixtures written by the tests, plus BSData)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from matplotlib.path import Path as MplPath

from defectscan.data import check_dataset, label_budget, labeled_subset, load_dataset, split_dataset
from defectscan.data.annotations import Shape, decode_rle, encode_rle, rasterize
from defectscan.errors import DefectscanError
from defectscan.io.images import write_image

from _helpers import bsdata_like, load_script, run_cli  # noqa: E402 - tests/ is on sys.path under pytest

BSDATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "bsdata"


def _image(h: int = 40, w: int = 48, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def _edge_distance(points, centres: np.ndarray) -> np.ndarray:
    p = np.asarray(points, float)
    d = np.full(len(centres), np.inf)
    for a, b in zip(p, np.roll(p, -1, axis=0)):
        ab = b - a
        t = np.clip(((centres - a) @ ab) / (ab @ ab), 0, 1)
        d = np.minimum(d, np.linalg.norm(centres - (a + t[:, None] * ab), axis=1))
    return d


# --- rasterisation -------------------------------------------------------------------------------------------

def test_rectangle_with_integer_corners_covers_exactly_its_pixels():
    m = rasterize([Shape("d", "polygon", [(2, 3), (10, 3), (10, 8), (2, 8)])], (12, 14), {"d": 1})
    expected = np.zeros((12, 14), np.uint8)
    expected[3:9, 2:11] = 1  # centres on the outline count as inside
    np.testing.assert_array_equal(m, expected)


def test_fractional_rectangle_is_not_rounded_outwards():
    m = rasterize([Shape("d", "rectangle", [(2.4, 3.6), (9.5, 8.2)])], (12, 14), {"d": 1})
    expected = np.zeros((12, 14), np.uint8)
    expected[4:9, 3:10] = 1  # centres x = 3..9, y = 4..8 lie inside
    np.testing.assert_array_equal(m, expected)


@pytest.mark.parametrize("points", [
    [(3.3, 2.7), (40.6, 10.2), (12.2, 35.9)],
    [(5, 5), (30, 5), (30, 30), (18, 12), (5, 30)],  # concave, integer vertices
    [(-5, -3), (20, 10), (3, 50)],  # partly outside the image
])
def test_polygon_matches_pixel_centre_rule(points):
    m = rasterize([Shape("d", "polygon", points)], (40, 48), {"d": 1}).astype(bool)
    yy, xx = np.mgrid[:40, :48]
    centres = np.stack([xx.ravel(), yy.ravel()], 1).astype(float)
    inside = MplPath(points).contains_points(centres).reshape(40, 48)
    dist = _edge_distance(points, centres).reshape(40, 48)
    clear = dist > 1e-6
    np.testing.assert_array_equal(m[clear], inside[clear])
    assert m[~clear].all(), "centres exactly on the outline belong to the polygon"


def test_coco_polygons_use_pixel_corner_coordinates():
    # COCO: pixel x spans [x, x+1); a square from 2 to 5 covers pixels 2, 3, 4
    m = rasterize([Shape("d", "polygon", [(2, 2), (5, 2), (5, 5), (2, 5)], corner_origin=True)], (8, 8), {"d": 1})
    assert m.sum() == 9 and m[2:5, 2:5].all()


def _compress_counts(counts: list[int]) -> str:
    """Independent implementation of pycocotools' rleToString, to test our decoder."""
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def test_rle_roundtrip_and_compressed_strings():
    rng = np.random.default_rng(1)
    mask = np.zeros((37, 23), bool)
    mask[5:20, 3:9] = True
    mask[rng.random(mask.shape) > 0.93] = True
    rle = encode_rle(mask)
    np.testing.assert_array_equal(decode_rle(rle), mask)
    compressed = {"size": rle["size"], "counts": _compress_counts(rle["counts"])}
    np.testing.assert_array_equal(decode_rle(compressed), mask)
    with pytest.raises(ValueError):
        decode_rle({"size": [5, 5], "counts": [3, 4]})


# --- formats ---------------------------------------------------------------------------------------------------

def test_folder_binary_masks(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(3):
        write_image(tmp_path / "images" / f"a{i}.png", _image(seed=i))
        m = np.zeros((40, 48), np.uint8)
        m[10:15, 10 + i : 20] = 255
        cv2.imwrite(str(tmp_path / "masks" / f"a{i}_mask.png"), m)
    write_image(tmp_path / "images" / "nolabel.png", _image(seed=9))
    ds = load_dataset(tmp_path)
    assert ds.format == "folder" and ds.classes == ("background", "defect") and ds.binary_masks
    assert len(ds.labeled) == 3 and [s.stem for s in ds.unlabeled] == ["nolabel"]
    mask = ds.load_mask(ds.labeled[0])
    assert set(np.unique(mask)) == {0, 1} and mask.sum() == 50
    assert not ds.problems


def test_folder_class_index_with_classes_file(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    write_image(tmp_path / "images" / "x.png", _image())
    m = np.zeros((40, 48), np.uint8)
    m[1:4, 1:4], m[20:30, 20:22] = 1, 2
    cv2.imwrite(str(tmp_path / "masks" / "x.png"), m)
    (tmp_path / "classes.json").write_text(json.dumps({"classes": ["background", "dent", "scratch"]}))
    ds = load_dataset(tmp_path)
    assert ds.classes == ("background", "dent", "scratch") and not ds.binary_masks
    np.testing.assert_array_equal(ds.load_mask(ds.samples[0]), m)
    # without the classes file, names are derived from the values
    (tmp_path / "classes.json").unlink()
    assert load_dataset(tmp_path).classes == ("background", "class_1", "class_2")


def _labelme(path: Path, image_name: str, shapes: list[dict], size=(40, 48)) -> None:
    path.write_text(json.dumps({"version": "5.0", "shapes": shapes, "imagePath": image_name, "imageData": None,
                                "imageHeight": size[0], "imageWidth": size[1]}))


def test_labelme_polygons_rectangles_and_unlabeled_images(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "ann").mkdir()
    for name in ("a", "b", "c"):
        write_image(tmp_path / "images" / f"{name}.jpg", _image())
    _labelme(tmp_path / "ann" / "a.json", "../images/a.jpg", [
        {"label": "pit", "points": [[2, 3], [10, 3], [10, 8], [2, 8]], "shape_type": "polygon"},
        {"label": "scratch", "points": [[20, 20], [30, 25]], "shape_type": "rectangle"},
        {"label": "pit", "points": [[1, 1], [2, 2]], "shape_type": "polygon"},  # degenerate: skipped, warned
    ])
    _labelme(tmp_path / "ann" / "b.json", "b.jpg", [])  # imagePath not next to the JSON: found by stem
    ds = load_dataset(tmp_path)
    assert ds.format == "labelme" and ds.classes == ("background", "pit", "scratch")
    by = {s.stem: s for s in ds.samples}
    assert by["a"].labeled and by["b"].labeled and not by["c"].labeled
    assert by["a"].has_defect and not by["b"].has_defect
    m = ds.load_mask(by["a"])
    assert (m == 1).sum() == 54 and (m == 2).sum() == 11 * 6
    assert [p.fatal for p in ds.problems] == [False] and "needs 3" in ds.problems[0].message
    # a label outside the given classes is a fatal problem
    ds = load_dataset(tmp_path, classes=["pit"])
    assert any(p.fatal and "unknown label" in p.message and "scratch" in p.message for p in ds.problems)


def test_coco_polygons_rle_and_unlisted_images(tmp_path):
    (tmp_path / "images").mkdir()
    for name in ("p", "q", "r"):
        write_image(tmp_path / "images" / f"{name}.png", _image())
    blob = np.zeros((40, 48), bool)
    blob[30:35, 40:46] = True
    coco = {
        "images": [{"id": 1, "file_name": "p.png", "height": 40, "width": 48},
                   {"id": 2, "file_name": "q.png", "height": 40, "width": 48}],
        "categories": [{"id": 7, "name": "crack"}, {"id": 9, "name": "stain"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "segmentation": [[2, 2, 5, 2, 5, 5, 2, 5]], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 9, "segmentation": encode_rle(blob), "iscrowd": 1},
        ],
    }
    (tmp_path / "instances_train.json").write_text(json.dumps(coco))
    ds = load_dataset(tmp_path)
    assert ds.format == "coco" and ds.classes == ("background", "crack", "stain")
    by = {s.stem: s for s in ds.samples}
    assert by["p"].split == "train" and by["q"].labeled and not by["q"].has_defect and not by["r"].labeled
    m = ds.load_mask(by["p"])
    assert (m == 1).sum() == 9 and m[2:5, 2:5].all() and (m == 2).sum() == blob.sum()


def test_mvtec_layout(tmp_path):
    root = tmp_path / "bottle"
    for d in ("train/good", "test/good", "test/broken", "ground_truth/broken"):
        (root / d).mkdir(parents=True)
    write_image(root / "train/good/000.png", _image())
    write_image(root / "test/good/000.png", _image(seed=1))
    write_image(root / "test/broken/000.png", _image(seed=2))
    gt = np.zeros((40, 48), np.uint8)
    gt[5:9, 5:9] = 255
    cv2.imwrite(str(root / "ground_truth/broken/000_mask.png"), gt)
    ds = load_dataset(root)
    assert ds.format == "mvtec" and ds.classes == ("background", "defect")
    assert [(s.split, s.label) for s in ds.samples] == [("train", "good"), ("test", "mask"), ("test", "good")]
    assert ds.load_mask(ds.samples[0]).sum() == 0 and ds.load_mask(ds.samples[1]).sum() == 16
    with pytest.raises(DefectscanError, match="one of them"):
        load_dataset(tmp_path)  # the MVTec root, not a category


# --- splits ----------------------------------------------------------------------------------------------------

def _vector_dataset(tmp_path, n: int, defect_every: int = 2):
    (tmp_path / "images").mkdir()
    for i in range(n):
        write_image(tmp_path / "images" / f"im{i:03d}.png", _image(8, 8, seed=i))
        shapes = [{"label": "d", "points": [[1, 1], [5, 1], [5, 5]], "shape_type": "polygon"}] if i % defect_every == 0 else []
        _labelme(tmp_path / "images" / f"im{i:03d}.json", f"im{i:03d}.png", shapes, size=(8, 8))
    return load_dataset(tmp_path)


def test_seeded_split_is_deterministic_disjoint_and_stratified(tmp_path):
    ds = _vector_dataset(tmp_path, 40)
    a, b = split_dataset(ds, 0.15, 0.2, seed=3), split_dataset(ds, 0.15, 0.2, seed=3)
    assert [s.stem for s in a.test] == [s.stem for s in b.test] and a.source == "seeded"
    stems = [{s.stem for s in part} for part in (a.train, a.val, a.test)]
    assert not (stems[0] & stems[1]) and not (stems[0] & stems[2]) and not (stems[1] & stems[2])
    assert sum(map(len, stems)) == 40 and len(a.test) == 8 and len(a.val) == 6
    assert sum(s.has_defect for s in a.test) == 4  # half the images have defects; so has the test split
    assert [s.stem for s in split_dataset(ds, 0.15, 0.2, seed=4).test] != [s.stem for s in a.test]


def test_labeled_subsets_are_nested(tmp_path):
    ds = _vector_dataset(tmp_path, 30, defect_every=3)
    train = split_dataset(ds, 0.1, 0.2).train
    prev: set = set()
    for n in (1, 2, 5, 10, len(train)):
        cur = {s.stem for s in labeled_subset(train, n, seed=1)}
        assert len(cur) == n and prev <= cur
        prev = cur
    five = labeled_subset(train, 5, seed=1)
    assert any(s.has_defect for s in five) and not all(s.has_defect for s in five)
    assert {s.stem for s in labeled_subset(train, fraction=0.5, seed=1)} >= {s.stem for s in five}
    with pytest.raises(DefectscanError, match="has"):
        labeled_subset(train, len(train) + 1)


def test_label_budget_includes_validation(tmp_path):
    ds = _vector_dataset(tmp_path, 30, defect_every=3)
    splits = split_dataset(ds, 0.15, 0.2)
    same, train = label_budget(splits)
    assert same is splits and [s.stem for s in train] == [s.stem for s in splits.train]  # no budget: unchanged
    budget, train = label_budget(splits, 20, val_fraction=0.15, subset_seed=1)
    used = {s.stem for s in train} | {s.stem for s in budget.val}
    assert len(train) == 17 and len(budget.val) == 3 and len(used) == 20  # 20 labels in all, 3 of them validate
    pool = {s.stem for s in splits.train} | {s.stem for s in splits.val}
    assert used == {s.stem for s in labeled_subset(sorted(splits.train + splits.val, key=lambda s: s.stem), 20,
                                                   seed=1)} and used <= pool
    assert [s.stem for s in budget.test] == [s.stem for s in splits.test]
    assert {s.stem for s in budget.train} == pool - {s.stem for s in budget.val}  # the unused rest stays 'train'
    small, train = label_budget(splits, 3, val_fraction=0.15)
    assert len(train) == 3 and small.val == []  # 0.45 validation images round to none: all 3 train
    _, train = label_budget(splits, 1, val_fraction=0.9)
    assert len(train) == 1  # never the last training image


def test_dataset_own_split_wins(tmp_path):
    ds_dir = tmp_path
    (ds_dir / "split.json").write_text(json.dumps({"train": [f"im{i:03d}.png" for i in range(10)],
                                                   "test": [f"im{i:03d}" for i in range(10, 14)]}))
    ds = _vector_dataset(ds_dir, 14)
    sp = split_dataset(ds, 0.2, 0.5)
    assert sp.source == "dataset" and [s.stem for s in sp.test] == [f"im{i:03d}" for i in range(10, 14)]
    assert len(sp.val) == 2 and len(sp.train) == 8


# --- problems and `data check` -----------------------------------------------------------------------------------

def test_check_reports_every_problem(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    write_image(tmp_path / "images" / "ok.png", _image())
    cv2.imwrite(str(tmp_path / "masks" / "ok.png"), np.zeros((40, 48), np.uint8))
    write_image(tmp_path / "images" / "small.png", _image())
    cv2.imwrite(str(tmp_path / "masks" / "small.png"), np.zeros((20, 48), np.uint8))  # wrong size
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    cv2.imwrite(str(tmp_path / "masks" / "broken.png"), np.zeros((40, 48), np.uint8))
    write_image(tmp_path / "images" / "ok.jpg", _image())  # duplicate stem
    cv2.imwrite(str(tmp_path / "masks" / "orphan.png"), np.zeros((4, 4), np.uint8))
    report = check_dataset(load_dataset(tmp_path))
    text = "\n".join(map(str, report.problems))
    assert "duplicate image stem 'ok'" in text
    assert "mask is 48x20, image is 48x40" in text
    assert "broken.png" in text and "cannot decode" in text
    assert "warning" in text and "orphan" in text
    assert report.fatal and report.images == 3 and report.labeled == 3


def test_unknown_format_and_empty_dataset_are_clear_errors(tmp_path):
    with pytest.raises(DefectscanError, match="cannot tell the dataset format"):
        load_dataset(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DefectscanError, match="no images found"):
        load_dataset(tmp_path)
    with pytest.raises(DefectscanError, match="no such dataset"):
        load_dataset(tmp_path / "missing")


@pytest.mark.skipif(not BSDATA.is_dir(), reason="../shared/datasets/bsdata is not available on this machine")
def test_bsdata_loads_with_its_own_split():
    ds = load_dataset(BSDATA)
    assert ds.format == "labelme" and ds.classes == ("background", "Pitting")
    assert len(ds.samples) == 1104 and len(ds.labeled) == 394 and not ds.fatal_problems
    assert sum(s.split == "train" for s in ds.labeled) == 324 and sum(s.split == "test" for s in ds.labeled) == 70
    sp = split_dataset(ds, val_fraction=0.0)
    assert len(sp.train) == 324 and len(sp.test) == 70 and not sp.val
    assert not ({s.stem for s in sp.train} & {s.stem for s in sp.test})
    sample = next(s for s in sp.test if s.shapes)
    mask = ds.load_mask(sample)
    image = cv2.imread(str(sample.image))
    assert mask.shape == image.shape[:2]
    # the mask is exactly the union of the polygons by the pixel-centre rule
    yy, xx = np.mgrid[: mask.shape[0], : mask.shape[1]]
    for shape in sample.shapes:
        pts = np.asarray(shape.points)
        x0, y0 = np.floor(pts.min(0)).astype(int)
        x1, y1 = np.ceil(pts.max(0)).astype(int) + 1
        centres = np.stack([xx[y0:y1, x0:x1].ravel(), yy[y0:y1, x0:x1].ravel()], 1).astype(float)
        inside = MplPath(pts).contains_points(centres).reshape(y1 - y0, x1 - x0)
        clear = (_edge_distance(pts, centres) > 1e-6).reshape(inside.shape)
        assert (mask[y0:y1, x0:x1][clear & inside] == 1).all()
    assert mask.sum() > 0


# --- malformed dataset files: `data check` names each one, `train` refuses them -----------------------------------

def _labelme_with(root: Path, **fields) -> Path:
    write_image(root / "a.png", _image())
    data = {"imagePath": "a.png", "imageHeight": 40, "imageWidth": 48,
            "shapes": [{"label": "scratch", "points": [[2, 2], [20, 2], [20, 20]], "shape_type": "polygon"}]}
    (root / "a.json").write_text(json.dumps({**data, **fields}))
    return root / "a.json"


def _coco(root: Path, segmentation=None, categories=None) -> Path:
    write_image(root / "images" / "a.png", _image())
    data = {"images": [{"id": 1, "file_name": "a.png", "height": 40, "width": 48}],
            "categories": categories or [{"id": 1, "name": "scratch"}],
            "annotations": [{"id": 7, "image_id": 1, "category_id": 1,
                             "segmentation": segmentation or [[2, 2, 20, 2, 20, 20]]}]}
    (root / "ann.json").write_text(json.dumps(data))
    return root / "ann.json"


def _folder(root: Path, mask_values=(0, 255), classes_json=None, classes_txt=None) -> Path:
    write_image(root / "images" / "a.png", _image())
    mask = np.zeros((40, 48), np.uint8)
    for i, v in enumerate(mask_values):
        mask[i * 4:(i + 1) * 4, :8] = v
    (root / "masks").mkdir(parents=True)
    cv2.imwrite(str(root / "masks" / "a.png"), mask)
    if classes_json is not None:
        (root / "classes.json").write_text(classes_json)
        return root / "classes.json"
    if classes_txt is not None:
        (root / "classes.txt").write_text(classes_txt)
        return root / "classes.txt"
    return root / "masks" / "a.png"


BAD_DATASETS = {
    "labelme-points-strings": (lambda r: _labelme_with(r, shapes=[{"label": "s", "points": [["1", "2"], [3, 4], [5, 6]]}]),
                               "shape 0 ('s'): points"),
    "labelme-shapes-string": (lambda r: _labelme_with(r, shapes="scratch here"), "'shapes' is a str"),
    "labelme-height-abc": (lambda r: _labelme_with(r, imageHeight="abc"), 'declared image size 48 x "abc"'),
    "coco-category-without-name": (lambda r: _coco(r, categories=[{"id": 1}]), "category 0 ({\"id\": 1}) needs"),
    "coco-segmentation-string": (lambda r: _coco(r, segmentation="2 2 20 2"), "annotation 7: segmentation"),
    "coco-rle-short-runs": (lambda r: _coco(r, segmentation={"size": [40, 48], "counts": [10, 5]}),
                            "annotation 7: RLE runs cover 15 pixels, the 48x40 image has 1920"),
    "coco-rle-other-size": (lambda r: _coco(r, segmentation={"size": [80, 48], "counts": [3840]}),
                            "annotation 7: RLE is for a 48x80 image, not 48x40"),
    "coco-list-id": (lambda r: _coco(r, categories=[{"id": [1], "name": "scratch"}]), "category 0 ({\"id\": [1]"),
    "folder-classes-json-empty": (lambda r: _folder(r, classes_json="{}"), "expected a list of class names"),
    "folder-stray-mask-value": (lambda r: _folder(r, mask_values=(0, 255, 7)), "unexpected mask value(s) 7"),
    "folder-classes-json-malformed": (lambda r: _folder(r, classes_json='{"klasses": 2}'),
                                      "expected a list of class names, {\"classes\": [names]}"),  # brackets survive rich
    "folder-classes-json-not-json": (lambda r: _folder(r, classes_json='["scratch",'), "unreadable JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATASETS))
def test_malformed_dataset_files_are_named_by_check_and_refused_by_train(monkeypatch, capsys, tmp_path, case):
    make, message = BAD_DATASETS[case]
    root = tmp_path / "data"
    root.mkdir()
    bad_file = make(root)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    code, out, err = run_cli(monkeypatch, capsys, "data", "check", root)
    assert code == 1 and "Traceback" not in out + err
    shown = str(bad_file.relative_to(root)) if bad_file.name != "classes.json" else bad_file.name
    assert message in out + err and shown in out + err, out + err
    code, _, err = run_cli(monkeypatch, capsys, "train", "--data", root, "--out", tmp_path / "run",
                           "--set", "model.encoder=resnet18")
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert str(bad_file) in lines[0], lines
    assert not (tmp_path / "run").exists()  # refused before a run folder exists
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # the dataset is left as it was


def test_classes_txt_with_index_name_lines(tmp_path):
    _folder(tmp_path, mask_values=(0, 1, 2), classes_txt="0 background\n1 scratch\n2 crack\n")
    assert load_dataset(tmp_path).classes == ("background", "scratch", "crack")
    (tmp_path / "classes.txt").write_text("1: scratch\n2: crack\n")
    assert load_dataset(tmp_path).classes == ("background", "scratch", "crack")
    (tmp_path / "classes.txt").write_text("1 scratch\n3 crack\n")
    with pytest.raises(DefectscanError, match="without gaps"):
        load_dataset(tmp_path)
    (tmp_path / "classes.txt").write_text("scratch\ncrack\n")  # plain names keep working
    assert load_dataset(tmp_path).classes == ("background", "scratch", "crack")


def test_check_fails_without_labeled_images(monkeypatch, capsys, tmp_path):
    for i in range(2):
        write_image(tmp_path / f"img{i}.png", _image(seed=i))
    (tmp_path / "a.json").write_text(json.dumps({"imagePath": "elsewhere.png", "shapes": []}))
    code, out, err = run_cli(monkeypatch, capsys, "data", "check", tmp_path, "--format", "labelme")
    assert code == 1 and "no labeled images" in out + err


def test_annotation_paths_never_leave_the_dataset(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    write_image(tmp_path / "secret.png", _image(seed=5))  # outside the dataset, reachable by ../
    write_image(root / "a.png", _image())
    shapes = [{"label": "pit", "points": [[2, 2], [20, 2], [20, 20]], "shape_type": "polygon"}]
    for name, image_path in (("a", "C:\\Users\\me\\labels\\a.png"), ("b", "../secret.png")):
        (root / f"{name}.json").write_text(json.dumps({"imagePath": image_path, "shapes": shapes}))
    ds = load_dataset(root)
    problems = {Path(p.path).name: p for p in ds.problems}
    # an absolute path from another machine: the dataset's image of that name, with a warning
    assert not problems["a.json"].fatal and "leaves the dataset folder; using a.png" in problems["a.json"].message
    # ../secret.png exists, but outside: not used, and an error
    assert problems["b.json"].fatal and "'../secret.png' leaves the dataset folder" in problems["b.json"].message
    assert all(s.image.resolve().is_relative_to(root.resolve()) for s in ds.samples)
    coco = tmp_path / "coco"
    write_image(coco / "images" / "x.png", _image())
    (coco / "ann.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": str(tmp_path / "secret.png")}, {"id": 2, "file_name": "x.png"}],
        "categories": [{"id": 1, "name": "pit"}], "annotations": []}))
    ds = load_dataset(coco)
    assert [s.image.name for s in ds.labeled] == ["x.png"]
    assert any(p.fatal and "leaves the dataset folder" in p.message and "image id 1" in p.path for p in ds.problems)


def test_symlinked_images_and_dotted_annotation_names(tmp_path):
    store, root = tmp_path / "store", tmp_path / "data"
    root.mkdir()
    write_image(store / "big.png", _image())
    (root / "big.png").symlink_to(store / "big.png")  # large datasets are often linked in from storage
    write_image(root / "img.png", _image(seed=1))
    write_image(root / "img.v2.png", _image(seed=2))
    shapes = [{"label": "pit", "points": [[2, 2], [20, 2], [20, 20]], "shape_type": "polygon"}]
    (root / "big.json").write_text(json.dumps({"imagePath": "big.png", "shapes": shapes}))
    (root / "img.v2.json").write_text(json.dumps({"shapes": shapes}))  # no imagePath: the JSON's own name
    ds = load_dataset(root)
    assert not ds.problems
    assert sorted(s.stem for s in ds.labeled) == ["big", "img.v2"]


def test_search_copies_hold_exactly_a_label_budget_and_its_held_out_images(tmp_path):
    """scripts/search_recipes_parallel.py prepare: a copy that a lent machine trains on without `--labeled` must
    reproduce the budget `train --labeled N` draws (train and val images), hold the first held-out images as
    `test`, draw the same masks without LabelMe's embedded imageData, and never contain the dataset's test split."""
    import argparse

    script = load_script("search_recipes_parallel")
    src = bsdata_like(tmp_path / "bsdata", 28, lambda i: "test" if i >= 24 else "train")
    script.prepare(argparse.Namespace(data=src, out=tmp_path / "copies", seeds=[0, 1], labeled=10,
                                      val_fraction=0.15, held_out=5))
    ds = load_dataset(src)
    for seed in (0, 1):
        splits, train = label_budget(split_dataset(ds, 0.15), 10, subset_seed=seed, val_fraction=0.15)
        copy = load_dataset(tmp_path / "copies" / f"s{seed}")
        got = split_dataset(copy, 0.15)  # what `train` with data.labeled=null uses on the copy
        assert [s.stem for s in got.train] == [s.stem for s in train] and len(train) == 8
        assert [s.stem for s in got.val] == [s.stem for s in splits.val] and len(got.val) == 2
        used = {s.stem for s in train + splits.val}
        held_out = [s.stem for s in ds.labeled if s.split == "train" and s.stem not in used][:5]
        assert [s.stem for s in got.test] == sorted(held_out) and len(held_out) == 5
        original = {s.stem: s for s in ds.labeled}
        for s in copy.labeled:
            assert original[s.stem].split == "train"  # the dataset's test images never travel
            assert np.array_equal(copy.load_mask(s), ds.load_mask(original[s.stem]))
            assert json.loads(s.annotation.read_text())["imageData"] is None
    assert {s.stem for s in load_dataset(tmp_path / "copies" / "s0").labeled} != \
        {s.stem for s in load_dataset(tmp_path / "copies" / "s1").labeled}  # each seed draws its own budget
