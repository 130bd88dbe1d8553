"""`defectscan evaluate`: metrics.json, per_image.csv and report.html for a checkpoint on a split."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from defectscan.cli.common import (amp_option, app, apply_max_pixels, apply_threads, batch_option, class_map_option,
                                   command_line, console, counting_task, device_option, format_option, join_processes,
                                   limit_option, max_pixels_option, parse_class_map, print_note, progress_bar,
                                   sample_option, threads_option, wide_console)


@app.command()
def evaluate(
    model: Path = typer.Option(..., "--model", "-m", help="Checkpoint (.safetensors with its .json)."),
    data: Path = typer.Option(..., "--data", "-d", help="Labeled dataset directory."),
    split: str = typer.Option("test", help="test, val, train, unused (the labeled images a label-budget run left "
                                           "out) or all (a training run's checkpoint uses that run's split)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default: <checkpoint dir>/evaluation)."),
    format: str = format_option(),
    tile: Optional[int] = typer.Option(None, help="Tile size in px (default: the checkpoint's)."),
    overlap: Optional[int] = typer.Option(None, help="Tile overlap in px (default: the checkpoint's)."),
    stitch: Optional[str] = typer.Option(None, help="center or gaussian (default: the checkpoint's)."),
    batch: int = batch_option(),
    device: str = device_option(),
    amp: str = amp_option(),
    threshold: Optional[float] = typer.Option(None, help="Defect score threshold (default: the checkpoint's)."),
    min_area: int = typer.Option(4, help="Drop predicted regions smaller than this many pixels (as infer does)."),
    tta: bool = typer.Option(False, "--tta", help="Average over flips (4x slower), as infer --tta does."),
    region_criterion: str = typer.Option("coverage", help="A true region is found when its coverage or iou reaches --region-threshold."),
    region_threshold: float = typer.Option(0.5, help="Coverage or IoU needed to count a true region as found."),
    pro_fpr: float = typer.Option(0.3, help="False-positive-rate limit of the PRO score."),
    seam_images: int = typer.Option(2, help="Images also run untiled to measure the stitching difference (0 = skip)."),
    limit: Optional[int] = limit_option(),
    sample: str = sample_option(),
    class_map: List[str] = class_map_option(),
    max_pixels: Optional[int] = max_pixels_option(),
    threads: Optional[int] = threads_option(),
) -> None:
    """Pixel, region and image metrics plus cost, through the real tiled inference; writes metrics.json,
    per_image.csv and a self-contained report.html. Under torchrun, each process scores a share of the images and
    the metrics are reduced exactly (the same metrics.json as one process, timings aside)."""
    from defectscan import distributed
    from defectscan.evaluation import EVALUATION_DIR, run_evaluation
    from defectscan.evaluation.outputs import summary_rows
    from defectscan.io.files import check_output_dir, remove_leftovers
    from defectscan.schemas import EvalOptions, validated
    from defectscan.training import RunDir

    # options are checked before any model or data is loaded
    opts = validated(EvalOptions, tile=tile, overlap=overlap, stitch=stitch, batch_size=batch, device=device, amp=amp,
                     threshold=threshold, min_area=min_area, tta=tta, region_criterion=region_criterion,
                     region_threshold=region_threshold, pro_fpr_limit=pro_fpr, seam_images=seam_images)
    apply_max_pixels(max_pixels)
    apply_threads(threads)
    classes = parse_class_map(class_map)
    run = RunDir.containing(model)  # a training run's checkpoint is evaluated on that run's own split
    out_dir = check_output_dir(out or model.parent / EVALUATION_DIR)
    shard = join_processes(device, lambda: remove_leftovers(out_dir.parent, out_dir.name))
    with progress_bar(shard.is_main) as progress:
        result = run_evaluation(model, data, out_dir, split=split, data_format=format, options=opts, limit=limit,
                                sample=sample,
                                run_splits=run.split_source() if run else None,
                                progress=counting_task(progress, f"evaluating {model.name}"
                                                       + (f" (rank 0 of {shard.world})" if shard.world > 1 else "")),
                                command=command_line(), class_map=classes,
                                log=print_note if shard.is_main else lambda message: None, shard=shard)
    distributed.close()
    if not shard.is_main:
        return
    table = Table(title=f"defectscan evaluate — {escape(result.model)}, {result.metrics.images} images "
                        f"({escape(result.split_source)})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in summary_rows(result):
        table.add_row(escape(name), escape(value))
    wide_console().print(table)
    if split == "all":
        print_note(f"evaluated {result.split_source}")
    console.print(f"report: {out_dir / 'report.html'}")
