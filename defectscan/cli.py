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


def _task_factory(progress: Progress):
    """progress_factory for the training loop: (description, total) -> update(done, {name: value})."""
    def factory(description: str, total: int):
        task = progress.add_task(description, total=total or None)

        def update(done: int, info: dict) -> None:
            extra = "  ".join(f"{k} {v:.4g}" for k, v in info.items())
            progress.update(task, completed=done, description=f"{description}  {extra}".rstrip())
        return update
    return factory


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
    from defectscan.tiling import check_stitch

    paths = collect_images(images)
    opts = InferenceOptions(tile=tile, overlap=overlap, stitch=stitch, batch_size=batch, device=device,
                            threshold=threshold, tta=tta, amp=amp, min_area=min_area, preview_size=preview_size)
    check_stitch(stitch)  # before any model or data is loaded
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
        result = run_training(cfg, run_dir, resume=resume is not None, progress_factory=_task_factory(progress),
                              log=lambda msg: progress.console.print(msg, highlight=False))
    best = f"{result.best_metric:.4f}" if result.best_metric is not None else "n/a (no validation split)"
    console.print(f"done in {result.seconds / 60:.1f} min: {result.epochs_run} epoch(s), best epoch {result.best_epoch} "
                  f"(val {cfg.training.select} {best}); checkpoint {run_dir / 'best.safetensors'}")
    if result.test:
        t = result.test
        console.print(f"test: mean IoU {t['mean_iou']}, mean Dice {t['mean_dice']}, defect pixel AP {t['defect_pixel_ap']}")


