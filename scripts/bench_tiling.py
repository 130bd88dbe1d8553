"""Tiled inference: our engine vs. the bare model on the same tiles (the floor) vs. MONAI, time and peak memory.

    python scripts/bench_tiling.py                              # 8192^2 and 16384^2 (about 1 h on 2 CPU cores)
    python scripts/bench_tiling.py --sizes 4096 --cases floor ours
    python scripts/bench_tiling.py --device cuda --batch 16     # on a GPU: + peak GPU memory; does the engine keep up?

Every case runs in a fresh process (peak RSS from getrusage is per process and includes ~1 GB of imports and
model) on the same synthetic wafer, loaded as uint8 RGB before timing starts. Model: smp Unet-resnet18, random
init, 1 class, eval mode, float32; channels-last for floor and ours (defectscan's CPU default for CNNs), the plain
model for MONAI (its default). Times are end to end from the uint8 image to a uint8 probability map:

- floor: only the model's forward passes over exactly the tiles our engine uses (extraction untimed);
- ours / ours-gaussian: `defectscan.tiling.tiled_inference`, center / gaussian stitching;
- ours-bf16: as ours, with bfloat16 autocast (`--amp bf16`);
- cli-1class / cli-5class: `defectscan infer image.png` end to end (PNG decode, tiling, segmentation, all
  outputs written) with a random 1-class / 5-class Unet-resnet18 checkpoint, as a user runs it; time is the
  command's wall time including start-up, peak RSS is the command's own (getrusage of the child);
- monai-gaussian / monai-constant: float32 input tensor + `sliding_window_inference` (overlap 64/512) + sigmoid
  + uint8 conversion. Needs `pip install monai` (the `bench` extra); skipped when it is missing.

With `--device cuda` the model runs on the GPU in every case after one untimed warm-up forward (floor: tiles copied
to the GPU untimed, each forward synchronised; MONAI: input and output on the GPU), and the GPU's peak allocated
memory is reported beside RSS: there the question is whether the CPU side (tile reading, copies, stitching) keeps
the GPU busy.
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

CASES = ("floor", "ours", "ours-gaussian", "ours-bf16", "monai-gaussian", "monai-constant", "cli-1class", "cli-5class")
DEFAULT_CASES = ("floor", "ours", "ours-bf16", "monai-gaussian", "monai-constant", "cli-1class", "cli-5class")
CLI_AMP = "off"  # the cli cases measure memory in float32 (the precision MONAI runs in); --cli-amp changes it


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux


def peak_gpu_gb(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else None


def run_cli_case(case: str, image_path: str, tile: int, overlap: int, batch: int, threads: int, amp: str,
                 device: str) -> dict:
    """`defectscan infer` on a PNG in a child process: wall time and the child's own peak RSS."""
    import torch
    import segmentation_models_pytorch as smp  # noqa: F401  (same import cost as the other cases)

    from defectscan.models import ModelSpec, build_model, save_checkpoint
    from defectscan.io.images import open_image

    classes = ("defect",) if case == "cli-1class" else ("scratch", "particle", "crack", "stain", "edge_chip")
    spec = ModelSpec(arch="unet", encoder="resnet18", classes=classes if len(classes) == 1 else ("background", *classes),
                     head="sigmoid" if len(classes) == 1 else "softmax", tile=tile, overlap=overlap)
    torch.manual_seed(0)
    work = Path(image_path).parent
    ckpt = work / f"{case}.safetensors"
    save_checkpoint(build_model(spec), spec, ckpt)
    h, w = open_image(image_path).shape
    out = work / f"out-{case}"
    cmd = [sys.executable, "-m", "defectscan", "infer", image_path, "--model", str(ckpt), "--out", str(out),
           "--batch", str(batch), "--threads", str(threads), "--amp", amp, "--device", device]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
    summary = json.loads(next(out.glob("*/defects.json")).read_text())
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
    return {"case": case, "size": h, "tiles": summary["tiles"], "seconds": seconds,
            "image_seconds": summary["seconds"], "precision": summary["precision"], "peak_rss_gb": rss,
            "output": f"{len(list(next(out.glob('*/')).iterdir()))} files, {w}x{h}"}


