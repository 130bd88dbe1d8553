"""`defectscan benchmark`: the resumable limited-label study."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from defectscan.cli.common import app, apply_threads, command_line, console, progress_bar, task_factory, threads_option
from defectscan.errors import DefectscanError


@app.command()
def benchmark(
    study: Path = typer.Argument(..., help="Study YAML (see configs/benchmark/)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Study directory (default: runs/benchmark/<study name>)."),
    cell: Optional[str] = typer.Option(None, help="Run only this cell, e.g. resnet18__n20__s1."),
    report_only: bool = typer.Option(False, "--report-only", help="Only rebuild the report from finished cells."),
    device: Optional[str] = typer.Option(None, help="Device for every cell (default: the training config's)."),
    threads: Optional[int] = threads_option(),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Dataset directory for every cell (sets data.root; "
                                        "default: the training config's)."),
    set_: List[str] = typer.Option([], "--set", help="Override a training config value in every cell, e.g. --set "
                                   "training.epochs=4 (repeatable; after the study's own `set`)."),
) -> None:
    """Limited-label study: backbones x labeled counts x seeds; resumable; learning curves with bootstrap CIs."""
    from defectscan.io.files import check_output_dir
    from defectscan.studies import load_study, run_study, write_report

    apply_threads(threads)
    st = load_study(study, [*set_, *([f"data.root={json.dumps(str(data))}"] if data is not None else [])])
    out_dir = check_output_dir(out or Path("runs") / "benchmark" / st.name)
    command = command_line()
    if report_only:
        if not write_report(st, out_dir, command=command):
            raise DefectscanError(f"{out_dir}: no finished cells yet, so no report; run the study without --report-only")
    else:
        with progress_bar() as progress:
            run_study(st, out_dir, only=cell, device=device, command=command, progress_factory=task_factory(progress),
                      log=lambda msg: progress.console.print(msg, highlight=False))
    console.print(f"report: {out_dir / 'report.html'}; curve: {out_dir / 'learning_curve.png'}")
