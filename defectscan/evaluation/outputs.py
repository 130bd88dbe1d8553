"""`defectscan evaluate`: checkpoint + labeled dataset split -> metrics.json, per_image.csv, report.html.

The output directory is assembled under a temporary name and swapped into place at the end, so a failed or
interrupted evaluation never leaves a half-written report. It also keeps every predicted class mask
(`predictions/<stem>.png`, small: mostly zeros), which `defectscan compare` uses to show the same crops for each
backbone. An evaluation directory is found inside a run or benchmark cell as `EVALUATION_DIR`.
"""

from __future__ import annotations

import random
import re
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from defectscan.data import load_dataset, split_dataset
from defectscan.data.dataset import Sample, SegmentationDataset
from defectscan.errors import DefectscanError
from defectscan.evaluation.evaluator import Evaluation, evaluate
from defectscan.inference import Predictor
from defectscan.distributed import SINGLE, Shard
from defectscan.io.files import csv_text, shared_atomic_dir
from defectscan.io.png import PngRowWriter
from defectscan.io.provenance import hardware, library_versions
from defectscan.metrics import pro_curve
from defectscan.models import describe
from defectscan.reporting import plots
from defectscan.reporting.html import fmt, png_bytes_uri, png_uri, render
from defectscan.schemas import EvalOptions, EvalSummary

SPLITS = ("test", "val", "train", "unused", "all")
# unused: a label-budget run's labeled training-split images it neither trained nor validated on (splits.json
# "train_unused"): held-out images outside the test split, on which a study may compare recipes and thresholds
SAMPLE_RULES = ("first", "random")  # how `limit` picks its images (see limit_samples)
SAMPLE_SEED = 0
EVALUATION_DIR = "evaluation"  # where an evaluation lives inside a training run or a benchmark cell
METRICS_FILE = "metrics.json"


def select_samples(ds: SegmentationDataset, split: str,
                   run_splits: tuple[Mapping[str, Sequence[str]], Path] | None = None) -> tuple[list[Sample], str]:
    """The labeled images of `split`, and how the split was decided.

    `run_splits` = (stems per split, file they came from) of the training run a checkpoint belongs to: its test
    images are the ones it never trained on. Without it, the dataset's split file, else a seeded split.
    """
    if split not in SPLITS:
        raise DefectscanError(f"unknown split '{split}' (choose {', '.join(SPLITS)})")
    labeled = ds.labeled
    if split == "all":
        if run_splits is None:
            return labeled, ("every labeled image (which of them the model was trained on is unknown: not a "
                             "training run's checkpoint)")
        trained = set(run_splits[0].get("train", []))
        seen = sum(s.stem in trained for s in labeled)
        return labeled, (f"every labeled image; {seen} of the {len(labeled)} were training images of this model, "
                         f"so these metrics are optimistic" if seen else "every labeled image (none was trained on)")
    if split == "unused" and (run_splits is None or not run_splits[0].get("train_unused")):
        raise DefectscanError("--split unused needs a training run that had a label budget (--labeled N): its "
                              "labeled images that it did not use" + (
                                  "" if run_splits is None else f"; {run_splits[1]} lists none"))
    if run_splits is not None:
        stems, source = run_splits
        wanted = set(stems.get("train_unused" if split == "unused" else split, []))
        chosen = [s for s in labeled if s.stem in wanted]
        if wanted and len(chosen) < len(wanted):
            raise DefectscanError(f"{source}: {len(wanted) - len(chosen)} {split} image(s) of the training run are "
                                  f"not labeled images of {ds.root}; is this the dataset the model was trained on?")
        how = f"the training run's {split} split ({source})"
    else:
        splits = split_dataset(ds)
        chosen = getattr(splits, split)
        how = f"{split} split ({splits.source}: " + ("the dataset's own split file)" if splits.source == "dataset"
                                                      else "seed 0, 15% val / 20% test)")
    if not chosen:
        raise DefectscanError(f"{ds.root}: the {split} split has no labeled images (use --split all to evaluate every "
                              f"labeled image)")
    return chosen, how


def check_sample_rule(sample: str) -> None:
    """Refuse an unknown `--sample` before a model is loaded."""
    if sample not in SAMPLE_RULES:
        raise DefectscanError(f"unknown --sample rule '{sample}' (choose {', '.join(SAMPLE_RULES)})")