@app.command()
def evaluate(
    model: Path = typer.Option(..., "--model", "-m", help="Checkpoint (.safetensors with its .json)."),
    data: Path = typer.Option(..., "--data", "-d", help="Labeled dataset directory."),
    split: str = typer.Option("test", help="test, val, train or all (a training run's checkpoint uses that run's split)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default: <checkpoint dir>/evaluation)."),
    format: str = typer.Option("auto", "--format", "-f", help="Dataset format: auto, folder, labelme, coco, mvtec."),
    tile: Optional[int] = typer.Option(None, help="Tile size in px (default: the checkpoint's)."),
    overlap: Optional[int] = typer.Option(None, help="Tile overlap in px (default: the checkpoint's)."),
    stitch: str = typer.Option("center", help="center or gaussian."),
    batch: int = typer.Option(4, help="Tiles per forward pass."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    amp: str = typer.Option("auto", help="Mixed precision: auto (CUDA only), off, bf16, fp16."),
    threshold: Optional[float] = typer.Option(None, help="Defect score threshold (default: the checkpoint's)."),
    min_area: int = typer.Option(4, help="Drop predicted regions smaller than this many pixels (as infer does)."),
    region_criterion: str = typer.Option("coverage", help="A true region is found when its coverage or iou reaches --region-threshold."),
    region_threshold: float = typer.Option(0.5, help="Coverage or IoU needed to count a true region as found."),
    pro_fpr: float = typer.Option(0.3, help="False-positive-rate limit of the PRO score."),
    seam_images: int = typer.Option(2, help="Images also run untiled to measure the stitching difference (0 = skip)."),
    limit: Optional[int] = typer.Option(None, help="Evaluate only the first N images of the split."),
) -> None:
    """Pixel, region and image metrics plus cost, through the real tiled inference; writes metrics.json,
    per_image.csv and a self-contained report.html."""
    from defectscan.evaluation import EvalOptions
    from defectscan.evaluation_output import run_evaluation
    from defectscan.tiling import check_stitch

    check_stitch(stitch)  # before any model or data is loaded
    if region_criterion not in ("coverage", "iou"):
        raise DefectscanError(f"unknown region criterion '{region_criterion}' (choose coverage or iou)")
    for name, value in (("threshold", threshold), ("region-threshold", region_threshold), ("pro-fpr", pro_fpr)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise DefectscanError(f"--{name} must be within [0, 1], got {value}")
    opts = EvalOptions(tile=tile, overlap=overlap, stitch=stitch, batch_size=batch, device=device, amp=amp,
                       threshold=threshold, min_area=min_area, region_criterion=region_criterion,
                       region_threshold=region_threshold, pro_fpr_limit=pro_fpr, seam_images=seam_images)
    out_dir = out or model.parent / "evaluation"
    with _progress() as progress:
        task = progress.add_task(f"evaluating {model.name}", total=None)
        result = run_evaluation(model, data, out_dir, split=split, data_format=format, options=opts, limit=limit,
                                progress=lambda d, n: progress.update(task, completed=d, total=n),
                                command=" ".join(["defectscan", *sys.argv[1:]]))
    m = result["metrics"]
    r, im, cost = m["region"], m["image_level"], m.get("cost", {})
    table = Table(title=f"defectscan evaluate — {result['model']}, {m['images']} images ({result['split_source']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in (
        ("pixel defect IoU / Dice", f"{m['defect_iou']} / {m['defect_dice']}"),
        ("pixel defect AP / AUROC", f"{m['defect_pixel_ap']} / {m['defect_pixel_auroc']}"),
        ("pixel best F1 (threshold)", f"{m['defect_best_f1']} ({m['defect_best_f1_threshold']})"),
        (f"region recall ({r['criterion']})", f"{r['recall']} ({r['found']}/{r['gt_regions']})"),
        ("FP regions / image, / MP", f"{r['fp_regions_per_image']}, {r['fp_regions_per_megapixel']}"),
        (f"PRO (FPR <= {r['pro_fpr_limit']})", str(r["pro"])),
        ("image AUROC / AP / F1", f"{im['auroc']} / {im['ap']} / {im['f1']}"),
        ("speed", f"{cost.get('megapixels_per_second')} MP/s, {cost.get('latency_mean_s')} s/image"),
    ):
        table.add_row(name, value)
    Console(width=max(120, Console().width)).print(table)
    console.print(f"report: {out_dir / 'report.html'}")


@app.command()
def compare(
    dirs: List[Path] = typer.Argument(..., help="Evaluation directories, or run / benchmark-cell directories holding one."),
    out: Path = typer.Option(Path("comparison"), "--out", "-o", help="Output directory."),
) -> None:
    """Compare evaluations across backbones: one table, accuracy-vs-cost plots and the same crops per model."""
    from defectscan.comparison import compare as run_compare

    result = run_compare(dirs, out)
    table = Table(title=f"defectscan compare — {len(result['models'])} models")
    cols = ("model", "defect_dice", "pixel_ap", "region_recall", "pro", "mp_per_s", "parameters")
    for col in cols:
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in result["models"]:
        table.add_row(*(str(r[c]) if r[c] is not None else "-" for c in cols))
    Console(width=max(120, Console().width)).print(table)
    if result["warning"]:
        console.print(f"[yellow]warning:[/] {result['warning']}")
    console.print(f"report: {out / 'compare.html'}")


@app.command()
def benchmark(
    study: Path = typer.Argument(..., help="Study YAML (see configs/benchmark/)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Study directory (default: runs/benchmark/<study name>)."),
    cell: Optional[str] = typer.Option(None, help="Run only this cell, e.g. resnet18__n20__s1."),
    report_only: bool = typer.Option(False, "--report-only", help="Only rebuild the report from finished cells."),
    device: Optional[str] = typer.Option(None, help="Device for every cell (default: the training config's)."),
) -> None:
    """Limited-label study: backbones x labeled counts x seeds; resumable; learning curves with bootstrap CIs."""
    from defectscan.benchmark import load_study, run_study, write_report

    st = load_study(study)
    out_dir = out or Path("runs") / "benchmark" / st.name
    command = " ".join(["defectscan", *sys.argv[1:]])
    if report_only:
        write_report(st, out_dir, command=command)
    else:
        with _progress() as progress:
            run_study(st, out_dir, only=cell, device=device, command=command, progress_factory=_task_factory(progress),
                      log=lambda msg: progress.console.print(msg, highlight=False))
    console.print(f"report: {out_dir / 'report.html'}; curve: {out_dir / 'learning_curve.png'}")


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
