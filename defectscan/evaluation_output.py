"""`defectscan evaluate`: checkpoint + labeled dataset split -> metrics.json, per_image.csv, report.html.

The output directory is assembled under a temporary name and swapped into place at the end, so a failed or
interrupted evaluation never leaves a half-written report. It also keeps every predicted class mask
(`predictions/<stem>.png`, small: mostly zeros), which `defectscan compare` uses to show the same crops for each
backbone.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from defectscan.data import load_dataset, split_dataset
from defectscan.data.dataset import Sample, SegmentationDataset
from defectscan.errors import DefectscanError
from defectscan.evaluation import EvalOptions, evaluate
from defectscan.images import atomic_dir, csv_text
from defectscan.models import load_checkpoint
from defectscan.models.checkpoint import library_versions
from defectscan.models.factory import describe
from defectscan.tiling import validate_tile

SPLITS = ("test", "val", "train", "all")


def hardware() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {torch.get_num_threads()} threads{gpu}"


def select_samples(ds: SegmentationDataset, split: str, checkpoint: Path) -> tuple[list[Sample], str]:
    """The labeled images of `split`, and how the split was decided.

    A checkpoint inside a training run directory is evaluated on that run's own split (its splits.json), so its
    test images are the ones it never trained on; otherwise the dataset's split file, else a seeded split.
    """
    if split not in SPLITS:
        raise DefectscanError(f"unknown split '{split}' (choose {', '.join(SPLITS)})")
    labeled = ds.labeled
    if split == "all":
        return labeled, "every labeled image"
    run_splits = checkpoint.parent / "splits.json"
    if run_splits.is_file() and (checkpoint.parent / "config.yaml").is_file():
        stems = json.loads(run_splits.read_text())
        wanted = set(stems.get(split, []))
        chosen = [s for s in labeled if s.stem in wanted]
        if wanted and len(chosen) < len(wanted):
            raise DefectscanError(f"{run_splits}: {len(wanted) - len(chosen)} {split} image(s) of the training run are "
                                  f"not labeled images of {ds.root}; is this the dataset the model was trained on?")
        how = f"the training run's {split} split ({run_splits})"
    else:
        splits = split_dataset(ds)
        chosen = getattr(splits, split)
        how = f"{split} split ({splits.source}: " + ("the dataset's own split file)" if splits.source == "dataset"
                                                      else "seed 0, 15% val / 20% test)")
    if not chosen:
        raise DefectscanError(f"{ds.root}: the {split} split has no labeled images (use --split all to evaluate every "
                              f"labeled image)")
    return chosen, how


def run_evaluation(checkpoint: str | Path, data: str | Path, out: str | Path, *, split: str = "test",
                   data_format: str = "auto", options: EvalOptions | None = None, limit: int | None = None,
                   progress: Callable[[int, int], None] | None = None, command: str = "") -> dict:
    """Evaluate and write the output directory; returns the summary (metrics.json's content)."""
    opts = options or EvalOptions()
    checkpoint, out = Path(checkpoint), Path(out)
    model, spec, meta = load_checkpoint(checkpoint)
    validate_tile(opts.tile or spec.tile, spec.stride, model_name=describe(spec))
    ds = load_dataset(data, data_format, list(spec.defect_classes))
    if list(ds.classes[1:]) != list(spec.defect_classes):
        raise DefectscanError(f"{data}: dataset classes {list(ds.classes[1:])} differ from the model's "
                              f"{list(spec.defect_classes)}")
    samples, how = select_samples(ds, split, checkpoint)
    if limit:
        samples = samples[:limit]
    with atomic_dir(out) as tmp:
        (tmp / "predictions").mkdir()

        def save_prediction(sample: Sample, mask: np.ndarray) -> None:
            if not cv2.imwrite(str(tmp / "predictions" / f"{sample.stem}.png"), mask):
                raise DefectscanError(f"{tmp}: could not write prediction")

        ev = evaluate(model, spec, ds, samples, opts, progress=progress, on_image=save_prediction)
        summary = ev.summary()
        info = {
            "model": describe(spec), "checkpoint": str(checkpoint), "encoder": spec.encoder, "arch": spec.arch,
            "data": str(ds.root), "format": ds.format, "split": split, "split_source": how,
            "images": [s.stem for s in samples], "hardware": hardware(), "versions": library_versions(),
            "created": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command,
            "options": dict(vars(opts)), "trained_on_images": meta.get("extra", {}).get("train_images"),
        }
        result = {**info, "metrics": summary}
        (tmp / "metrics.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        (tmp / "per_image.csv").write_text(csv_text(ev.per_image), encoding="utf-8")
        from defectscan.report_html import evaluation_html

        (tmp / "report.html").write_text(evaluation_html(ev, info), encoding="utf-8")
    return result


def load_metrics(path: str | Path) -> dict:
    """metrics.json of an evaluation directory (or of `<run dir>/evaluation`)."""
    p = Path(path)
    for candidate in (p, p / "metrics.json", p / "evaluation" / "metrics.json"):
        if candidate.is_file():
            try:
                return {**json.loads(candidate.read_text()), "_dir": str(candidate.parent)}
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise DefectscanError(f"{candidate}: not a valid metrics.json") from None
    raise DefectscanError(f"{path}: no metrics.json (run `defectscan evaluate` first, or give its output directory)")


__all__ = ["SPLITS", "hardware", "load_metrics", "run_evaluation", "select_samples"]
