"""Train the bundled default model (defectscan/weights/) on synthetic wafers, reproducibly, on a CPU.

    python scripts/train_default_model.py --config configs/default_wafer_model.yaml   # ~20 min on 2 CPU cores
    python scripts/train_default_model.py --steps 50 --out /tmp/quick                  # smoke run
    python scripts/train_default_model.py --revalidate defectscan/weights/wafer_unet_r10t.safetensors

Data: `defectscan.synth` wafers (train seeds 1000.., validation seeds 2000..), random crops with defect-aware
oversampling, flips/rotations and brightness/contrast jitter. Loss: cross-entropy + Dice. Validation runs the
real tiling engine (the path `defectscan infer` uses) on full validation wafers and reports per-class IoU/Dice.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import albumentations as A
import numpy as np
import torch
import torch.nn.functional as F
import yaml
from segmentation_models_pytorch.losses import DiceLoss

from defectscan.metrics import confusion_matrix, iou_dice
from defectscan.images import write_text
from defectscan.models import ModelSpec, build_model, load_checkpoint, save_checkpoint
from defectscan.models.checkpoint import checkpoint_paths
from defectscan.postprocess import segment
from defectscan.synth import CLASSES, generate_wafer
from defectscan.tiling import tiled_inference

ROOT = Path(__file__).resolve().parent.parent


def sample_crop(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, fg: np.ndarray, size: int, defect_share: float):
    """A crop centred on a random defect pixel with probability `defect_share`, else anywhere."""
    h, w = mask.shape
    if fg.size and rng.random() < defect_share:
        cy, cx = fg[rng.integers(len(fg))]
        y = int(np.clip(cy - size // 2 + rng.integers(-size // 4, size // 4 + 1), 0, h - size))
        x = int(np.clip(cx - size // 2 + rng.integers(-size // 4, size // 4 + 1), 0, w - size))
    else:
        y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    return image[y : y + size, x : x + size], mask[y : y + size, x : x + size]


def validate(model: torch.nn.Module, spec: ModelSpec, wafers: int, size: int) -> dict:
    """Per-class IoU/Dice on full validation wafers through the tiling engine and the mask rule of `infer`."""
    model.eval()
    n = len(CLASSES)
    conf = np.zeros((n, n), np.int64)
    t0 = time.perf_counter()
    for i in range(wafers):
        img, msk = generate_wafer(size, 2000 + i)
        probs = tiled_inference(model, img, tile=spec.tile, overlap=spec.overlap, head="softmax", device="cpu",
                                mean=spec.mean, std=spec.std, align=spec.stride)
        pred, _ = segment(probs, spec.head, spec.threshold, dict(enumerate(CLASSES)), min_area=4)  # infer's default
        conf += confusion_matrix(pred, msk, n)
    iou, dsc = iou_dice(conf)
    tp = conf[1:, 1:].sum()
    fp, fn = conf[0, 1:].sum(), conf[1:, 0].sum()
    return {"wafers": wafers, "seeds": f"2000..{1999 + wafers}", "size": size, "tile": spec.tile,
            "overlap": spec.overlap, "stitch": "center", "rule": "postprocess.segment, min_area 4",
            "seconds": round(time.perf_counter() - t0, 1),
            "iou": {c: round(float(v), 4) for c, v in zip(CLASSES, iou)},
            "dice": {c: round(float(v), 4) for c, v in zip(CLASSES, dsc)},
            "mean_iou_defect_classes": round(float(np.nanmean(iou[1:])), 4),
            "defect_vs_background_iou": round(float(tp / (tp + fp + fn)), 4)}


def revalidate(path: str, wafers: int, size: int) -> None:
    """Re-measure a saved model (e.g. after a change of the mask rule) and update its sidecar's numbers."""
    model, spec, meta = load_checkpoint(path)
    meta.setdefault("extra", {})["validation"] = validate(model, spec, wafers, size)
    print(json.dumps(meta["extra"]["validation"], indent=2))
    write_text(checkpoint_paths(path)[1], json.dumps(meta, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "default_wafer_model.yaml")
    ap.add_argument("--out", default=str(ROOT / "defectscan" / "weights" / "wafer_unet_r10t"))
    for name, typ in (("steps", int), ("batch", int), ("crop", int), ("lr", float), ("train-wafers", int),
                      ("val-wafers", int), ("size", int), ("seed", int)):
        ap.add_argument(f"--{name}", type=typ, default=None, help="overrides the config")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--revalidate", metavar="CKPT", help="only re-measure this checkpoint and update its sidecar")
    args = ap.parse_args()
    cfg = yaml.safe_load(args.config.read_text())
    m, d, t = cfg["model"], cfg["data"], cfg["train"]
    defaults = {"steps": t["steps"], "batch": t["batch"], "lr": t["lr"], "seed": t["seed"], "crop": d["crop"],
                "train_wafers": d["train_wafers"], "val_wafers": d["val_wafers"], "size": d["size"]}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.revalidate:
        return revalidate(args.revalidate, args.val_wafers, args.size)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    spec = ModelSpec(
        arch=m["arch"], encoder=m["encoder"], classes=CLASSES, head="softmax", tile=m["tile"],
        overlap=m["overlap"], threshold=m["threshold"], arch_kwargs={"decoder_channels": tuple(m["decoder_channels"])},
    )
    model = build_model(spec)
    t0 = time.perf_counter()
    train = [generate_wafer(args.size, 1000 + i) for i in range(args.train_wafers)]
    fgs = [np.argwhere(m > 0) for _, m in train]
    print(f"generated {len(train)} training wafers of {args.size}px in {time.perf_counter() - t0:.1f}s")

    aug = A.Compose([
        A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.RandomRotate90(p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=0.7),
        A.GaussNoise(std_range=(0.0, 0.03), p=0.3),
    ], seed=args.seed)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    dice = DiceLoss(mode="multiclass", classes=list(range(1, len(CLASSES))), from_logits=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=t["weight_decay"])
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
    )
    model.train()
    t0, running = time.perf_counter(), None
    for step in range(1, args.steps + 1):
        xs, ys = [], []
        for _ in range(args.batch):
            k = int(rng.integers(len(train)))
            img, msk = sample_crop(rng, *train[k], fgs[k], args.crop, defect_share=d["defect_share"])
            out = aug(image=img, mask=msk)
            xs.append(out["image"])
            ys.append(out["mask"])
        x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float().div_(255).sub_(mean).div_(std)
        y = torch.from_numpy(np.stack(ys)).long()
        logits = model(x)
        loss = F.cross_entropy(logits, y) + dice(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 25 == 0 or step == args.steps:
            el = time.perf_counter() - t0
            print(f"step {step}/{args.steps} loss {running:.4f} lr {sched.get_last_lr()[0]:.2e} "
                  f"{el:.0f}s elapsed, eta {el / step * (args.steps - step):.0f}s", flush=True)
    train_time = time.perf_counter() - t0

    result = {
        "config": str(args.config.relative_to(ROOT)) if args.config.is_relative_to(ROOT) else str(args.config),
        "train": {"wafers": args.train_wafers, "size": args.size, "seeds": f"1000..{999 + args.train_wafers}",
                  "steps": args.steps, "batch": args.batch, "crop": args.crop, "lr": args.lr,
                  "seconds": round(train_time, 1), "torch_threads": torch.get_num_threads()},
        "validation": validate(model, spec, args.val_wafers, args.size),
    }
    print(json.dumps(result, indent=2))
    path = save_checkpoint(model, spec, args.out, half=True, extra=result)
    print(f"saved {path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