def run_case(case: str, image_path: str, tile: int, overlap: int, batch: int, threads: int, device_name: str) -> dict:
    import torch
    import segmentation_models_pytorch as smp

    from defectscan.inference import TorchTiles
    from defectscan.models.registry import IMAGENET_MEAN, IMAGENET_STD
    from defectscan.tiling import plan_tiles, read_tile, tiled_inference
    from defectscan.io.images import ImageSource

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device(device_name)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model = smp.Unet("resnet18", encoder_weights=None, classes=1).eval().to(device)
    if case == "floor" or case.startswith("ours"):  # defectscan's CPU default for CNNs; MONAI gets the plain model
        model = model.to(memory_format=torch.channels_last)
    image = np.load(image_path.replace(".png", ".npy"))  # uint8 (H, W, 3), fully in memory like a decoded PNG
    h, w = image.shape[:2]
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    layout = plan_tiles(h, w, tile, overlap, 32)
    result = {"case": case, "size": h, "tiles": len(layout)}
    if device.type == "cuda":  # one untimed forward per case: CUDA context, cuDNN's kernel choice, autocast caches
        warm = torch.zeros(batch, 3, tile, tile, device=device)
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=case == "ours-bf16"):
            model(warm.contiguous(memory_format=torch.channels_last) if case == "floor" or case.startswith("ours")
                  else warm)
        sync()

    if case == "floor":
        source = ImageSource(image)
        tiles = list(layout.tiles())
        spent = 0.0
        with torch.inference_mode():
            for start in range(0, len(tiles), batch):
                chunk = tiles[start : start + batch]
                arr = np.stack([read_tile(source, layout.rows.origin(iy), layout.cols.origin(ix), *layout.tile_shape)
                                for iy, ix in chunk])
                x = (torch.from_numpy(arr).to(device).permute(0, 3, 1, 2).float() / 255 - mean) / std
                x = x.contiguous(memory_format=torch.channels_last)
                sync()
                t0 = time.perf_counter()
                model(x)
                sync()
                spent += time.perf_counter() - t0
        result["seconds"] = spent
    elif case.startswith("ours"):
        t0 = time.perf_counter()
        predict = TorchTiles(model, head="sigmoid", mean=IMAGENET_MEAN, std=IMAGENET_STD, device=device,
                             amp="bf16" if case == "ours-bf16" else "off")
        out = tiled_inference(predict, image, tile=tile, overlap=overlap, batch_size=batch,
                              stitch="gaussian" if case == "ours-gaussian" else "center")
        result["seconds"] = time.perf_counter() - t0
        result["output"] = f"{out.dtype} {out.shape}"
    else:
        from monai.inferers import sliding_window_inference

        t0 = time.perf_counter()
        with torch.inference_mode():
            x = torch.from_numpy(image).to(device).permute(2, 0, 1)[None].float().div_(255).sub_(mean).div_(std)
            logits = sliding_window_inference(x, roi_size=(tile, tile), sw_batch_size=batch, predictor=model,
                                              overlap=overlap / tile, mode=case.split("-")[1])
            del x
            out = (torch.sigmoid_(logits).mul_(255).add_(0.5).clamp_(0, 255)).to(torch.uint8).cpu().numpy()
        result["seconds"] = time.perf_counter() - t0
        result["output"] = f"{out.dtype} {out.shape}"
    result["peak_rss_gb"] = peak_rss_gb()
    result["peak_gpu_gb"] = peak_gpu_gb(device)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384])
    ap.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), choices=CASES)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cli-amp", default=CLI_AMP, help="--amp of the cli cases (default: off, i.e. float32)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the model's device in every case)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--_case", help=argparse.SUPPRESS)
    ap.add_argument("--_image", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._case:  # child process: one case, result as JSON on stdout
        if args._case.startswith("cli"):
            res = run_cli_case(args._case, args._image, args.tile, args.overlap, args.batch, args.threads, args.cli_amp,
                               args.device)
        else:
            res = run_case(args._case, args._image, args.tile, args.overlap, args.batch, args.threads, args.device)
        print(json.dumps(res))
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
    from defectscan.io.images import write_image
    from defectscan.io.provenance import cpu_bf16, cpu_name

    gpu = f", model on {torch.cuda.get_device_name(args.device)}" if args.device.startswith("cuda") else ""
    print(f"torch {torch.__version__}, {args.threads} threads, {cpu_name()} (bf16: {cpu_bf16()}), "
          f"{os.cpu_count()} CPUs{gpu}; Unet-resnet18, tile {args.tile}, overlap {args.overlap}, batch {args.batch}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            image_path = str(Path(tmp) / f"wafer_{size}.png")
            wafer = generate_wafer(size, seed=3)[0]
            np.save(image_path.replace(".png", ".npy"), wafer)
            write_image(image_path, wafer)
            del wafer
            for case in cases:
                cmd = [sys.executable, __file__, "--_case", case, "--_image", image_path, "--tile", str(args.tile),
                       "--overlap", str(args.overlap), "--batch", str(args.batch), "--threads", str(args.threads),
                       "--cli-amp", args.cli_amp, "--device", args.device]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"{size} {case}: FAILED\n{proc.stderr[-2000:]}")
                    continue
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                results.append(res)
                gpu_mem = f", GPU {res['peak_gpu_gb']:.2f} GB" if res.get("peak_gpu_gb") is not None else ""
                print(f"  {size}^2 {case:15s} {res['seconds']:8.2f} s  peak RSS {res['peak_rss_gb']:.2f} GB{gpu_mem}",
                      flush=True)
            os.remove(image_path)
            os.remove(image_path.replace(".png", ".npy"))

    on_gpu = args.device.startswith("cuda")
    print("\n| image | tiles | case | time (s) | MP/s | time / floor | speed / MONAI gaussian | peak RSS (GB) "
          "| RSS / MONAI gaussian |" + (" peak GPU (GB) |" if on_gpu else ""))
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if on_gpu else ""))
    for size in args.sizes:
        rows = [r for r in results if r["size"] == size]
        floor = next((r["seconds"] for r in rows if r["case"] == "floor"), None)
        monai = next((r for r in rows if r["case"] == "monai-gaussian"), None)
        for r in rows:
            ratio = f"{r['seconds'] / floor:.3f}" if floor else "-"
            speed = f"{monai['seconds'] / r['seconds']:.2f}" if monai else "-"
            mem = f"{r['peak_rss_gb'] / monai['peak_rss_gb']:.2f}" if monai and r["case"] != "floor" else "-"
            gpu_mem = r.get("peak_gpu_gb")
            mps = size * size / 1e6 / r["seconds"]
            print(f"| {size}^2 | {r['tiles']} | {r['case']} | {r['seconds']:.2f} | {mps:.3f} "
                  f"| {ratio} | {speed} | {r['peak_rss_gb']:.2f} | {mem} |"
                  + (f" {gpu_mem:.2f} |" if gpu_mem is not None else (" - |" if on_gpu else "")))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
