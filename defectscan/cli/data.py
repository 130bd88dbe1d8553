"""`defectscan data check`: a dataset's counts, sizes, balance and every problem, as tables."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from defectscan.cli.common import app, apply_max_pixels, format_option, max_pixels_option, progress_bar, wide_console
from defectscan.errors import DefectscanError


data_app = typer.Typer(no_args_is_help=True, help="Inspect and validate datasets.")
app.add_typer(data_app, name="data")


@data_app.command("check")
def data_check(
    root: Path = typer.Argument(..., help="Dataset directory."),
    format: str = format_option(),
    classes: Optional[str] = typer.Option(None, help="Comma-separated defect class names (default: from the data)."),
    max_pixels: Optional[int] = max_pixels_option(),
) -> None:
    """Report counts, sizes, class balance, defect sizes and every problem; exit 1 if a problem is fatal."""
    from defectscan.data import check_dataset, load_dataset

    apply_max_pixels(max_pixels)
    ds = load_dataset(root, format, classes.split(",") if classes else None)
    with progress_bar() as progress:
        task = progress.add_task("checking images", total=len(ds.samples))
        report = check_dataset(ds, progress=lambda d, n: progress.update(task, completed=d))
    _print_report(report, wide_console())
    if report.fatal:
        raise DefectscanError(f"{root}: {sum(p.fatal for p in report.problems)} fatal problem(s), listed above")


def _print_report(report, console: Console) -> None:
    """Rich tables for `defectscan data check` (a `defectscan.data.DatasetReport`)."""
    r = report
    t = Table(title=f"dataset ({r.format})", show_header=False)
    t.add_row("images", str(r.images))
    t.add_row("labeled", f"{r.labeled}" + (f" (of which {r.good} defect-free by the format)" if r.good else ""))
    t.add_row("unlabeled", f"{r.unlabeled}" + (f"  e.g. {', '.join(r.unlabeled_examples)}" if r.unlabeled else ""))
    t.add_row("splits (labeled)", ", ".join(f"{k} {v}" for k, v in sorted(r.splits.items())) or "-")
    sizes = ", ".join(f"{w}x{h} ({n})" for (w, h), n in r.sizes.most_common(4))
    more = len(r.sizes) - 4
    t.add_row("image sizes", sizes + (f", and {more} other size(s)" if more > 0 else ""))
    if r.defect_fractions:
        f = np.asarray(r.defect_fractions) * 100
        t.add_row("defect area per labeled image", f"median {np.median(f):.3f}%, max {f.max():.3f}%, "
                  f"{int((f == 0).sum())} image(s) without defects")
    console.print(t)
    c = Table(title="classes")
    for col in ("id", "class", "images", "pixels", "share of defect px", "regions", "region area px (min / median / max)"):
        c.add_column(col, justify="left" if col == "class" else "right")
    total = sum(s.pixels for s in r.classes_stats.values()) or 1
    for i, (name, s) in enumerate(r.classes_stats.items(), start=1):
        areas = np.asarray(s.region_areas) if s.region_areas else None
        c.add_row(str(i), name, str(s.images), str(s.pixels), f"{100 * s.pixels / total:.1f}%", str(s.regions),
                  f"{areas.min()} / {int(np.median(areas))} / {areas.max()}" if areas is not None else "-")
    console.print(c)
    if r.problems:
        p = Table(title=f"problems ({sum(x.fatal for x in r.problems)} fatal; files relative to {r.root})")
        p.add_column("severity")
        p.add_column("file", overflow="fold")  # a file name cut short would name no file
        p.add_column("problem", overflow="fold")
        for x in r.problems:
            where, root = Path(x.path).resolve(), r.root.resolve()
            shown = where.relative_to(root) if where.is_relative_to(root) and where != root else where
            p.add_row("[red]error[/]" if x.fatal else "[yellow]warning[/]", escape(str(shown)), escape(x.message))
        console.print(p)
    else:
        console.print("no problems found")
