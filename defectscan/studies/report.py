"""The study's aggregate: results.csv, summary.json, summary.md, learning_curve.png, cost_curve.png and
report.html, rebuilt from the finished cells (`<out>/cells/*/cell.json`, else the study's durable records)."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np

from defectscan.io.files import csv_text, write_text
from defectscan.io.provenance import hardware, library_versions
from defectscan.reporting import plots
from defectscan.reporting.html import png_bytes_uri, render
from defectscan.schemas import HEADLINE_METRICS
from defectscan.studies.records import read_record


def collect_rows(study, out: Path) -> list[dict]:
    """The result rows of the study's finished cells, in the study's cell order: from the cell directory, else
    from the cell's durable record (a cell finished on another machine)."""
    rows = []
    for cell in study.cells():
        f = Path(out) / "cells" / cell.name / "cell.json"
        record = study.record(cell)
        if f.is_file():
            rows.append(json.loads(f.read_text()))
        elif record is not None and record.is_file():
            rows.append(read_record(record)["row"])
    return rows


def bootstrap_ci(values: list[float | None], reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its 95% percentile-bootstrap interval (`scipy.stats.bootstrap`).

    With few seeds the interval is rough, not wrong; one value gives a zero-width interval, none gives NaNs."""
    from scipy.stats import bootstrap

    v = np.asarray([x for x in values if x is not None], np.float64)
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    if len(v) == 1 or np.all(v == v[0]):
        return float(v[0]), float(v[0]), float(v[0])
    res = bootstrap((v,), np.mean, n_resamples=reps, confidence_level=0.95, method="percentile",
                    random_state=np.random.default_rng(seed))
    return float(v.mean()), float(res.confidence_interval.low), float(res.confidence_interval.high)


# What a cell's machine decides rather than its model alone: averaged only over the cells of one machine
MACHINE_FIELDS = ("train_seconds", "pretrain_seconds", "mp_per_s", "latency_s", "peak_rss_mb")


def aggregate(rows: list[dict], metrics: list[str], machine: str | None = None) -> list[dict]:
    """One row per (backbone, labeled setting): mean and 95% bootstrap interval over seeds of each metric.

    With `machine` (a row's `hardware`), times and speeds (MACHINE_FIELDS) average only that machine's cells and
    are None for a row that has none there: a study resumed on a GPU would otherwise average a CPU's hour with a
    GPU's two minutes. Accuracy averages every seed, whatever machine ran it."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["backbone"], str(r["labeled_setting"])), []).append(r)
    out = []
    for (backbone, setting), rs in groups.items():
        timed = [r for r in rs if machine is None or r.get("hardware") == machine]
        agg = {"backbone": backbone, "family": rs[0]["family"], "labeled_setting": setting,
               "labeled": int(np.mean([r["labeled"] for r in rs])), "seeds": len(rs)}
        for key in ("train_seconds", "pretrain_seconds"):
            agg[key] = round(float(np.mean([r.get(key, 0.0) for r in timed])), 1) if timed else None
        for m in metrics:
            mean, lo, hi = bootstrap_ci([r.get(m) for r in (timed if m in MACHINE_FIELDS else rs)])
            agg[m] = None if np.isnan(mean) else round(mean, 4)
            agg[f"{m}_ci"] = None if np.isnan(mean) else [round(lo, 4), round(hi, 4)]
        out.append(agg)
    return out


def machine_times(rows: list[dict]) -> list[dict]:
    """Per machine, backbone and labeled setting: cells and their mean training, evaluation and inference speed,
    the times of a study that ran on several machines side by side."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r.get("hardware") or "not recorded", r["backbone"], str(r["labeled_setting"])), []).append(r)
    return [{"machine": machine, "backbone": backbone, "labeled_setting": setting, "cells": len(rs),
             "train_seconds": round(float(np.mean([r["train_seconds"] for r in rs])), 1),
             "eval_seconds": round(float(np.mean([r["eval_seconds"] for r in rs])), 1),
             "mp_per_s": round(float(np.mean([r["mp_per_s"] for r in rs])), 3) if all(r.get("mp_per_s")
                                                                                      for r in rs) else None}
            for (machine, backbone, setting), rs in sorted(groups.items())]


GROUP_PREFIX = "defect_iou ["


def group_column(group: str) -> str:
    """A result row's column for one image group's defect IoU (`evaluate`'s groups, e.g. BSData's image types)."""
    return f"{GROUP_PREFIX}{group}]"


def group_scores(rows: list[dict]) -> tuple[list[str], list[dict]]:
    """(groups, one row per backbone and labeled setting: each group's mean defect IoU over the seeds that scored
    it, and how many did): cells recorded before rows kept groups have none."""
    groups = sorted({k[len(GROUP_PREFIX):-1] for r in rows for k in r if k.startswith(GROUP_PREFIX)})
    if not groups:
        return [], []
    by_row: dict[tuple, list[dict]] = {}
    for r in rows:
        by_row.setdefault((r["backbone"], str(r["labeled_setting"]), r["labeled"]), []).append(r)
    out = []
    for (backbone, setting, labeled), rs in by_row.items():
        entry: dict = {"backbone": backbone, "labeled_setting": setting, "labeled": labeled}
        for g in groups:
            values = [r[group_column(g)] for r in rs if r.get(group_column(g)) is not None]
            entry[g] = (round(float(np.mean(values)), 4), len(values)) if values else None
        if any(entry[g] for g in groups):
            out.append(entry)
    return groups, out


def group_markdown(groups: list[str], table: list[dict]) -> str:
    """`group_scores` as Markdown: mean defect IoU per group (seeds that scored it)."""
    lines = ["| backbone | labeled | " + " | ".join(groups) + " |", "|" + "---|" * (len(groups) + 2)]
    lines += [f"| {t['backbone']} | {t['labeled']} | " + " | ".join(
        f"{t[g][0]:.3f} (n={t[g][1]})" if t[g] else "-" for g in groups) + " |" for t in table]
    return "\n".join(lines) + "\n"


MIN_SEEDS_TO_RANK = 3  # a bootstrap over 1-2 values has 1-3 possible means: its interval claims too much


def separations(summary: list[dict], metric: str) -> list[str]:
    """Per labeled setting, the pairs of rows whose 95% intervals do not overlap ('A > B'), and the rows that
    cannot be told apart from the best; rows with fewer than MIN_SEEDS_TO_RANK seeds are not ranked."""
    lines = []
    settings = dict.fromkeys(str(s["labeled_setting"]) for s in summary)
    for setting in settings:
        rows = [s for s in summary if str(s["labeled_setting"]) == setting and s[metric] is not None]
        ranked = sorted((s for s in rows if s["seeds"] >= MIN_SEEDS_TO_RANK), key=lambda s: -s[metric])
        unranked = [s["backbone"] for s in rows if s["seeds"] < MIN_SEEDS_TO_RANK]
        head = f"labeled {setting}:"
        if len(ranked) < 2:
            lines.append(f"{head} no ranking (fewer than two rows with {MIN_SEEDS_TO_RANK}+ seeds)")
            continue
        wins = [f"{a['backbone']} > {b['backbone']}" for i, a in enumerate(ranked) for b in ranked[i + 1:]
                if a[f"{metric}_ci"][0] > b[f"{metric}_ci"][1]]
        top = ranked[0]
        tied = [s["backbone"] for s in ranked[1:] if s[f"{metric}_ci"][1] >= top[f"{metric}_ci"][0]]
        text = f"{head} {'; '.join(wins) if wins else 'no two intervals separate'}"
        text += f". Best mean: {top['backbone']}" + (f", not separated from {', '.join(tied)}" if tied else
                                                      ", separated from every other row")
        if unranked:
            text += f". Too few seeds to rank: {', '.join(unranked)}"
        lines.append(text)
    return lines


def learning_curve_png(summary: list[dict], metric: str, title: str, split: str = "test") -> bytes:
    """Mean metric (on the study's evaluation split) against labeled images per backbone (log x), the bootstrap
    interval shaded."""
    series: dict[str, list] = {}
    for s in summary:
        if s[metric] is not None:
            series.setdefault(f"{s['backbone']} ({s['family']})", []).append(
                (s["labeled"], s[metric], *s[f"{metric}_ci"]))
    return plots.learning_curves(series, f"{split} {metric.replace('_', ' ')}", title)


def cost_curve_png(summary: list[dict], metric: str, title: str, split: str = "test") -> bytes:
    """Mean metric against what a cell costs, training plus its row's pretraining (every row that pretrains pays
    for it, as a user starting out would), one line per backbone through its labeled counts."""
    series: dict[str, list] = {}
    for s in summary:
        if s[metric] is not None and s["train_seconds"] is not None:
            minutes = (s["train_seconds"] + s.get("pretrain_seconds", 0.0)) / 60
            series.setdefault(f"{s['backbone']} ({s['family']})", []).append(
                (minutes, s[metric], *s[f"{metric}_ci"], f"{s['labeled']}"))
    return plots.accuracy_vs_cost(series, "minutes per cell: training + pretraining (mean over seeds)",
                                  f"{split} {metric.replace('_', ' ')}", title)


def write_report(study, out: Path, *, command: str = "") -> bool:
    """results.csv, summary.json, summary.md, learning_curve.png, cost_curve.png and report.html from the finished
    cells; False (and nothing written) while no cell has finished."""
    out = Path(out)
    rows = collect_rows(study, out)
    if not rows:
        return False
    write_text(out / "results.csv", csv_text(rows))
    machines = _machine_counts(rows)
    # times and speeds from the machine that ran the most cells (the first such in study order on a tie)
    reference = max(machines, key=machines.get)
    summary = aggregate(rows, list(HEADLINE_METRICS), machine=reference if len(machines) > 1 else None)
    shown = [m for m in dict.fromkeys([study.metric, "defect_iou", "pixel_ap", "region_recall", "fp_regions_per_mp",
                                       "predicted_area_ratio", "fp_area_fraction", "pro", "image_auroc"])
             if any(s[m] is not None for s in summary)]  # e.g. no image AUROC when every test image has defects
    log = out / "commands.log"
    ran = log.read_text(encoding="utf-8").strip().replace("\n", " | ") if log.is_file() else command
    info = {"study": study.name, "study_file": str(study.path), "commands": ran, "hardware": hardware(),
            "platform": platform.platform(), "versions": library_versions(),
            "cell_machines": _machines(rows), "times_from": reference, "cells_done": len(rows),
            "cells_total": len(study.cells()),
            "evaluation": _evaluation_line(study.evaluate),
            "updated": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_text(out / "summary.json", json.dumps({**info, "metric": study.metric, "summary": summary}, indent=1) + "\n")
    split = study.evaluate.split  # a recipe search scores validation images, not the test split
    main_curve = learning_curve_png(summary, study.metric, f"{study.name}: mean and 95% bootstrap CI over seeds",
                                    split)
    plots.write_png(main_curve, out / "learning_curve.png")
    cost_curve = cost_curve_png(summary, study.metric, f"accuracy vs training time (labels at each point), on "
                                f"{_short_machine(reference)}", split)
    plots.write_png(cost_curve, out / "cost_curve.png")
    curves = [{"uri": png_bytes_uri(main_curve if m == study.metric else
                                    learning_curve_png(summary, m, f"{study.name}: {m}", split)), "caption": m}
              for m in shown[:4]]
    largest: dict[str, dict] = {}
    for s in summary:
        if s["backbone"] not in largest or s["labeled"] > largest[s["backbone"]]["labeled"]:
            largest[s["backbone"]] = s
    metric = study.metric
    speed = plots.scatter([(s["backbone"], s["mp_per_s"], s[metric], tuple(s[f"{metric}_ci"]))
                           for s in largest.values() if s["mp_per_s"] and s[metric] is not None],
                          f"inference speed (megapixels / s, {_short_machine(reference)})", f"{split} {metric}",
                          "accuracy vs speed (largest labeled set)")
    groups, group_table = group_scores(rows)
    times = machine_times(rows)
    html = render(
        "benchmark.html.j2", title=f"defectscan benchmark — {study.name}", info=info, curves=curves,
        accuracy_header=["backbone", "family", "labeled", "seeds", *shown, "train s", "pretrain s"],
        accuracy_rows=[[s["backbone"], s["family"], s["labeled"], s["seeds"], *[_with_ci(s, m) for m in shown],
                        s["train_seconds"], s["pretrain_seconds"]] for s in summary],
        separations=separations(summary, study.metric), metric=study.metric,
        speed_plot=png_bytes_uri(speed), cost_plot=png_bytes_uri(cost_curve),
        cost_header=["backbone", "family", metric, "params (M)", "GFLOPs / tile", "MP/s", "s / image", "peak RSS MB",
                     "train s / cell", "pretrain s (once per row)"],
        cost_rows=[[s["backbone"], s["family"], _with_ci(s, metric),
                    round(s["parameters"] / 1e6, 2) if s["parameters"] else None, s["gflops_per_tile"], s["mp_per_s"],
                    s["latency_s"], s["peak_rss_mb"], s["train_seconds"], s["pretrain_seconds"]]
                   for s in largest.values()],
        group_header=["backbone", "labeled", *[f"defect IoU, {g}" for g in groups]],
        group_rows=[[t["backbone"], t["labeled"], *[f"{t[g][0]:.3f} (n={t[g][1]})" if t[g] else "-" for g in groups]]
                    for t in group_table],
        machine_header=["machine", "backbone", "labeled", "cells", "train s / cell", "eval s / cell", "MP/s"],
        machine_rows=[[t["machine"], t["backbone"], t["labeled_setting"], t["cells"], t["train_seconds"],
                       t["eval_seconds"], t["mp_per_s"]] for t in times] if len(machines) > 1 else [],
        cell_header=["cell", "labeled", "seed", *shown, "train s", "eval s", "precision", "machine"],
        cell_rows=[[r["cell"], r["labeled"], r["seed"], *[r.get(m) for m in shown], r["train_seconds"],
                    r["eval_seconds"], r.get("precision", "-"), r.get("hardware", "-")] for r in rows])
    write_text(out / "report.html", html)
    md = markdown_table(summary, shown)
    if group_table:
        md += ("\nTest defect IoU by image group (mean over the seeds that scored groups; cells recorded before "
               "groups were kept have none):\n\n" + group_markdown(groups, group_table))
    if len(machines) > 1:
        md += (f"\nTimes and speeds above: the cells that ran on {reference} (the machine with the most cells); "
               f"cells ran on {info['cell_machines']}. Per machine:\n\n" + machine_markdown(times))
    md += (f"\nWhere the 95% intervals of {study.metric} separate:\n"
           + "".join(f"- {line}\n" for line in separations(summary, study.metric)))
    write_text(out / "summary.md", md)
    return True


def _evaluation_line(ev) -> str:
    """How every cell was scored, as one line (flip TTA also slows the measured speed)."""
    picked = f"first {ev.limit} images" if ev.sample == "first" else f"{ev.limit} images drawn at random"
    images = f"{ev.split} split" + (f", {picked}" if ev.limit else "")
    return (f"{images}; regions: {ev.region_criterion} >= {ev.region_threshold}; PRO up to FPR {ev.pro_fpr_limit}"
            + ("; flip TTA (speeds include the flipped passes)" if ev.tta else ""))


def _machine_counts(rows: list[dict]) -> dict[str, int]:
    """Cells per machine they ran on: a study resumed across sessions may mix CPUs, and then its times and speeds
    compare only between cells of one machine."""
    counts: dict[str, int] = {}
    for r in rows:
        name = r.get("hardware") or "not recorded"
        counts[name] = counts.get(name, 0) + 1
    return counts


def _short_machine(hardware_line: str) -> str:
    """A machine for a plot title: its GPU if it has one, else its CPU (`hardware()` lines: 'CPU (bf16: ...),
    N threads[, GPU]')."""
    parts = hardware_line.split(", ")
    return parts[-1] if len(parts) > 2 else hardware_line.split(" (bf16")[0]


def _machines(rows: list[dict]) -> str:
    """Which machines the cells ran on, with counts (see `_machine_counts`)."""
    return "; ".join(f"{name} ({n} cell{'s' if n > 1 else ''})" for name, n in _machine_counts(rows).items())


def markdown_table(summary: list[dict], metrics: list[str]) -> str:
    """The accuracy table as Markdown (mean [95% bootstrap interval] over seeds), for READMEs and tickets."""
    head = ["backbone", "family", "labeled", "seeds", *metrics, "train s / cell", "pretrain s", "MP/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in sorted(summary, key=lambda s: (s["backbone"], s["labeled"])):
        lines.append("| " + " | ".join([s["backbone"], s["family"], str(s["labeled"]), str(s["seeds"]),
                                        *[_with_ci(s, m) for m in metrics], _num(s["train_seconds"], 0),
                                        _num(s.get("pretrain_seconds", 0.0), 0), _num(s["mp_per_s"], 3)]) + " |")
    return "\n".join(lines) + "\n"


def machine_markdown(times: list[dict]) -> str:
    """`machine_times` as Markdown."""
    lines = ["| machine | backbone | labeled | cells | train s / cell | eval s / cell | MP/s |", "|" + "---|" * 7]
    lines += [f"| {t['machine']} | {t['backbone']} | {t['labeled_setting']} | {t['cells']} | {t['train_seconds']:.0f} "
              f"| {t['eval_seconds']:.0f} | {_num(t['mp_per_s'], 3)} |" for t in times]
    return "\n".join(lines) + "\n"


def _num(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _with_ci(s: dict, m: str) -> str:
    if s.get(m) is None:
        return "-"
    if s.get("seeds", 0) < 2:  # one seed has no spread to show: an interval [x, x] would claim certainty
        return f"{s[m]:.3f} (n=1)"
    lo, hi = s[f"{m}_ci"]
    return f"{s[m]:.3f} [{lo:.3f}, {hi:.3f}]"
