"""Self-contained HTML reports (plots and previews embedded as data URIs) and the evaluation report.

One HTML file can be mailed or attached to a ticket: no side files, no JavaScript, no network.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any, Iterable, Sequence

import cv2
import numpy as np

from defectscan.evaluation import Evaluation
from defectscan.metrics import pro_curve
from defectscan.reporting import FN_COLOR, FP_COLOR, TP_COLOR

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px auto;max-width:1280px;color:#222;padding:0 16px}
h1{font-size:1.5em} h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:.88em;margin:8px 0} td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:12px} figure{margin:0} figcaption{font-size:.85em;color:#555}
.meta{color:#555;font-size:.9em} .key span{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px}
img{max-width:100%}
"""


def esc(value: Any) -> str:
    return html.escape(str(value))


def png_uri(image_rgb: np.ndarray, quality: int | None = None) -> str:
    """An RGB image as a data URI (JPEG when `quality` is given: previews of photos are much smaller)."""
    bgr = np.ascontiguousarray(image_rgb[:, :, ::-1])
    if quality:
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
        mime = "jpeg"
    else:
        ok, buf = cv2.imencode(".png", bgr)
        mime = "png"
    if not ok:
        raise ValueError("could not encode image")
    return f"data:image/{mime};base64," + base64.b64encode(buf.tobytes()).decode()


def fig_png(fig, dpi: int = 100) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def png_bytes_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def fig_uri(fig) -> str:
    return png_bytes_uri(fig_png(fig))


def figure(uri: str, caption: str = "", width: int | None = None) -> str:
    w = f' width="{width}"' if width else ""
    return f'<figure><img src="{uri}"{w} alt="{esc(caption)}"><figcaption>{esc(caption)}</figcaption></figure>'


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{CSS}</style>"
            f"</head><body><h1>{esc(title)}</h1>{body}</body></html>\n")


def outcome_key() -> str:
    swatch = lambda c, t: f'<span style="background:rgb{c}"></span>{t}'  # noqa: E731
    return ('<p class="key">' + swatch(TP_COLOR, "true positive") + swatch(FP_COLOR, "false positive")
            + swatch(FN_COLOR, "missed (false negative)") + "</p>")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---- evaluation report ---------------------------------------------------------------------------------------
