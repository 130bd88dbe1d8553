"""`defectscan compare DIR ...`: evaluations of several models side by side (HTML + JSON + CSV).

Each DIR is an `evaluate` output directory, or a directory holding one as `evaluation/` (a training run or a
benchmark cell). The crops section shows the same image windows for every model, coloured by outcome, chosen
where the models disagree most.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import cv2
import numpy as np

from defectscan.benchmark import METRICS, metric_value
from defectscan.errors import DefectscanError
from defectscan.reporting import outcome_preview
from defectscan.evaluation_output import load_metrics
from defectscan.images import atomic_dir, csv_text

TABLE_METRICS = ["defect_iou", "defect_dice", "pixel_ap", "pixel_auroc", "best_f1", "region_recall",
                 "fp_regions_per_mp", "pro", "image_auroc", "image_ap", "image_f1", "parameters", "gflops_per_tile",
                 "mp_per_s", "latency_s", "peak_rss_mb"]


def _labels(evals: list[dict]) -> list[str]:
    """Short unique names: the encoder, with the directory name added where two share an encoder."""
    base = [e.get("encoder") or Path(e["_dir"]).name for e in evals]
    out = []
    for e, b in zip(evals, base):
        if base.count(b) > 1:
            d = Path(e["_dir"])
            b = f"{b} ({d.parent.name if d.name == 'evaluation' else d.name})"
        out.append(b)
    if len(set(out)) < len(out):
        out = [f"{o} #{i + 1}" for i, o in enumerate(out)]
    return out


def _per_image(ev: dict) -> dict[str, dict]:
    path = Path(ev["_dir"]) / "per_image.csv"
    if not path.is_file():
        return {}
    return {Path(r["image"]).stem: r for r in csv.DictReader(io.StringIO(path.read_text()))}


def pick_crops(evals: list[dict], ds, count: int = 4, window: int = 320) -> list[dict]:
    """Windows on images every evaluation saw, where per-image Dice varies most across the models: per window
    the image name and position, the RGB crop, the true defect mask and each evaluation's predicted mask."""
    per = [_per_image(e) for e in evals]
    common = [s for s in evals[0].get("images", []) if all(s in p for p in per)
              and all((Path(e["_dir"]) / "predictions" / f"{s}.png").is_file() for e in evals)]

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
        preds = [cv2.imread(str(Path(e["_dir"]) / "predictions" / f"{stem}.png"), cv2.IMREAD_UNCHANGED) for e in evals]
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


def compare(dirs: list[str | Path], out: str | Path) -> dict:
    """Write compare.html, compare.json and compare.csv into `out` (atomically); returns the JSON content."""
    from defectscan.data import load_dataset
    from defectscan.report_html import pyplot, esc, fig_uri, figure, outcome_key, page, png_uri, table

    if len(dirs) < 1:
        raise DefectscanError("compare needs at least one evaluation directory")
    evals = [load_metrics(d) for d in dirs]
    labels = _labels(evals)
    rows = []
    for label, e in zip(labels, evals):
        m = e["metrics"]
        rows.append({"model": label, "description": e.get("model"), "dir": e["_dir"], "images": m.get("images"),
                     "split": e.get("split"), "data": e.get("data"),
                     **{k: metric_value(m, METRICS[k]) for k in TABLE_METRICS}})
    datasets = {(e.get("data"), e.get("split"), tuple(e.get("images", []))) for e in evals}
    warning = "" if len(datasets) == 1 else ("the evaluations did not all use the same images: the numbers are not "
                                             "directly comparable")
    plt = pyplot()
    scatters = []
    for x_key, x_label in (("mp_per_s", "inference speed (MP/s)"), ("parameters", "parameters")):
        fig, ax = plt.subplots(figsize=(5.2, 4.0))
        for r in rows:
            if r[x_key] is not None and r["defect_dice"] is not None:
                ax.scatter(r[x_key], r["defect_dice"], s=40)
                ax.annotate(r["model"], (r[x_key], r["defect_dice"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
        ax.set(xlabel=x_label, ylabel="defect Dice", title=f"accuracy vs {x_label.split(' (')[0]}")
        if x_key == "parameters":
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        scatters.append(figure(fig_uri(fig), f"defect Dice against {x_label}"))
    crops_html = ""
    first = evals[0]
    if first.get("data") and Path(first["data"]).is_dir():
        try:
            classes = first["metrics"]["confusion"]["classes"][1:]
            ds = load_dataset(first["data"], first.get("format", "auto"), classes)
            crops = pick_crops(evals, ds)
        except DefectscanError:
            crops = []
        cells = []
        for c in crops:
            row = [figure(png_uri(c["image"], quality=88), c["name"])]
            for label, pred in zip(labels, c["preds"]):
                preview = outcome_preview(c["image"], c["gt"], pred, max_side=max(c["image"].shape[:2]))
                row.append(figure(png_uri(preview, quality=88), label))
            cells.append("<div class='grid'>" + "".join(row) + "</div>")
        if cells:
            crops_html = ("<h2>Same crops, every model (where they disagree most)</h2>" + outcome_key() + "".join(cells))
    header = ["model", *TABLE_METRICS]
    body = [f"<p class='meta'>{len(evals)} evaluations · data {esc(first.get('data'))} · split {esc(first.get('split'))}"
            f"{' · <b>' + esc(warning) + '</b>' if warning else ''}</p>",
            "<h2>Metrics</h2>", table(header, [[r[k] for k in header] for r in rows]),
            "<h2>Accuracy against cost</h2><div class='grid'>" + "".join(scatters) + "</div>", crops_html,
            "<h2>Sources</h2>", table(["model", "description", "directory"], [[r["model"], r["description"], r["dir"]] for r in rows])]
    result = {"models": rows, "warning": warning or None}
    with atomic_dir(out) as tmp:
        (tmp / "compare.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        (tmp / "compare.csv").write_text(csv_text(rows), encoding="utf-8")
        (tmp / "compare.html").write_text(page("defectscan compare", "\n".join(body)), encoding="utf-8")
    return result
