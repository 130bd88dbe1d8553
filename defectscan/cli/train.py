"""`defectscan train`: a training run from a YAML config and overrides, or `--resume`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from defectscan.cli.common import (app, apply_max_pixels, apply_threads, console, max_pixels_option, progress_bar,
                                   task_factory, threads_option)
from defectscan.errors import DefectscanError


@app.command()
def train(
    config: Optional[Path] = typer.Argument(None, help="YAML config (see configs/); default: built-in defaults."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Dataset directory (sets data.root)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default: runs/<config name>-<time>)."),
    set_: List[str] = typer.Option([], "--set", help="Override a config value, e.g. --set training.epochs=30 (repeatable)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the interrupted run in this directory."),
    epochs: Optional[int] = typer.Option(None, help="Shortcut for --set training.epochs=N."),
    labeled: Optional[int] = typer.Option(None, help="Train on the first N labeled images (nested subsets)."),
    finetune: Optional[Path] = typer.Option(None, "--finetune", help="Start from every weight of this checkpoint (same "
                                            "architecture and classes); shortcut for --set model.init_checkpoint=PATH."),
    device: Optional[str] = typer.Option(None, help="Shortcut for --set training.device=..."),
    max_pixels: Optional[int] = max_pixels_option(),
    threads: Optional[int] = threads_option(),
) -> None:
    """Train a segmentation model; validation runs the tiling engine on full images; best checkpoint kept."""
    import time as _time

    from defectscan.io.files import check_output_dir
    from defectscan.training import RunDir, load_config, train as run_training

    apply_max_pixels(max_pixels)
    apply_threads(threads)
    overrides = list(set_)
    for key, value in (("data.root", data), ("training.epochs", epochs), ("data.labeled", labeled),
                       ("training.device", device), ("model.init_checkpoint", finetune)):
        if value is not None:  # paths go in quoted: `lot #2`, `null` or `2024` are folder names, not YAML
            overrides.append(f"{key}={json.dumps(str(value)) if isinstance(value, Path) else value}")
    if resume is not None:
        if config is not None or any(not o.startswith("training.epochs=") for o in overrides):
            raise DefectscanError("--resume continues a run with its saved config.yaml; give no config or overrides "
                                  "(except --epochs N, which extends the run)")
        cfg, run_dir = RunDir(resume).read_config(overrides), resume
    else:
        cfg = load_config(config, overrides)
        run_dir = out or Path("runs") / f"{config.stem if config else 'train'}-{_time.strftime('%Y%m%d-%H%M%S')}"
    check_output_dir(run_dir)
    if console.is_terminal:
        with progress_bar() as progress:
            result = run_training(cfg, run_dir, resume=resume is not None, progress_factory=task_factory(progress),
                                  log=lambda msg: progress.console.print(msg, highlight=False, markup=False))
    else:  # redirected output: plain lines every training.log_every steps (a progress bar shows nothing until the end)
        result = run_training(cfg, run_dir, resume=resume is not None,
                              log=lambda msg: console.print(msg, highlight=False, markup=False))
    best = f"{result.best_metric:.4f}" if result.best_metric is not None else "n/a (no validation split)"
    console.print(f"done in {result.seconds / 60:.1f} min: {result.epochs_run} epoch(s), best epoch {result.best_epoch} "
                  f"(val {cfg.training.select} {best}); checkpoint {RunDir(run_dir).checkpoint('best')}")
    if result.test:
        t = result.test
        console.print(f"test: mean IoU {t['mean_iou']}, mean Dice {t['mean_dice']}, defect pixel AP {t['defect_pixel_ap']}")
