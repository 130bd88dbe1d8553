"""Processes vs threads on one machine: `infer` images/s and `train` steps/s at 1 and N processes, as ratios.

    python scripts/bench_scaling.py                 # about 5 min on 2 cores
    python scripts/bench_scaling.py --procs 4 --images 16
    python scripts/bench_scaling.py --cases ray     # the Ray engine against the local one (needs defectscan[ray])

Cases, each in its own launch (the script starts itself under torchrun for the multi-process ones):
  1 process x 1 thread, 1 process x N threads, N processes x 1 thread (gloo).
infer: synthetic wafers (`--size` px) through `write_prediction` (tiling, model, every output file), each process
its share of the images (rank i mod N), timed between two barriers. train: DistributedDataParallel steps of the
real step code (loss, clipping, AdamW) on a global batch of `--batch` crops split over the processes, a BN-free
Unet (GroupNorm encoder, no decoder norm: the configuration that trains as one process would), timed after
`--warmup` steps. Also measured: one gradient all-reduce (the message DDP sends per step) with 2+ processes.
The numbers feed the projection to many GPUs in the README ("More than one machine").
Ray (`--cases ray` or `all`): whole `defectscan infer` commands on the same wafers, wall time from launch to exit
(start-up and model loading included, as a user waits for them): local engine 1 process x 1 thread, local engine
1 x N threads, and `--engine ray` with N workers x 1 thread on a private local Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SPEC = dict(arch="unet", encoder="resnet18", classes=("defect",), tile=512, overlap=64,
            arch_kwargs={"decoder_use_norm": False}, encoder_kwargs={"norm_layer": "groupnorm1"})


def worker(args: argparse.Namespace) -> dict:
    from defectscan import distributed
    from defectscan.inference import Predictor, write_prediction
    from defectscan.io.images import open_image
    from defectscan.models import ModelSpec, build_model, save_checkpoint
    from defectscan.schemas import InferOptions
    from defectscan.training.losses import build_loss
    from defectscan.training.config import LossTerm
    from defectscan.training.loop import _distributed
    from defectscan.training.optim import optimizer_step

    torch.set_num_threads(args.threads)
    shard = distributed.current_shard("cpu")
    work = Path(args.work)
    spec = ModelSpec(**SPEC)
    torch.manual_seed(0)
    model = build_model(spec)
    out: dict = {"processes": shard.world, "threads": args.threads}
    if args.what == "infer":
        ckpt = work / "model"
        if shard.is_main and not ckpt.with_suffix(".safetensors").is_file():
            save_checkpoint(model, spec, ckpt)
        shard.barrier()
        predictor = Predictor.from_checkpoint(ckpt.with_suffix(".safetensors"), InferOptions(device="cpu"))
        images = sorted((work / "data" / "images").glob("*.png"))
        mine = shard.take(images)
        shard.barrier()
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            for i, path in mine:
                write_prediction(predictor, path, open_image(path), Path(tmp) / f"{i}")
            shard.barrier()
            seconds = time.perf_counter() - t0
        out.update(images=len(images), seconds=seconds, images_per_second=len(images) / seconds)
    else:
        model = model.to(memory_format=torch.channels_last).train()
        net = _distributed(model, torch.device("cpu"), shard, lambda message: None)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        loss_fn = build_loss([LossTerm(name="bce")], "sigmoid", 1)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        per = args.batch // shard.world
        gen = torch.Generator().manual_seed(shard.rank)
        x = torch.rand((per, 3, args.crop, args.crop), generator=gen).contiguous(memory_format=torch.channels_last)
        y = (torch.rand((per, args.crop, args.crop), generator=gen) < 0.05).long()
        for k in range(args.warmup + args.steps):
            if k == args.warmup:
                shard.barrier()
                t0 = time.perf_counter()
            optimizer_step(loss_fn(net(x), y), model, opt, scaler, 1.0, "bench")
        shard.barrier()
        seconds = time.perf_counter() - t0
        grad_bytes = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
        out.update(steps=args.steps, seconds=seconds, steps_per_second=args.steps / seconds, grad_mb=grad_bytes / 1e6)
        if shard.world > 1:  # one all-reduce of every gradient, as DDP sends per step (in buckets)
            flat = torch.ones(grad_bytes // 4)
            torch.distributed.all_reduce(flat)
            shard.barrier()
            t0 = time.perf_counter()
            for _ in range(5):
                torch.distributed.all_reduce(flat)
            out["allreduce_seconds"] = (time.perf_counter() - t0) / 5
    distributed.close()
    return out


def launch(args: argparse.Namespace, what: str, procs: int, threads: int) -> dict:
    result = Path(args.work) / f"{what}-{procs}x{threads}.json"
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
                              if procs > 1 else []) + [
        __file__, "--worker", what, "--threads", str(threads), "--work", args.work, "--result", str(result),
        "--batch", str(args.batch), "--crop", str(args.crop), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(result.read_text())


def ray_cases(args: argparse.Namespace) -> None:
    from defectscan.models import ModelSpec, build_model, save_checkpoint

    work = Path(args.work)
    torch.manual_seed(0)
    save_checkpoint(build_model(ModelSpec(**SPEC)), ModelSpec(**SPEC), work / "model")
    base = [sys.executable, "-m", "defectscan", "infer", str(work / "data" / "images"), "-m",
            str(work / "model.safetensors"), "--device", "cpu"]
    print("| infer command | wall s | images/s | vs local 1x1 |")
    print("|---|---|---|---|")
    first = None
    for name, extra in (("local, 1 process x 1 thread", ["--threads", "1"]),
                        (f"local, 1 process x {args.procs} threads", ["--threads", str(args.procs)]),
                        (f"--engine ray, {args.procs} workers x 1 thread",
                         ["--engine", "ray", "--workers", str(args.procs), "--threads", "1"])):
        out = work / f"out-{len(name)}"
        t0 = time.perf_counter()
        subprocess.run(base + extra + ["-o", str(out)], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": extra[-1]})
        wall = time.perf_counter() - t0
        first = first or wall
        print(f"| {name} | {wall:.1f} | {args.images / wall:.3f} | {first / wall:.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--worker", choices=("infer", "train"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work")
    ap.add_argument("--result")
    ap.add_argument("--cases", choices=("torchrun", "ray", "all"), default="torchrun")
    args = ap.parse_args()
    if args.worker:
        args.what = args.worker
        out = worker(args)
        if int(os.environ.get("RANK", 0)) == 0:
            Path(args.result).write_text(json.dumps(out))
        return

    from defectscan.data.synth import write_dataset
    from defectscan.io.provenance import hardware

    with tempfile.TemporaryDirectory() as work:
        args.work = work
        write_dataset(Path(work) / "data", size=args.size, count=args.images, seed=0)
        print(f"# {hardware()}; torch {torch.__version__}; Unet-resnet18 (GroupNorm), {args.images} wafers of "
              f"{args.size} px, train: global batch {args.batch} x {args.crop} px, {args.steps} timed steps")
        if args.cases in ("ray", "all"):
            ray_cases(args)
        if args.cases == "ray":
            return
        cases = [(1, 1), (1, args.procs), (args.procs, 1)]
        print("| case | infer images/s | vs 1x1 | train steps/s | vs 1x1 | gradient MB | all-reduce s |")
        print("|---|---|---|---|---|---|---|")
        base = None
        for procs, threads in cases:
            inf = launch(args, "infer", procs, threads)
            tr = launch(args, "train", procs, threads)
            base = base or (inf["images_per_second"], tr["steps_per_second"])
            print(f"| {procs} process(es) x {threads} thread(s) | {inf['images_per_second']:.3f} | "
                  f"{inf['images_per_second'] / base[0]:.2f} | {tr['steps_per_second']:.3f} | "
                  f"{tr['steps_per_second'] / base[1]:.2f} | {tr['grad_mb']:.1f} | "
                  f"{tr.get('allreduce_seconds', float('nan')):.4f} |", flush=True)


if __name__ == "__main__":
    main()
