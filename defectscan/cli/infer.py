"""`defectscan infer`: images -> probability maps, masks, overlays, defect tables."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from defectscan.cli.common import (amp_option, app, apply_max_pixels, apply_threads, batch_option, console,
                                   device_option, join_processes, max_pixels_option, print_error, print_note,
                                   progress_bar, threads_option, wide_console)
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
    batch: int = batch_option(),
    device: str = device_option(),
    threshold: Optional[float] = typer.Option(None, help="Defect score threshold in [0, 1] (default: the checkpoint's)."),
    tta: bool = typer.Option(False, "--tta", help="Average over flips (4x slower)."),
    amp: str = amp_option(),
    min_area: int = typer.Option(4, help="Drop defect regions smaller than this many pixels."),
    preview_size: int = typer.Option(2048, help="Longest side of the overlay preview in px."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Also take images from sub-folders of directories."),
    max_pixels: Optional[int] = max_pixels_option(),
    threads: Optional[int] = threads_option(),
    engine: str = typer.Option("local", help="local: this process (one share per process under torchrun); ray: "
                               "a Ray cluster, one model per worker (pip install \"defectscan[ray]\")."),
    address: Optional[str] = typer.Option(None, help="--engine ray: the cluster to join (auto: the one `ray start` "
                                          "runs on this node; ray://HOST:10001); default: a private Ray on this "
                                          "machine. Images, model and --out must be paths every node sees."),
    workers: Optional[int] = typer.Option(None, min=1, help="--engine ray: model workers (default: one per GPU, "
                                          "else one per --threads CPUs; --threads defaults to 1 per worker)."),
) -> None:
    """Detect defects: per image a probability map per class, a mask, an overlay and a defect table. Under
    torchrun, each process takes a share of the images; with --engine ray, a Ray cluster's workers do (the same
    files as one process)."""
    from defectscan import distributed
    from defectscan.inference import Predictor, collect_images, output_names
    from defectscan.inference.writers import batch_row, infer_one, write_batch_summary
    from defectscan.io.files import check_output_dir, remove_leftovers
    from defectscan.schemas import InferOptions, validated

    # options are checked before any model or data is loaded
    opts = validated(InferOptions, tile=tile, overlap=overlap, stitch=stitch, batch_size=batch, device=device,
                     threshold=threshold, tta=tta, amp=amp, min_area=min_area, preview_size=preview_size)
    if engine not in ("local", "ray"):
        raise DefectscanError(f"--engine {engine}: use local or ray")
    if engine == "local" and (address is not None or workers is not None):
        raise DefectscanError("--address and --workers go with --engine ray")
    if engine == "ray":
        from defectscan.inference import ray_engine

        if distributed.launched_by_torchrun():
            raise DefectscanError("--engine ray drives its own workers: start it once, not under torchrun")
        ray_engine.require()
    apply_max_pixels(max_pixels)
    paths = collect_images(images, recursive=recursive, exclude=out)
    check_output_dir(out)
    items = list(zip(paths, output_names(paths)))
    if engine == "ray":
        shard = distributed.SINGLE
        remove_leftovers(out)
        # the driver loads the model once on its CPU to check it (architecture, tile, overlap) before any worker
        predictor = Predictor.from_checkpoint(model, opts.model_copy(update={"device": "cpu"}))
    else:
        apply_threads(threads)
        shard = join_processes(device, lambda: remove_leftovers(out))
        predictor = Predictor.from_checkpoint(model, opts)
    for note in predictor.unreported_notes() if shard.is_main else ():
        print_note(note)
    class_cols = list(predictor.class_names.values())
    mine: list[tuple[int, dict, list[str] | None]] = []  # (image index, summary row, table cells)

    def record(index: int, summary: dict | None, error: str | None) -> None:
        path, name = items[index]
        mine.append((index, batch_row(path, name, class_cols, summary, error=error), summary and _cells(path, summary)))
        if error:
            print_error(error)

    with progress_bar(shard.is_main) as progress:
        if engine == "ray":
            from defectscan.io.images import max_pixels as pixel_limit

            ray_engine.connect(address)
            try:
                pool = ray_engine.plan(device, workers, threads, len(items))
                title = f"{pool.workers} Ray workers"  # each loads the model itself: the bundled one when none given
                task = progress.add_task(f"{len(items)} images on {pool.workers} Ray worker(s)", total=len(items))
                for index, summary, error in ray_engine.ray_infer(
                        [(i, p, out / n) for i, (p, n) in enumerate(items)], options=opts, pool=pool,
                        checkpoint=model.resolve() if model else None, max_pixels=pixel_limit()):
                    record(index, summary, error)
                    progress.advance(task)
            finally:
                ray_engine.shutdown()
        else:
            title = f"{shard.world} processes" if shard.world > 1 else ""
            for index, (path, name) in shard.take(items):
                task = progress.add_task(f"{escape(path.name)}: reading", total=None)  # a huge PNG decodes slowly
                summary, error = infer_one(predictor, path, out / name,
                                           progress=lambda d, n: progress.update(task, completed=d, total=n),
                                           on_open=lambda: progress.update(task, description=escape(path.name)))
                if error:
                    progress.update(task, description=f"[red]{escape(path.name)} (failed)")
                record(index, summary, error)
    for note in predictor.unreported_notes() if shard.is_main else ():  # what the run found (a provider gave way)
        print_note(note)
    gathered = sorted((x for part in shard.gather(mine) for x in part), key=lambda x: x[0])
    distributed.close()
    # under Ray each worker picks its precision on its own node (defects.json records it)
    table = Table(title=f"defectscan infer — {predictor.spec.arch}/{predictor.spec.encoder}, tile {predictor.tile[0]}, "
                        f"overlap {predictor.overlap}, {predictor.stitch}"
                        + (f", {predictor.precision}" if engine == "local" else "") + (f", {title}" if title else ""))
    for col in ("image", "size", "tiles", "time", "MP/s", *class_cols, "defect area"):
        table.add_column(col, justify="left" if col == "image" else "right")
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


def _cells(path: Path, s: dict) -> list[str]:
    """One image's row of the infer table."""
    return [escape(path.name), f"{s['width']}x{s['height']}", str(s["tiles"]), f"{s['seconds']:.1f}s",
            f"{s['megapixels_per_second']:.2f}", *(str(n) for n in s["regions_per_class"].values()),
            f"{100 * s['defect_area_fraction']:.3f}%"]
