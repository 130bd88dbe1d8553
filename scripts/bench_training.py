"""Training step speed per backbone, float32 vs bfloat16 autocast, NCHW vs channels_last, on this CPU or a GPU.

    python scripts/bench_training.py                       # the four backbones below, about 15 min on 2 cores
    python scripts/bench_training.py --encoders resnet34 --steps 4
    python scripts/bench_training.py --device cuda --batch 32 --steps 20    # + float16 (GradScaler), GPU memory

One process, every case back to back (ratios are measured under the same machine load). A step is what
`defectscan train` does per batch: forward, the preset's dice + BCE loss, backward, gradient clipping, AdamW;
Unet decoder, 1 class (BSData's Pitting), the BSData preset's crop (256) and batch (8); random init and random
uint8 batches (speed does not depend on the weights). The first `--warmup` steps of each case are not timed
(allocator and oneDNN kernel selection). Also timed: making one batch of crops from the BSData images with the
preset's augmentations, to show whether the input pipeline can keep up (skipped without ../shared).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

ENCODERS = ("resnet34", "efficientnet_lite0", "swin_t", "vitae_t_win")
VARIANTS = (("fp32", None, False), ("fp32 channels_last", None, True), ("bf16", torch.bfloat16, False),
            ("bf16 channels_last", torch.bfloat16, True))
CUDA_VARIANTS = (("fp16 channels_last", torch.float16, True),)  # float16 autocast is CUDA-only (GradScaler)
BSDATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "bsdata"
PRESET = Path(__file__).resolve().parents[1] / "configs" / "bsdata_unet_r34.yaml"


def time_steps(encoder: str, dtype: torch.dtype | None, channels_last: bool, crop: int, batch: int, steps: int,
               warmup: int, device: torch.device) -> list[float]:
    """Seconds per timed step (on CUDA each step ends with a synchronisation: kernels are asynchronous)."""
    from defectscan.models import ModelSpec, build_model
    from defectscan.runtime import autocast
    from defectscan.training.config import load_config
    from defectscan.training.losses import build_loss

    cfg = load_config(PRESET)
    spec = ModelSpec(arch="unet", encoder=encoder, classes=("Pitting",), head="sigmoid", tile=crop, overlap=64)
    torch.manual_seed(0)
    model = build_model(spec).train().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = build_loss(cfg.loss, spec.head, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, 3, crop, crop), generator=gen, dtype=torch.uint8).to(device)
    y = (torch.rand((batch, crop, crop), generator=gen) < 0.05).long().to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for k in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        xf = x.float().div_(255).sub_(0.5).div_(0.25)
        if channels_last:
            xf = xf.contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            logits = model(xf)
        loss = loss_fn(logits, y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        sync()
        if k >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def crop_batch_seconds(data: Path, crop: int, batch: int, repeats: int = 20) -> float | None:
    """Seconds to make one batch of training crops (defect-centred sampling + the preset's augmentations)."""
    if not data.is_dir():
        return None
    from defectscan.data.formats import load_dataset
    from defectscan.data.sampling import CropDataset, build_augment
    from defectscan.training.config import load_config

    cfg = load_config(PRESET)
    ds = load_dataset(data, "labelme")
    samples = [s for s in ds.labeled][:40]
    images = [ds.load_image(s) for s in samples]
    masks = [ds.load_mask(s, im.shape[:2]) for s, im in zip(samples, images)]
    crops = CropDataset(images, masks, len(ds.classes), crop, cfg.sampling.defect_share, 0, build_augment(cfg.augment),
                        scale=tuple(cfg.sampling.scale))
    t0 = time.perf_counter()
    for i in range(repeats * batch):
        crops[i]
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoders", nargs="+", default=list(ENCODERS))
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per case")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: every usable core)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--data", type=Path, default=BSDATA, help="BSData (or a part of it) for the input pipeline's time")
    args = ap.parse_args()

    from defectscan.io.provenance import hardware
    from defectscan.runtime import resolve_device, set_threads

    set_threads(args.threads)
    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"
    print(f"torch {torch.__version__}, {hardware()}; Unet, 1 class, crop {args.crop}, batch {args.batch}, "
          f"{args.steps} timed steps after {args.warmup} untimed, on {device}")
    data = crop_batch_seconds(args.data, args.crop, args.batch)
    print(f"input pipeline: {data * 1000:.0f} ms per batch of {args.batch} crops (one thread)" if data is not None
          else f"input pipeline: not timed ({args.data} absent)")
    rows = []
    for enc in args.encoders:
        base = None
        for name, dtype, cl in VARIANTS + (CUDA_VARIANTS if on_gpu else ()):
            if on_gpu:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            try:
                times = time_steps(enc, dtype, cl, args.crop, args.batch, args.steps, args.warmup, device)
            except Exception as exc:  # report and go on: one backbone's failure should not hide the others
                print(f"  {enc:20s} {name:20s} FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
                continue
            step = statistics.median(times)
            base = base or (step if name == "fp32" else None)
            memory = torch.cuda.max_memory_allocated(device) / 2**20 if on_gpu else None
            rows.append((enc, name, step, base / step if base else float("nan"), memory))
            print(f"  {enc:20s} {name:20s} {step:7.3f} s/step  {1 / step:6.2f} steps/s  "
                  f"x{rows[-1][3]:.2f} vs fp32" + (f"  peak {memory:.0f} MiB" if on_gpu else ""), flush=True)
    print("\n| encoder | precision | s/step | steps/s | speed-up vs fp32 NCHW | input pipeline share |"
          + (" peak GPU MiB |" if on_gpu else ""))
    print("|---|---|---|---|---|---|" + ("---|" if on_gpu else ""))
    for enc, name, step, ratio, memory in rows:
        share = f"{100 * data / step:.1f} %" if data is not None else "-"
        print(f"| {enc} | {name} | {step:.3f} | {1 / step:.2f} | {ratio:.2f} | {share} |"
              + (f" {memory:.0f} |" if on_gpu else ""))


if __name__ == "__main__":
    main()
