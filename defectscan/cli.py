"""Command line: thin wrappers around the library; every user error is one line on stderr and exit code 1."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from defectscan.errors import DefectscanError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Pixel-level defect detection on high-resolution industrial images.")
console = Console(stderr=True, soft_wrap=True)  # errors stay on one line, whatever the width


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, transient=False)


@app.command()
def infer(
    images: List[Path] = typer.Argument(..., help="Image files and/or directories of images."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Checkpoint (.safetensors with its .json); default: the bundled wafer model."),
    out: Path = typer.Option(Path("defectscan_results"), "--out", "-o", help="Output directory (one sub-directory per image)."),
    tile: Optional[int] = typer.Option(None, help="Tile size in px (default: the checkpoint's)."),
    overlap: Optional[int] = typer.Option(None, help="Tile overlap in px (default: the checkpoint's)."),
    stitch: str = typer.Option("center", help="center (exact overlap-tile) or gaussian (weighted blending)."),
    batch: int = typer.Option(4, help="Tiles per forward pass."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    threshold: Optional[float] = typer.Option(None, help="Defect score threshold in [0, 1] (default: the checkpoint's)."),
    tta: bool = typer.Option(False, "--tta", help="Average over flips (4x slower)."),
    amp: str = typer.Option("auto", help="Mixed precision: auto (CUDA only), off, bf16, fp16."),
    min_area: int = typer.Option(4, help="Drop defect regions smaller than this many pixels."),
    preview_size: int = typer.Option(2048, help="Longest side of the overlay preview in px."),
) -> None:
    """Detect defects: per image a probability map per class, a mask, an overlay and a defect table."""
    from defectscan.inference import InferenceOptions, Predictor, collect_images, open_image, output_names

    paths = collect_images(images)
    opts = InferenceOptions(tile=tile, overlap=overlap, stitch=stitch, batch_size=batch, device=device,
                            threshold=threshold, tta=tta, amp=amp, min_area=min_area, preview_size=preview_size)
    if stitch not in ("center", "gaussian"):
        raise DefectscanError(f"unknown stitch mode '{stitch}' (choose center or gaussian)")
    predictor = Predictor(model, opts)
    for note in predictor.notes:
        console.print(f"[yellow]note:[/] {note}")
    table = Table(title=f"defectscan infer — {predictor.spec.arch}/{predictor.spec.encoder}, tile {predictor.tile[0]}, "
                        f"overlap {predictor.overlap}, {stitch}")
    class_cols = list(predictor.class_names.values())
    for col in ("image", "size", "tiles", "time", "MP/s", *class_cols, "defect area"):
        table.add_column(col, justify="left" if col == "image" else "right")
    failures = 0
    with _progress() as progress:
        for path, name in zip(paths, output_names(paths)):
            task = progress.add_task(path.name, total=None)
            try:
                source = open_image(path)
                pred = predictor.predict(source, progress=lambda d, n: progress.update(task, completed=d, total=n))
                predictor.write(path, source, pred, out / name)
            except DefectscanError as exc:
                failures += 1
                progress.update(task, description=f"[red]{path.name} (failed)")
                console.print(f"[red]error:[/] {exc}", highlight=False)
                continue
            s = pred.summary
            table.add_row(path.name, f"{s['width']}x{s['height']}", str(s["tiles"]), f"{s['seconds']:.1f}s",
                          f"{s['megapixels_per_second']:.2f}", *(str(s["regions_per_class"][c]) for c in class_cols),
                          f"{100 * s['defect_area_fraction']:.3f}%")
    Console(width=max(120, Console().width)).print(table)
    console.print(f"outputs in {out}/" + (f"; [red]{failures} of {len(paths)} image(s) failed[/]" if failures else ""))
    if failures:
        raise typer.Exit(1)


@app.command()
def synth(
    out_dir: Path = typer.Argument(..., help="Directory for images/ and masks/."),
    size: int = typer.Option(8192, help="Image side in px."),
    count: int = typer.Option(1, help="Number of wafers."),
    seed: int = typer.Option(0, help="Seed of the first wafer (wafer i uses seed + i)."),
) -> None:
    """Write synthetic wafer images with class-index masks (deterministic for a seed)."""
    from defectscan.synth import CLASSES, write_dataset

    if size < 64 or count < 1:
        raise DefectscanError("synth needs --size >= 64 and --count >= 1")
    with _progress() as progress:
        task = progress.add_task(f"wafers {size}px", total=count)
        pairs = write_dataset(out_dir, size=size, count=count, seed=seed, progress=lambda n: progress.update(task, completed=n))
    console.print(f"wrote {len(pairs)} image/mask pairs to {out_dir} (mask values: "
                  + ", ".join(f"{i}={c}" for i, c in enumerate(CLASSES)) + ")")


data_app = typer.Typer(no_args_is_help=True, help="Inspect and validate datasets.")
app.add_typer(data_app, name="data")


@data_app.command("check")
def data_check(
    root: Path = typer.Argument(..., help="Dataset directory."),
    format: str = typer.Option("auto", "--format", "-f", help="auto, folder, labelme, coco or mvtec."),
    classes: Optional[str] = typer.Option(None, help="Comma-separated defect class names (default: from the data)."),
) -> None:
    """Report counts, sizes, class balance, defect sizes and every problem; exit 1 if a problem is fatal."""
    from defectscan.data import check_dataset, load_dataset
    from defectscan.reporting import print_dataset_report

    ds = load_dataset(root, format, classes.split(",") if classes else None)
    with _progress() as progress:
        task = progress.add_task("checking images", total=len(ds.samples))
        report = check_dataset(ds, progress=lambda d, n: progress.update(task, completed=d))
    print_dataset_report(report, Console(width=max(120, Console().width)))
    if report.fatal:
        raise DefectscanError(f"{root}: {sum(p.fatal for p in report.problems)} fatal problem(s), listed above")


@app.command()
def train(
    config: Optional[Path] = typer.Argument(None, help="YAML config (see configs/); default: built-in defaults."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Dataset directory (sets data.root)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default: runs/<config name>-<time>)."),
    set_: List[str] = typer.Option([], "--set", help="Override a config value, e.g. --set training.epochs=30 (repeatable)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the interrupted run in this directory."),
    epochs: Optional[int] = typer.Option(None, help="Shortcut for --set training.epochs=N."),
    labeled: Optional[int] = typer.Option(None, help="Train on the first N labeled images (nested subsets)."),
    device: Optional[str] = typer.Option(None, help="Shortcut for --set training.device=..."),
) -> None:
    """Train a segmentation model; validation runs the tiling engine on full images; best checkpoint kept."""
    import time as _time

    from defectscan.training import load_config, train as run_training

    overrides = list(set_)
    for key, value in (("data.root", data), ("training.epochs", epochs), ("data.labeled", labeled),
                       ("training.device", device)):
        if value is not None:
            overrides.append(f"{key}={value}")
    if resume is not None:
        if config is not None or overrides:
            raise DefectscanError("--resume continues a run with its saved config.yaml; give no config or overrides")
        cfg, run_dir = load_config(resume / "config.yaml"), resume
    else:
        cfg = load_config(config, overrides)
        run_dir = out or Path("runs") / f"{config.stem if config else 'train'}-{_time.strftime('%Y%m%d-%H%M%S')}"
    with _progress() as progress:
        tasks: dict[str, int] = {}

        def factory(description: str, total: int):
            task = progress.add_task(description, total=total)
            tasks[description] = task

            def update(done: int, info: dict) -> None:
                extra = "  ".join(f"{k} {v:.4g}" for k, v in info.items())
                progress.update(task, completed=done, description=f"{description}  {extra}".rstrip())
            return update

        result = run_training(cfg, run_dir, resume=resume is not None, progress_factory=factory,
                              log=lambda msg: progress.console.print(msg, highlight=False))
    best = f"{result.best_metric:.4f}" if result.best_metric is not None else "n/a (no validation split)"
    console.print(f"done in {result.seconds / 60:.1f} min: {result.epochs_run} epoch(s), best epoch {result.best_epoch} "
                  f"(val {cfg.training.select} {best}); checkpoint {run_dir / 'best.safetensors'}")
    if result.test:
        t = result.test
        console.print(f"test: mean IoU {t['mean_iou']}, mean Dice {t['mean_dice']}, defect pixel AP {t['defect_pixel_ap']}")


@app.command()
def models() -> None:
    """List the encoders and decoders the model factory can build."""
    from defectscan.models.factory import DECODERS, ENCODERS

    table = Table(title="encoders (each works under every decoder unless noted)")
    for col in ("encoder", "family", "stride", "notes"):
        table.add_column(col)
    for name, info in ENCODERS.items():
        notes = [] if info.output_stride_16 else ["no deeplabv3plus"]
        if info.offline_package:
            notes.append(f"imagenet offline via {info.offline_package}")
        table.add_row(name, info.family, str(info.stride), "; ".join(notes))
    Console().print(table)
    Console().print("decoders: " + ", ".join(DECODERS))


def main() -> None:
    """Console entry point: user errors become one line and exit code 1, never a traceback."""
    try:
        app(standalone_mode=True)
    except DefectscanError as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
