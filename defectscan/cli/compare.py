"""`defectscan compare`: evaluations side by side."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer
from rich.markup import escape
from rich.table import Table

from defectscan.cli.common import app, console, wide_console


@app.command()
def compare(
    dirs: List[Path] = typer.Argument(..., help="Evaluation directories, or run / benchmark-cell directories holding one."),
    out: Path = typer.Option(Path("comparison"), "--out", "-o", help="Output directory."),
) -> None:
    """Compare evaluations across backbones: one table, accuracy-vs-cost plots and the same crops per model."""
    from defectscan.evaluation.compare import METRIC_LABELS, compare as run_compare
    from defectscan.reporting.html import fmt
    from defectscan.io.files import check_output_dir, remove_leftovers

    remove_leftovers(check_output_dir(out).parent, out.name)  # what runs killed while writing this output left
    result = run_compare(dirs, out)
    table = Table(title=f"defectscan compare — {len(result['models'])} models")
    cols = ("defect_dice", "pixel_ap", "region_recall", "fp_regions_per_mp", "predicted_area_ratio",
            "fp_area_fraction", "pro", "mp_per_s", "parameters")
    table.add_column("model")
    for col in cols:
        table.add_column(METRIC_LABELS[col][0], justify="right")
    for r in result["models"]:
        table.add_row(escape(r["model"]), *(fmt(r[c]) for c in cols))
    wide_console().print(table)
    if result["warning"]:
        console.print(f"[yellow]warning:[/] {result['warning']}")
    console.print(f"report: {out / 'compare.html'}")
