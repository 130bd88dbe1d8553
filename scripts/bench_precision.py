"""Which CPU inference settings are safe for a checkpoint? float32 (NCHW) vs float32 channels-last vs bf16
autocast channels-last, on the same images, masks compared with float32's.

    python scripts/bench_precision.py runs/x/best.safetensors ../shared/datasets/bsdata --split test

For every image of the split, the checkpoint's `Predictor` runs once per variant, one after the other in this
process (ratios are measured under the same machine load). Printed per variant: the share of mask pixels whose
class differs from the first variant (float32 NCHW unless `--variants` says otherwise), the largest probability difference, the defect IoU against the ground truth,
regions predicted, time and speed-up. A variant may be a default only within the rule of issue 13: at most
0.1 % of mask pixels differ and IoU within 0.005 (README, "bf16 on CPUs").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch


VARIANTS = {"float32": ("off", False), "float32 channels_last": ("off", True), "bf16 channels_last": ("bf16", True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("--split", default="test")
    ap.add_argument("--format", default="auto")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                    help="variants to run; the first is the reference the others are compared with")
    args = ap.parse_args()

    from defectscan.data.formats import load_dataset
    from defectscan.evaluation.outputs import select_samples
    from defectscan.inference import Predictor
    from defectscan.io.provenance import hardware
    from defectscan.runtime import set_threads
    from defectscan.schemas import InferOptions

    set_threads(args.threads)
    ds = load_dataset(args.data, args.format)
    samples, how = select_samples(ds, args.split, None)
    samples = samples[: args.limit] if args.limit else samples
    runs = {}
    for name in args.variants:
        amp, cl = VARIANTS[name]
        p = Predictor.from_checkpoint(args.checkpoint, InferOptions(amp=amp, device="cpu"))
        p.model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
        p.tiles.channels_last = cl
        runs[name] = p
    print(f"{hardware()}; {args.checkpoint} on {len(samples)} images ({how})")
    pixels = 0
    stats = {name: {"differ": 0, "prob": 0, "seconds": 0.0, "conf": np.zeros(3, np.int64), "regions": 0}
             for name in runs}
    for i, s in enumerate(samples):
        image = ds.load_image(s)
        truth = ds.load_mask(s, image.shape[:2]) > 0
        pixels += truth.size
        ref = None
        for name, predictor in runs.items():
            t0 = time.perf_counter()
            pred = predictor.predict(image)
            st = stats[name]
            st["seconds"] += time.perf_counter() - t0
            hit = pred.mask > 0
            st["conf"] += (np.count_nonzero(hit & truth), np.count_nonzero(hit & ~truth), np.count_nonzero(~hit & truth))
            st["regions"] += len(pred.regions)
            ref = ref or pred
            st["differ"] += int(np.count_nonzero(pred.mask != ref.mask))
            st["prob"] = max(st["prob"], int(np.abs(pred.probs.astype(np.int16) - ref.probs.astype(np.int16)).max()))
        print(f"\r{i + 1}/{len(samples)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    base = stats[args.variants[0]]
    base_iou = base["conf"][0] / max(1, base["conf"].sum())
    print(f"| variant | mask pixels differing from {args.variants[0]} | max prob. diff (/255) | defect IoU | regions | MP/s "
          "| speed-up | within the rule |")
    print("|---|---|---|---|---|---|---|---|")
    for name, st in stats.items():
        iou = st["conf"][0] / max(1, st["conf"].sum())
        share = 100 * st["differ"] / pixels
        ok = share <= 0.1 and abs(iou - base_iou) <= 0.005
        print(f"| {name} | {st['differ']:,} ({share:.4f} %) | {st['prob']} | {iou:.4f} ({iou - base_iou:+.4f}) "
              f"| {st['regions']} | {pixels / 1e6 / st['seconds']:.3f} | {base['seconds'] / st['seconds']:.2f} "
              f"| {'yes' if ok else 'NO'} |")


if __name__ == "__main__":
    main()
