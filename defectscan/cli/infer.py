"""`defectscan infer`: images -> probability maps, masks, overlays, defect tables."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from defectscan.cli.common import (amp_option, app, apply_max_pixels, apply_threads, console, join_processes,
                                   max_pixels_option, print_error,
                                   print_note, progress_bar, threads_option, wide_console)
from defectscan.errors import DefectscanError


@app.command()
def infer(
    images: List[Path] = typer.Argument(..., help="Image files and/or directories of images."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Checkpoint (.safetensors with its .json); default: the bundled wafer model."),
    out: Path = typer.Option(Path("defectscan_results"), "--out", "-o", help="Output directory (one sub-directory per image)."),
    tile: Optional[int] = typer.Option(None, help="Tile size in px (default: the checkpoint's)."),
    overlap: Optional[int] = typer.Option(None, help="Tile overlap in px (default: the checkpoint's)."),
    stitch: Optional[str] = typer.Option(None, help="center (exact overlap-tile) or gaussian (weighted blending); "
                                         "default: the checkpoint's (how its training validated)."),
    batch: int = typer.Option(4, help="Tiles per forward pass."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    threshold: Optional[float] = typer.Option(None, help="Defect score threshold in [0, 1] (default: the checkpoint's)."),
    tta: bool = typer.Option(False, "--tta", help="Average over flips (4x slower)."),
    amp: str = amp_option(),
    min_area: int = typer.Option(4, help="Drop defect regions smaller than this many pixels."),
    preview_size: int = typer.Option(2048, help="Longest side of the overlay preview in px."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Also take images from sub-folders of directories."),
    max_pixels: Optional[int] = max_pixels_option(),
    threads: Optional[int] = threads_option(),
) -> None:
    """Detect defects: per image a probability map per class, a mask, an overlay and a defect table. Under
    torchrun, each process takes a share of the images (the same files as one process)."""
    from defectscan import distributed
    from defectscan.inference import Predictor, collect_images, output_names, write_prediction
    from defectscan.inference.writers import batch_row, write_batch_summary
    from defectscan.io.files import check_output_dir, remove_leftovers
    from defectscan.io.images import open_image
    from defectscan.schemas import InferOptions, validated

    # options are checked before any model or data is loaded
    opts = validated(InferOptions, tile=tile, overlap=overlap, stitch=stitch, batch_size=batch, device=device,
                     threshold=threshold, tta=tta, amp=amp, min_area=min_area, preview_size=preview_size)
    apply_max_pixels(max_pixels)
    apply_threads(threads)
    paths = collect_images(images, recursive=recursive, exclude=out)
    check_output_dir(out)
    shard = join_processes(device, lambda: remove_leftovers(out))
    predictor = Predictor.from_checkpoint(model, opts)
    for note in predictor.notes if shard.is_main else ():
        print_note(note)
    table = Table(title=f"defectscan infer — {predictor.spec.arch}/{predictor.spec.encoder}, tile {predictor.tile[0]}, "
                        f"overlap {predictor.overlap}, {predictor.stitch}, {predictor.precision}"
                        + (f", {shard.world} processes" if shard.world > 1 else ""))
    class_cols = list(predictor.class_names.values())
    for col in ("image", "size", "tiles", "time", "MP/s", *class_cols, "defect area"):
        table.add_column(col, justify="left" if col == "image" else "right")
    mine: list[tuple[int, dict, list[str] | None]] = []  # (image index, summary row, table cells)
    with progress_bar(shard.is_main) as progress:
        for index, (path, name) in shard.take(list(zip(paths, output_names(paths)))):
            task = progress.add_task(f"{escape(path.name)}: reading", total=None)  # a huge PNG decodes for minutes
            try:
                source = open_image(path)
                progress.update(task, description=escape(path.name))
                s = write_prediction(predictor, path, source, out / name,
                                     progress=lambda d, n: progress.update(task, completed=d, total=n))
            except DefectscanError as exc:
                mine.append((index, batch_row(path, name, class_cols, error=str(exc)), None))
                progress.update(task, description=f"[red]{escape(path.name)} (failed)")
                print_error(exc)
                continue
            mine.append((index, batch_row(path, name, class_cols, s),
                         [escape(path.name), f"{s['width']}x{s['height']}", str(s["tiles"]), f"{s['seconds']:.1f}s",
                          f"{s['megapixels_per_second']:.2f}", *(str(s["regions_per_class"][c]) for c in class_cols),
                          f"{100 * s['defect_area_fraction']:.3f}%"]))
    gathered = sorted((x for part in shard.gather(mine) for x in part), key=lambda x: x[0])
    distributed.close()
    rows = [row for _, row, _ in gathered]
    for _, _, cells in gathered:
        if cells:
            table.add_row(*cells)
    done = [r for r in rows if r["status"] == "ok"]
    failures = len(rows) - len(done)
    if not shard.is_main:  # rank 0 reports and writes the summary; every rank exits with the same status
        raise typer.Exit(1 if failures else 0)
    if not done:
        console.print(f"[red]all {failures} image(s) failed; nothing written[/]")
        raise typer.Exit(1)
    if len(rows) > 1:
        table.add_section()
        table.add_row(f"all {len(done)} images", "", str(sum(r["tiles"] for r in done)),
                      f"{sum(r['seconds'] for r in done):.1f}s", "",
                      *(str(sum(r[f"regions_{c}"] for r in done)) for c in class_cols), "", style="bold")
    wide_console().print(table)
    summary = write_batch_summary(out, rows)
    console.print(f"outputs in {escape(str(out))}/, one row per image in {escape(summary.name)}"
                  + (f"; [red]{failures} of {len(paths)} image(s) failed[/]" if failures else ""))
    if failures:
        raise typer.Exit(1)
