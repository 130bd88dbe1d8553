"""`defectscan benchmark STUDY.yaml`: backbones x labeled-image counts x seeds, each cell trained and evaluated.

A study file (see configs/benchmark/) names a training config, overrides for every cell, the backbones (each a
list of overrides), the labeled counts (`all` = every training image), the seeds and how to evaluate. A cell is
one training run plus one `evaluate` of its best checkpoint on the fixed test split:

    <out>/cells/<backbone>__n<labeled>__s<seed>/run/         the training run directory
    <out>/cells/<backbone>__n<labeled>__s<seed>/evaluation/  evaluate's output (metrics.json marks the cell done)

The seed sets both the training seed and the nested labeled subset, so the spread across seeds covers "which
images were labeled" as well as initialisation and crop order. Finished cells are never recomputed; an
interrupted cell resumes from its last finished epoch. The aggregate (results.csv, summary.json,
learning_curve.png, report.html) is rewritten after every cell.
"""

from __future__ import annotations

import csv
import io
import json
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from defectscan.errors import DefectscanError
from defectscan.images import atomic_path, csv_text, write_text
from defectscan.models.factory import encoder_info

# metric name in results -> path in metrics.json's "metrics"
METRICS: dict[str, tuple[str, ...]] = {
    "defect_iou": ("defect_iou",), "defect_dice": ("defect_dice",), "mean_iou": ("mean_iou",),
    "pixel_ap": ("defect_pixel_ap",), "pixel_auroc": ("defect_pixel_auroc",), "best_f1": ("defect_best_f1",),
    "region_recall": ("region", "recall"), "fp_regions_per_mp": ("region", "fp_regions_per_megapixel"),
    "pro": ("region", "pro"), "image_auroc": ("image_level", "auroc"), "image_ap": ("image_level", "ap"),
    "image_f1": ("image_level", "f1"), "mp_per_s": ("cost", "megapixels_per_second"),
    "latency_s": ("cost", "latency_mean_s"), "gflops_per_tile": ("cost", "gflops_per_tile"),
    "parameters": ("cost", "parameters"), "peak_rss_mb": ("cost", "peak_rss_mb"),
}


@dataclass
class Backbone:
    name: str
    overrides: list[str] = field(default_factory=list)


@dataclass
class Study:
    path: Path
    name: str
    train_config: Path
    overrides: list[str]
    backbones: list[Backbone]
    labeled: list[int | None]  # None = all
    seeds: list[int]
    metric: str = "defect_dice"
    evaluate: dict = field(default_factory=dict)

    def cells(self) -> list["Cell"]:
        return [Cell(b, n, s) for b in self.backbones for n in self.labeled for s in self.seeds]


@dataclass
class Cell:
    backbone: Backbone
    labeled: int | None
    seed: int

    @property
    def name(self) -> str:
        return f"{self.backbone.name}__n{'all' if self.labeled is None else self.labeled}__s{self.seed}"

    def overrides(self, study: Study) -> list[str]:
        return [*study.overrides, *self.backbone.overrides,
                f"data.labeled={'null' if self.labeled is None else self.labeled}",
                f"training.seed={self.seed}", f"data.subset_seed={self.seed}", "validation.test=false"]


