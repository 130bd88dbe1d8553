"""Choosing a checkpoint's decision threshold on labeled images and storing it in the checkpoint.

A fixed 0.5 is rarely the best threshold: on data where few images are defective, a model can rank pixels well
(high AP) and still mark far too much at 0.5. The threshold is chosen on images the test metrics will not see
(a run's validation split by default; the test split is refused) from the pixel score histogram of one
evaluation pass, by a `ScoreHistogram.choose_threshold` rule, and `infer`/`evaluate` then use it by default.
Training does the same at its end from the best epoch's validation pass (`validation.threshold`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

from defectscan.errors import DefectscanError
from defectscan.evaluation.evaluator import evaluate
from defectscan.evaluation.outputs import check_sample_rule, limit_samples, open_for_scoring, select_samples
from defectscan.metrics import STABLE_F1_TOLERANCE, THRESHOLD_RULES, ThresholdChoice, choose_threshold
from defectscan.models import set_threshold
from defectscan.schemas import EvalOptions


def trained_threshold(meta: Mapping, current: float) -> float:
    """The threshold a checkpoint had before any calibration (stable_f1 stays near it unless the images say
    otherwise): recalibrating a calibrated checkpoint must not drift from its last choice."""
    record = meta.get("extra", {}).get("threshold") or {}
    return float(record.get("default", record.get("previous", current)))


def calibrate_threshold(checkpoint: str | Path, data: str | Path, *, split: str = "val", rule: str = "stable_f1",
                        target: float | None = None, tolerance: float = STABLE_F1_TOLERANCE,
                        out: str | Path | None = None, data_format: str = "auto",
                        options: EvalOptions | None = None,
                        run_splits: tuple[Mapping[str, Sequence[str]], Path] | None = None,
                        class_map: Mapping[str, str] | None = None, limit: int | None = None,
                        sample: str = "first", progress: Callable[[int, int], None] | None = None,
                        log: Callable[[str], None] = lambda message: None) -> tuple[ThresholdChoice, Path, str]:
    """Choose the threshold on `split` of `data` and write it into the checkpoint (in place, or a copy at `out`).

    Returns (the choice, the checkpoint written, which images it was chosen on)."""
    if split == "test":
        raise DefectscanError("a threshold chosen on the test split would leak it into the test metrics; choose it "
                              "on --split val (or train)")
    if split == "all" and run_splits is not None and run_splits[0].get("test"):
        raise DefectscanError("--split all would include the training run's test images; choose the threshold on "
                              "--split val (or train)")
    if rule not in THRESHOLD_RULES:
        raise DefectscanError(f"unknown threshold rule '{rule}' (choose from {', '.join(THRESHOLD_RULES)})")
    if rule in ("precision", "recall") and (target is None or not 0.0 < target <= 1.0):
        raise DefectscanError(f"--rule {rule} needs --target in (0, 1], e.g. 0.9")
    check_sample_rule(sample)
    opts = (options or EvalOptions()).model_copy(update={"seam_images": 0, "examples": 0, "cost": False})
    checkpoint = Path(checkpoint)
    predictor, ds, _ = open_for_scoring(checkpoint, data, opts, data_format=data_format, class_map=class_map, log=log)
    samples, how = select_samples(ds, split, run_splits)
    samples, picked = limit_samples(samples, limit, sample)
    how += picked
    ev = evaluate(predictor, ds, samples, opts, progress=progress)
    for note in predictor.unreported_notes():  # what the run itself found (an ONNX Runtime provider gave way)
        log(note)
    if ev.hist["any"].pos.sum() == 0:
        raise DefectscanError(f"{ds.root}: the {split} images hold no defect pixels, so no threshold can be chosen "
                              f"on them")
    default = trained_threshold(predictor.meta, predictor.threshold)
    choice = choose_threshold(ev.image_hists, rule, target, default=default, tolerance=tolerance)
    written = set_threshold(checkpoint, choice.threshold, {
        **choice.to_dict(), "split": split, "split_source": how, "images": len(samples), "data": str(ds.root),
        "previous": predictor.threshold, "default": default, "tta": opts.tta}, out=out)
    return choice, written, how
