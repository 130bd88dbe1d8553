"""`evaluate`, `compare` and `benchmark`: metrics against scikit-learn and brute force, reports, resumable studies."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score, precision_recall_curve, roc_auc_score
from torch import nn

from _helpers import bsdata_like, folder_dataset, load_script, run_cli  # tests/ is on sys.path under pytest
from defectscan.studies import aggregate, bootstrap_ci, load_study, run_study
from defectscan.studies.records import comparable_config
from defectscan.studies.report import separations
from defectscan.training import RunDir
from defectscan.training.config import Config
from defectscan.evaluation.calibrate import calibrate_threshold
from defectscan.evaluation.compare import compare
from defectscan.data import load_dataset
from defectscan.data.dataset import Sample
from defectscan.errors import DefectscanError
from defectscan.evaluation import evaluate, run_evaluation
from defectscan.evaluation.outputs import limit_samples, select_samples, summary_rows
from defectscan.inference import Predictor, TorchTiles
from defectscan.io.images import write_image
from defectscan.metrics import ScoreHistogram, choose_threshold, pro_auc, region_stats
from defectscan.models import ModelSpec, build_model, load_checkpoint, save_checkpoint
from defectscan.schemas import EvalOptions, EvalSummary, InferOptions
from defectscan.tiling import tiled_inference

TINY_UNET = {"decoder_channels": [32, 16, 16, 8, 8]}


# --- metric functions -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_best_f1_and_curve_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(5000) < 0.1
    s = np.clip(rng.normal(90 + 70 * y, 40), 0, 255).astype(np.uint8)
    h = ScoreHistogram()
    h.add(s[:2000], y[:2000])
    h.add(s[2000:], y[2000:])
    p, r, t = precision_recall_curve(y, s)
    f1 = np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0)[:-1]
    best, thr = h.best_f1()
    assert best == pytest.approx(f1.max(), abs=1e-12)
    assert round(thr * 255) == t[np.argmax(f1)]
    c = h.curve()
    level = int(t[len(t) // 2])
    pred = s >= level
    assert c["precision"][level] == pytest.approx((pred & y).sum() / pred.sum())
    assert c["recall"][level] == pytest.approx((pred & y).sum() / y.sum())
    assert c["fpr"][level] == pytest.approx((pred & ~y).sum() / (~y).sum())


def test_region_stats_by_hand():
    gt = np.zeros((40, 60), bool)
    gt[2:12, 2:12] = True  # region A, 100 px
    gt[20:30, 30:40] = True  # region B, 100 px
    pred = np.zeros_like(gt)
    pred[2:8, 2:12] = True  # covers 60 px of A, nothing outside
    pred[20:22, 30:40] = True  # covers 20 px of B...
    pred[20:22, 40:50] = True  # ...as part of a region that extends 20 px outside it
    pred[35:38, 5:8] = True  # a false positive
    score = np.where(gt, 200, 10).astype(np.uint8)
    cov = region_stats(gt, pred, score, criterion="coverage", threshold=0.5)
    assert (cov.gt_regions, cov.found, cov.pred_regions, cov.false_positive_regions) == (2, 1, 3, 1)
    assert region_stats(gt, pred, score, criterion="coverage", threshold=0.2).found == 2
    # IoU of B with its touching prediction: 20 / (100 + 40 - 20); of A: 60 / 100
    assert region_stats(gt, pred, score, criterion="iou", threshold=0.6).found == 1
    assert region_stats(gt, pred, score, criterion="iou", threshold=20 / 120).found == 2
    assert region_stats(gt, pred, score, criterion="iou", threshold=20 / 120 + 1e-3).found == 1
    # every region scores 200: fully covered for levels <= 200, not at all above
    assert cov.overlap_curve[200] == 2 and cov.overlap_curve[201] == 0
    empty = region_stats(np.zeros_like(gt), pred, score)
    assert (empty.gt_regions, empty.false_positive_regions) == (0, 3)


def _pro_brute_force(gts, scores, limit):
    """PRO as MVTec AD defines it, by looping over every threshold: reference for the streaming version."""
    regions = []
    for gt in gts:
        n, lab = cv2.connectedComponents(gt.astype(np.uint8), connectivity=8)
        regions += [(len(regions), lab, k, i) for k, i in zip(range(1, n), [len(regions)] * (n - 1))]
    points = [(0.0, 0.0)]
    for t in range(255, -1, -1):
        fp = sum(((s >= t) & ~g).sum() for s, g in zip(scores, gts))
        neg = sum((~g).sum() for g in gts)
        overlaps = []
        for img, (gt, s) in enumerate(zip(gts, scores)):
            n, lab = cv2.connectedComponents(gt.astype(np.uint8), connectivity=8)
            overlaps += [((s >= t) & (lab == k)).sum() / (lab == k).sum() for k in range(1, n)]
        points.append((fp / neg, float(np.mean(overlaps))))
    x, y = map(np.array, zip(*points))
    keep = x <= limit
    xs, ys = list(x[keep]), list(y[keep])
    j = keep.sum()
    if j < len(x) and xs[-1] < limit:
        xs.append(limit)
        ys.append(y[j - 1] + (limit - x[j - 1]) / (x[j] - x[j - 1]) * (y[j] - y[j - 1]))
    return float(np.trapezoid(ys, xs) / limit)


@pytest.mark.parametrize("limit", [0.3, 0.05])
def test_pro_equals_brute_force(limit):
    rng = np.random.default_rng(4)
    gts, scores = [], []
    hist = ScoreHistogram()
    overlap = np.zeros(256)
    regions = 0
    for _ in range(3):
        gt = np.zeros((48, 48), bool)
        for _ in range(3):
            y, x = rng.integers(2, 40, 2)
            gt[y:y + rng.integers(2, 8), x:x + rng.integers(2, 8)] = True
        s = np.clip(rng.normal(80 + 80 * gt, 50), 0, 255).astype(np.uint8)
        rs = region_stats(gt, s >= 128, s)
        overlap += rs.overlap_curve
        regions += rs.gt_regions
        hist.add(s, gt)
        gts.append(gt)
        scores.append(s)
    assert pro_auc(overlap, regions, hist, limit) == pytest.approx(_pro_brute_force(gts, scores, limit), abs=1e-9)


def test_bootstrap_interval():
    mean, lo, hi = bootstrap_ci([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6) and 0.5 <= lo < mean < hi <= 0.7
    assert bootstrap_ci([0.4]) == (0.4, 0.4, 0.4)
    assert bootstrap_ci([0.5, 0.6, 0.7]) == (mean, lo, hi)  # deterministic
    rows = [{"backbone": "a", "family": "cnn", "labeled_setting": 5, "labeled": 5, "train_seconds": 1.0, "m": v}
            for v in (0.1, 0.3)]
    (agg,) = aggregate(rows, ["m"])
    assert agg["m"] == pytest.approx(0.2) and agg["seeds"] == 2 and agg["m_ci"][0] <= 0.2 <= agg["m_ci"][1]


def test_times_of_a_study_on_several_machines_average_one_machine_only():
    """Accuracy pools every seed; times and speeds pool one machine's cells (a GPU's two minutes averaged with a
    CPU's hour describe neither), and every machine's times are listed on their own."""
    from defectscan.studies.report import machine_markdown, machine_times

    def row(backbone, seed, machine, seconds, mps, iou):
        return {"backbone": backbone, "family": "cnn", "labeled_setting": 20, "labeled": 20, "seed": seed,
                "hardware": machine, "train_seconds": seconds, "eval_seconds": seconds / 10, "mp_per_s": mps,
                "defect_iou": iou}

    rows = [row("a", 0, "cpu", 3000.0, 0.2, 0.4), row("a", 1, "gpu", 100.0, 9.0, 0.5),
            row("a", 2, "gpu", 120.0, 11.0, 0.6), row("b", 0, "cpu", 2000.0, 0.3, 0.3)]
    a, b = aggregate(rows, ["defect_iou", "mp_per_s"], machine="gpu")
    assert a["seeds"] == 3 and a["defect_iou"] == pytest.approx(0.5)
    assert a["train_seconds"] == 110.0 and a["mp_per_s"] == pytest.approx(10.0)
    assert b["defect_iou"] == pytest.approx(0.3) and b["train_seconds"] is None and b["mp_per_s"] is None
    assert aggregate(rows, ["mp_per_s"])[0]["train_seconds"] == pytest.approx(1073.3, abs=0.1)  # one machine: all
    times = machine_times(rows)
    assert [(t["machine"], t["backbone"], t["cells"], t["train_seconds"]) for t in times] == [
        ("cpu", "a", 1, 3000.0), ("cpu", "b", 1, 2000.0), ("gpu", "a", 2, 110.0)]
    assert "| gpu | a | 20 | 2 | 110 | 11 | 10.000 |" in machine_markdown(times)


# --- the evaluation pass --------------------------------------------------------------------------------------

class DarkIsDefect(nn.Module):
    """A fixed 'network': darker pixels get higher defect logits, so scores are known without training."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)
        with torch.no_grad():
            self.conv.weight.fill_(-1.5)
            self.conv.bias.fill_(-2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def dataset_with_clean_images(root: Path, defective: int = 3, clean: int = 2) -> Path:
    folder_dataset(root, defective, size=96)
    rng = np.random.default_rng(9)
    for i in range(clean):
        image = np.repeat(cv2.GaussianBlur(rng.normal(128, 25, (96, 96)).astype(np.float32), (0, 0), 1.5)
                          .clip(0, 255).astype(np.uint8)[:, :, None], 3, axis=2)
        write_image(root / "images" / f"c{i}.png", image)
        cv2.imwrite(str(root / "masks" / f"c{i}.png"), np.zeros((96, 96), np.uint8))
    return root


def test_evaluate_equals_sklearn_on_the_pixels_it_scored(tmp_path):
    ds = load_dataset(dataset_with_clean_images(tmp_path / "d"))
    spec = ModelSpec(arch="unet", encoder="resnet10t", classes=("defect",), tile=64, overlap=16)
    model = DarkIsDefect()
    predictor = Predictor(model, spec, InferOptions(min_area=1, amp="off"))
    ev = evaluate(predictor, ds, ds.labeled, EvalOptions(device="cpu", seam_images=1, examples=2, min_area=1))
    scores, truth, img_scores, img_truth = [], [], [], []
    for s in ds.labeled:
        image = ds.load_image(s)
        p = tiled_inference(TorchTiles(model, head="sigmoid", mean=spec.mean, std=spec.std, amp="off"), image, tile=64,
                            overlap=16, align=32)[0]
        gt = ds.load_mask(s, image.shape[:2]) > 0
        scores.append(p.ravel())
        truth.append(gt.ravel())
        img_scores.append(p.max() / 255)
        img_truth.append(gt.any())
    scores, truth = np.concatenate(scores), np.concatenate(truth)
    summary = ev.metrics().model_dump()
    assert summary["pixel_ap"]["defect"] == pytest.approx(average_precision_score(truth, scores), abs=1e-4)
    assert summary["pixel_auroc"]["defect"] == pytest.approx(roc_auc_score(truth, scores), abs=1e-4)
    pred = scores >= 128
    assert summary["dice"]["defect"] == pytest.approx(f1_score(truth, pred), abs=1e-4)
    im = summary["image_level"]
    assert (im["defective"], im["clean"]) == (3, 2)
    assert im["auroc"] == pytest.approx(roc_auc_score(img_truth, img_scores), abs=1e-4)
    assert im["ap"] == pytest.approx(average_precision_score(img_truth, img_scores), abs=1e-4)
    assert summary["region"]["gt_regions"] == sum(r["gt_regions"] for r in ev.per_image) > 0
    assert 0 <= summary["region"]["pro"] <= 1
    assert len(ev.best) == 2 and len(ev.worst) == 2 and ev.best[0].dice >= ev.worst[0].dice
    # a 1x1-conv network has no tile context: tiled and whole-image outputs are identical
    assert ev.seam[0]["max_abs_diff"] == 0
    assert summary["cost"]["parameters"] == 4 and summary["cost"]["peak_rss_mb"] > 0
    assert summary["cost"]["gflops_per_tile"] == pytest.approx(2 * 3 * 64 * 64 / 1e9, rel=1e-3)  # 3 multiply-adds per pixel


class EverythingIsDefect(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x[:, :1], 10.0)


def test_a_model_that_marks_everything_shows_in_area_not_in_regions(tmp_path):
    ds = load_dataset(dataset_with_clean_images(tmp_path / "d"))
    spec = ModelSpec(arch="unet", encoder="resnet10t", classes=("defect",), tile=64, overlap=16)
    ev = evaluate(Predictor(EverythingIsDefect(), spec, InferOptions(min_area=1)), ds, ds.labeled,
                  EvalOptions(device="cpu", seam_images=0))
    m = ev.metrics()
    assert m.region.recall == 1.0  # every true region is covered...
    true = sum(int((ds.load_mask(s) > 0).sum()) for s in ds.labeled)
    pixels = 5 * 96 * 96
    assert m.area.true_fraction == pytest.approx(true / pixels, abs=1e-6)
    assert m.area.predicted_fraction == 1.0 and m.area.false_positive_fraction == 1.0  # ...and so is everything else
    assert m.area.predicted_to_true == pytest.approx(pixels / true, abs=1e-3)
    assert m.area.false_positive_per_megapixel == pytest.approx((pixels - true) / (pixels / 1e6), abs=0.1)


def _checkpoint(path: Path, encoder: str = "resnet10t", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    spec = ModelSpec(arch="unet", encoder=encoder, classes=("defect",), tile=64, overlap=16, arch_kwargs=TINY_UNET)
    save_checkpoint(build_model(spec), spec, path)
    return path.with_suffix(".safetensors")


def test_evaluation_report_has_every_section(tmp_path):
    data = dataset_with_clean_images(tmp_path / "d")
    ckpt = _checkpoint(tmp_path / "m" / "model")
    result = run_evaluation(ckpt, data, tmp_path / "ev", split="all", options=EvalOptions(device="cpu", threshold=0.3))
    out = tmp_path / "ev"
    html = (out / "report.html").read_text()
    for section in ("Summary", "Per class", "Confusion matrix", "Curves", "Per-image scores", "Worst images",
                    "Seam check", "Per image"):
        assert f">{section}" in html, section
    assert html.count("data:image/png;base64,") >= 4 and "data:image/jpeg;base64," in html
    assert "src=\"http" not in html  # self-contained
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["schema_version"] == 1 and metrics["metrics"]["images"] == 5 and metrics["split"] == "all"
    assert {"region", "image_level", "cost", "pixel_ap", "best_f1"} <= set(metrics["metrics"])
    assert metrics["metrics"]["groups"] is None and ">Per image group" not in html  # the images carry no groups
    assert len((out / "per_image.csv").read_text().strip().splitlines()) == 6
    assert len(list((out / "predictions").glob("*.png"))) == 5
    assert not list(tmp_path.glob(".ev*"))  # no temporary directory left behind
    assert result == EvalSummary.read(out / "metrics.json")  # the file is the typed summary, read back exactly
    assert result.headline()["defect_dice"] == metrics["metrics"]["defect_dice"]


def test_each_image_group_is_scored_on_its_own(tmp_path):
    import csv

    data = dataset_with_clean_images(tmp_path / "d")
    types = {"s00": 1, "s01": 1, "s02": 2, "c0": 2, "c1": 2}  # BSData's image_data.json layout: a `type` per image
    (data / "image_data.json").write_text(json.dumps({"images": [
        {"filename": f"{stem}.png", "train_test_split": "train" if stem == "c1" else "test", "type": t}
        for stem, t in types.items()]}))
    ds = load_dataset(data)
    assert {s.stem: s.group for s in ds.samples} == {stem: f"type {t}" for stem, t in types.items()}
    out = tmp_path / "ev"
    run_evaluation(_checkpoint(tmp_path / "m" / "model"), data, out, split="test",
                   options=EvalOptions(device="cpu", threshold=0.3))
    groups = json.loads((out / "metrics.json").read_text())["metrics"]["groups"]
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    assert {r["image"]: r["group"] for r in rows} == {f"{stem}.png": f"type {t}" for stem, t in types.items()
                                                      if stem != "c1"}
    assert set(groups) == {"type 1", "type 2"}
    for name, g in groups.items():
        mine = [r for r in rows if r["group"] == name]
        tp, fp, fn = (sum(int(r[k]) for r in mine) for k in ("tp_px", "fp_px", "fn_px"))
        assert (g["images"], g["defective"]) == (len(mine), sum(r["defective"] == "True" for r in mine))
        assert (g["true_px"], g["false_positive_px"], g["false_negative_px"]) == (tp + fn, fp, fn)
        assert g["defect_iou"] == pytest.approx(tp / (tp + fp + fn), abs=1e-4)  # pooled, as the headline IoU
    assert ">Per image group" in (out / "report.html").read_text()
    summary = EvalSummary.read(out / "metrics.json")
    assert any(name == "pixel defect IoU per image group" and "type 1" in value
               for name, value in summary_rows(summary))


def test_unused_split_is_the_labeled_images_a_label_budget_left_out(tmp_path):
    data = dataset_with_clean_images(tmp_path / "d")
    ds = load_dataset(data)
    stems = sorted(s.stem for s in ds.labeled)
    splits = {"train": stems[:1], "train_unused": stems[1:3], "val": stems[3:4], "test": []}
    chosen, how = select_samples(ds, "unused", (splits, tmp_path / "splits.json"))
    assert sorted(s.stem for s in chosen) == stems[1:3] and "unused" in how
    with pytest.raises(DefectscanError, match="lists none"):  # a run trained on every labeled image
        select_samples(ds, "unused", ({**splits, "train_unused": []}, tmp_path / "splits.json"))


def test_limit_random_sample_spans_name_groups_and_is_the_same_for_every_call():
    # file names that group by kind (BSData: every type-1 image sorts after every type-2 one)
    samples = [Sample(image=Path(f"{kind}{i:02d}.png"), stem=f"{kind}{i:02d}") for kind in "ab" for i in range(30)]
    first, how = limit_samples(samples, 10)
    assert [s.stem for s in first] == [f"a{i:02d}" for i in range(10)] and "first 10" in how
    drawn, how = limit_samples(samples, 10, "random")
    assert len(drawn) == 10 and "at random" in how and {s.stem[0] for s in drawn} == {"a", "b"}
    assert [s.stem for s in drawn] == sorted(s.stem for s in drawn)  # kept in name order
    assert drawn == limit_samples(samples, 10, "random")[0]  # a fixed seed: every model scores the same images
    assert limit_samples(samples, 100, "random") == (samples, "")  # a limit over the split's size takes them all
    with pytest.raises(DefectscanError, match="unknown --sample rule"):
        limit_samples(samples, 10, "spread")


def test_evaluate_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    data = dataset_with_clean_images(tmp_path / "d")
    ckpt = _checkpoint(tmp_path / "m" / "model")
    cases = [
        (["--model", tmp_path / "none.safetensors", "--data", data], "none"),
        (["--model", ckpt, "--data", tmp_path / "nodata"], "no such dataset"),
        (["--model", ckpt, "--data", data, "--region-criterion", "area"], "region_criterion"),
        (["--model", ckpt, "--data", data, "--tile", "0"], "'tile'"),
        (["--model", ckpt, "--data", data, "--min-area", "-1"], "'min_area'"),
        (["--model", ckpt, "--data", data, "--tile", "100"], "multiple of 32"),
        (["--model", ckpt, "--data", data, "--split", "dev"], "unknown split"),
        (["--model", ckpt, "--data", data, "--split", "unused"], "label budget"),  # not a training run's checkpoint
        (["--model", ckpt, "--data", data, "--limit", "1", "--sample", "spread"], "unknown --sample rule"),
    ]
    for args, expected in cases:
        code, _, err = run_cli(monkeypatch, capsys, "evaluate", *args, "-o", tmp_path / "o")
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert code == 1 and len(lines) == 1 and expected in lines[0], (args, err)
        assert "Traceback" not in err
    assert not (tmp_path / "o").exists()
    code, out, err = run_cli(monkeypatch, capsys, "evaluate", "-m", ckpt, "-d", data, "--split", "all",
                             "--seam-images", "0", "-o", tmp_path / "o")
    assert code == 0 and "region recall" in out and (tmp_path / "o" / "report.html").is_file()
    assert "which of them the model was trained on is unknown" in err


def _pitting_dataset(root: Path) -> Path:
    """LabelMe images whose only class is 'Pitting' (BSData's name), unknown to the checkpoints above."""
    root.mkdir(parents=True)
    for i in range(2):
        write_image(root / f"p{i}.png", np.full((64, 64, 3), 180, np.uint8))
        (root / f"p{i}.json").write_text(json.dumps({"imagePath": f"p{i}.png", "imageHeight": 64, "imageWidth": 64,
                                                     "shapes": [{"label": "Pitting", "points": [[8, 8], [30, 30]],
                                                                 "shape_type": "rectangle"}]}))
    return root


def test_evaluate_matches_classes_by_name_and_refuses_unmatched(tmp_path, monkeypatch, capsys):
    data = _pitting_dataset(tmp_path / "pits")
    ckpt = _checkpoint(tmp_path / "m" / "model")  # one class: "defect"
    code, _, err = run_cli(monkeypatch, capsys, "evaluate", "-m", ckpt, "-d", data, "--split", "all",
                           "-o", tmp_path / "o")
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 1 and len(lines) == 1 and "Traceback" not in err
    assert "Pitting match no model class (model: defect)" in lines[0] and "--class-map" in lines[0]
    assert not (tmp_path / "o").exists()
    for bad, why in (("Pitting=crack", "the model has no class 'crack'"), ("Rust=defect", "no class 'Rust'"),
                     ("Pitting", "DATASET_CLASS=MODEL_CLASS")):
        code, _, err = run_cli(monkeypatch, capsys, "evaluate", "-m", ckpt, "-d", data, "--class-map", bad,
                               "-o", tmp_path / "o")
        assert code == 1 and why in err, err
    code, _, err = run_cli(monkeypatch, capsys, "evaluate", "-m", ckpt, "-d", data, "--split", "all",
                           "--class-map", "Pitting=defect", "--seam-images", "0", "-o", tmp_path / "o")
    assert code == 0 and "Pitting -> defect" in err
    summary = EvalSummary.read(tmp_path / "o" / "metrics.json")
    assert summary.class_map == {"Pitting": "defect"}
    assert summary.precision == "float32" and "(bf16: " in summary.hardware  # what ran, on what CPU features
    truth = summary.metrics.confusion.rows_truth_cols_prediction
    assert sum(truth[1]) == 2 * 23 * 23  # the Pitting rectangles are scored as defect pixels, not as background


def test_compare_two_evaluations(tmp_path):
    data = dataset_with_clean_images(tmp_path / "d")
    for name, seed in (("a", 0), ("b", 1)):
        run_evaluation(_checkpoint(tmp_path / name / "model", seed=seed), data, tmp_path / name / "evaluation",
                       split="all", options=EvalOptions(device="cpu", seam_images=0, threshold=0.3))
    result = compare([tmp_path / "a", tmp_path / "b" / "evaluation"], tmp_path / "cmp")
    assert [r["model"] for r in result["models"]] == ["resnet10t (a)", "resnet10t (b)"]
    assert result["warning"] is None
    html = (tmp_path / "cmp" / "compare.html").read_text()
    assert "Same crops" in html and html.count("data:image/jpeg;base64,") >= 3
    assert "<th>defect Dice</th>" in html and "fp_regions_per_mp" not in html  # titles people read
    assert 'class="best"' in html  # the best value of a column stands out
    assert (tmp_path / "cmp" / "compare.csv").read_text().count("\n") == 3
    # the same models scored with different run options are not a comparison of models: said, with the values
    f = tmp_path / "b" / "evaluation" / "metrics.json"
    raw = json.loads(f.read_text())
    raw["options"].update(tta=True, threshold=None, stitch="gaussian")
    raw["metrics"]["threshold"] = 0.5  # what "as trained" resolved to
    f.write_text(json.dumps(raw))
    warning = compare([tmp_path / "a", tmp_path / "b"], tmp_path / "cmp1")["warning"]
    assert warning == ("they ran with different options (threshold: 0.3, as trained; tta: False, True): "
                       "the numbers are not directly comparable")  # each model's own stitch mode is fair
    assert warning in (tmp_path / "cmp1" / "compare.html").read_text()
    # an explicit threshold equal to the one the other model was calibrated at, or an unrecorded precision: the same
    raw["options"].update(tta=False)
    raw["metrics"]["threshold"], raw["precision"] = 0.3, None
    f.write_text(json.dumps(raw))
    assert compare([tmp_path / "a", tmp_path / "b"], tmp_path / "cmp1")["warning"] is None
    raw["precision"] = "onnxruntime int8 (OpenVINO)"
    f.write_text(json.dumps(raw))
    assert "precision: float32, onnxruntime int8 (OpenVINO)" in compare([tmp_path / "a", tmp_path / "b"],
                                                                         tmp_path / "cmp1")["warning"]
    with pytest.raises(DefectscanError, match="no metrics.json"):
        compare([tmp_path / "d"], tmp_path / "cmp2")
    # image names in metrics.json name files inside the evaluation directory: a path is refused, not followed
    f.write_text(f.read_text().replace('"images": [', '"images": ["../../outside", ', 1))
    with pytest.raises(DefectscanError, match="plain file stems, got '../../outside'"):
        compare([tmp_path / "a", tmp_path / "b"], tmp_path / "cmp3")
    assert not (tmp_path / "cmp3").exists()


def test_compare_and_benchmark_cli(tmp_path, monkeypatch, capsys):
    data = dataset_with_clean_images(tmp_path / "d", defective=2, clean=1)
    run_evaluation(_checkpoint(tmp_path / "a" / "model"), data, tmp_path / "a" / "evaluation", split="all",
                   options=EvalOptions(device="cpu", seam_images=0))
    code, out, _ = run_cli(monkeypatch, capsys, "compare", tmp_path / "a", "-o", tmp_path / "cmp")
    assert code == 0 and "resnet10t" in out and (tmp_path / "cmp" / "compare.html").is_file()
    code, _, err = run_cli(monkeypatch, capsys, "compare", tmp_path / "d", "-o", tmp_path / "cmp")
    assert code == 1 and "no metrics.json" in err
    code, _, err = run_cli(monkeypatch, capsys, "benchmark", tmp_path / "missing.yaml")
    assert code == 1 and "no such study file" in err
    (tmp_path / "train.yaml").write_text("model: {encoder: resnet10t}\ndata: {root: /nowhere}\n")
    (tmp_path / "study.yaml").write_text("train_config: train.yaml\nbackbones: [{name: r}]\nlabeled: [2]\n"
                                         "seeds: [0]\n")
    code, _, err = run_cli(monkeypatch, capsys, "benchmark", tmp_path / "study.yaml", "--out", tmp_path / "b",
                           "--report-only")
    assert code == 1 and "no finished cells yet" in err and not (tmp_path / "b" / "report.html").exists()
    code, _, err = run_cli(monkeypatch, capsys, "benchmark", tmp_path / "study.yaml", "--set", "optim.lrr=1")
    assert code == 1 and "optim.lrr" in err
    study = load_study(tmp_path / "study.yaml", [f"data.root={data}", "training.epochs=3"])
    cfg_overrides = study.cells()[0].overrides(study)
    assert f"data.root={data}" in cfg_overrides and "training.epochs=3" in cfg_overrides


# --- benchmark study ------------------------------------------------------------------------------------------

def _tiny_train_config(path: Path, data: Path) -> None:
    """A training config whose cells take seconds: a small Unet, 2 steps, 2 of 6 images tested."""
    path.write_text(
        "model: {encoder: resnet10t, tile: 64, overlap: 16, arch_kwargs: {decoder_channels: [32, 16, 16, 8, 8]}}\n"
        f"data: {{root: {data}, val_fraction: 0.0, test_fraction: 0.34}}\n"
        "sampling: {crop: 64, batch_size: 2, steps_per_epoch: 2}\naugment: []\ntraining: {epochs: 1, device: cpu}\n")


def test_study_rows_keep_each_image_groups_score_and_the_report_shows_them(tmp_path):
    """A cell's row holds each image group's test defect IoU (a column per group), equal to its evaluation's
    group figures; the report tabulates them per row, and rows recorded before groups were kept count as absent."""
    from defectscan.studies.report import group_scores

    data = folder_dataset(tmp_path / "d", 6, size=96)
    (data / "image_data.json").write_text(json.dumps(
        {"images": [{"filename": f"s{i:02d}.png", "group": "odd" if i % 2 else "even"} for i in range(6)]}))
    _tiny_train_config(tmp_path / "train.yaml", data)
    study_file = tmp_path / "study.yaml"
    study_file.write_text("name: tiny\ntrain_config: train.yaml\nbackbones: [{name: r10t}]\nlabeled: [2]\n"
                          "seeds: [0]\nevaluate: {seam_images: 0, examples: 0}\n")
    (row,) = run_study(load_study(study_file), tmp_path / "out", log=lambda m: None)
    saved = EvalSummary.read(tmp_path / "out" / "cells" / "r10t__n2__s0" / "evaluation" / "metrics.json")
    assert saved.metrics.groups and {f"defect_iou [{g}]" for g in saved.metrics.groups} <= row.keys()
    for name, g in saved.metrics.groups.items():
        assert row[f"defect_iou [{name}]"] == g.defect_iou
    older = {k: v for k, v in row.items() if not k.startswith("defect_iou [")} | {"seed": 1}
    groups, table = group_scores([row, older])
    assert groups == sorted(saved.metrics.groups) and len(table) == 1
    assert all(table[0][g] == (pytest.approx(row[f"defect_iou [{g}]"], abs=1e-4), 1) for g in groups)
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "Test defect IoU by image group" in summary and "(n=1)" in summary
    assert "Defect IoU by image group" in (tmp_path / "out" / "report.html").read_text()
    assert group_scores([older]) == ([], [])


def test_labeled_copy_draws_the_same_budgets_and_masks(tmp_path):
    """scripts/run_study_parallel.py copy-labeled: without the unlabeled images and LabelMe's embedded imageData,
    every label budget and seed draws the same train / val / test images, with the same masks."""
    from defectscan.data import label_budget, split_dataset

    # 6 unlabeled images, as BSData's 710
    src = bsdata_like(tmp_path / "bsdata", 30, lambda i: None if i >= 24 else "test" if i >= 18 else "train", seed=1)
    assert load_script("run_study_parallel").copy_labeled(src, tmp_path / "copy" / "bsdata") == 24
    full, copy = load_dataset(src), load_dataset(tmp_path / "copy" / "bsdata")
    assert len(copy.labeled) == len(full.labeled) == 24 and len(full.samples) == 30 and len(copy.samples) == 24
    for labeled, seed in [(5, 0), (5, 1), (10, 2), (None, 0)]:
        drawn = []
        for ds in (full, copy):
            splits, train = label_budget(split_dataset(ds, 0.15), labeled, subset_seed=seed, val_fraction=0.15)
            drawn.append([sorted(s.stem for s in part) for part in (train, splits.val, splits.test)])
        assert drawn[0] == drawn[1] and len(drawn[0][2]) == 6
    for a, b in zip(full.labeled, copy.labeled):
        assert a.stem == b.stem and np.array_equal(full.load_mask(a), copy.load_mask(b))
        assert json.loads(b.annotation.read_text())["imageData"] is None


@pytest.mark.slow
def test_study_cells_run_in_parallel_and_their_records_resume_the_study(tmp_path, monkeypatch):
    """scripts/run_study_parallel.py run: each cell in its own `defectscan benchmark` process; the records it
    leaves (and packs for a lent machine) are what a serial study resumes from, without training again."""
    import subprocess
    import sys
    import tarfile

    import defectscan.studies.benchmark as benchmark

    data = folder_dataset(tmp_path / "d", 6, size=96)
    _tiny_train_config(tmp_path / "train.yaml", data)
    study_file = tmp_path / "study.yaml"
    study_file.write_text("name: tiny\ntrain_config: train.yaml\nbackbones: [{name: r10t}]\n"
                          "labeled: [2]\nseeds: [0, 1, 2]\nrecords: results/tiny\n"
                          "evaluate: {seam_images: 0, examples: 0}\n")
    script = Path(__file__).resolve().parents[1] / "scripts" / "run_study_parallel.py"
    args = [sys.executable, str(script), "run", str(study_file), "--out", str(tmp_path / "runs"), "--device", "cpu",
            "--jobs", "2", "--threads", "1", "--cells", "r10t__n2__s1", "r10t__n2__s0", "--collect",
            str(tmp_path / "collected")]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with tarfile.open(tmp_path / "collected" / "records.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["r10t__n2__s0.json", "r10t__n2__s1.json"]
    with tarfile.open(tmp_path / "collected" / "logs.tar.gz") as tar:
        assert {"runner.log", "r10t__n2__s0.log", "r10t__n2__s1.log"} <= set(tar.getnames())
    # a cell still running at the deadline is stopped and leaves no record
    late = args[:args.index("--cells")] + ["--cells", "r10t__n2__s2", "--seconds", "1", "--job-seconds", "0",
                                           "--grace", "1"]
    stopped = subprocess.run(late, capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 0 and "stopped r10t__n2__s2 at the deadline" in stopped.stdout
    assert not (tmp_path / "results" / "tiny" / "r10t__n2__s2.json").exists()
    trained = []
    real_train = benchmark.train
    monkeypatch.setattr(benchmark, "train", lambda *a, **k: (trained.append(a[1]), real_train(*a, **k))[1])
    rows = run_study(load_study(study_file), tmp_path / "serial", log=lambda m: None)
    assert [r["cell"] for r in rows] == ["r10t__n2__s0", "r10t__n2__s1", "r10t__n2__s2"] and len(trained) == 1
    # a second parallel run finds nothing left to do
    again = subprocess.run(args[:-2], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "0 cells to run" in again.stdout


@pytest.mark.slow
def test_benchmark_runs_and_resumes_between_cells(tmp_path, monkeypatch, capsys):
    import defectscan.studies.benchmark as benchmark

    data = folder_dataset(tmp_path / "d", 6, size=96)
    _tiny_train_config(tmp_path / "train.yaml", data)
    (tmp_path / "study.yaml").write_text(
        "name: tiny\ntrain_config: train.yaml\nset: [optim.lr=0.001]\n"
        "backbones:\n  - {name: r10t}\nlabeled: [2, all]\nseeds: [0, 1, 2]\n"
        "evaluate: {seam_images: 0, examples: 1}\n")
    study = load_study(tmp_path / "study.yaml")
    out = tmp_path / "out"
    calls = []
    real_train = benchmark.train

    def counting_train(*args, **kwargs):
        calls.append(args[1])
        return real_train(*args, **kwargs)

    monkeypatch.setattr(benchmark, "train", counting_train)

    class Stop(Exception):
        pass

    def stop_at_third(msg: str) -> None:
        if msg.startswith("[3/"):
            raise Stop

    with pytest.raises(Stop):
        run_study(study, out, log=stop_at_third)
    assert len(calls) == 2 and (out / "results.csv").read_text().count("\n") == 3
    rows = run_study(study, out, log=lambda m: None)
    assert len(calls) == 6 and len(rows) == 6  # the two finished cells were not trained again
    assert sorted({r["labeled"] for r in rows}) == [2, 4]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cells_done"] == 6 and len(summary["summary"]) == 2
    assert all(s["seeds"] == 3 and s["defect_dice_ci"] is not None for s in summary["summary"])
    html = (out / "report.html").read_text()
    assert "Learning curves" in html and "Every cell" in html and html.count("data:image/png;base64,") >= 3
    assert (out / "learning_curve.png").stat().st_size > 1000 and (out / "cost_curve.png").stat().st_size > 1000
    table, _, ranking = (out / "summary.md").read_text().partition("\n\n")
    assert table.count("\n") == 3 and "labeled 2: no ranking (fewer than two rows" in ranking  # one backbone
    # a single cell on its own, and a clear error for a name that is not in the study
    run_study(study, out, only="r10t__n2__s1", log=lambda m: None)
    assert len(calls) == 6
    with pytest.raises(DefectscanError, match="no cell 'r10t__n3__s0'"):
        run_study(study, out, only="r10t__n3__s0")
    (out / "report.html").unlink()
    code, _, _ = run_cli(monkeypatch, capsys, "benchmark", tmp_path / "study.yaml", "--out", out, "--report-only")
    assert code == 0 and (out / "report.html").is_file() and len(calls) == 6
    # the same directory with an edited study: finished cells are not silently reused
    edited = tmp_path / "study.yaml"
    edited.write_text(edited.read_text().replace("optim.lr=0.001", "optim.lr=0.002"))
    with pytest.raises(DefectscanError, match="other settings"):
        run_study(load_study(edited), out, log=lambda m: None)


@pytest.mark.slow
def test_benchmark_records_let_another_machine_resume_and_report(tmp_path, monkeypatch, capsys):
    """Run directories stay on the machine that trained; the committed records carry the study on."""
    import defectscan.studies.benchmark as benchmark

    data = folder_dataset(tmp_path / "d", 6, size=96)
    _tiny_train_config(tmp_path / "train.yaml", data)
    study_file = tmp_path / "study.yaml"
    study_file.write_text("name: tiny\ntrain_config: train.yaml\nset: [optim.lr=0.001]\nbackbones: [{name: r10t}]\n"
                          "labeled: [2]\nseeds: [0, 1]\nrecords: results/tiny\n"
                          "evaluate: {seam_images: 0, examples: 0}\n")
    calls = []
    real_train = benchmark.train
    monkeypatch.setattr(benchmark, "train", lambda *a, **k: (calls.append(a[1]), real_train(*a, **k))[1])
    rows = run_study(load_study(study_file), tmp_path / "machine1", only="r10t__n2__s0", log=lambda m: None)
    record = tmp_path / "results" / "tiny" / "r10t__n2__s0.json"
    saved = json.loads(record.read_text())
    assert saved["row"] == rows[0] and saved["history"][0]["epoch"] == 1.0
    assert saved["config"]["data"]["root"] == "d" and "device" not in saved["config"]["training"]
    assert rows[0]["precision"] == "float32" and "(bf16: " in rows[0]["hardware"]
    # a finished cell directory without its record (made before `records:`) is recorded, not trained again
    record.unlink()
    run_study(load_study(study_file), tmp_path / "machine1", log=lambda m: None, only="r10t__n2__s0")
    assert len(calls) == 1 and json.loads(record.read_text())["row"] == rows[0]
    # another machine: no cell directories, the dataset elsewhere; the recorded cell is not trained again
    moved = tmp_path / "moved" / "d"
    moved.parent.mkdir()
    (tmp_path / "d").rename(moved)
    rows2 = run_study(load_study(study_file, [f"data.root={moved}"]), tmp_path / "machine2", log=lambda m: None)
    assert len(calls) == 2 and [r["cell"] for r in rows2] == ["r10t__n2__s0", "r10t__n2__s1"]
    assert rows2[0] == rows[0] and (tmp_path / "results" / "tiny" / "r10t__n2__s1.json").is_file()
    # a third machine rebuilds the report from the records alone
    code, _, _ = run_cli(monkeypatch, capsys, "benchmark", study_file, "--out", tmp_path / "machine3",
                         "--report-only", "--data", moved)
    assert code == 0 and json.loads((tmp_path / "machine3" / "summary.json").read_text())["cells_done"] == 2
    report = (tmp_path / "machine3" / "report.html").read_text()
    assert "cells ran on: " in report and "cells scored on: test split; regions: coverage &gt;= 0.5" in report
    assert "Time per cell on each machine" not in report
    # one cell moved to another machine: the report lists each machine's times, the tables take one machine's
    saved = json.loads(record.read_text())
    saved["row"]["hardware"] = "another machine"
    record.write_text(json.dumps(saved))
    code, _, _ = run_cli(monkeypatch, capsys, "benchmark", study_file, "--out", tmp_path / "machine3",
                         "--report-only", "--data", moved)
    assert code == 0 and "Time per cell on each machine" in (tmp_path / "machine3" / "report.html").read_text()
    assert "Per machine:" in (tmp_path / "machine3" / "summary.md").read_text()
    # a record from before tta was a study option (no key) evaluated without it: it stands; with tta it does not
    saved = json.loads(record.read_text())
    del saved["evaluation"]["tta"]
    record.write_text(json.dumps(saved))
    run_study(load_study(study_file, [f"data.root={moved}"]), tmp_path / "machine2", log=lambda m: None)
    assert len(calls) == 2
    other_study = tmp_path / "study_other.yaml"
    for other in ("tta: true", "limit: 1"):  # flip TTA; fewer images than the record scored
        other_study.write_text(study_file.read_text().replace("examples: 0}", f"examples: 0, {other}}}"))
        with pytest.raises(DefectscanError, match="recorded with another evaluation"):
            run_study(load_study(other_study, [f"data.root={moved}"]), tmp_path / "machine2", only="r10t__n2__s0",
                      log=lambda m: None)
    # a record scored on the first N images (before `sample` was an option: no key) stands for `sample: first` only
    saved = json.loads(record.read_text())
    saved["evaluation"]["limit"] = 5
    record.write_text(json.dumps(saved))
    for other, stands in (("limit: 5", True), ("limit: 5, sample: first", True), ("limit: 5, sample: random", False)):
        other_study.write_text(study_file.read_text().replace("examples: 0}", f"examples: 0, {other}}}"))
        if stands:
            run_study(load_study(other_study, [f"data.root={moved}"]), tmp_path / "machine2", only="r10t__n2__s0",
                      log=lambda m: None)
            continue
        with pytest.raises(DefectscanError, match="recorded with another evaluation"):
            run_study(load_study(other_study, [f"data.root={moved}"]), tmp_path / "machine2", only="r10t__n2__s0",
                      log=lambda m: None)
    assert len(calls) == 2
    # an edited study does not silently take the records of the old one
    study_file.write_text(study_file.read_text().replace("optim.lr=0.001", "optim.lr=0.002"))
    with pytest.raises(DefectscanError, match="recorded with another training config"):
        run_study(load_study(study_file, [f"data.root={moved}"]), tmp_path / "machine4", log=lambda m: None)
    record.write_text("{not json")
    with pytest.raises(DefectscanError, match="cannot read the cell record"):
        run_study(load_study(study_file), tmp_path / "machine4", only="r10t__n2__s0", log=lambda m: None)


def test_a_record_compares_on_what_decides_the_result_not_on_where_it_ran(tmp_path):
    """The device and the DataLoader workers (crops depend on the seed and index only) do not make a record stale;
    a record from before `sampling.workers: auto` holds 0 and stands for today's auto."""
    today = Config.model_validate({"data": {"root": str(tmp_path / "d")}})
    old = today.to_dict()
    old["sampling"]["workers"], old["training"]["device"] = 0, "cuda"
    assert comparable_config(old, tmp_path) == comparable_config(today, tmp_path)
    old["sampling"]["crop"] = today.sampling.crop * 2
    assert comparable_config(old, tmp_path) != comparable_config(today, tmp_path)


@pytest.mark.slow
def test_pretrained_row_pretrains_once_without_test_images_and_counts_its_time(tmp_path, monkeypatch):
    import defectscan.studies.benchmark as benchmark

    data = folder_dataset(tmp_path / "d", 6, size=96)
    (tmp_path / "train.yaml").write_text(
        "model: {encoder: resnet10t, tile: 64, overlap: 16}\n"
        f"data: {{root: {data}, val_fraction: 0.0, test_fraction: 0.34}}\n"
        "sampling: {crop: 64, batch_size: 2, steps_per_epoch: 2}\naugment: []\ntraining: {epochs: 1, device: cpu}\n")
    (tmp_path / "mim.yaml").write_text("sampling: {crop: 64, batch_size: 2, steps_per_epoch: 2}\nmask: {patch: 16}\n"
                                       "training: {epochs: 1}\n")
    (tmp_path / "study.yaml").write_text(
        "train_config: train.yaml\nbackbones:\n  - {name: scratch}\n"
        "  - {name: ssl, pretrain: {config: mim.yaml, set: [mask.ratio=0.5]}}\n"
        "labeled: [2]\nseeds: [0, 1]\nevaluate: {seam_images: 0, examples: 0}\n")
    out = tmp_path / "out"
    rows = run_study(load_study(tmp_path / "study.yaml"), out, log=lambda m: None)
    (pre,) = (out / "pretrain").iterdir()  # one pretraining, shared by both seeds of the row
    meta = json.loads((pre / "encoder.json").read_text())
    assert meta["encoder"] == "resnet10t" and meta["test_images_left_out"] == 2 and meta["images"] == 4
    ssl = [r for r in rows if r["backbone"] == "ssl"]
    assert len(ssl) == 2 and all(r["pretrain_seconds"] == meta["seconds"] > 0 for r in ssl)
    assert all(r["pretrained"] == f"self-supervised ({pre.name})" for r in ssl)
    assert len({r["pretrained_sha256"] for r in ssl}) == 1 and len(ssl[0]["pretrained_sha256"]) == 16
    cfg = RunDir(out / "cells" / "ssl__n2__s1" / "run").read_config()
    assert cfg.model.encoder_weights == str(pre / "encoder.safetensors")
    assert all(r["pretrain_seconds"] == 0.0 for r in rows if r["backbone"] == "scratch")
    assert "pretrain s" in (out / "summary.md").read_text()
    calls = []
    monkeypatch.setattr(benchmark, "pretrain", lambda *a, **k: calls.append(a))
    run_study(load_study(tmp_path / "study.yaml"), out, log=lambda m: None)
    assert calls == []  # a rerun finds every cell and the pretraining done


def test_ranking_only_where_intervals_separate():
    def row(name, mean, lo, hi, seeds=3):
        return {"backbone": name, "labeled_setting": 20, "seeds": seeds, "m": mean, "m_ci": [lo, hi]}

    (line,) = separations([row("a", 0.7, 0.65, 0.75), row("b", 0.5, 0.45, 0.55), row("c", 0.68, 0.6, 0.72),
                           row("d", 0.9, 0.9, 0.9, seeds=1)], "m")
    assert "a > b" in line and "c > b" in line and "a > c" not in line
    assert "Best mean: a, not separated from c" in line and "Too few seeds to rank: d" in line
    (line,) = separations([row("a", 0.7, 0.65, 0.75), row("b", 0.6, 0.5, 0.66)], "m")
    assert "no two intervals separate" in line
    (line,) = separations([row("a", 0.7, 0.65, 0.75), row("b", 0.6, 0.5, 0.66, seeds=2)], "m")
    assert "no ranking" in line


def test_benchmark_scores_the_images_a_label_budget_left_out(tmp_path):
    """evaluate.split: unused scores each cell on the labeled training images outside its budget (a recipe
    search's validation images at 20 labels), never on the test split."""
    data = folder_dataset(tmp_path / "d", 6, size=96)
    _tiny_train_config(tmp_path / "train.yaml", data)
    (tmp_path / "study.yaml").write_text(
        "train_config: train.yaml\nbackbones:\n  - {name: r10t}\nlabeled: [2]\nseeds: [0]\n"
        "evaluate: {split: unused, seam_images: 0, examples: 0}\n")
    (row,) = run_study(load_study(tmp_path / "study.yaml"), tmp_path / "out", log=lambda m: None)
    cell = tmp_path / "out" / "cells" / "r10t__n2__s0"
    splits = RunDir(cell / "run").read_splits()
    metrics = json.loads((cell / "evaluation" / "metrics.json").read_text())
    assert len(splits["train_unused"]) == 2 and row["test_images"] == 2  # 6 images: 2 test, 2 in the budget
    assert sorted(metrics["images"]) == sorted(splits["train_unused"]) and metrics["split"] == "unused"
    # a limit with `sample: random` reaches the evaluation and is checked when the finished cell is reused
    (tmp_path / "study.yaml").write_text((tmp_path / "study.yaml").read_text().replace(
        "examples: 0}", "examples: 0, limit: 1, sample: random}"))
    (row,) = run_study(load_study(tmp_path / "study.yaml"), tmp_path / "out2", log=lambda m: None)
    metrics = json.loads((tmp_path / "out2" / "cells" / "r10t__n2__s0" / "evaluation" / "metrics.json").read_text())
    assert row["test_images"] == 1 and metrics["sample"] == "random" and "at random" in metrics["split_source"]
    (tmp_path / "study.yaml").write_text((tmp_path / "study.yaml").read_text().replace("random", "first"))
    with pytest.raises(DefectscanError, match="finished with other settings"):
        run_study(load_study(tmp_path / "study.yaml"), tmp_path / "out2", log=lambda m: None)


def test_study_file_errors(tmp_path):
    (tmp_path / "t.yaml").write_text("model: {encoder: resnet10t}\n")
    bad = {
        "labeled: [0]": "positive integers",
        "seeds: [1, 1]": "distinct",
        "metric: speed": "unknown metric",
        "extra: 1": "unknown study key .extra.",
        "backbones: [{name: a__b}]": "may not contain",
        "evaluate: {split: dev}": "evaluate.split",
        "evaluate: {split: unused}": "'all' leaves none",
        "backbones: [{name: a, pretrain: {config: nope.yaml}}]": "pretrain config .*nope.yaml does not exist",
        "backbones: [{name: a, pretrain: {config: t.yaml, set: [mask.size=3]}}]": "mask.size",
    }
    for line, message in bad.items():
        base = {"train_config": "train_config: t.yaml", "backbones": "backbones: [{name: a}]",
                "labeled": "labeled: [2, all]", "seeds": "seeds: [0, 1, 2]"}
        key = line.split(":")[0]
        base[key] = line
        (tmp_path / "s.yaml").write_text("\n".join(base.values()) + "\n")
        with pytest.raises(DefectscanError, match=message):
            load_study(tmp_path / "s.yaml")


@pytest.mark.parametrize("study", sorted((Path(__file__).resolve().parents[1] / "configs" / "benchmark").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_benchmark_presets_load(study):
    from defectscan.training import load_config

    st = load_study(study)
    assert len(st.seeds) >= 3
    for cell in [c for c in st.cells() if c.seed == st.seeds[0]]:
        load_config(st.train_config, cell.overrides(st))


def test_log_axes_are_labelled_with_plain_numbers():
    from defectscan.reporting.plots import _plain_log_x, pyplot

    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([5, 20, 324], [0.2, 0.4, 0.6])
    _plain_log_x(ax, [5, 20, 324])
    fig.canvas.draw()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["5", "20", "324"]
    assert all(t.get_text() == "" for t in ax.xaxis.get_minorticklabels())  # no 2x10^0 minor labels
    ax.set_xlim(1e6, 3e7)
    ax.set_xticks([1e6, 1e7])
    fig.canvas.draw()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1M", "10M"]
    plt.close(fig)


def test_best_cells_follow_each_metrics_direction():
    from defectscan.evaluation.compare import _best_cells

    rows = [{"model": "a", "defect_dice": 0.5, "fp_regions_per_mp": 2.0, "predicted_area_ratio": 1.0},
            {"model": "b", "defect_dice": 0.7, "fp_regions_per_mp": 3.0, "predicted_area_ratio": 5.0}]
    header = ["model", "defect_dice", "fp_regions_per_mp", "predicted_area_ratio"]
    assert _best_cells(rows, header) == [[False, False, True, False], [False, True, False, False]]
    assert _best_cells(rows[:1], header) == [[False] * 4]  # one model: nothing to compare


def test_benchmark_never_clears_a_cell_another_process_holds(tmp_path):
    from defectscan.io.files import exclusive_lock

    (tmp_path / "train.yaml").write_text("model: {encoder: resnet10t}\ndata: {root: /nowhere}\n")
    (tmp_path / "study.yaml").write_text("train_config: train.yaml\nbackbones: [{name: r}]\nlabeled: [2]\nseeds: [0]\n")
    study = load_study(tmp_path / "study.yaml")
    run = tmp_path / "out" / "cells" / "r__n2__s0" / "run"
    run.mkdir(parents=True)
    (run / "half.txt").write_text("a cell stopped before its setup finished")
    with exclusive_lock(run / ".lock", "run directory"):
        with pytest.raises(DefectscanError, match="another defectscan process"):
            run_study(study, tmp_path / "out", log=lambda m: None)
    assert (run / "half.txt").exists()
    with pytest.raises(DefectscanError, match="no such dataset"):  # cleared, then the (missing) data is the error
        run_study(study, tmp_path / "out", log=lambda m: None)
    assert not (run / "half.txt").exists()


def test_calibrate_stores_the_chosen_threshold_and_evaluate_uses_it(tmp_path, monkeypatch, capsys):
    data = dataset_with_clean_images(tmp_path / "d")
    ckpt = _checkpoint(tmp_path / "m" / "model")
    weights_before = ckpt.read_bytes()
    for args, expected in [(["--split", "test"], "leak"), (["--rule", "precision"], "needs --target"),
                           (["--rule", "roc"], "unknown threshold rule")]:
        code, _, err = run_cli(monkeypatch, capsys, "calibrate", "-m", ckpt, "-d", data, *args)
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert code == 1 and len(lines) == 1 and expected in lines[0] and "Traceback" not in err, (args, err)
    ds = load_dataset(data)
    predictor = Predictor.from_checkpoint(ckpt, InferOptions(device="cpu"))
    ev = evaluate(predictor, ds, ds.labeled, EvalOptions(device="cpu", seam_images=0, examples=0, cost=False))
    best = choose_threshold(ev.image_hists, "stable_f1")  # the default rule, towards the trained 0.5
    # a copy first: the original is left as it was
    code, out, _ = run_cli(monkeypatch, capsys, "calibrate", "-m", ckpt, "-d", data, "--split", "all",
                           "-o", tmp_path / "copy")
    assert code == 0 and f"threshold {best.threshold:.4f}" in out
    assert load_checkpoint(tmp_path / "copy.safetensors")[1].threshold == best.threshold
    assert load_checkpoint(ckpt)[1].threshold == 0.5
    # in place, by recall (an untrained network: best F1 is "everything is defect", a recall target is not)
    want = ev.hist["any"].choose_threshold("recall", 0.5)
    assert 0 < want.threshold < 1 and want.threshold != 0.5
    code, out, _ = run_cli(monkeypatch, capsys, "calibrate", "-m", ckpt, "-d", data, "--split", "all",
                           "--rule", "recall", "--target", "0.5")
    _, spec, meta = load_checkpoint(ckpt)  # the weights still match their (rewritten) sidecar
    assert code == 0 and spec.threshold == want.threshold and ckpt.read_bytes() == weights_before
    record = meta["extra"]["threshold"]
    assert record["rule"] == "recall" and record["target"] == 0.5 and record["previous"] == record["default"] == 0.5
    assert record["images"] == 5 and record["recall"] == pytest.approx(want.recall, abs=1e-6) and want.recall >= 0.5
    summary = run_evaluation(ckpt, data, tmp_path / "ev", split="all",
                             options=EvalOptions(device="cpu", seam_images=0, min_area=0))
    assert summary.metrics.threshold == want.threshold  # evaluate (and infer) use the stored threshold
    m = summary.metrics.model_dump()
    assert m["dice"]["defect"] == pytest.approx(want.f1, abs=1e-4)  # the mask at that threshold: pixel F1 = Dice


def test_evaluate_says_what_infer_says_about_center_stitching(tmp_path):
    """`evaluate` logs the predictor's notes as `infer` prints them, e.g. that center stitching cannot be exact."""
    spec = ModelSpec(arch="deeplabv3plus", encoder="resnet10t", classes=("defect",), tile=64, overlap=16)
    save_checkpoint(build_model(spec), spec, tmp_path / "m" / "model")
    notes: list[str] = []
    run_evaluation(tmp_path / "m" / "model.safetensors", dataset_with_clean_images(tmp_path / "d"), tmp_path / "ev",
                   split="all", options=EvalOptions(device="cpu", seam_images=0, stitch="center"), log=notes.append)
    assert notes == ["deeplabv3plus pools over the whole tile: center stitching is not exact; consider --stitch gaussian"]


def test_evaluate_and_calibrate_with_flip_tta_score_what_infer_tta_predicts(tmp_path):
    """`--tta` in evaluate / calibrate runs the flip-averaged network `infer --tta` runs, not the plain one."""
    data = dataset_with_clean_images(tmp_path / "d")
    ckpt = _checkpoint(tmp_path / "m" / "model")  # random weights: not flip-equivariant
    model, spec, _ = load_checkpoint(ckpt)
    model.eval()
    ds = load_dataset(data)
    tiles = TorchTiles(model, head="sigmoid", mean=spec.mean, std=spec.std, amp="off", tta=True)
    scores, truth = [], []
    for s in ds.labeled:
        image = ds.load_image(s)
        scores.append(tiled_inference(tiles, image, tile=64, overlap=16, align=32)[0].ravel())
        truth.append((ds.load_mask(s, image.shape[:2]) > 0).ravel())
    want = average_precision_score(np.concatenate(truth), np.concatenate(scores))
    results = {tta: run_evaluation(ckpt, data, tmp_path / f"ev{tta}", split="all",
                                   options=EvalOptions(device="cpu", amp="off", seam_images=0, examples=0, tta=tta))
               for tta in (False, True)}
    assert results[True].metrics.defect_pixel_ap == pytest.approx(want, abs=1e-4)
    assert results[False].metrics.defect_pixel_ap != pytest.approx(want, abs=1e-4)  # the flips did change scores
    assert json.loads((tmp_path / "evTrue" / "metrics.json").read_text())["options"]["tta"] is True
    assert "with flip TTA" in (tmp_path / "evTrue" / "report.html").read_text()
    calibrate_threshold(ckpt, data, split="all", options=EvalOptions(device="cpu", amp="off", tta=True))
    assert load_checkpoint(ckpt)[2]["extra"]["threshold"]["tta"] is True


def test_evaluate_and_calibrate_say_what_the_run_itself_found(tmp_path, monkeypatch):
    """A note the run adds (an ONNX Runtime provider giving way to the CPU one) is logged after it, once."""
    original = Predictor.segment_rows

    def segment_rows_with_fallback(self, *args, **kwargs):
        self.tiles.fallback_note = "the provider gave way"
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Predictor, "segment_rows", segment_rows_with_fallback)
    data = dataset_with_clean_images(tmp_path / "d")
    ckpt = _checkpoint(tmp_path / "m" / "model")
    options = EvalOptions(device="cpu", amp="off", seam_images=0, examples=0)
    for run in (lambda log: run_evaluation(ckpt, data, tmp_path / "ev", split="all", options=options, log=log),
                lambda log: calibrate_threshold(ckpt, data, split="all", options=options, log=log)):
        notes: list[str] = []
        run(notes.append)
        assert notes == ["the provider gave way"]
