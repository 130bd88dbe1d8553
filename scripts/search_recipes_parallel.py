"""Recipe search for the 20-label BSData preset, many variants at once on one GPU (or a large CPU machine).

    python scripts/search_recipes_parallel.py prepare --data ../shared/datasets/bsdata --out search_data
    python scripts/search_recipes_parallel.py run --data search_data --out search_out --device cuda --jobs 6

`prepare` writes, per seed, a small copy of the dataset that holds exactly the images a 20-label budget of that
seed trains and validates on (the split `defectscan train --labeled 20` draws: 17 train + 3 val) and, marked
`test`, the first 60 labeled training-split images that budget leaves out — the images the CPU search
(configs/benchmark/bsdata_cpu_search_n20.yaml, `evaluate.split: unused, limit: 60`) scores on. The BSData test
split is never copied. LabelMe files lose their embedded `imageData` (the JPEG again, base64): masks are drawn from
the polygons alone, so they are the same, and the copy is small enough to carry to a lent machine.

`run` trains every variant (overrides of the 20-label preset as the search found it, `SEARCHED_FROM`; float32) with `defectscan train` on a
seed's copy (`data.labeled=null`: the copy is the budget) and scores its best checkpoint with `defectscan evaluate
--split test` (the 60 held-out images, float32), `--jobs` at a time; one JSON line per finished job in
OUT/results.jsonl, logs in OUT/logs.tar.gz. Seeds 0 and 1 of every variant first, then seed 2 in the order of the
variants' mean gain over `base` on seeds 0-1. Nothing is launched that would end after `--seconds`.

Scores are what the CPU search reads (held-out defect IoU at the threshold the 3 validation images chose, pixel
AP), not test figures; a variant chosen here is confirmed by a CPU search cell before it becomes a preset.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

PRESET = "configs/bsdata_unet_lite0_n20.yaml"  # crop 256, batch 8, 6 x 160 steps, lr 1e-3
# The preset before the search: it has since adopted the encoder's full rate (`enc1.0`), so `base` pins what it was.
SEARCHED_FROM = ["optim.encoder_lr_scale=0.3"]
VARIANTS = {
    "base": [],
    "s480": ["sampling.steps_per_epoch=80"],
    "lr2e-3": ["optim.lr=0.002"],
    "enc1.0": ["optim.encoder_lr_scale=1.0"],
    "wd0.05": ["optim.weight_decay=0.05"],
    "ds0.25": ["sampling.defect_share=0.25"],
    "ds0.75": ["sampling.defect_share=0.75"],
    "focal": ["loss=[{name: dice}, {name: focal}]"],
    "aug+": ["augment=[{HorizontalFlip: {p: 0.5}}, {VerticalFlip: {p: 0.5}}, {RandomRotate90: {p: 0.5}}, "
             "{Affine: {scale: [0.8, 1.25], rotate: [-15, 15], p: 0.5}}, "
             "{RandomBrightnessContrast: {brightness_limit: 0.2, contrast_limit: 0.2, p: 0.5}}]"],
    "b16x480": ["sampling.batch_size=16", "sampling.steps_per_epoch=80"],
    "b4x1920": ["sampling.batch_size=4", "sampling.steps_per_epoch=320"],
    "lr5e-4": ["optim.lr=0.0005"],
    "s1920": ["sampling.steps_per_epoch=320"],
    "s3840": ["sampling.steps_per_epoch=640"],
}
LENGTH = {"s1920": 2.0, "s3840": 4.0}  # job length relative to base, for the deadline


def prepare(args: argparse.Namespace) -> None:
    from defectscan.data import label_budget, load_dataset, split_dataset
    from defectscan.evaluation.outputs import select_samples

    ds = load_dataset(args.data)
    for seed in args.seeds:
        splits, train = label_budget(split_dataset(ds, args.val_fraction), args.labeled, subset_seed=seed,
                                     val_fraction=args.val_fraction)
        # what `evaluate --split unused --limit N` scores for a run of this budget (its splits.json's train_unused)
        unused = {s.stem for s in splits.train} - {s.stem for s in train}
        held_out = select_samples(ds, "unused", ({"train_unused": sorted(unused)}, args.data))[0][:args.held_out]
        role = {**{s.stem: "train" for s in train}, **{s.stem: "val" for s in splits.val},
                **{s.stem: "test" for s in held_out}}
        out = args.out / f"s{seed}"
        shutil.rmtree(out, ignore_errors=True)
        (out / "images").mkdir(parents=True)
        (out / "masks").mkdir()
        entries = []
        for entry in json.loads((args.data / "image_data.json").read_text())["images"]:
            stem = Path(entry["filename"]).stem
            if stem not in role:
                continue
            shutil.copy2(args.data / "images" / entry["filename"], out / "images" / entry["filename"])
            labelme = json.loads((args.data / "masks" / entry["annotations"]).read_text())
            labelme["imageData"] = None
            (out / "masks" / entry["annotations"]).write_text(json.dumps(labelme))
            entries.append({**entry, "train_test_split": role[stem]})
        (out / "image_data.json").write_text(json.dumps({"images": entries}))
        counts = {k: list(role.values()).count(k) for k in ("train", "val", "test")}
        print(f"seed {seed}: {out} {counts}")


def _commands(job_dir: Path, data: str, variant: str, seed: int, device: str, extra: list[str]) -> str:
    sets = ["data.labeled=null", "validation.test=false", "training.amp=off", "sampling.workers=1",
            f"training.seed={seed}", f"data.subset_seed={seed}", *SEARCHED_FROM, *VARIANTS[variant], *extra]
    train = [sys.executable, "-m", "defectscan", "train", PRESET, "--data", data, "--out", str(job_dir / "run"),
             "--device", device, "--threads", "2"] + [a for kv in sets for a in ("--set", kv)]
    evaluate = [sys.executable, "-m", "defectscan", "evaluate", "-m", str(job_dir / "run" / "best.safetensors"),
                "-d", data, "--split", "test", "--seam-images", "0", "--threads", "2", "--device", device,
                "--amp", "off", "--out", str(job_dir / "evaluation")]
    return (f"{shlex.join(train)} > {job_dir}/train.out 2>&1 && "
            f"{shlex.join(evaluate)} > {job_dir}/eval.out 2>&1")


def _record(job_dir: Path, variant: str, seed: int, rc: int, wall: float) -> dict:
    row: dict = {"variant": variant, "seed": seed, "rc": rc, "wall_s": round(wall, 1), "sets": VARIANTS[variant]}
    try:
        metrics = json.loads((job_dir / "evaluation" / "metrics.json").read_text())
        m = metrics["metrics"]
        epochs = list(csv.DictReader((job_dir / "run" / "metrics.csv").open()))
        row.update(iou=m["defect_iou"], ap=m["defect_pixel_ap"], best_f1=m["defect_best_f1"],
                   best_f1_threshold=m["defect_best_f1_threshold"], threshold=m["threshold"], images=m["images"],
                   train_s=round(sum(float(e["train_seconds"]) for e in epochs), 1),
                   best_epoch=json.loads((job_dir / "run" / "best.json").read_text())["extra"].get("epoch"),
                   hardware=metrics["hardware"])
    except (OSError, KeyError, ValueError) as e:
        row["error"] = repr(e)[:300]
        for name in ("train.out", "eval.out"):
            if (job_dir / name).exists():
                row[name] = (job_dir / name).read_text()[-1500:]
    return row


def run(args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "jobs"
    t0 = time.time()
    log = (args.out / "runner.log").open("a")

    def say(msg: str) -> None:
        line = f"[{time.time() - t0:6.0f} s] {msg}"
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    queue = list(args.jobs_list) or [(v, s) for v in args.variants for s in (0, 1)]
    seed2_planned = bool(args.jobs_list)
    results: dict[tuple[str, int], dict] = {}
    running: dict[tuple[str, int], tuple[subprocess.Popen, float]] = {}
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}
    while queue or running:
        for key, (proc, start) in list(running.items()):
            if proc.poll() is not None:
                del running[key]
                row = _record(work / f"{key[0]}__s{key[1]}", *key, proc.returncode, time.time() - start)
                results[key] = row
                with (args.out / "results.jsonl").open("a") as f:
                    f.write(json.dumps(row) + "\n")
                say(f"done {key[0]} s{key[1]} rc={proc.returncode} IoU {row.get('iou')} AP {row.get('ap')}")
        if not queue and not seed2_planned:  # every seed-0/1 job launched: seed 2, most promising first
            seed2_planned = True
            base = [results.get(("base", s), {}).get("iou") for s in (0, 1)]
            gain = {v: sum(results[(v, s)]["iou"] - base[s] for s in (0, 1)) / 2 for v in args.variants
                    if None not in base and all(results.get((v, s), {}).get("iou") is not None for s in (0, 1))}
            order = [v for v in ("base", "s480") if v in args.variants]
            order += sorted((v for v in args.variants if v not in order), key=lambda v: -gain.get(v, -1.0))
            queue = [(v, 2) for v in order]
            say("seed 2 order: " + ", ".join(f"{v} {gain[v]:+.3f}" if v in gain else v for v in order))
        while queue and len(running) < args.jobs:
            variant, seed = queue.pop(0)
            left = args.seconds - (time.time() - t0)
            if args.job_seconds * LENGTH.get(variant, 1.0) > left:
                say(f"skip {variant} s{seed}: {left:.0f} s left")
                continue
            job_dir = work / f"{variant}__s{seed}"
            job_dir.mkdir(parents=True, exist_ok=True)
            cmd = _commands(job_dir, str(args.data / f"s{seed}"), variant, seed, args.device, args.set)
            running[(variant, seed)] = (subprocess.Popen(cmd, shell=True, env=env, start_new_session=True),
                                        time.time())
            say(f"start {variant} s{seed}")
        if time.time() - t0 > args.seconds + args.grace:
            for (variant, seed), (proc, _) in running.items():
                os.killpg(proc.pid, 9)
                say(f"killed {variant} s{seed} at the deadline")
            break
        time.sleep(1)
    with tarfile.open(args.out / "logs.tar.gz", "w:gz") as tar:
        for job_dir in sorted(work.glob("*__s*")):
            for name in ("train.out", "eval.out", "run/metrics.csv", "run/train.log", "run/config.yaml",
                         "evaluation/metrics.json"):
                if (job_dir / name).exists():
                    tar.add(job_dir / name, arcname=f"{job_dir.name}/{name}")
    say("finished")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="per-seed copies of the 20-label budgets and their held-out images")
    p.add_argument("--data", type=Path, required=True, help="BSData (LabelMe with image_data.json)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--labeled", type=int, default=20)
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--held-out", type=int, default=60)
    r = sub.add_parser("run", help="train and score the variants, several at once")
    r.add_argument("--data", type=Path, required=True, help="`prepare`'s output")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--device", default="cuda")
    r.add_argument("--jobs", type=int, default=6, help="jobs at once (each: 2 threads + 1 loader process)")
    r.add_argument("--seconds", type=float, default=440, help="launch nothing expected to end after this")
    r.add_argument("--job-seconds", type=float, default=100, help="expected length of a `base` job")
    r.add_argument("--grace", type=float, default=60, help="kill what still runs this long after --seconds")
    r.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    r.add_argument("--jobs-list", nargs="+", help="explicit VARIANT:SEED jobs instead (replicates, seed 2)")
    r.add_argument("--set", action="append", default=[], help="override for every job (e.g. a short dry run)")
    args = ap.parse_args()
    if args.command == "run":
        jobs = [(job, *job.partition(":")[::2]) for job in args.jobs_list or []]
        for job, variant, seed in jobs:
            if variant not in VARIANTS or not seed.isdigit():
                ap.error(f"--jobs-list {job}: expected VARIANT:SEED, VARIANT one of {', '.join(VARIANTS)}")
        args.jobs_list = [(variant, int(seed)) for _, variant, seed in jobs]
    prepare(args) if args.command == "prepare" else run(args)


if __name__ == "__main__":
    main()