def limit_samples(samples: list[Sample], limit: int | None, sample: str = "first") -> tuple[list[Sample], str]:
    """At most `limit` of `samples` (in their order), and how they were picked, for `split_source`.

    `first` takes the first N by name: on a dataset whose file names group by kind (BSData's type-1 images all sort
    after its type-2 ones) that scores one kind only. `random` draws N with a fixed seed, so every model evaluated on
    the same split gets the same images."""
    check_sample_rule(sample)
    if not limit or limit >= len(samples):
        return samples, ""
    if sample == "first":
        return samples[:limit], f"; the first {limit} by name"
    keep = sorted(random.Random(SAMPLE_SEED).sample(range(len(samples)), limit))
    return [samples[i] for i in keep], f"; {limit} drawn at random (seed {SAMPLE_SEED})"


def match_classes(data_classes: Sequence[str], model_classes: Sequence[str],
                  class_map: Mapping[str, str] | None = None) -> tuple[dict[str, str], list[str]]:
    """Which model class each dataset defect class is scored as: `class_map` (dataset name -> model name) first,
    then equal names (ignoring case); names a loader invented (class_1, class_2, ...; `defect` for one class) by
    index. Returns the mapping
    and notes; a dataset class left without a model class is an error naming both sides, since scoring it as
    background would make every metric silently wrong."""
    class_map = dict(class_map or {})
    model_by_lower = {m.lower(): m for m in model_classes}
    for data_name, model_name in class_map.items():
        if data_name not in data_classes:
            raise DefectscanError(f"--class-map {data_name}={model_name}: the dataset has no class '{data_name}' "
                                  f"(its classes: {', '.join(data_classes)})")
        if model_name not in model_classes:
            raise DefectscanError(f"--class-map {data_name}={model_name}: the model has no class '{model_name}' "
                                  f"(its classes: {', '.join(model_classes)})")
    mapping, notes = {}, []
    # names a loader makes up when the data names none: class_1, class_2 (index masks), defect (0/255 masks); a
    # model trained on such data under names given in its config (data.classes) is matched by index
    unnamed = (all(re.fullmatch(r"class_\d+", c) for c in data_classes)
               or (tuple(data_classes) == ("defect",) and len(model_classes) == 1))
    for i, name in enumerate(data_classes, start=1):
        if name in class_map:
            mapping[name] = class_map[name]
        elif name.lower() in model_by_lower:
            mapping[name] = model_by_lower[name.lower()]
        elif unnamed and i <= len(model_classes):
            mapping[name] = model_classes[i - 1]
    if unnamed and mapping and not class_map and any(k != v for k, v in mapping.items()):
        notes.append(f"the dataset names no classes: mask value i is scored as the model's class i "
                     f"({', '.join(f'{k}={v}' for k, v in mapping.items())})")
    missing = [c for c in data_classes if c not in mapping]
    if missing:
        raise DefectscanError(
            f"dataset class(es) {', '.join(missing)} match no model class (model: {', '.join(model_classes)}); "
            f"map them with --class-map DATASET_CLASS=MODEL_CLASS, or evaluate a model trained on these classes")
    return mapping, notes


def open_for_scoring(checkpoint: Path, data: str | Path, options: EvalOptions, *, data_format: str = "auto",
                     class_map: Mapping[str, str] | None = None,
                     log: Callable[[str], None] = lambda message: None) -> tuple[Predictor, SegmentationDataset, dict]:
    """(predictor, the dataset seen with the model's classes, dataset class -> model class): what scoring a
    checkpoint on labeled data starts with. Classes are matched by name (`match_classes`); `log` says how."""
    predictor = Predictor.from_checkpoint(checkpoint, options.infer_options())
    spec = predictor.spec
    ds = load_dataset(data, data_format)
    mapping, notes = match_classes(ds.classes[1:], spec.defect_classes, class_map)
    if any(k != v for k, v in mapping.items()):
        notes.append("scored as the model's classes: " + ", ".join(f"{k} -> {v}" for k, v in mapping.items()))
    for note in predictor.unreported_notes() + notes:  # the predictor's: center-stitch caveat, emulated bf16
        log(note)
    return predictor, ds.seen_as((ds.classes[0], *spec.defect_classes), mapping), mapping


