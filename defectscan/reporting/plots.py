"""Matplotlib figures people look at: training curves, evaluation curves, learning curves, accuracy vs cost.

Every function takes plain numbers and arrays (no evaluation or study objects), returns PNG bytes or writes a
PNG atomically; figures are always closed.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np

from defectscan.io.files import atomic_path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fig_png(fig, dpi: int = 100) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed."""
    plt = pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def write_png(png: bytes, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)


def training_curves(history: list[dict]) -> bytes:
    """Training loss and the validation metrics per epoch."""
    plt = pyplot()
    epochs = [r["epoch"] for r in history]
    validation = [(label, [(r["epoch"], r[key]) for r in history if r.get(key) is not None])
                  for key, label in (("val_mean_iou", "mean IoU"), ("val_mean_dice", "mean Dice"),
                                     ("val_defect_ap", "pixel AP"),
                                     ("val_defect_iou_at_threshold", "defect IoU at its own threshold"))]
    has_val = any(pts for _, pts in validation)  # none without a validation split, and in pretraining
    fig, axes = plt.subplots(1, 2 if has_val else 1, figsize=(10 if has_val else 5.5, 3.8), dpi=100, squeeze=False)
    ax_loss = axes[0, 0]
    ax_loss.plot(epochs, [r["train_loss"] for r in history], marker="o", ms=3)
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    ax_loss.grid(alpha=0.3)
    if not has_val:
        fig.tight_layout()
        return fig_png(fig)
    ax_val = axes[0, 1]
    for label, pts in validation:
        if pts:
            ax_val.plot(*zip(*pts), marker="o", ms=3, label=label)
    ax_val.set(xlabel="epoch", ylabel="validation", title="validation (tiled, full images)", ylim=(0, 1))
    ax_val.grid(alpha=0.3)
    if ax_val.lines:
        ax_val.legend(loc="lower right")
    fig.tight_layout()
    return fig_png(fig)


def precision_recall(curves: Sequence[tuple[str, np.ndarray, np.ndarray, float]]) -> bytes:
    """Pixel precision-recall curves: (name, recall, precision, AP) per class."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    for name, recall, precision, ap in curves:
        ax.plot(recall, precision, label=f"{name} (AP {ap:.3f})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="pixel precision-recall")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no defect pixels in these images", ha="center")
    return fig_png(fig)


def threshold_sweep(threshold: np.ndarray, precision: np.ndarray, recall: np.ndarray, f1: np.ndarray,
                    model_threshold: float, best: tuple[float, float]) -> bytes:
    """Pixel precision, recall and F1 against the score threshold, with the model's and the best-F1 threshold."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    ax.plot(threshold, precision, label="precision")
    ax.plot(threshold, recall, label="recall")
    ax.plot(threshold, f1, label="F1", lw=2)
    ax.axvline(model_threshold, color="k", ls="--", lw=1, label=f"model threshold {model_threshold:.2f}")
    if not np.isnan(best[0]):
        ax.axvline(best[1], color="tab:red", ls=":", lw=1, label=f"best F1 {best[0]:.3f} at {best[1]:.2f}")
    ax.set(xlabel="defect score threshold", ylabel="pixel metric", xlim=(0, 1), ylim=(0, 1.02),
           title="threshold sweep (any defect, pixel level)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig_png(fig)


def pro_curve(fpr: np.ndarray, overlap: np.ndarray, fpr_limit: float) -> bytes:
    """Mean per-region overlap against the pixel false-positive rate (symlog x)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    ax.plot(fpr, overlap)
    ax.axvline(fpr_limit, color="k", ls="--", lw=1, label=f"FPR limit {fpr_limit}")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="pixel false-positive rate (symlog)",
           ylabel="mean per-region overlap", title="PRO curve")
    ax.set_xscale("symlog", linthresh=1e-4)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig_png(fig)


def image_distributions(scores: np.ndarray, defective: np.ndarray, threshold: float, dice: Sequence[float]) -> bytes:
    """Per-image score histograms (defective vs clean images) and per-image Dice of images with defects."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    bins = np.linspace(0, 1, 26)
    axes[0].hist([scores[defective], scores[~defective]], bins=bins, label=["defective images", "clean images"],
                 color=["tab:red", "tab:blue"], alpha=0.8)
    axes[0].axvline(threshold, color="k", ls="--", lw=1)
    axes[0].set(xlabel="image score (highest defect score)", ylabel="images", title="per-image scores")
    axes[0].legend(fontsize=8)
    axes[1].hist(list(dice), bins=np.linspace(0, 1, 21), color="tab:green")
    axes[1].set(xlabel="defect Dice of the image", ylabel="images", title="per-image Dice (images with defects)")
    return fig_png(fig)


def learning_curves(series: dict[str, list[tuple[float, float, float, float]]], ylabel: str, title: str) -> bytes:
    """Metric against labeled images (log x) per backbone: points (x, mean, low, high), the interval shaded."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, pts in series.items():
        if not pts:
            continue
        x, y, lo, hi = zip(*sorted(pts))
        line, = ax.plot(x, y, marker="o", label=label)
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.18)
    _plain_log_x(ax, [p[0] for pts in series.values() for p in pts])  # ticks at the labeled counts studied
    ax.set(xlabel="labeled training images (log scale)", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig_png(fig, dpi=110)


def accuracy_vs_cost(series: dict[str, list[tuple[float, float, float, float, str]]], xlabel: str, ylabel: str,
                     title: str) -> bytes:
    """Metric against a cost per backbone: points (cost, mean, low, high, tag), joined in cost order, each tagged
    (e.g. its labeled count) and its interval drawn as an error bar."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, pts in series.items():
        if not pts:
            continue
        x, y, lo, hi, tags = zip(*sorted(pts))
        line, = ax.plot(x, y, marker="o", label=label)
        ax.errorbar(x, y, yerr=[np.subtract(y, lo), np.subtract(hi, y)], fmt="none", ecolor=line.get_color(),
                    capsize=3, alpha=0.6)
        for xi, yi, tag in zip(x, y, tags):
            ax.annotate(tag, (xi, yi), fontsize=7, xytext=(4, -10), textcoords="offset points")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig_png(fig, dpi=110)


def _plain_log_x(ax, ticks: Sequence[float] | None = None) -> None:
    """A log x axis labelled with plain numbers (5, 20, 324 or 2M), not 2x10^0 minor-tick labels."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    def human(v: float, _pos: int = 0) -> str:
        for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(v) >= div:
                return f"{v / div:.3g}{suffix}"
        return f"{v:.3g}"

    ax.set_xscale("log")
    if ticks:
        ax.set_xticks(sorted(set(ticks)))
    ax.xaxis.set_major_formatter(FuncFormatter(human))
    ax.xaxis.set_minor_formatter(NullFormatter())


def scatter(points: Sequence[tuple[str, float, float, tuple[float, float] | None]], xlabel: str, ylabel: str,
            title: str, log_x: bool = False, annotate: bool = False) -> bytes:
    """Labelled points (label, x, y, optional (low, high) interval of y): accuracy against a cost."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.4, 4.2))
    for label, x, y, interval in points:
        if interval is not None:
            ax.errorbar(x, y, yerr=[[y - interval[0]], [interval[1] - y]], fmt="o", capsize=3, label=label)
        else:
            ax.scatter(x, y, s=40, label=None if annotate else label)
        if annotate:
            ax.annotate(label, (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if log_x:
        _plain_log_x(ax)
    ax.grid(alpha=0.3)
    if points and not annotate:
        ax.legend(fontsize=8)
    return fig_png(fig)
