"""`defectscan benchmark STUDY.yaml`: backbones x labeled-image counts x seeds, each cell trained and evaluated.

A study file (see configs/benchmark/) names a training config, overrides for every cell, the backbones (each a
list of overrides), the labeled counts (`all` = every training image), the seeds and how to evaluate. A cell is
one training run plus one `evaluate` of its best checkpoint on the fixed test split:

    <out>/cells/<backbone>__n<labeled>__s<seed>/run/         the training run directory
    <out>/cells/<backbone>__n<labeled>__s<seed>/evaluation/  evaluate's output (metrics.json marks the cell done)
    <out>/pretrain/<encoder>-<config digest>/                 a row's self-supervised pretraining (`pretrain:`)
    <records>/<cell>.json                                     the cell's durable record (`records:`, studies.records)

A row with `pretrain: {config: ..., set: [...]}` first pretrains its encoder (`defectscan pretrain`) on every
image of the row's dataset except its test split, once: the run is keyed by its resolved config, so rows and
studies resumed later share it, and an interrupted pretraining resumes. Every cell of the row starts from that
encoder; its pretraining time is reported beside the training time as part of the row's cost.

The seed sets both the training seed and the nested labeled subset, so the spread across seeds covers "which
images were labeled" as well as initialisation and crop order. Finished cells are never recomputed; an
interrupted cell resumes from its last finished epoch. With `records: DIR` in the study file a finished cell also
leaves a small record there (commit it): on another machine, without the cell directory, the record marks the
cell finished and the report is rebuilt from the records. The aggregate (results.csv, summary.json,
learning_curve.png, report.html) is rewritten after every cell.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml
from pydantic import ValidationError

from defectscan.errors import DefectscanError, one_line
from defectscan.evaluation import EVALUATION_DIR, run_evaluation
from defectscan.evaluation.outputs import METRICS_FILE
from defectscan.io.files import file_sha256, write_text
from defectscan.io.provenance import hardware
from defectscan.models import encoder_info
from defectscan.models.checkpoint import read_sidecar
from defectscan.schemas import (
    SCORE_OPTIONS, BackboneSpec, EvalOptions, EvalSummary, StudyEvaluate, StudySpec, describe_validation_error,
)
from defectscan.studies.records import (MACHINE_KEYS, check_record, read_record, record_path, same_subset,
                                        write_record)
from defectscan.studies.report import collect_rows, group_column, write_report
from defectscan.training import RunDir, load_config, train
from defectscan.training.config import PretrainConfig
from defectscan.training.pretrain import encoder_files, pretrain


@dataclass
class Study:
    path: Path
    name: str
    train_config: Path
    overrides: list[str]
    backbones: list[BackboneSpec]
    labeled: list[int | None]  # None = all
    seeds: list[int]
    metric: str = "defect_dice"
    evaluate: StudyEvaluate = field(default_factory=StudyEvaluate)
    records: Path | None = None  # where each finished cell's durable record goes (studies.records)

    def record(self, cell: "Cell") -> Path | None:
        return record_path(self.records, cell.name) if self.records is not None else None

    def cells(self) -> list["Cell"]:
        """Seed by seed: a study that runs across several sessions has every row and labeled count of seed 0
        before any second seed, so its first pass already gives a whole (if unranked) table."""
        return [Cell(b, n, s) for s in self.seeds for n in self.labeled for b in self.backbones]


@dataclass
class Cell:
    backbone: BackboneSpec
    labeled: int | None
    seed: int

    @property
    def name(self) -> str:
        return f"{self.backbone.name}__n{'all' if self.labeled is None else self.labeled}__s{self.seed}"

    def overrides(self, study: Study) -> list[str]:
        return [*study.overrides, *self.backbone.set,
                f"data.labeled={'null' if self.labeled is None else self.labeled}",
                f"training.seed={self.seed}", f"data.subset_seed={self.seed}", "validation.test=false"]


def load_study(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Study:
    """Read and check a study file; every problem is one line naming the file and the key. `overrides`
    (`key=value`, e.g. the user's data.root) apply to every cell after the study's own `set`."""
    path = Path(path)
    if not path.is_file():
        raise DefectscanError(f"{path}: no such study file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise DefectscanError(f"{path}: not valid YAML ({one_line(exc)})") from None
    if not isinstance(raw, dict):
        raise DefectscanError(f"{path}: a study file is a mapping of keys")
    try:
        spec = StudySpec.model_validate(raw)
    except ValidationError as exc:
        raise DefectscanError(f"{path}: " + describe_validation_error(exc, "study key")) from None
    train_config = (path.parent / spec.train_config).resolve()
    if not train_config.is_file():
        raise DefectscanError(f"{path}: train_config {train_config} does not exist")
    load_config(train_config, [*spec.set, *overrides])  # a bad key or value is found now, not in the first cell
    study = Study(path, spec.name or path.stem, train_config, [*spec.set, *overrides], list(spec.backbones),
                  list(spec.labeled), list(spec.seeds), spec.metric, spec.evaluate,
                  (path.parent / spec.records).resolve() if spec.records else None)
    for backbone in study.backbones:  # likewise every row's own overrides and pretraining config
        cfg = load_config(train_config, [*study.overrides, *backbone.set])
        if backbone.pretrain is not None:
            pretrain_config(study, backbone, cfg)
    return study


def pretrain_config(study: Study, backbone: BackboneSpec, cfg) -> PretrainConfig:
    """The row's pretraining config: its file and `set`, on the encoder, dataset and test split of the row's
    training config `cfg` (so pretraining never sees the images the cells are tested on)."""
    spec = backbone.pretrain
    path = (study.path.parent / spec.config).resolve()
    if not path.is_file():
        raise DefectscanError(f"{study.path}: backbone '{backbone.name}': pretrain config {path} does not exist")
    dc = cfg.data
    base = [f"model.encoder={cfg.model.encoder}", f"model.encoder_kwargs={json.dumps(cfg.model.encoder_kwargs)}",
            f"data.root={json.dumps(dc.root)}", f"data.format={dc.format}", f"data.test_fraction={dc.test_fraction}",
            f"data.split_seed={dc.split_seed}", "data.exclude_test=true", f"training.device={cfg.training.device}"]
    return load_config(path, [*base, *spec.set], schema=PretrainConfig)


def pretrain_dir(out: Path, pcfg: PretrainConfig) -> Path:
    """Where a pretraining with this config lives in the study: keyed by the config (the device aside)."""
    key = pcfg.to_dict()
    key["training"] = {k: v for k, v in key["training"].items() if k != "device"}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return out / "pretrain" / f"{pcfg.model.encoder}-{digest}"


def ensure_pretrained(pcfg: PretrainConfig, run_dir: Path, *, log: Callable[[str], None] = print,
                      progress_factory=None) -> Path:
    """The encoder weights of the pretraining in `run_dir`, pretraining (or resuming) first if they are missing."""
    weights, _ = encoder_files(run_dir)
    if not weights.is_file():
        resume = RunDir(run_dir).is_run()
        log(f"{'resuming' if resume else 'starting'} pretraining of {pcfg.model.encoder} in {run_dir}")
        pretrain(pcfg, run_dir, resume=resume, log=log, progress_factory=progress_factory)
    return weights


def run_cell(study: Study, cell: Cell, out: Path, *, log: Callable[[str], None] = print,
             progress_factory=None, device: str | None = None) -> tuple[dict, bool]:
    """Train and evaluate one cell unless it is done; returns its result row and whether it was computed now."""
    cell_dir = out / "cells" / cell.name
    row_file = cell_dir / "cell.json"
    overrides = cell.overrides(study) + ([f"training.device={device}"] if device else [])
    cfg = load_config(study.train_config, overrides)
    pre_dir = None
    if cell.backbone.pretrain is not None:
        pcfg = pretrain_config(study, cell.backbone, cfg)
        pre_dir = pretrain_dir(out, pcfg)
        pre_weights, pre_meta = encoder_files(pre_dir)
        overrides.append(f"model.encoder_weights={json.dumps(str(pre_weights))}")
        cfg = load_config(study.train_config, overrides)
    opts = eval_options(study, cfg, device)
    ev = study.evaluate
    split, limit, sample, record = ev.split, ev.limit, ev.sample, study.record(cell)
    if row_file.is_file():
        check_finished_cell(cell_dir, cfg, opts, split, limit, sample)
        row = json.loads(row_file.read_text())
        if record is not None and record.is_file():
            check_record(record, read_record(record), cfg, opts, split, out, limit, sample)
        elif record is not None:  # finished before the study kept records: record it now
            write_record(record, cell.name, row, cfg, opts, split, out, limit=limit, sample=sample,
                         **_history(cell_dir / "run"))
        return row, False
    if record is not None and record.is_file():  # finished on another machine
        rec = read_record(record)
        check_record(record, rec, cfg, opts, split, out, limit, sample)
        return rec["row"], False
    if pre_dir is not None:
        ensure_pretrained(pcfg, pre_dir, log=log, progress_factory=progress_factory)
    run = RunDir(cell_dir / "run")
    resume = run.is_run()
    if run.path.exists() and not resume:  # a cell stopped before its setup finished: nothing worth keeping,
        with run.locked():  # unless another benchmark process is setting it up right now (then: one clear line)
            for entry in run.path.iterdir():
                if entry.name != RunDir.LOCK:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    log(f"cell {cell.name}: {'resuming' if resume else 'training'}")
    train(cfg, run.path, resume=resume, log=log, progress_factory=progress_factory)
    update = progress_factory(f"evaluating {cell.name}", 0) if progress_factory else None
    result = run_evaluation(run.checkpoint("best"), cfg.data.root, cell_dir / EVALUATION_DIR,
                            split=split, data_format=cfg.data.format, options=opts,
                            limit=limit, sample=sample, run_splits=run.split_source(),
                            progress=(lambda d, n: update(d, {})) if update else None)
    labeled = run.labeled_images()  # the label budget: training and validation images together
    row = {"cell": cell.name, "backbone": cell.backbone.name, "encoder": cfg.model.encoder,
           "family": encoder_info(cfg.model.encoder).family, "arch": cfg.model.arch,
           "pretrained": (f"self-supervised ({pre_dir.name})" if pre_dir is not None
                          else cfg.model.encoder_weights or "none"),
           "pretrain_seconds": json.loads(pre_meta.read_text())["seconds"] if pre_dir is not None else 0.0,
           # the same pretraining config re-run on another machine (caches do not travel) gives other weights
           "pretrained_sha256": file_sha256(pre_weights)[:16] if pre_dir is not None else None,
           "labeled": labeled, "train_images": run.train_images(),
           "labeled_setting": "all" if cell.labeled is None else cell.labeled, "seed": cell.seed,
           "train_seconds": round(run.seconds(), 1),
           "eval_seconds": result.metrics.seconds, "test_images": result.metrics.images,
           # times compare only within one machine and precision: a study may run across several
           "hardware": hardware(), "precision": read_sidecar(run.checkpoint("best"))["extra"].get("precision"),
           **result.headline(),
           # each image group on its own (BSData's two image types): a pooled score hides the group a row fails on
           **{group_column(name): g.defect_iou for name, g in (result.metrics.groups or {}).items()}}
    write_text(row_file, json.dumps(row, indent=1) + "\n")
    if record is not None:
        write_record(record, cell.name, row, cfg, opts, split, out, limit=limit, sample=sample,
                     **_history(run.path))
    return row, True


def _history(run_dir: Path) -> dict[str, list[dict]]:
    """What the run recorded per epoch, numbers as numbers: its metrics.csv rows and each validation image's pixel
    counts (validation_images.csv)."""
    def value(v: str):
        try:
            return float(v) if v != "" else None
        except ValueError:
            return v
    run = RunDir(run_dir)
    return {name: [{k: value(v) for k, v in row.items()} for row in rows]
            for name, rows in (("history", run.read_history()), ("validation_images", run.read_validation_images()))}


def eval_options(study: Study, cfg, device: str | None) -> EvalOptions:
    """A cell's evaluation: the study's evaluate section plus the stitching and mask rule of its validation."""
    ev = study.evaluate
    return EvalOptions(device=device or cfg.training.device, stitch=cfg.validation.stitch,
                       batch_size=cfg.validation.batch_size, min_area=cfg.validation.min_area,
                       seam_images=ev.seam_images, examples=ev.examples, region_criterion=ev.region_criterion,
                       region_threshold=ev.region_threshold, pro_fpr_limit=ev.pro_fpr_limit, tta=ev.tta)


def check_finished_cell(cell_dir: Path, cfg, opts: EvalOptions, split: str, limit: int | None = None,
                        sample: str = "first") -> None:
    """A finished cell is reused only if it was made with this cell's settings: otherwise a study edited in place
    would silently mix results of two configurations."""
    run = RunDir(cell_dir / "run")
    metrics_file = cell_dir / EVALUATION_DIR / METRICS_FILE
    for f in (run.path / RunDir.CONFIG, metrics_file):
        if not f.is_file():
            raise DefectscanError(f"{cell_dir}: cell.json exists but {f.name} is missing; delete the cell directory "
                                  f"to recompute it")
    # where it ran does not change what it measured
    same_cfg = run.same_config(cfg, ignore=MACHINE_KEYS)
    saved = EvalSummary.read(metrics_file)
    same_eval = (saved.split == split
                 and all(getattr(saved.options, k) == getattr(opts, k) for k in SCORE_OPTIONS)
                 and same_subset(limit, sample, saved.sample, len(saved.images)))
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
