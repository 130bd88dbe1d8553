"""`defectscan compare DIR ...`: evaluations of several models side by side (HTML + JSON + CSV).

Each DIR is an `evaluate` output directory, or a directory holding one as `evaluation/` (a training run or a
benchmark cell). The crops section shows the same image windows for every model, coloured by outcome, chosen
where the models disagree most.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from defectscan.data import load_dataset
from defectscan.errors import DefectscanError
from defectscan.evaluation.outputs import EVALUATION_DIR, load_metrics
from defectscan.io.files import atomic_dir, csv_text, read_csv
from defectscan.reporting import plots
from defectscan.reporting.html import png_bytes_uri, png_uri, render
from defectscan.reporting.overlays import outcome_preview
from defectscan.schemas import SCORE_OPTIONS, EvalSummary

# Column titles people read, and which way is better (True: higher), for the best-value highlight
METRIC_LABELS = {
    "defect_iou": ("defect IoU", True), "defect_dice": ("defect Dice", True), "pixel_ap": ("pixel AP", True),
    "pixel_auroc": ("pixel AUROC", True), "best_f1": ("best F1", True), "region_recall": ("region recall", True),
    "fp_regions_per_mp": ("FP regions / MP", False), "predicted_area_ratio": ("predicted / true area", None),
    "fp_area_fraction": ("FP area (of background)", False), "pro": ("PRO", True), "image_auroc": ("image AUROC", True),
    "image_ap": ("image AP", True), "image_f1": ("image F1", True), "parameters": ("parameters", False),
    "gflops_per_tile": ("GFLOPs / tile", False), "mp_per_s": ("MP / s", True), "latency_s": ("s / image", False),
    "peak_rss_mb": ("peak RSS MB", False),
}
TABLE_METRICS = ["defect_iou", "defect_dice", "pixel_ap", "pixel_auroc", "best_f1", "region_recall",
                 "fp_regions_per_mp", "predicted_area_ratio", "fp_area_fraction", "pro", "image_auroc", "image_ap", "image_f1", "parameters", "gflops_per_tile",
                 "mp_per_s", "latency_s", "peak_rss_mb"]


def _labels(evals: list[EvalSummary], dirs: list[Path]) -> list[str]:
    """Short unique names: the encoder, with the directory name added where two share an encoder."""
    base = [e.encoder or d.name for e, d in zip(evals, dirs)]
    out = []
    for d, b in zip(dirs, base):
        if base.count(b) > 1:
            b = f"{b} ({d.parent.name if d.name == EVALUATION_DIR else d.name})"
        out.append(b)
    if len(set(out)) < len(out):
        out = [f"{o} #{i + 1}" for i, o in enumerate(out)]
    return out


def _per_image(eval_dir: Path) -> dict[str, dict]:
    return {Path(r["image"]).stem: r for r in read_csv(eval_dir / "per_image.csv")}


def pick_crops(evals: list[EvalSummary], dirs: list[Path], ds, count: int = 4, window: int = 320) -> list[dict]:
    """Windows on images every evaluation saw, where per-image Dice varies most across the models: per window
    the image name and position, the RGB crop, the true defect mask and each evaluation's predicted mask."""
    per = [_per_image(d) for d in dirs]
    common = [s for s in evals[0].images if all(s in p for p in per)
              and all((d / "predictions" / f"{s}.png").is_file() for d in dirs)]

    def spread(stem: str) -> tuple[float, int]:
        dice = [float(p[stem]["defect_dice"]) if p[stem]["defect_dice"] not in ("", "None") else 1.0 for p in per]
        return float(np.std(dice)), int(per[0][stem]["gt_defect_px"])

    by_stem = {s.stem: s for s in ds.labeled}
    crops = []
    for stem in sorted(common, key=spread, reverse=True)[:count]:
        sample = by_stem.get(stem)
        if sample is None:
            continue
        image = ds.load_image(sample)
        gt = ds.load_mask(sample, image.shape[:2]) > 0
        preds = [cv2.imread(str(d / "predictions" / f"{stem}.png"), cv2.IMREAD_UNCHANGED) for d in dirs]
        if any(p is None or p.shape != gt.shape for p in preds):
            continue
        preds = [p > 0 for p in preds]
        union = gt.copy()
        for p in preds:
            union |= p
        h, w = gt.shape
        ch, cw = min(window, h), min(window, w)
        ys, xs = np.nonzero(gt if gt.any() else union)
        cy, cx = (int(np.median(ys)), int(np.median(xs))) if len(ys) else (h // 2, w // 2)
        y0, x0 = min(max(0, cy - ch // 2), h - ch), min(max(0, cx - cw // 2), w - cw)
        win = (slice(y0, y0 + ch), slice(x0, x0 + cw))
        crops.append({"name": f"{stem} [{y0}:{y0 + ch}, {x0}:{x0 + cw}]", "image": np.ascontiguousarray(image[win]),
                      "gt": gt[win], "preds": [p[win] for p in preds]})
    return crops


# Two evaluations that chose a scoring option differently are not a comparison of models. None means "as the
# checkpoint records" (each model's own tile, threshold, ...), which is comparable. `stitch` is left out:
# metrics.json records the resolved mode, and each family's own (center for CNNs, gaussian for Swin / ViTAE) is its
# fair setting.
COMPARED_OPTIONS = tuple(k for k in SCORE_OPTIONS if k != "stitch")


def _used(e: EvalSummary, key: str):
    """The value an option resolved to, where metrics.json records it (None: not recorded)."""
    if key == "threshold":
        return e.metrics.threshold
    if key == "tile" and e.metrics.cost is not None and e.metrics.cost.tile:
        return tuple(e.metrics.cost.tile)
    return None


def differing_options(evals: list[EvalSummary]) -> list[str]:
    """`name: value, value` for every scoring option (and the precision) the evaluations chose differently. An
    explicit value that resolved to what the others used (`--threshold 0.9` on a model calibrated at 0.9) is not a
    difference; a precision older files did not record is not either."""
    out = []
    for key in COMPARED_OPTIONS:
        values = [getattr(e.options, key) for e in evals]
        if len(set(values)) < 2:
            continue
        used = [_used(e, key) for e in evals]
        if None not in used and len(set(used)) == 1:
            continue
        out.append(f"{key}: " + ", ".join("as trained" if v is None else str(v) for v in values))
    precisions = [e.precision for e in evals if e.precision is not None]
    if len(set(precisions)) > 1:
        out.append("precision: " + ", ".join(str(e.precision or "not recorded") for e in evals))
    return out


def _best_cells(rows: list[dict], header: list[str]) -> list[list[bool]]:
    """Per row and column: whether that cell holds the best value of its column (ties too; not for one model)."""
    best = [[False] * len(header) for _ in rows]
    if len(rows) < 2:
        return best
    for j, key in enumerate(header):
        higher = METRIC_LABELS.get(key, (None, None))[1]
        values = [r[key] for r in rows]
        known = [v for v in values if isinstance(v, (int, float))]
        if higher is None or not known:
            continue
        target = max(known) if higher else min(known)
        for i, v in enumerate(values):
            best[i][j] = v == target
    return best


def compare(dirs: list[str | Path], out: str | Path) -> dict:
    """Write compare.html, compare.json and compare.csv into `out` (atomically); returns the JSON content."""
    if len(dirs) < 1:
        raise DefectscanError("compare needs at least one evaluation directory")
    loaded = [load_metrics(d) for d in dirs]
    evals, eval_dirs = [e for e, _ in loaded], [d for _, d in loaded]
    labels = _labels(evals, eval_dirs)
    rows = []
    for label, e, d in zip(labels, evals, eval_dirs):
        head = e.headline()
        rows.append({"model": label, "description": e.model, "dir": str(d), "images": e.metrics.images,
                     "split": e.split, "data": e.data, **{k: head[k] for k in TABLE_METRICS}})
    datasets = {(e.data, e.split, tuple(e.images)) for e in evals}
    warnings = [] if len(datasets) == 1 else ["the evaluations did not all use the same images"]
    options = differing_options(evals)
    if options:
        warnings.append("they ran with different options (" + "; ".join(options) + ")")
    warning = (" and ".join(warnings) + ": the numbers are not directly comparable") if warnings else ""
    scatters = []
    for x_key, x_label in (("mp_per_s", "inference speed (MP/s)"), ("parameters", "parameters")):
        pts = [(r["model"], r[x_key], r["defect_dice"], None) for r in rows
               if r[x_key] is not None and r["defect_dice"] is not None]
        png = plots.scatter(pts, x_label, "defect Dice", f"accuracy vs {x_label.split(' (')[0]}",
                            log_x=x_key == "parameters", annotate=True)
        scatters.append({"uri": png_bytes_uri(png), "caption": f"defect Dice against {x_label}"})
    crops_html = []
    first = evals[0]
    if Path(first.data).is_dir():
        try:
            ds = load_dataset(first.data, first.format)  # its own classes: the crops show any defect vs none
            crops = pick_crops(evals, eval_dirs, ds)
        except DefectscanError:  # the dataset moved or changed since: the report goes without crops
            crops = []
        for c in crops:
            row = [{"uri": png_uri(c["image"], quality=88), "caption": c["name"]}]
            for label, pred in zip(labels, c["preds"]):
                preview = outcome_preview(c["image"], c["gt"], pred, max_side=max(c["image"].shape[:2]))
                row.append({"uri": png_uri(preview, quality=88), "caption": label})
            crops_html.append(row)
    header = ["model", *TABLE_METRICS]
    html = render("compare.html.j2", title="defectscan compare", count=len(evals), data=first.data,
                  split=first.split, warning=warning, header=["model", *(METRIC_LABELS[k][0] for k in TABLE_METRICS)],
                  rows=[[r[k] for k in header] for r in rows], best=_best_cells(rows, header),
                  scatters=scatters, crops=crops_html,
                  sources=[[r["model"], r["description"], r["dir"]] for r in rows])
    result = {"models": rows, "warning": warning or None}
    with atomic_dir(out) as tmp:
        (tmp / "compare.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        (tmp / "compare.csv").write_text(csv_text(rows), encoding="utf-8")
        (tmp / "compare.html").write_text(html, encoding="utf-8")
    return result