def run_evaluation(checkpoint: str | Path, data: str | Path, out: str | Path, *, split: str = "test",
                   data_format: str = "auto", options: EvalOptions | None = None, limit: int | None = None,
                   sample: str = "first", run_splits: tuple[Mapping[str, Sequence[str]], Path] | None = None,
                   progress: Callable[[int, int], None] | None = None, command: str = "",
                   class_map: Mapping[str, str] | None = None,
                   log: Callable[[str], None] = lambda message: None, shard: Shard = SINGLE) -> EvalSummary:
    """Evaluate and write the output directory; returns what metrics.json holds. Dataset classes are matched to
    the model's by name (`match_classes`); `log` receives notes on how. With a `shard` of several processes,
    each scores and writes the predictions of its share of the images; rank 0 writes the rest (see `evaluate`)."""
    opts = options or EvalOptions()
    check_sample_rule(sample)  # before the model loads
    checkpoint, out = Path(checkpoint), Path(out)
    predictor, ds, mapping = open_for_scoring(checkpoint, data, opts, data_format=data_format, class_map=class_map,
                                              log=log)
    opts = opts.model_copy(update={"stitch": predictor.stitch})  # metrics.json records what was used
    spec = predictor.spec
    samples, how = select_samples(ds, split, run_splits)
    samples, picked = limit_samples(samples, limit, sample)
    with shared_atomic_dir(out, shard) as tmp:
        (tmp / "predictions").mkdir()

        def prediction_png(sample: Sample, shape: tuple[int, int]) -> PngRowWriter:
            return PngRowWriter(tmp / "predictions" / f"{sample.stem}.png", *shape)

        ev = evaluate(predictor, ds, samples, opts, progress=progress, mask_sink=prediction_png, shard=shard)
        for note in predictor.unreported_notes():  # what the run itself found (an ONNX Runtime provider gave way)
            log(note)
        summary = EvalSummary(
            model=describe(spec), checkpoint=str(checkpoint), encoder=spec.encoder, arch=spec.arch,
            data=str(ds.root), format=ds.format, split=split, split_source=how + picked,
            sample=sample if limit else None, images=[s.stem for s in samples],
            hardware=hardware(), versions=library_versions(), created=time.strftime("%Y-%m-%d %H:%M:%S"),
            command=command, options=opts, trained_on_images=predictor.meta.get("extra", {}).get("train_images"),
            class_map={k: v for k, v in mapping.items() if k != v}, precision=predictor.precision,
            metrics=ev.metrics())
        if shard.is_main:
            (tmp / METRICS_FILE).write_text(summary.to_json(), encoding="utf-8")
            (tmp / "per_image.csv").write_text(csv_text(ev.per_image), encoding="utf-8")
            (tmp / "report.html").write_text(evaluation_report(ev, summary), encoding="utf-8")
    return summary


def find_metrics(path: str | Path) -> Path:
    """metrics.json of an evaluation directory, given the file, the directory, or a run / cell holding one."""
    p = Path(path)
    for candidate in (p, p / METRICS_FILE, p / EVALUATION_DIR / METRICS_FILE):
        if candidate.is_file():
            return candidate
    raise DefectscanError(f"{path}: no metrics.json (run `defectscan evaluate` first, or give its output directory)")


def load_metrics(path: str | Path) -> tuple[EvalSummary, Path]:
    """(the evaluation's metrics.json, its directory)."""
    f = find_metrics(path)
    return EvalSummary.read(f), f.parent


def summary_rows(summary: EvalSummary) -> list[tuple[str, str]]:
    """(metric, value) rows people read first: the console table of `evaluate` and the top of report.html."""
    m = summary.metrics
    r, im, cost, a = m.region, m.image_level, m.cost, m.area
    rows = [("pixel defect IoU / Dice (at threshold)", f"{fmt(m.defect_iou)} / {fmt(m.defect_dice)}")]
    if m.groups:
        rows.append(("pixel defect IoU per image group", ", ".join(
            f"{name} {fmt(g.defect_iou)} ({g.images} images)" for name, g in m.groups.items())))
    rows += [("pixel defect AP / AUROC", f"{fmt(m.defect_pixel_ap)} / {fmt(m.defect_pixel_auroc)}"),
             ("pixel best F1 (threshold)", f"{fmt(m.defect_best_f1)} ({fmt(m.defect_best_f1_threshold)})"),
             (f"region recall ({r.criterion})", f"{fmt(r.recall)} ({r.found} of {r.gt_regions})"),
             ("false-positive regions per image / per MP",
              f"{fmt(r.fp_regions_per_image)} / {fmt(r.fp_regions_per_megapixel)}")]
    if a is not None:
        rows += [("defect area: predicted / true (ratio)", f"{100 * a.predicted_fraction:.3f}% / "
                  f"{100 * a.true_fraction:.3f}% ({fmt(a.predicted_to_true)})"),
                 ("false-positive area (share of background)", f"{100 * a.false_positive_fraction:.3f}%")]
    rows += [(f"PRO (FPR <= {r.pro_fpr_limit})", fmt(r.pro)),
             ("image AUROC / AP / F1", f"{fmt(im.auroc)} / {fmt(im.ap)} / {fmt(im.f1)} "
                                       f"({im.defective} defective, {im.clean} clean, {im.flagged} flagged)")]
    if cost is not None and cost.megapixels_per_second is not None:
        tta = " with flip TTA" if summary.options.tta else ""
        rows.append((f"speed on {cost.device}{tta}", f"{fmt(cost.megapixels_per_second)} MP/s, "
                     f"{fmt(cost.latency_mean_s)} s per image"))
    if cost is not None and cost.parameters is not None:
        peaks = [f"{v:,.0f} MB {k}" for k, v in (("RSS", cost.peak_rss_mb), ("GPU", cost.peak_gpu_mb)) if v is not None]
        rows += [("parameters", f"{cost.parameters / 1e6:.2f} M"),
                 (f"GFLOPs per {cost.tile} tile", fmt(cost.gflops_per_tile)),
                 ("peak memory", ", ".join(peaks) or "-")]
    return rows