def evaluation_plots(ev: Evaluation) -> dict[str, str]:
    plt = pyplot()
    plots = {}
    names = [c for c in ev.classes[1:]] + (["any defect"] if len(ev.classes) > 2 else [])
    keys = list(ev.classes[1:]) + (["any"] if len(ev.classes) > 2 else [])

    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    for name, key in zip(names, keys):
        c = ev.hist[key].curve()
        keep = (ev.hist[key].pos + ev.hist[key].neg) > 0
        if ev.hist[key].pos.sum():
            ax.plot(c["recall"][keep], c["precision"][keep], label=f"{name} (AP {ev.hist[key].average_precision():.3f})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="pixel precision-recall")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no defect pixels in these images", ha="center")
    plots["pr"] = fig_uri(fig)

    c = ev.hist["any"].curve()
    t = c["level"] / 255
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    ax.plot(t, c["precision"], label="precision")
    ax.plot(t, c["recall"], label="recall")
    ax.plot(t, c["f1"], label="F1", lw=2)
    ax.axvline(ev.threshold, color="k", ls="--", lw=1, label=f"model threshold {ev.threshold:.2f}")
    f1, thr = ev.hist["any"].best_f1()
    if not np.isnan(f1):
        ax.axvline(thr, color="tab:red", ls=":", lw=1, label=f"best F1 {f1:.3f} at {thr:.2f}")
    ax.set(xlabel="defect score threshold", ylabel="pixel metric", xlim=(0, 1), ylim=(0, 1.02),
           title="threshold sweep (any defect, pixel level)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    plots["sweep"] = fig_uri(fig)

    if ev.gt_regions and ev.hist["any"].neg.sum():
        fig, ax = plt.subplots(figsize=(5.2, 4.2))
        ax.plot(*pro_curve(ev.overlap_sum, ev.gt_regions, ev.hist["any"]))
        limit = ev.options.pro_fpr_limit
        ax.axvline(limit, color="k", ls="--", lw=1, label=f"FPR limit {limit}")
        ax.set(xscale="symlog", xlim=(0, 1), ylim=(0, 1.02), xlabel="pixel false-positive rate (symlog)",
               ylabel="mean per-region overlap", title="PRO curve")
        ax.set_xscale("symlog", linthresh=1e-4)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        plots["pro"] = fig_uri(fig)

    scores = np.asarray(ev.image_scores)
    labels = np.array([r["defective"] for r in ev.per_image], bool)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    bins = np.linspace(0, 1, 26)
    axes[0].hist([scores[labels], scores[~labels]], bins=bins, label=["defective images", "clean images"],
                 color=["tab:red", "tab:blue"], alpha=0.8)
    axes[0].axvline(ev.threshold, color="k", ls="--", lw=1)
    axes[0].set(xlabel="image score (highest defect score)", ylabel="images", title="per-image scores")
    axes[0].legend(fontsize=8)
    dice = [r["defect_dice"] for r in ev.per_image if r["gt_defect_px"] and r["defect_dice"] is not None]
    axes[1].hist(dice, bins=np.linspace(0, 1, 21), color="tab:green")
    axes[1].set(xlabel="defect Dice of the image", ylabel="images", title="per-image Dice (images with defects)")
    plots["images"] = fig_uri(fig)
    return plots


def evaluation_html(ev: Evaluation, meta: dict) -> str:
    s = ev.summary()
    r, im = s["region"], s["image_level"]
    plots = evaluation_plots(ev)
    defect = list(ev.classes[1:])
    body = [f'<p class="meta">{esc(meta.get("model", ""))} · checkpoint {esc(meta.get("checkpoint", ""))} · data '
            f'{esc(meta.get("data", ""))} (split {esc(meta.get("split", ""))}, {ev.images} images) · '
            f'{esc(meta.get("hardware", ""))} · {esc(meta.get("created", ""))}</p>']
    body.append("<h2>Summary</h2>")
    rows = [["pixel defect IoU / Dice (at threshold)", f"{fmt(s['defect_iou'])} / {fmt(s['defect_dice'])}"],
            ["pixel defect AP / AUROC", f"{fmt(s['defect_pixel_ap'])} / {fmt(s['defect_pixel_auroc'])}"],
            ["pixel best F1 (threshold)", f"{fmt(s['defect_best_f1'])} ({fmt(s['defect_best_f1_threshold'])})"],
            [f"region recall ({r['criterion']})", f"{fmt(r['recall'])} ({r['found']} of {r['gt_regions']})"],
            ["false-positive regions per image / per MP",
             f"{fmt(r['fp_regions_per_image'])} / {fmt(r['fp_regions_per_megapixel'])}"],
            [f"PRO (FPR <= {r['pro_fpr_limit']})", fmt(r["pro"])],
            ["image AUROC / AP / F1", f"{fmt(im['auroc'])} / {fmt(im['ap'])} / {fmt(im['f1'])} "
                                      f"({im['defective']} defective, {im['clean']} clean, {im['flagged']} flagged)"]]
    cost = s.get("cost", {})
    if cost:
        rows += [["parameters", f"{cost.get('parameters', 0) / 1e6:.2f} M"],
                 [f"GFLOPs per {cost.get('tile')} tile", fmt(cost.get("gflops_per_tile"))],
                 [f"speed on {cost.get('device')}", f"{fmt(cost.get('megapixels_per_second'))} MP/s, "
                                                    f"{fmt(cost.get('latency_mean_s'))} s per image"],
                 ["peak memory", ", ".join(f"{k} {v}" for k, v in cost.items() if k.startswith("peak"))]]
    body.append(table(["metric", "value"], rows))
    body.append("<h2>Per class (pixel level)</h2>")
    body.append(table(["class", "IoU", "Dice", "best F1", "best-F1 threshold", "AP", "AUROC"],
                      [[c, s["iou"][c], s["dice"][c], s["best_f1"][c], s["best_f1_threshold"][c], s["pixel_ap"][c],
                        s["pixel_auroc"][c]] for c in defect]))
    body.append("<h3>Confusion matrix (pixels; rows truth, columns prediction)</h3>")
    body.append(table(["truth \\ prediction", *ev.classes],
                      [[c, *map(int, row)] for c, row in zip(ev.classes, ev.conf)]))
    body.append("<h2>Curves</h2><div class='grid'>"
                + figure(plots["pr"], "precision-recall over pixels")
                + figure(plots["sweep"], "pixel precision, recall and F1 against the threshold")
                + (figure(plots["pro"], "per-region overlap against pixel FPR") if "pro" in plots else "")
                + "</div>")
    body.append("<h2>Per-image scores</h2>" + figure(plots["images"], "image-level score and Dice distributions"))
    for title, pool in (("Best images", ev.best), ("Worst images", ev.worst)):
        if pool:
            body.append(f"<h2>{title}</h2>" + outcome_key() + "<div class='grid'>" + "".join(
                figure(png_uri(e.preview, quality=88), f"{e.image}: Dice {e.dice:.3f}, {e.errors} wrong px")
                for e in pool) + "</div>")
    if ev.seam:
        body.append("<h2>Seam check (tiled vs whole image)</h2>")
        body.append(table(["image", "max |diff|", "mean |diff|", "mask disagreement"],
                          [[x["image"], x.get("max_abs_diff", x.get("skipped")), x.get("mean_abs_diff"), x.get("mask_disagreement")]
                           for x in ev.seam]))
    rows = sorted(ev.per_image, key=lambda r: (r["defect_dice"] if r["defect_dice"] is not None else 2.0))
    shown = rows[:200]
    body.append(f"<h2>Per image ({'all' if len(shown) == len(rows) else f'the {len(shown)} worst of {len(rows)}'})</h2>")
    cols = ["image", "gt_defect_px", "predicted_px", "defect_dice", "gt_regions", "found_regions", "fp_regions",
            "max_score", "seconds"]
    body.append(table(cols, [[row[c] for c in cols] for row in shown]))
    return page(f"defectscan evaluation — {meta.get('model', '')}", "\n".join(body))
