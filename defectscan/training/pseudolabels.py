"""Self-training on unlabeled images: a trained model's confident predictions as extra training targets.

`write_pseudolabels` runs a checkpoint (the teacher) through the tiling engine, as `infer` would, on a dataset's
unlabeled images and writes one class-index PNG per image: the teacher's mask where it is sure, and
`IGNORE_INDEX` where its defect score lies within `band` logits of its decision threshold, so the student's loss
skips what the teacher could not decide. `load_pseudolabels` gives `train` the (image, mask) pairs; their crops
are mixed with the labeled ones (`data.pseudo_labels`, `sampling.pseudo_share`).

The band is measured in logits around the teacher's own (calibrated) threshold rather than in probability, so it
means the same for a teacher whose threshold is 0.1 and one whose threshold is 0.95.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

from defectscan.data import load_dataset
from defectscan.data.dataset import IGNORE_INDEX, Sample, SegmentationDataset
from defectscan.errors import DefectscanError
from defectscan.evaluation.outputs import check_sample_rule, limit_samples
from defectscan.inference import Predictor
from defectscan.io.files import atomic_dir, check_output_dir
from defectscan.schemas import InferOptions

MANIFEST = "pseudolabels.json"
MASKS = "masks"
MANIFEST_VERSION = 1
SCORE_EPS = 0.5 / 255  # scores are stored in 1/255 steps: keep logits finite at 0 and 255


def uncertain_pixels(score: np.ndarray, threshold: float, band: float) -> np.ndarray:
    """Pixels whose uint8 defect score is within `band` logits of `threshold` (band 0: none). Decided once per score
    value (256 of them) and looked up, so a huge image costs no float copies."""
    if band <= 0:
        return np.zeros(score.shape, bool)
    p = np.clip(np.arange(256, dtype=np.float32) / 255.0, SCORE_EPS, 1 - SCORE_EPS)
    t = float(np.clip(threshold, SCORE_EPS, 1 - SCORE_EPS))
    unsure = np.abs(np.log(p / (1 - p)) - np.log(t / (1 - t))) < band
    return unsure[score]


@dataclass
class PseudoLabels:
    """What `load_pseudolabels` returns: the images (dataset samples) and their masks, in manifest order."""

    samples: list[Sample]
    masks: list[np.ndarray]
    manifest: dict


def write_pseudolabels(checkpoint: str | Path, data: str | Path, out: str | Path, *, options: InferOptions,
                       band: float = 2.0, limit: int | None = None, sample: str = "first",
                       data_format: str = "auto",
                       progress: Callable[[int, int], None] | None = None) -> dict:
    """Pseudo-label the unlabeled images of `data` with `checkpoint` into `out` (masks/<stem>.png and
    pseudolabels.json; the folder appears whole or not at all, replacing an earlier one). Returns the manifest."""
    if band < 0:
        raise DefectscanError(f"--band must be >= 0 logits, got {band}")
    check_sample_rule(sample)
    out = Path(out)
    check_output_dir(out)
    predictor = Predictor.from_checkpoint(checkpoint, options)
    ds = load_dataset(data, data_format)
    pool = ds.unlabeled
    if not pool:
        raise DefectscanError(f"{ds.root}: no unlabeled images to pseudo-label ({len(ds.labeled)} labeled, none "
                              f"without labels)")
    chosen, _ = limit_samples(pool, limit, sample)
    t0 = time.perf_counter()
    rows = []
    with atomic_dir(out) as tmp:
        (tmp / MASKS).mkdir()
        if progress:
            progress(0, len(chosen))
        for i, s in enumerate(chosen):
            pred = predictor.predict(ds.open_source(s), keep_probs=False)
            mask = pred.mask  # the prediction's own array: nothing else reads it
            unsure = uncertain_pixels(pred.score, predictor.threshold, band)
            mask[unsure] = IGNORE_INDEX
            if not cv2.imwrite(str(tmp / MASKS / f"{s.stem}.png"), mask):
                raise DefectscanError(f"{out}: could not write the mask of {s.stem}")
            n = mask.size
            rows.append({"stem": s.stem, "height": int(mask.shape[0]), "width": int(mask.shape[1]),
                         "defect_share": round(float(((mask > 0) & (mask != IGNORE_INDEX)).sum()) / n, 6),
                         "ignored_share": round(float(unsure.sum()) / n, 6), "regions": len(pred.regions)})
            if progress:
                progress(i + 1, len(chosen))
        manifest = {
            "version": MANIFEST_VERSION, "teacher": str(Path(checkpoint).resolve()), "dataset": str(ds.root),
            "classes": list(predictor.spec.defect_classes), "threshold": predictor.threshold, "band": band,
            "tta": predictor.options.tta, "precision": predictor.precision, "unlabeled_images": len(pool),
            "limit": limit, "sample": sample if limit else None, "seconds": round(time.perf_counter() - t0, 1),
            "images": rows,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return manifest


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    file = path / MANIFEST
    if not file.is_file():
        raise DefectscanError(f"data.pseudo_labels {path}: no {MANIFEST} (make the folder with `defectscan "
                              f"pseudolabel`)")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DefectscanError(f"{file}: unreadable ({exc})") from None
    if manifest.get("version") != MANIFEST_VERSION or not isinstance(manifest.get("images"), list):
        raise DefectscanError(f"{file}: not a version-{MANIFEST_VERSION} pseudo-label manifest")
    return manifest


def load_pseudolabels(path: str | Path, ds: SegmentationDataset, *, exclude: Sequence[str] = ()) -> PseudoLabels:
    """The pseudo-labeled images of `ds` listed in `path` and their masks (uint8, IGNORE_INDEX where unsure).

    Refused, with one line: another class list than the dataset's, an image the dataset lacks, a mask of the wrong
    size, or an image in `exclude` (the run's own labeled, validation and test images: a test image trained on
    with the teacher's labels would make its test score meaningless)."""
    path = Path(path)
    manifest = read_manifest(path)
    if [c.lower() for c in manifest["classes"]] != [c.lower() for c in ds.classes[1:]]:
        raise DefectscanError(f"data.pseudo_labels {path}: classes {manifest['classes']} do not match the dataset's "
                              f"{list(ds.classes[1:])}")
    by_stem = {s.stem: s for s in ds.samples}
    excluded = set(exclude)
    samples, masks = [], []
    for row in manifest["images"]:
        stem = row["stem"]
        if stem not in by_stem:
            raise DefectscanError(f"data.pseudo_labels {path}: image '{stem}' is not in {ds.root}")
        if stem in excluded:
            raise DefectscanError(f"data.pseudo_labels {path}: '{stem}' is one of this run's labeled, validation or "
                                  f"test images; pseudo-label unlabeled images only")
        mask = cv2.imread(str(path / MASKS / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        if mask is None or mask.ndim != 2 or mask.shape != (row["height"], row["width"]):
            raise DefectscanError(f"data.pseudo_labels {path}: mask of '{stem}' is missing or not "
                                  f"{row['height']}x{row['width']}")
        samples.append(by_stem[stem])
        masks.append(mask)
    if not samples:
        raise DefectscanError(f"data.pseudo_labels {path}: the manifest lists no images")
    return PseudoLabels(samples, masks, manifest)