def evaluation_report(ev: Evaluation, summary: EvalSummary) -> str:
    """The self-contained report.html of an evaluation."""
    m = summary.metrics
    rows = [list(row) for row in summary_rows(summary)]
    defect = list(ev.classes[1:])
    per_image = sorted(ev.per_image, key=lambda row: (row["defect_dice"] if row["defect_dice"] is not None else 2.0))
    shown = per_image[:200]
    cols = ["image", *(["group"] if m.groups else []), "gt_defect_px", "predicted_px", "defect_dice", "gt_regions",
            "found_regions", "fp_regions", "max_score", "seconds"]
    examples = [{"title": title, "images": [{"uri": png_uri(e.preview, quality=88),
                                            "caption": f"{e.image}: Dice {e.dice:.3f}, {e.errors} wrong px"} for e in pool]}
                for title, pool in (("Best images", ev.best), ("Worst images", ev.worst)) if pool]
    return render(
        "evaluation.html.j2", title=f"defectscan evaluation — {summary.model}",
        meta={"model": summary.model, "checkpoint": summary.checkpoint, "data": summary.data, "split": summary.split,
              "images": m.images, "hardware": summary.hardware, "created": summary.created},
        summary_rows=rows,
        class_rows=[[c, m.iou[c], m.dice[c], m.best_f1[c], m.best_f1_threshold[c], m.pixel_ap[c], m.pixel_auroc[c],
                     *_class_regions(m, c)] for c in defect],
        group_rows=[[name, g.images, g.defective, g.defect_iou, g.defect_dice, g.true_px, g.false_positive_px,
                     g.false_negative_px] for name, g in (m.groups or {}).items()],
        confusion_classes=list(ev.classes), confusion_rows=[[c, *map(int, row)] for c, row in zip(ev.classes, ev.conf)],
        plots={k: png_bytes_uri(v) if v else None for k, v in evaluation_plots(ev).items()},
        examples=examples,
        seam_rows=[[x.get("image"), x.get("max_abs_diff", x.get("skipped")), x.get("mean_abs_diff"),
                    x.get("mask_disagreement")] for x in ev.seam],
        per_image_note="all" if len(shown) == len(per_image) else f"the {len(shown)} worst of {len(per_image)}",
        per_image_header=cols, per_image_rows=[[row[c] for c in cols] for row in shown])


def _class_regions(m, c: str) -> list:
    """[found / true regions, recall, false-positive regions per MP] of one class ('-' for single-class models)."""
    rc = (m.region_per_class or {}).get(c)
    if rc is None:
        return ["-", "-", "-"]
    return [f"{rc.found} / {rc.gt_regions}", rc.recall, rc.fp_regions_per_megapixel]


def evaluation_plots(ev: Evaluation) -> dict[str, bytes | None]:
    """PNGs of the precision-recall curves, the threshold sweep, the PRO curve and the per-image distributions."""
    keys = list(ev.classes[1:]) + (["any"] if len(ev.classes) > 2 else [])
    names = list(ev.classes[1:]) + (["any defect"] if len(ev.classes) > 2 else [])
    pr = []
    for name, key in zip(names, keys):
        h = ev.hist[key]
        if h.pos.sum():
            c, keep = h.curve(), (h.pos + h.neg) > 0
            pr.append((name, c["recall"][keep], c["precision"][keep], h.average_precision()))
    any_hist = ev.hist["any"]
    c = any_hist.curve()
    out: dict[str, bytes | None] = {
        "pr": plots.precision_recall(pr),
        "sweep": plots.threshold_sweep(c["level"] / 255, c["precision"], c["recall"], c["f1"], ev.threshold,
                                       any_hist.best_f1()),
        "pro": None,
    }
    if ev.gt_regions and any_hist.neg.sum():
        out["pro"] = plots.pro_curve(*pro_curve(ev.overlap_sum, ev.gt_regions, any_hist), ev.options.pro_fpr_limit)
    defective = np.array([r["defective"] for r in ev.per_image], bool)
    dice = [r["defect_dice"] for r in ev.per_image if r["gt_defect_px"] and r["defect_dice"] is not None]
    out["images"] = plots.image_distributions(np.asarray(ev.image_scores), defective, ev.threshold, dice)
    return out
