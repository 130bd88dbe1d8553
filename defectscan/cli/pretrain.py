"""`defectscan pretrain`: self-supervised pretraining of an encoder on every image of a dataset, or `--resume`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from defectscan.cli.common import (app, apply_max_pixels, apply_threads, console, max_pixels_option, run_config,
                                   run_with_progress, threads_option)
from defectscan.errors import DefectscanError


@app.command()
def pretrain(
    data: Optional[Path] = typer.Argument(None, help="Dataset directory: every image is used, labeled or not."),
    encoder: Optional[str] = typer.Option(None, "--encoder", "-e", help="Encoder to pretrain (see `defectscan "
                                          "models`); shortcut for --set model.encoder=NAME."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default: runs/pretrain-<encoder>-<time>)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (e.g. configs/pretrain_mim.yaml)."),
    set_: List[str] = typer.Option([], "--set", help="Override a config value, e.g. --set mask.ratio=0.75 (repeatable)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the interrupted pretraining in this directory."),
    epochs: Optional[int] = typer.Option(None, help="Shortcut for --set training.epochs=N."),
    device: Optional[str] = typer.Option(None, help="Shortcut for --set training.device=..."),
    max_pixels: Optional[int] = max_pixels_option(),
    threads: Optional[int] = threads_option(),
) -> None:
    """Masked image modelling on the user's own images (SimMIM objective through the segmentation decoder); writes
    encoder.safetensors for `train --set model.encoder_weights=PATH`."""
    from defectscan.training.config import PretrainConfig
    from defectscan.training.pretrain import pretrain as run_pretraining

    apply_max_pixels(max_pixels)
    apply_threads(threads)
    if resume is None and data is None and config is None:
        raise DefectscanError("give the dataset directory: defectscan pretrain DATA --encoder NAME")
    shortcuts = [("data.root", data), ("model.encoder", encoder), ("training.epochs", epochs),
                 ("training.device", device)]
    cfg, run_dir = run_config(config, set_, shortcuts, out, resume, schema=PretrainConfig, what="pretraining",
                              default_dir=lambda c: f"pretrain-{c.model.encoder}")
    result = run_with_progress(run_pretraining, cfg, run_dir, resume is not None)
    console.print(f"done in {result.seconds / 60:.1f} min: {result.epochs_run} epoch(s), masked-pixel L1 "
                  f"{result.final_loss:.4f}; encoder weights {result.encoder_weights}")
