"""Tiled inference: our engine vs. the bare model on the same tiles (the floor) vs. MONAI, time and peak memory.

    python scripts/bench_tiling.py                              # 8192^2 and 16384^2 (about 1 h on 2 CPU cores)
    python scripts/bench_tiling.py --sizes 4096 --cases floor ours

Every case runs in a fresh process (peak RSS from getrusage is per process and includes ~1 GB of imports and
model) on the same synthetic wafer, loaded as uint8 RGB before timing starts. Model: smp Unet-resnet18, random
init, 1 class, eval mode, float32. Times are end to end from the uint8 image to a uint8 probability map:

- floor: only the model's forward passes over exactly the tiles our engine uses (extraction untimed);
- ours / ours-gaussian: `defectscan.tiling.tiled_inference`, center / gaussian stitching;
- monai-gaussian / monai-constant: float32 input tensor + `sliding_window_inference` (overlap 64/512) + sigmoid
  + uint8 conversion. Needs `pip install monai` (the `bench` extra); skipped when it is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CASES = ("floor", "ours", "ours-gaussian", "monai-gaussian", "monai-constant")
DEFAULT_CASES = ("floor", "ours", "monai-gaussian", "monai-constant")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux


def run_case(case: str, image_path: str, tile: int, overlap: int, batch: int, threads: int) -> dict:
    import torch
    import segmentation_models_pytorch as smp

    from defectscan.inference import TorchTiles
    from defectscan.models.registry import IMAGENET_MEAN, IMAGENET_STD
    from defectscan.tiling import plan_tiles, read_tile, tiled_inference
    from defectscan.io.images import ImageSource

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = smp.Unet("resnet18", encoder_weights=None, classes=1).eval()
    image = np.load(image_path)  # uint8 (H, W, 3), fully in memory like a decoded PNG
    h, w = image.shape[:2]
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    layout = plan_tiles(h, w, tile, overlap, 32)
    result = {"case": case, "size": h, "tiles": len(layout)}

    if case == "floor":
        source = ImageSource(image)
        tiles = list(layout.tiles())
        spent = 0.0
        with torch.inference_mode():
            for start in range(0, len(tiles), batch):
                chunk = tiles[start : start + batch]
                arr = np.stack([read_tile(source, layout.rows.origin(iy), layout.cols.origin(ix), *layout.tile_shape)
                                for iy, ix in chunk])
                x = (torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255 - mean) / std
                x = x.contiguous()
                t0 = time.perf_counter()
                model(x)
                spent += time.perf_counter() - t0
        result["seconds"] = spent
    elif case.startswith("ours"):
        t0 = time.perf_counter()
        predict = TorchTiles(model, head="sigmoid", mean=IMAGENET_MEAN, std=IMAGENET_STD, device="cpu")
        out = tiled_inference(predict, image, tile=tile, overlap=overlap, batch_size=batch,
                              stitch="gaussian" if case == "ours-gaussian" else "center")
        result["seconds"] = time.perf_counter() - t0
        result["output"] = f"{out.dtype} {out.shape}"
    else:
        from monai.inferers import sliding_window_inference

        t0 = time.perf_counter()
        with torch.inference_mode():
            x = torch.from_numpy(image).permute(2, 0, 1)[None].float().div_(255).sub_(mean).div_(std)
            logits = sliding_window_inference(x, roi_size=(tile, tile), sw_batch_size=batch, predictor=model,
                                              overlap=overlap / tile, mode=case.split("-")[1])
            del x
            out = (torch.sigmoid_(logits).mul_(255).add_(0.5).clamp_(0, 255)).to(torch.uint8).numpy()
        result["seconds"] = time.perf_counter() - t0
        result["output"] = f"{out.dtype} {out.shape}"
    result["peak_rss_gb"] = peak_rss_gb()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384])
    ap.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), choices=CASES)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--_case", help=argparse.SUPPRESS)
    ap.add_argument("--_image", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._case:  # child process: one case, result as JSON on stdout
        print(json.dumps(run_case(args._case, args._image, args.tile, args.overlap, args.batch, args.threads)))
        return

    cases = list(args.cases)
    try:
        import monai  # noqa: F401
    except ImportError:
        skipped = [c for c in cases if c.startswith("monai")]
        if skipped:
            print(f"monai is not installed: skipping {', '.join(skipped)} (pip install monai)")
        cases = [c for c in cases if not c.startswith("monai")]

    import torch

    from defectscan.data.synth import generate_wafer
    from defectscan.io.provenance import cpu_bf16, cpu_name

    print(f"torch {torch.__version__}, {args.threads} threads, {cpu_name()} (bf16: {cpu_bf16()}), "
          f"{os.cpu_count()} CPUs; Unet-resnet18, tile {args.tile}, overlap {args.overlap}, batch {args.batch}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            image_path = str(Path(tmp) / f"wafer_{size}.npy")
            np.save(image_path, generate_wafer(size, seed=3)[0])
            for case in cases:
                cmd = [sys.executable, __file__, "--_case", case, "--_image", image_path, "--tile", str(args.tile),
                       "--overlap", str(args.overlap), "--batch", str(args.batch), "--threads", str(args.threads)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"{size} {case}: FAILED\n{proc.stderr[-2000:]}")
                    continue
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                results.append(res)
                print(f"  {size}^2 {case:15s} {res['seconds']:8.1f} s  peak RSS {res['peak_rss_gb']:.2f} GB", flush=True)
            os.remove(image_path)

    print("\n| image | tiles | case | time (s) | time / floor | peak RSS (GB) | RSS / MONAI gaussian |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        rows = [r for r in results if r["size"] == size]
        floor = next((r["seconds"] for r in rows if r["case"] == "floor"), None)
        monai = next((r["peak_rss_gb"] for r in rows if r["case"] == "monai-gaussian"), None)
        for r in rows:
            ratio = f"{r['seconds'] / floor:.3f}" if floor else "-"
            mem = f"{r['peak_rss_gb'] / monai:.2f}" if monai and r["case"] != "floor" else "-"
            print(f"| {size}^2 | {r['tiles']} | {r['case']} | {r['seconds']:.1f} | {ratio} | {r['peak_rss_gb']:.2f} | {mem} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
