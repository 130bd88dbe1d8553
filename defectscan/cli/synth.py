"""`defectscan synth`: synthetic wafers with class-index masks."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from defectscan.cli.common import app, console, progress_bar
from defectscan.errors import DefectscanError


@app.command()
def synth(
    out_dir: Path = typer.Argument(..., help="Directory for images/ and masks/."),
    size: int = typer.Option(8192, help="Image side in px."),
    count: int = typer.Option(1, help="Number of wafers."),
    seed: int = typer.Option(0, help="Seed of the first wafer (wafer i uses seed + i)."),
    split: Optional[str] = typer.Option(None, help="Also record the wafers as this split (train, val, test) in split.json."),
) -> None:
    """Write synthetic wafer images with class-index masks (deterministic for a seed); files are named by size and
    seed (wafer_<size>px_s<seed>.png), so several calls build one dataset."""
    from defectscan.data.synth import CLASSES, write_dataset

    if size < 64 or count < 1:
        raise DefectscanError("synth needs --size >= 64 and --count >= 1")
    if split not in (None, "train", "val", "test"):
        raise DefectscanError(f"unknown split '{split}' (choose train, val or test)")
    with progress_bar() as progress:
        task = progress.add_task(f"wafers {size}px", total=count)
        pairs = write_dataset(out_dir, size=size, count=count, seed=seed, split=split, progress=lambda n: progress.update(task, completed=n))
    console.print(f"wrote {len(pairs)} image/mask pairs to {out_dir} (mask values: "
                  + ", ".join(f"{i}={c}" for i, c in enumerate(CLASSES)) + ")")
