"""Cost of each backbone under Unet and UPerNet: parameters, FLOPs, forward latency and peak memory per tile.

    python scripts/bench_backbones.py                                  # all rows (about 20 min on 2 CPU cores)
    python scripts/bench_backbones.py --encoders resnet34 vitae_t_win --tiles 256 512 --decoders unet
    python scripts/bench_backbones.py --device cuda --batch 16 --amp bf16 --tiles 512 --decoders unet --repeats 20

Each (encoder, decoder, tile) runs in a fresh process: one 1 x 3 x tile x tile forward in eval mode, float32,
`torch.inference_mode`; FLOPs from `defectscan.evaluation.cost.count_flops` (torch.utils.flop_counter, multiply-add = 2
FLOPs, CPU fused attention included), latency = median of `--repeats` forwards after one warm-up, peak memory =
growth of the process's peak RSS during the forwards (activations and workspace, not the weights). The last
column is FLOPs at this tile / FLOPs at 512: 0.25 and 4.0 mean cost linear in tile area; more than 4.0 at 1024
shows the part that grows with the square of the area (global attention). With `--device cuda` the model runs
channels-last (defectscan's CUDA choice), every forward is synchronised, and peak memory is the GPU's peak
allocation (weights included); `--batch` and `--amp` set tiles per forward and autocast.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

ENCODERS = ["resnet34", "efficientnet_lite0", "convnext_tiny", "swin_t", "vitae_t", "vitae_t_win", "vitae_s",
            "vitae_s_win", "vit_s"]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(encoder: str, decoder: str, tile: int, repeats: int, threads: int, device_name: str = "cpu",
             batch: int = 1, amp: str = "off") -> dict:
    import torch

    from defectscan.evaluation.cost import count_flops, count_parameters
    from defectscan.models import ModelSpec, build_model, encoder_info
    from defectscan.runtime import autocast, resolve_amp, resolve_device

    torch.set_num_threads(threads)
    device = resolve_device(device_name)
    on_gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    model = build_model(ModelSpec(arch=decoder, encoder=encoder, classes=("defect",))).eval().to(device)
    if on_gpu:  # defectscan's choice on CUDA (models.prefers_channels_last)
        model = model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, tile, tile, device=device)
    with torch.inference_mode(), autocast(device, resolve_amp(amp, device)):  # timed before FLOP counting, whose
        base = _rss_mb()  # own forward would set the peak first
        times = []
        for i in range(repeats + 1):
            sync()
            t0 = time.perf_counter()
            model(x)
            sync()
            if i:
                times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if on_gpu else _rss_mb() - base
    times.sort()
    flops = count_flops(model, x[:1])
    return {"encoder": encoder, "family": encoder_info(encoder).family, "decoder": decoder, "tile": tile,
            "params_m": count_parameters(model) / 1e6, "encoder_params_m": count_parameters(model.encoder) / 1e6,
            "gflops": flops / 1e9, "seconds": times[len(times) // 2],
            "peak_mem_mb": max(0.0, peak)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoders", nargs="+", default=ENCODERS)
    ap.add_argument("--decoders", nargs="+", default=["unet", "upernet"])
    ap.add_argument("--tiles", nargs="+", type=int, default=[256, 512, 1024])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (on CUDA: channels-last, peak = GPU memory)")
    ap.add_argument("--batch", type=int, default=1, help="tiles per forward (GFLOPs stay per tile)")
    ap.add_argument("--amp", default="off", help="off, bf16, fp16 (autocast), auto")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--_case", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._case:
        enc, dec, tile = args._case
        print(json.dumps(run_case(enc, dec, int(tile), args.repeats, args.threads, args.device, args.batch, args.amp)))
        return

    import torch

    from defectscan.io.provenance import cpu_bf16, cpu_name

    gpu = f", GPU: {torch.cuda.get_device_name(args.device)}" if args.device.startswith("cuda") else ""
    print(f"torch {torch.__version__}, {args.threads} threads; batch {args.batch}, amp {args.amp}, on {args.device}, "
          f"CPU: {cpu_name()} (bf16: {cpu_bf16()}){gpu}", file=sys.stderr)
    rows = []
    for dec in args.decoders:
        for enc in args.encoders:
            for tile in args.tiles:
                proc = subprocess.run([sys.executable, __file__, "--_case", enc, dec, str(tile), "--repeats",
                                       str(args.repeats), "--threads", str(args.threads), "--device", args.device,
                                       "--batch", str(args.batch), "--amp", args.amp], capture_output=True, text=True)
                if proc.returncode:
                    err = (proc.stderr.strip().splitlines() or ["failed"])[-1]
                    print(f"  {dec}/{enc} @{tile}: {err}", file=sys.stderr)
                    continue
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"  {dec:8s} {enc:18s} {tile:5d}  {row['gflops']:8.1f} GFLOPs  {row['seconds']:7.3f} s  "
                      f"{row['peak_mem_mb']:7.0f} MB", file=sys.stderr, flush=True)
    at512 = {(r["encoder"], r["decoder"]): r["gflops"] for r in rows if r["tile"] == 512}
    print("| decoder | encoder | family | params (M) | encoder params (M) | tile | GFLOPs | s / batch | MP/s | "
          f"peak MB ({'GPU allocated' if args.device.startswith('cuda') else 'RSS growth'}) | FLOPs / FLOPs@512 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = at512.get((r["encoder"], r["decoder"]))
        ratio = f"{r['gflops'] / ref:.2f}" if ref else "-"
        mps = args.batch * r["tile"] ** 2 / 1e6 / r["seconds"]
        print(f"| {r['decoder']} | {r['encoder']} | {r['family']} | {r['params_m']:.2f} | {r['encoder_params_m']:.2f} | "
              f"{r['tile']} | {r['gflops']:.1f} | {r['seconds']:.4f} | {mps:.1f} | {r['peak_mem_mb']:.0f} | {ratio} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
