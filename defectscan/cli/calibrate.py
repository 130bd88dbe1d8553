"""`defectscan calibrate`: choose a checkpoint's decision threshold on labeled images and store it in it."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from defectscan.cli.common import (amp_option, app, apply_max_pixels, apply_threads, batch_option, class_map_option,
                                   counting_task, device_option, format_option, limit_option, max_pixels_option,
                                   parse_class_map, print_note, progress_bar, sample_option, threads_option,
                                   wide_console)


@app.command()
def calibrate(
    model: Path = typer.Option(..., "--model", "-m", help="Checkpoint (.safetensors with its .json)."),
    data: Path = typer.Option(..., "--data", "-d", help="Labeled dataset directory."),
    split: str = typer.Option("val", help="val, train, unused or all: the images to choose on (a training run's "
                              "checkpoint uses that run's split; test is refused)."),
    rule: str = typer.Option("stable_f1", help="stable_f1 (best pixel F1, but the threshold nearest the trained "
                             "one whose F1 is within --tolerance bootstrap standard errors of the best: a few images "
                             "cannot pull it to an extreme); best_f1; precision (the loosest threshold reaching "
                             "--target precision); recall (the strictest threshold keeping --target recall)."),
    target: Optional[float] = typer.Option(None, help="Pixel precision or recall to reach, in (0, 1]."),
    tolerance: float = typer.Option(0.25, min=0.0, help="stable_f1: standard errors of F1 given up to stay near "
                                    "the trained threshold (0: best F1)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the calibrated checkpoint here (default: "
                                       "update --model in place; its weights are not rewritten)."),
    format: str = format_option(),
    batch: int = batch_option(),
    device: str = device_option(),
    amp: str = amp_option(),
    tta: bool = typer.Option(False, "--tta", help="Average over flips (4x slower): calibrate with it if infer "
                             "will run with --tta."),
    limit: Optional[int] = limit_option(),
    sample: str = sample_option(),
    class_map: List[str] = class_map_option(),
    max_pixels: Optional[int] = max_pixels_option(),
    threads: Optional[int] = threads_option(),
) -> None:
    """Choose the defect-score threshold on labeled images (best pixel F1, or a target precision or recall) and
    store it in the checkpoint, so that `infer` and `evaluate` use it by default."""
    from defectscan.evaluation.calibrate import calibrate_threshold
    from defectscan.schemas import EvalOptions, validated
    from defectscan.training import RunDir

    opts = validated(EvalOptions, batch_size=batch, device=device, amp=amp, tta=tta)
    apply_max_pixels(max_pixels)
    apply_threads(threads)
    classes = parse_class_map(class_map)
    run = RunDir.containing(model)
    with progress_bar() as progress:
        choice, written, how = calibrate_threshold(
            model, data, split=split, rule=rule, target=target, tolerance=tolerance, out=out, data_format=format,
            options=opts, run_splits=run.split_source() if run else None, class_map=classes,
            progress=counting_task(progress, f"scoring {model.name}"), log=print_note, limit=limit,
            sample=sample)
    result = wide_console()  # the result on stdout; progress and notes on stderr
    result.print(f"threshold {choice.threshold:.4f} ({rule}{f' {target}' if target else ''}, on {how}): pixel "
                  f"precision {choice.precision:.3f}, recall {choice.recall:.3f}, F1 {choice.f1:.3f}")
    if choice.note:
        print_note(choice.note)
    result.print(f"stored in {written}", highlight=False)
