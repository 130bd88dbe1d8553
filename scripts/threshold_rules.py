"""Which threshold rule generalises from a few validation images? A resampling study on non-test images.

For each training run, the images of a pool that the run neither trained on nor tests on (its validation split,
and the labeled images left out of its label budget; at most --limit of them) are scored once by its best
checkpoint through the tiled engine; their per-image defect-score histograms are cached. Then, many times for each calibration size k, k images of the pool
choose a threshold by each rule and the other images of the pool measure it (pooled defect IoU at that
threshold). The test split is never read, so a rule chosen from this table is chosen on validation data.

    python scripts/threshold_rules.py runs/lite0_all runs/lite0_n20 --data ../shared/datasets/bsdata
    (the README's table: five BSData runs, --limit 80 --draws 200)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from defectscan.evaluation.evaluator import evaluate
from defectscan.evaluation.outputs import open_for_scoring
from defectscan.io.provenance import cpu_name
from defectscan.metrics import ScoreHistogram, choose_threshold
from defectscan.schemas import EvalOptions

RULES = {"fixed 0.5": None, "best_f1": 0.0, "stable_f1 0.25 SE": 0.25, "stable_f1 0.5 SE": 0.5, "stable_f1 1 SE": 1.0}


def image_histograms(run: Path, data: str, pools: list[str], cache: Path, limit: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(pos, neg) per image, shape (n, 256), for the run's images in `pools` (a seeded `limit` of them);
    cached in `cache`."""
    if cache.is_file():
        z = np.load(cache)
        return z["pos"], z["neg"]
    splits = json.loads((run / "splits.json").read_text())
    stems = {s for p in pools for s in splits.get(p, [])}
    if stems & set(splits.get("test", [])):
        raise SystemExit("the pool overlaps the test split")
    opts = EvalOptions(seam_images=0, examples=0, cost=False)
    predictor, ds, _ = open_for_scoring(run / "best.safetensors", data, opts)
    samples = [s for s in ds.labeled if s.stem in stems]
    if limit and len(samples) > limit:
        samples = [samples[i] for i in sorted(np.random.default_rng(0).choice(len(samples), limit, replace=False))]
    print(f"scoring {len(samples)} images of {run.name} ({'+'.join(pools)})", flush=True)
    ev = evaluate(predictor, ds, samples, opts)
    pos = np.stack([h.pos for h in ev.image_hists])
    neg = np.stack([h.neg for h in ev.image_hists])
    np.savez(cache, pos=pos, neg=neg)
    return pos, neg


def held_out_iou(pos: np.ndarray, neg: np.ndarray, threshold: float) -> float:
    level = int(round(threshold * 255))
    tp, fp, p = pos[:, level:].sum(), neg[:, level:].sum(), pos.sum()
    return float(tp / (p + fp)) if p + fp else float("nan")  # TP / (TP + FP + FN)


def hists(pos: np.ndarray, neg: np.ndarray) -> list[ScoreHistogram]:
    return [ScoreHistogram.from_dict({"pos": p, "neg": n}) for p, n in zip(pos, neg)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--data", required=True)
    ap.add_argument("--pool", nargs="+", default=["val", "train_unused"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[1, 2, 3, 5, 10, 20])
    ap.add_argument("--limit", type=int, default=100, help="score at most this many pool images per run")
    ap.add_argument("--draws", type=int, default=300)
    ap.add_argument("--cache", type=Path, default=Path("runs/threshold_rules"))
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    print(f"# threshold rules on non-test images; {cpu_name()}")
    print("| run | pool images | k | " + " | ".join(f"{r}: IoU mean, p10" for r in RULES) + " | oracle IoU |")
    print("|---|---|---|" + "---|" * (len(RULES) + 1))
    regret: dict[tuple[int, str], list[float]] = {}
    for run in args.runs:
        pos, neg = image_histograms(run, args.data, args.pool, args.cache / f"{run.name}.npz", args.limit)
        n = len(pos)
        rng = np.random.default_rng(0)
        oracle = max(held_out_iou(pos, neg, lvl / 255) for lvl in range(256))
        for k in args.sizes:
            if k >= n - 1:
                continue
            ious: dict[str, list[float]] = {r: [] for r in RULES}
            for _ in range(args.draws):
                pick = rng.permutation(n)
                cal, rest = pick[:k], pick[k:]
                if pos[cal].sum() == 0 or pos[rest].sum() == 0:
                    continue
                calib = hists(pos[cal], neg[cal])
                for rule, tolerance in RULES.items():
                    t = 0.5 if tolerance is None else choose_threshold(calib, "stable_f1", tolerance=tolerance).threshold
                    if tolerance == 0.0 and sum(h.pos.any() for h in calib) < 2:
                        t = choose_threshold(calib, "best_f1").threshold  # raw best F1, even from one image
                    ious[rule].append(held_out_iou(pos[rest], neg[rest], t))
            means = {r: float(np.mean(v)) for r, v in ious.items()}
            for r in RULES:
                regret.setdefault((k, r), []).append(max(means.values()) - means[r])
            print(f"| {run.name} | {n} | {k} | " + " | ".join(f"{means[r]:.3f}, {np.percentile(ious[r], 10):.3f}"
                                                            for r in RULES) + f" | {oracle:.3f} |", flush=True)
    print("\nRegret (best rule's mean IoU minus this rule's, per run): mean (worst) over runs")
    print("| k | " + " | ".join(RULES) + " |")
    print("|---|" + "---|" * len(RULES))
    for k in args.sizes:
        if (k, "best_f1") in regret:
            print(f"| {k} | " + " | ".join(f"{np.mean(regret[k, r]):.4f} ({max(regret[k, r]):.3f})" for r in RULES)
                  + " |")


if __name__ == "__main__":
    main()
