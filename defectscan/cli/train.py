"""`defectscan train`: a training run from a YAML config and overrides, or `--resume`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from defectscan.cli.common import (app, apply_max_pixels, apply_threads, console, max_pixels_option, run_config,
                                   run_with_progress, threads_option)


@app.command()
def train(
    config: Optional[Path] = typer.Argument(None, help="YAML config (see configs/); default: built-in defaults."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Dataset directory (sets data.root)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default: runs/<config name>-<time>)."),
    set_: List[str] = typer.Option([], "--set", help="Override a config value, e.g. --set training.epochs=30 (repeatable)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the interrupted run in this directory."),
    epochs: Optional[int] = typer.Option(None, help="Shortcut for --set training.epochs=N."),
    labeled: Optional[int] = typer.Option(None, help="Label budget: the first N labeled images of a nested order, "
                                          "validation images included."),
    finetune: Optional[Path] = typer.Option(None, "--finetune", help="Start from every weight of this checkpoint (same "
                                            "architecture and classes); shortcut for --set model.init_checkpoint=PATH."),
    device: Optional[str] = typer.Option(None, help="Shortcut for --set training.device=..."),
    max_pixels: Optional[int] = max_pixels_option(),
    threads: Optional[int] = threads_option(),
) -> None:
    """Train a segmentation model; validation runs the tiling engine on full images; best checkpoint kept.
    Under torchrun: DistributedDataParallel, each process an equal part of every batch; rank 0 writes the run."""
    from functools import partial

    from defectscan import distributed
    from defectscan.training import RunDir
    from defectscan.training import train as run_training
    from defectscan.training.config import Config

    apply_max_pixels(max_pixels)
    apply_threads(threads)
    shortcuts = [("data.root", data), ("training.epochs", epochs), ("data.labeled", labeled),
                 ("training.device", device), ("model.init_checkpoint", finetune)]
    cfg, run_dir = run_config(config, set_, shortcuts, out, resume, schema=Config, what="run",
                              default_dir=lambda c: config.stem if config else "train")
    shard = distributed.current_shard(cfg.training.device)
    run_dir = Path(shard.gather(str(run_dir))[0])  # a default directory is named by rank 0's clock
    if shard.is_main:
        result = run_with_progress(partial(run_training, shard=shard), cfg, run_dir, resume is not None)
    else:
        run_training(cfg, run_dir, resume=resume is not None, log=lambda message: None, shard=shard)
    distributed.close()
    if not shard.is_main:
        return
    best = f"{result.best_metric:.4f}" if result.best_metric is not None else "n/a (no validation split)"
    console.print(f"done in {result.seconds / 60:.1f} min: {result.epochs_run} epoch(s), best epoch {result.best_epoch} "
                  f"(val {cfg.training.select} {best}); checkpoint {RunDir(run_dir).checkpoint('best')}")
    if result.test:
        t = result.test
        console.print(f"test: mean IoU {t['mean_iou']}, mean Dice {t['mean_dice']}, defect pixel AP {t['defect_pixel_ap']}")