def load_study(path: str | Path) -> Study:
    path = Path(path)
    if not path.is_file():
        raise DefectscanError(f"{path}: no such study file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise DefectscanError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    unknown = set(raw) - {"name", "train_config", "set", "backbones", "labeled", "seeds", "metric", "evaluate"}
    if unknown:
        raise DefectscanError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}")
    for key in ("train_config", "backbones", "labeled", "seeds"):
        if not raw.get(key):
            raise DefectscanError(f"{path}: '{key}' is required")
    backbones = []
    for b in raw["backbones"]:
        if not isinstance(b, dict) or "name" not in b:
            raise DefectscanError(f"{path}: each backbone needs a name and optional 'set' overrides, got {b!r}")
        if "__" in str(b["name"]) or "/" in str(b["name"]):
            raise DefectscanError(f"{path}: backbone name {b['name']!r} may not contain '__' or '/'")
        backbones.append(Backbone(str(b["name"]), [str(x) for x in b.get("set", [])]))
    if len({b.name for b in backbones}) != len(backbones):
        raise DefectscanError(f"{path}: backbone names must be unique")
    labeled: list[int | None] = []
    for n in raw["labeled"]:
        if n == "all" or n is None:
            labeled.append(None)
        elif isinstance(n, int) and n > 0:
            labeled.append(n)
        else:
            raise DefectscanError(f"{path}: labeled counts must be positive integers or 'all', got {n!r}")
    seeds = raw["seeds"]
    if not all(isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
        raise DefectscanError(f"{path}: seeds must be distinct integers")
    metric = raw.get("metric", "defect_dice")
    if metric not in METRICS:
        raise DefectscanError(f"{path}: unknown metric '{metric}' (choose {', '.join(METRICS)})")
    train_config = (path.parent / raw["train_config"]).resolve()
    if not train_config.is_file():
        raise DefectscanError(f"{path}: train_config {train_config} does not exist")
    return Study(path, str(raw.get("name", path.stem)), train_config, [str(x) for x in raw.get("set", [])],
                 backbones, labeled, list(seeds), metric, dict(raw.get("evaluate", {})))


def metric_value(metrics: dict, keys: tuple[str, ...]) -> Any:
    for k in keys:
        if not isinstance(metrics, dict) or k not in metrics:
            return None
        metrics = metrics[k]
    return metrics


def run_cell(study: Study, cell: Cell, out: Path, *, log: Callable[[str], None] = print,
             progress_factory=None, device: str | None = None) -> tuple[dict, bool]:
    """Train and evaluate one cell unless it is done; returns its result row and whether it was computed now."""
    from defectscan.evaluation_output import run_evaluation
    from defectscan.training import load_config, train

    cell_dir = out / "cells" / cell.name
    row_file = cell_dir / "cell.json"
    overrides = cell.overrides(study) + ([f"training.device={device}"] if device else [])
    cfg = load_config(study.train_config, overrides)
    opts = eval_options(study, cfg, device)
    if row_file.is_file():
        check_finished_cell(cell_dir, cfg, opts, study.evaluate.get("split", "test"))
        return json.loads(row_file.read_text()), False
    run_dir = cell_dir / "run"
    resume = (run_dir / "config.yaml").is_file()
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)  # a cell stopped before its setup finished: nothing worth keeping
    log(f"cell {cell.name}: {'resuming' if resume else 'training'}")
    train(cfg, run_dir, resume=resume, log=log, progress_factory=progress_factory)
    ev = study.evaluate
    update = progress_factory(f"evaluating {cell.name}", 0) if progress_factory else None
    result = run_evaluation(run_dir / "best.safetensors", cfg.data.root, cell_dir / "evaluation",
                            split=ev.get("split", "test"), data_format=cfg.data.format, options=opts,
                            limit=ev.get("limit"), progress=(lambda d, n: update(d, {})) if update else None)
    history = list(csv.DictReader(io.StringIO((run_dir / "metrics.csv").read_text())))
    train_images = len(json.loads((run_dir / "splits.json").read_text())["train"])
    row = {"cell": cell.name, "backbone": cell.backbone.name, "encoder": cfg.model.encoder,
           "family": encoder_info(cfg.model.encoder).family, "arch": cfg.model.arch,
           "pretrained": cfg.model.encoder_weights or "none", "labeled": train_images,
           "labeled_setting": "all" if cell.labeled is None else cell.labeled, "seed": cell.seed,
           "train_seconds": round(sum(float(h.get("train_seconds") or 0) + float(h.get("val_seconds") or 0)
                                      for h in history), 1),
           "eval_seconds": result["metrics"]["seconds"], "test_images": result["metrics"]["images"],
           **{k: metric_value(result["metrics"], path) for k, path in METRICS.items()}}
    write_text(row_file, json.dumps(row, indent=1) + "\n")
    return row, True


def eval_options(study: Study, cfg, device: str | None):
    from defectscan.evaluation import EvalOptions

    ev = study.evaluate
    unknown = set(ev) - {"split", "limit", "seam_images", "examples", "region_criterion", "region_threshold",
                         "pro_fpr_limit"}
    if unknown:
        raise DefectscanError(f"{study.path}: unknown evaluate key(s) {', '.join(sorted(unknown))}")
    return EvalOptions(device=device or cfg.training.device, stitch=cfg.validation.stitch,
                       batch_size=cfg.validation.batch_size, min_area=cfg.validation.min_area,
                       seam_images=int(ev.get("seam_images", 1)), examples=int(ev.get("examples", 3)),
                       region_criterion=ev.get("region_criterion", "coverage"),
                       region_threshold=float(ev.get("region_threshold", 0.5)),
                       pro_fpr_limit=float(ev.get("pro_fpr_limit", 0.3)))


def check_finished_cell(cell_dir: Path, cfg, opts, split: str) -> None:
    from defectscan.training.config import same_as_saved

    """A finished cell is reused only if it was made with this cell's settings: otherwise a study edited in place
    would silently mix results of two configurations."""
    for f in (cell_dir / "run" / "config.yaml", cell_dir / "evaluation" / "metrics.json"):
        if not f.is_file():
            raise DefectscanError(f"{cell_dir}: cell.json exists but {f.name} is missing; delete the cell directory "
                                  f"to recompute it")
    # where it ran does not change what it measured
    same_cfg = same_as_saved(cfg, cell_dir / "run" / "config.yaml", ignore=("training.device",))
    metrics = json.loads((cell_dir / "evaluation" / "metrics.json").read_text())
    same_eval = metrics.get("split") == split and all(
        metrics.get("options", {}).get(k) == getattr(opts, k)
        for k in ("region_criterion", "region_threshold", "pro_fpr_limit", "min_area", "stitch"))
    if not same_cfg or not same_eval:
        raise DefectscanError(f"{cell_dir}: finished with other settings than the study now gives this cell; "
                              f"run the changed study into a new --out directory")


