"""How well does a validation set of k images pick the epoch? Measured on validation images only.

    python scripts/epoch_selection.py runs/x                    # a training run with a validation split
    python scripts/epoch_selection.py results/study/CELL.json   # or a study cell's record

A run records, per epoch, every validation image's defect pixel counts (validation_images.csv). This script
plays many small validation sets: k images drawn at random pick the epoch with the best pooled defect IoU (ties to
the earlier epoch, as `train` does), and that epoch is scored on the *other* validation images, against keeping the
last epoch and against the best epoch those other images would pick themselves. The gap between "picked" and
"last" tells whether k validation images are worth choosing an epoch with, or only add noise (issue 14: one
validation image picked epoch 1 of 6 for two 5-label cells). Nothing here reads a test split.

A run directory with validation_scores.npz (per epoch and image: score histograms) also replays the whole choice a
run makes: the k images pick the epoch by one of three rules (the last epoch; the best IoU at model.threshold, what
`train` does; the best IoU at each epoch's own validation.threshold choice) and then the threshold (stable_f1 on
the same k images); the other images score that epoch at that threshold. Counted from the histograms (no min_area).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np


def load_counts(source: Path) -> tuple[list[str], np.ndarray]:
    """(image names, counts[epoch, image, (tp, fp, fn)]) from a run directory or a study record."""
    if source.is_dir():
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from defectscan.training import RunDir

        rows = RunDir(source).read_validation_images()
    else:
        rows = json.loads(source.read_text()).get("validation_images", [])
    if not rows:
        raise SystemExit(f"{source}: no per-image validation counts (runs record them since validation_images.csv)")
    by_epoch: dict[int, dict[str, tuple]] = defaultdict(dict)
    for r in rows:
        by_epoch[int(float(r["epoch"]))][r["image"]] = tuple(float(r[k]) for k in ("tp_px", "fp_px", "fn_px"))
    epochs = sorted(by_epoch)
    images = sorted(set.intersection(*(set(v) for v in by_epoch.values())))
    return images, np.array([[by_epoch[e][i] for i in images] for e in epochs])


def pooled_iou(counts: np.ndarray) -> np.ndarray:
    """Pooled defect IoU per epoch of counts[epoch, image, (tp, fp, fn)] (0 where nothing is predicted or true)."""
    tp, fp, fn = counts.sum(axis=1).T
    union = tp + fp + fn
    return np.where(union > 0, tp / np.maximum(union, 1), 0.0)


def load_scores(source: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(pos, neg) histograms [epoch, image, level] of a run directory's validation_scores.npz, or None."""
    if not source.is_dir():
        return None
    from defectscan.training import RunDir

    _, _, pos, neg = RunDir(source).read_validation_scores()
    return None if pos is None else (pos, neg)


def replay_with_thresholds(pos: np.ndarray, neg: np.ndarray, sizes: list[int], draws: int, seed: int,
                           default: float) -> dict[int, np.ndarray]:
    """The k images choose epoch (three rules) and threshold (stable_f1); the others score the choice. Returns
    {k: mean IoU on the other images per rule}, as printed."""
    from defectscan.metrics import ScoreHistogram, choose_threshold

    n_epochs, n_images, _ = pos.shape
    default_level = int(round(default * 255))

    def iou_at(e: int, images: np.ndarray, level: int) -> float:
        tp, p, fp = pos[e, images, level:].sum(), pos[e, images].sum(), neg[e, images, level:].sum()
        return tp / (p + fp) if p + fp > 0 else 0.0  # tp / (tp + fp + fn), fn = p - tp

    def choice(e: int, images: np.ndarray):
        hists = [ScoreHistogram.from_dict({"pos": pos[e, i], "neg": neg[e, i]}) for i in images]
        return choose_threshold(hists, "stable_f1", default=default) if pos[e, images].sum() > 0 else None

    rng = np.random.default_rng(seed)
    rules = ("last epoch", f"best IoU at {default:g}", "best IoU at own threshold")
    print(f"\nepoch and threshold chosen on k images (stable_f1), scored on the others: mean IoU over {draws} draws")
    print("| k | " + " | ".join(rules) + f" | own threshold - last | own threshold - at {default:g} |")
    print("|---|" + "---|" * (len(rules) + 2))
    means = {}
    for k in sizes:
        if k >= n_images:
            continue
        scores = np.zeros((draws, len(rules)))
        for d in range(draws):
            chosen = rng.choice(n_images, k, replace=False)
            rest = np.setdiff1d(np.arange(n_images), chosen)
            choices = [choice(e, chosen) for e in range(n_epochs)]
            at_default = [iou_at(e, chosen, default_level) for e in range(n_epochs)]
            own = [c.iou if c else -1.0 for c in choices]
            for r, e in enumerate((n_epochs - 1, int(np.argmax(at_default)), int(np.argmax(own)))):
                level = int(round(choices[e].threshold * 255)) if choices[e] else default_level
                scores[d, r] = iou_at(e, rest, level)
        m = means[k] = scores.mean(axis=0)
        print(f"| {k} | " + " | ".join(f"{v:.3f}" for v in m)
              + f" | {np.mean(scores[:, 2] - scores[:, 0]):+.3f} | {np.mean(scores[:, 2] - scores[:, 1]):+.3f} |")
    return means


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="run directory or study cell record (.json)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 3, 5, 10, 20])
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threshold-draws", type=int, default=300, help="draws of the replay with thresholds")
    ap.add_argument("--default-threshold", type=float, default=0.5, help="model.threshold of the run")
    args = ap.parse_args()
    images, counts = load_counts(args.source)
    n_epochs, n_images = counts.shape[:2]
    rng = np.random.default_rng(args.seed)
    whole = pooled_iou(counts)
    print(f"{args.source}: {n_images} validation images x {n_epochs} epochs; pooled defect IoU per epoch: "
          + " ".join(f"{v:.3f}" for v in whole))
    print("| k validation images | picked epoch: IoU on the others | last epoch | best epoch (others' own pick) "
          "| picked - last | share of draws picked >= last | epochs picked (1..n) |")
    print("|---|---|---|---|---|---|---|")
    for k in args.sizes:
        if k >= n_images:
            continue
        picked, last, best, hist = [], [], [], np.zeros(n_epochs, int)
        for _ in range(args.draws):
            chosen = rng.choice(n_images, k, replace=False)
            rest = np.setdiff1d(np.arange(n_images), chosen)
            e = int(np.argmax(pooled_iou(counts[:, chosen])))  # argmax: the first of equal values, like train
            others = pooled_iou(counts[:, rest])
            picked.append(others[e])
            last.append(others[-1])
            best.append(others.max())
            hist[e] += 1
        picked, last = np.array(picked), np.array(last)
        print(f"| {k} | {picked.mean():.3f} | {last.mean():.3f} | {np.mean(best):.3f} | {np.mean(picked - last):+.3f} "
              f"| {np.mean(picked >= last):.0%} | {' '.join(str(h) for h in hist)} |")
    scores = load_scores(args.source)
    if scores is not None:
        replay_with_thresholds(*scores, args.sizes, args.threshold_draws, args.seed, args.default_threshold)


if __name__ == "__main__":
    main()
