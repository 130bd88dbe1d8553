"""What every command shares: the typer app, the stderr console (errors stay on one line) and progress bars."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from defectscan.errors import DefectscanError

if TYPE_CHECKING:  # a type only: importing defectscan.distributed here would load torch at every CLI start
    from defectscan.distributed import Shard

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Pixel-level defect detection on high-resolution industrial images.")
console = Console(stderr=True, soft_wrap=True)  # errors stay on one line, whatever the width


def print_error(message: object) -> None:
    """`error: ...` on one stderr line; the text is escaped, so a path or message with [brackets] prints as is."""
    console.print(f"[red]error:[/] {escape(str(message))}", highlight=False)


def print_note(message: object) -> None:
    """`note: ...` on stderr (escaped like `print_error`)."""
    console.print(f"[yellow]note:[/] {escape(str(message))}", highlight=False)


def max_pixels_option():
    """`--max-pixels`: the image-size limit of every command that reads images (see io.images.max_pixels)."""
    return typer.Option(None, "--max-pixels", min=1, help="Refuse images larger than this many pixels, read from the "
                        "header before decoding (default: 2^30 = 32768^2, or $DEFECTSCAN_MAX_PIXELS).")


def apply_max_pixels(value: int | None) -> None:
    if value is not None:
        from defectscan.io.images import set_max_pixels

        set_max_pixels(value)


def class_map_option():
    """`--class-map`: score a dataset class as a model class of another name (evaluate, calibrate)."""
    return typer.Option([], "--class-map", help="Score a dataset class as a model class whose name differs: "
                        "DATASET_CLASS=MODEL_CLASS (repeatable; equal names match by themselves).")


def parse_class_map(items: list[str]) -> dict[str, str]:
    pairs = [item.split("=", 1) for item in items]
    if any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
        raise DefectscanError(f"--class-map takes DATASET_CLASS=MODEL_CLASS, got {items}")
    return {a.strip(): b.strip() for a, b in pairs}


def limit_option():
    """`--limit`: score only N images of the split (evaluate, calibrate)."""
    return typer.Option(None, min=1, help="Use only N images of the split (which ones: --sample).")


def sample_option():
    """`--sample`: how `--limit` picks its images (see evaluation.outputs.limit_samples)."""
    return typer.Option("first", help="How --limit picks its images: first (the first N by file name) or random (N "
                        "drawn with a fixed seed, the same for every model on this split: use it where file names "
                        "group images by kind).")


def format_option():
    """`--format`: how a dataset directory is read (see data.formats)."""
    return typer.Option("auto", "--format", "-f", help="Dataset format: auto, folder, labelme, coco, mvtec.")


def batch_option():
    """`--batch`: tiles per forward pass of the tiling engine."""
    return typer.Option(4, help="Tiles per forward pass.")


def device_option():
    """`--device`: where the model runs (see runtime.resolve_device)."""
    return typer.Option("auto", help="auto, cpu, cuda, cuda:N.")


def amp_option():
    """`--amp`: mixed precision of the forward passes (see runtime.resolve_amp)."""
    return typer.Option("auto", help="Mixed precision: auto (bf16/fp16 on CUDA; on CPUs with native bf16, bf16 "
                        "for models trained in bf16, else float32: see README), off, bf16, fp16.")


def threads_option():
    """`--threads`: CPU threads for the model (default: every core this process may use)."""
    return typer.Option(None, "--threads", min=1, help="CPU threads for the model (default: every core this "
                        "process may use).")


def apply_threads(value: int | None) -> None:
    from defectscan.runtime import set_threads

    set_threads(value)


def wide_console() -> Console:
    """A stdout console at least 120 columns wide, for result tables."""
    return Console(width=max(120, Console().width))


def command_line() -> str:
    return " ".join(["defectscan", *sys.argv[1:]])


def join_processes(device: str, remove_leftovers: Callable[[], object]) -> Shard:
    """This process's `Shard` under torchrun (one process otherwise). Rank 0 first runs `remove_leftovers` (what
    killed runs left in the output) while the others wait, so that no rank removes another's live files."""
    from defectscan import distributed

    shard = distributed.current_shard(device)
    if shard.is_main:
        remove_leftovers()
    shard.barrier()
    return shard


def progress_bar(enabled: bool = True) -> Progress:
    """The progress display of long commands (`enabled=False`: the ranks of a torchrun job other than rank 0)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, transient=False, disable=not enabled)


def counting_task(progress: Progress, description: str) -> Callable[[int, int], None]:
    """A (done, total) callback whose task appears on its first call: a command that fails before any work (a
    dataset without the images it needs) prints its one error line without an empty bar above it."""
    task = None

    def update(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            task = progress.add_task(description, total=total or None)
        progress.update(task, completed=done, total=total or None)
    return update


def task_factory(progress: Progress):
    """progress_factory for the training loop: (description, total) -> update(done, {name: value})."""
    def factory(description: str, total: int):
        task = progress.add_task(description, total=total or None)

        def update(done: int, info: dict) -> None:
            extra = "  ".join(f"{k} {v:.4g}" for k, v in info.items())
            progress.update(task, completed=done, description=f"{description}  {extra}".rstrip())
        return update
    return factory


def run_config(config: Path | None, set_: list[str], shortcuts: list[tuple[str, object]], out: Path | None,
               resume: Path | None, *, schema, what: str, default_dir: Callable[[object], str]):
    """(config, run directory) for `train` / `pretrain`: YAML <- --set <- shortcut options (paths quoted, so that
    `lot #2`, `null` or `2024` stay folder names), or the saved config of the run `--resume` names (then only
    --epochs may change). Without `out` the run goes to runs/<default_dir(config)>-<time>."""
    import json
    import time

    from defectscan.io.files import check_output_dir
    from defectscan.training import RunDir, load_config

    overrides = list(set_)
    for key, value in shortcuts:
        if value is not None:
            overrides.append(f"{key}={json.dumps(str(value)) if isinstance(value, Path) else value}")
    if resume is not None:
        if config is not None or any(not o.startswith("training.epochs=") for o in overrides):
            raise DefectscanError(f"--resume continues a {what} with its saved config.yaml; give no config, data or "
                                  "overrides (except --epochs N, which extends it)")
        cfg, run_dir = RunDir(resume).read_config(overrides, schema=schema), resume
    else:
        cfg = load_config(config, overrides, schema=schema)
        run_dir = out or Path("runs") / f"{default_dir(cfg)}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_output_dir(run_dir)
    return cfg, run_dir


def run_with_progress(fn, cfg, run_dir: Path, resume: bool):
    """`fn(cfg, run_dir, resume=..., log=..., progress_factory=...)` with a progress bar on a terminal, and plain
    log lines (every log_every steps) when the output is redirected, where a bar shows nothing until the end."""
    if console.is_terminal:
        with progress_bar() as progress:
            return fn(cfg, run_dir, resume=resume, progress_factory=task_factory(progress),
                      log=lambda msg: progress.console.print(msg, highlight=False, markup=False))
    return fn(cfg, run_dir, resume=resume, log=lambda msg: console.print(msg, highlight=False, markup=False))