def run_study(study: Study, out: str | Path, *, only: str | None = None, log: Callable[[str], None] = print,
              progress_factory=None, device: str | None = None, command: str = "") -> list[dict]:
    out = Path(out)
    cells = study.cells()
    if only:
        cells = [c for c in cells if c.name == only]
        if not cells:
            names = ", ".join(c.name for c in study.cells()[:4])
            raise DefectscanError(f"no cell '{only}' in {study.path} (cells are named like {names}, ...)")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "study.yaml").exists():  # the study as first run, next to its results
        shutil.copyfile(study.path, out / "study.yaml")
    with open(out / "commands.log", "a", encoding="utf-8") as fh:  # every invocation that computed cells
        fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {command or '(library call)'}\n")
    for i, cell in enumerate(cells):
        log(f"[{i + 1}/{len(cells)}] {cell.name}")
        _, computed = run_cell(study, cell, out, log=log, progress_factory=progress_factory, device=device)
        if computed:  # the report follows the study as it runs; reused cells change nothing in it
            write_report(study, out, command=command)
    write_report(study, out, command=command)
    return collect_rows(study, out)


def collect_rows(study: Study, out: Path) -> list[dict]:
    rows = []
    for cell in study.cells():
        f = out / "cells" / cell.name / "cell.json"
        if f.is_file():
            rows.append(json.loads(f.read_text()))
    return rows


def bootstrap_ci(values: list[float], reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, 2.5th, 97.5th percentile of bootstrap means). With few seeds the interval is rough, not wrong."""
    v = np.asarray([x for x in values if x is not None], np.float64)
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    if len(v) == 1:
        return float(v[0]), float(v[0]), float(v[0])
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(reps, len(v)))].mean(1)
    return float(v.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def aggregate(rows: list[dict], metrics: list[str]) -> list[dict]:
    """One row per (backbone, labeled setting): mean and 95% bootstrap interval over seeds of each metric."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["backbone"], str(r["labeled_setting"])), []).append(r)
    out = []
    for (backbone, setting), rs in groups.items():
        agg = {"backbone": backbone, "family": rs[0]["family"], "labeled_setting": setting,
               "labeled": int(np.mean([r["labeled"] for r in rs])), "seeds": len(rs),
               "train_seconds": round(float(np.mean([r["train_seconds"] for r in rs])), 1)}
        for m in metrics:
            mean, lo, hi = bootstrap_ci([r.get(m) for r in rs])
            agg[m] = None if np.isnan(mean) else round(mean, 4)
            agg[f"{m}_ci"] = None if np.isnan(mean) else [round(lo, 4), round(hi, 4)]
        out.append(agg)
    return out


