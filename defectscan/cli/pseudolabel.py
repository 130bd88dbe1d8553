"""`defectscan pseudolabel`: a trained model's confident masks for a dataset's unlabeled images (self-training)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from defectscan.cli.common import (amp_option, app, apply_max_pixels, apply_threads, batch_option, counting_task,
                                   device_option, format_option, limit_option, max_pixels_option, progress_bar,
                                   sample_option, threads_option, wide_console)


@app.command()
def pseudolabel(
    data: Path = typer.Argument(..., help="Dataset directory: its unlabeled images are pseudo-labeled."),
    model: Path = typer.Option(..., "--model", "-m", help="The teacher checkpoint (.safetensors with its .json); "
                               "its calibrated threshold decides defect or not."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: masks/<image>.png and pseudolabels.json, for "
                             "train --set data.pseudo_labels=OUT."),
    band: float = typer.Option(2.0, min=0.0, help="Pixels whose defect score lies within this many logits of the "
                               "threshold are left out of the loss (0: every pixel labeled)."),
    format: str = format_option(),
    batch: int = batch_option(),
    device: str = device_option(),
    amp: str = amp_option(),
    tta: bool = typer.Option(False, "--tta", help="Average over flips (4x slower); the threshold should then come "
                             "from calibrate --tta."),
    min_area: int = typer.Option(4, help="Drop predicted regions smaller than this many pixels."),
    limit: Optional[int] = limit_option(),
    sample: str = sample_option(),
    max_pixels: Optional[int] = max_pixels_option(),
    threads: Optional[int] = threads_option(),
) -> None:
    """Run a trained model on the dataset's unlabeled images and keep its masks as training targets where it is
    confident; train a new model on labeled + pseudo-labeled crops with `--set data.pseudo_labels=OUT`."""
    from defectscan.schemas import InferOptions, validated
    from defectscan.training.pseudolabels import write_pseudolabels

    opts = validated(InferOptions, batch_size=batch, device=device, amp=amp, tta=tta, min_area=min_area)
    apply_max_pixels(max_pixels)
    apply_threads(threads)
    with progress_bar() as progress:
        manifest = write_pseudolabels(model, data, out, options=opts, band=band, limit=limit, sample=sample,
                                      data_format=format,
                                      progress=counting_task(progress, f"pseudo-labeling with {model.name}"))
    rows = manifest["images"]
    n = len(rows)
    wide_console().print(
        f"{n} of {manifest['unlabeled_images']} unlabeled image(s) in {manifest['seconds']:.0f} s: "
        f"{sum(r['regions'] > 0 for r in rows)} with predicted defects; defect pixels "
        f"{sum(r['defect_share'] for r in rows) / n:.4%}, ignored {sum(r['ignored_share'] for r in rows) / n:.4%} "
        f"(threshold {manifest['threshold']:.3f}, band {manifest['band']} logits); written to {out}", highlight=False)