def learning_curve_figure(summary: list[dict], metric: str, title: str):
    """Mean metric against labeled images per backbone (log x), the bootstrap interval shaded."""
    from defectscan.report_html import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for backbone in dict.fromkeys(s["backbone"] for s in summary):
        pts = sorted((s for s in summary if s["backbone"] == backbone and s[metric] is not None), key=lambda s: s["labeled"])
        if not pts:
            continue
        x = [p["labeled"] for p in pts]
        y = [p[metric] for p in pts]
        lo = [p[f"{metric}_ci"][0] for p in pts]
        hi = [p[f"{metric}_ci"][1] for p in pts]
        line, = ax.plot(x, y, marker="o", label=f"{backbone} ({pts[0]['family']})")
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.18)
    ax.set_xscale("log")
    ax.set(xlabel="labeled training images (log scale)", ylabel=f"test {metric.replace('_', ' ')}", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


def write_report(study: Study, out: Path, *, command: str = "") -> None:
    """results.csv, summary.json, learning_curve.png and report.html from the finished cells."""
    from defectscan.evaluation_output import hardware
    from defectscan.models.checkpoint import library_versions
    from defectscan.report_html import esc, fig_uri, figure, page, png_bytes_uri, table

    rows = collect_rows(study, out)
    if not rows:
        return
    write_text(out / "results.csv", csv_text(rows))
    summary = aggregate(rows, list(METRICS))
    shown = [m for m in dict.fromkeys([study.metric, "defect_iou", "pixel_ap", "region_recall", "fp_regions_per_mp",
                                       "pro", "image_auroc"])
             if any(s[m] is not None for s in summary)]  # e.g. no image AUROC when every test image has defects
    log = out / "commands.log"
    ran = log.read_text(encoding="utf-8").strip().replace("\n", " | ") if log.is_file() else command
    info = {"study": study.name, "study_file": str(study.path), "commands": ran, "hardware": hardware(),
            "platform": platform.platform(), "versions": library_versions(),
            "cells_done": len(rows), "cells_total": len(study.cells()), "updated": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_text(out / "summary.json", json.dumps({**info, "metric": study.metric, "summary": summary}, indent=1) + "\n")
    from defectscan.report_html import fig_png, pyplot

    plt = pyplot()
    main_curve = fig_png(learning_curve_figure(summary, study.metric,
                                               f"{study.name}: mean and 95% bootstrap CI over seeds"), dpi=110)
    with atomic_path(out / "learning_curve.png") as tmp:
        tmp.write_bytes(main_curve)
    curves = "".join(figure(png_bytes_uri(main_curve) if m == study.metric else
                            fig_uri(learning_curve_figure(summary, m, f"{study.name}: {m}")), m) for m in shown[:4])
    largest = {}
    for s in summary:
        if s["backbone"] not in largest or s["labeled"] > largest[s["backbone"]]["labeled"]:
            largest[s["backbone"]] = s
    fig, ax = plt.subplots(figsize=(5.4, 4.2))
    for s in largest.values():
        if s["mp_per_s"] and s[study.metric] is not None:
            ax.errorbar(s["mp_per_s"], s[study.metric], yerr=[[s[study.metric] - s[f"{study.metric}_ci"][0]],
                        [s[f"{study.metric}_ci"][1] - s[study.metric]]], fmt="o", capsize=3, label=s["backbone"])
    ax.set(xlabel="inference speed (megapixels / s, this machine)", ylabel=f"test {study.metric}",
           title="accuracy vs speed (largest labeled set)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    scatter = fig_uri(fig)
    body = [f"<p class='meta'>{esc(info['hardware'])} · {esc(info['platform'])} · "
            + " · ".join(f"{esc(k)} {esc(v)}" for k, v in info["versions"].items())
            + f"<br>commands that ran cells: <code>{esc(ran)}</code> · study file {esc(study.path)} · "
              f"{len(rows)} of {len(study.cells())} cells done · updated {info['updated']}</p>",
            "<h2>Learning curves (mean over seeds, shaded: 95% bootstrap interval)</h2><div class='grid'>" + curves + "</div>",
            "<h2>Accuracy by labeled images</h2>",
            table(["backbone", "family", "labeled", "seeds", *shown, "train s"],
                  [[s["backbone"], s["family"], s["labeled"], s["seeds"],
                    *[_with_ci(s, m) for m in shown], s["train_seconds"]] for s in summary]),
            "<h2>Accuracy and cost (largest labeled set)</h2><div class='grid'>" + figure(scatter, "accuracy vs speed") + "</div>",
            table(["backbone", "family", study.metric, "params (M)", "GFLOPs / tile", "MP/s", "s / image",
                   "peak RSS MB", "train s / cell"],
                  [[s["backbone"], s["family"], _with_ci(s, study.metric),
                    round(s["parameters"] / 1e6, 2) if s["parameters"] else None, s["gflops_per_tile"], s["mp_per_s"],
                    s["latency_s"], s["peak_rss_mb"], s["train_seconds"]] for s in largest.values()]),
            "<h2>Every cell</h2>",
            table(["cell", "labeled", "seed", *shown, "train s", "eval s"],
                  [[r["cell"], r["labeled"], r["seed"], *[r.get(m) for m in shown], r["train_seconds"], r["eval_seconds"]]
                   for r in rows])]
    write_text(out / "report.html", page(f"defectscan benchmark — {study.name}", "\n".join(body)))
    write_text(out / "summary.md", markdown_table(summary, shown))


def markdown_table(summary: list[dict], metrics: list[str]) -> str:
    """The accuracy table as Markdown (mean [95% bootstrap interval] over seeds), for READMEs and tickets."""
    head = ["backbone", "family", "labeled", "seeds", *metrics, "train s / cell", "MP/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in sorted(summary, key=lambda s: (s["backbone"], s["labeled"])):
        lines.append("| " + " | ".join([s["backbone"], s["family"], str(s["labeled"]), str(s["seeds"]),
                                        *[_with_ci(s, m) for m in metrics], f"{s['train_seconds']:.0f}",
                                        f"{s['mp_per_s']:.3f}" if s["mp_per_s"] else "-"]) + " |")
    return "\n".join(lines) + "\n"


def _with_ci(s: dict, m: str) -> str:
    if s.get(m) is None:
        return "-"
    lo, hi = s[f"{m}_ci"]
    return f"{s[m]:.3f} [{lo:.3f}, {hi:.3f}]"

