"""Typed options and results shared across layers: the one definition that every reader and writer uses.

- `InferOptions`, `EvalOptions`: run-time choices of `infer` and `evaluate` (validated: a bad value is one
  line naming the option and the value).
- `EvalSummary`: the content of an evaluation's `metrics.json` (schema version `EVAL_SCHEMA_VERSION`), read by
  `compare`, the benchmark and the CLI through attributes and `headline()`, never through spelled-out key paths.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, TypeVar

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator,
                      model_serializer, model_validator)

from defectscan.errors import DefectscanError

EVAL_SCHEMA_VERSION = 1
Stitch = Literal["center", "gaussian"]
# YAML reads a bare `off` (amp: off, --set training.amp=off) as the boolean false: it means "off"
Amp = Annotated[Literal["auto", "off", "bf16", "fp16"], BeforeValidator(lambda v: "off" if v is False else v)]
M = TypeVar("M", bound=BaseModel)


def error_key(loc: tuple) -> str:
    """A pydantic error location as people write it: `loss[0].weight`."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def describe_validation_error(exc: ValidationError, what: str = "option") -> str:
    """The first problem of a pydantic error as one line: the key, what was expected and the value given."""
    err = exc.errors()[0]
    key = error_key(err["loc"]) or "(top level)"
    more = f" (and {exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else ""
    if err["type"] == "extra_forbidden":
        return f"unknown {what} '{key}'{more}"
    if err["type"] == "value_error":  # our own validators name the value themselves
        return f"{what} '{key}': {err['msg'].removeprefix('Value error, ')}{more}"
    shown = "" if err["type"] == "missing" else f" (got {err.get('input')!r})"
    return f"{what} '{key}': {err['msg']}{shown}{more}"


def validated(cls: type[M], what: str = "option", **values: Any) -> M:
    """Build `cls` from keyword values; a bad value becomes a one-line `DefectscanError`."""
    try:
        return cls(**values)
    except ValidationError as exc:
        raise DefectscanError(describe_validation_error(exc, what)) from None


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class _TiledRun(_Options):
    """What every tiled run chooses; None means "as recorded in the checkpoint"."""

    tile: Optional[int] = Field(None, ge=1)
    overlap: Optional[int] = Field(None, ge=0)
    stitch: Optional[Stitch] = None
    batch_size: int = Field(4, ge=1)
    device: str = "auto"
    amp: Amp = "auto"
    threshold: Optional[float] = Field(None, ge=0.0, le=1.0)
    min_area: int = Field(4, ge=0)
    tta: bool = False  # average over flips; evaluate and calibrate as infer will run


class InferOptions(_TiledRun):
    """Run-time choices of `infer`."""

    preview_size: int = Field(2048, ge=16)


class EvalOptions(_TiledRun):
    """Run-time choices of `evaluate` (and of validation during training)."""

    region_criterion: Literal["coverage", "iou"] = "coverage"
    region_threshold: float = Field(0.5, ge=0.0, le=1.0)
    pro_fpr_limit: float = Field(0.3, gt=0.0, le=1.0)
    seam_images: int = Field(2, ge=0)  # images also run whole (untiled) to measure the stitching difference
    seam_max_pixels: int = Field(4_000_000, ge=1)
    examples: int = Field(3, ge=0)  # best and worst images kept as previews
    preview_side: int = Field(900, ge=16)
    cost: bool = True  # FLOPs per tile and peak memory

    def infer_options(self) -> InferOptions:
        """The inference part (what `Predictor` needs)."""
        return InferOptions(**self.model_dump(include=set(_TiledRun.model_fields)))


# The EvalOptions that change the metrics (the others change only speed, memory or the pictures written): study
# records are checked against them, and `compare` warns where evaluations chose them differently.
SCORE_OPTIONS = ("tile", "overlap", "stitch", "threshold", "min_area", "tta", "region_criterion", "region_threshold",
                 "pro_fpr_limit")


# ---- infer's defect table ----------------------------------------------------------------------------------------
@dataclass
class Region:
    """One connected defect region as `infer` reports it (a row of defects.csv)."""

    id: int
    class_id: int
    class_name: str
    x: int
    y: int
    width: int
    height: int
    area_px: int
    centroid_x: float
    centroid_y: float
    score_max: float
    score_mean: float

    def to_dict(self) -> dict:
        return asdict(self)


REGION_FIELDS = [f.name for f in fields(Region)]


# ---- metrics.json --------------------------------------------------------------------------------------------
class _Result(BaseModel):
    model_config = ConfigDict(extra="forbid")


Num = Optional[float]


class Confusion(_Result):
    classes: list[str]
    rows_truth_cols_prediction: list[list[int]]


class RegionMetrics(_Result):
    criterion: str
    gt_regions: int
    found: int
    recall: Num
    false_positive_regions: int
    fp_regions_per_image: Num
    fp_regions_per_megapixel: Num
    pro_fpr_limit: float
    pro: Num


class AreaMetrics(_Result):
    """Defect area, any class: catches a model that marks everything (region recall 1.0, no false regions)."""

    true_fraction: float  # share of all pixels that are defects in the truth
    predicted_fraction: float  # share of all pixels predicted as defect
    predicted_to_true: Num  # predicted / true defect area; None without true defects
    false_positive_fraction: float  # share of the true background predicted as defect (pixel false-positive rate)
    false_positive_per_megapixel: float  # false-positive defect pixels per megapixel of image


class ClassRegions(_Result):
    gt_regions: int
    found: int
    recall: Num
    false_positive_regions: int
    fp_regions_per_megapixel: Num


class GroupMetrics(_Result):
    """One image group (dataset sub-type: camera, product type, MVTec defect type) scored on its own: a pooled
    score hides a group the model fails on when that group is a small share of the images."""

    images: int
    defective: int  # images with defect pixels
    defect_iou: Num  # pixels pooled over the group's images, at the evaluation's threshold
    defect_dice: Num
    true_px: int
    false_positive_px: int
    false_negative_px: int


class ImageMetrics(_Result):
    defective: int
    clean: int
    auroc: Num
    ap: Num
    f1: Num
    flagged: int


class _Sparse(_Result):
    """Optional fields that do not apply are left out of the file (e.g. GPU memory on a CPU), not written as null."""

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class SeamCheck(_Sparse):
    image: str
    skipped: Optional[str] = None
    max_abs_diff: Num = None
    mean_abs_diff: Num = None
    mask_disagreement: Num = None


class CostMetrics(_Sparse):
    device: Optional[str] = None
    parameters: Optional[int] = None
    tile: Optional[list[int]] = None
    gflops_per_tile: Num = None
    peak_rss_mb: Num = None  # under torchrun: rank 0's
    peak_gpu_mb: Num = None
    processes: Optional[int] = None  # under torchrun: how many shared the images
    megapixels_per_second: Num = None  # per process: pixels / the processes' inference seconds together
    latency_mean_s: Num = None
    latency_median_s: Num = None
    latency_max_s: Num = None
    seam_check: list[SeamCheck] = []


class Metrics(_Result):
    """Pixel, region and image metrics of one evaluation (see `defectscan.evaluation.evaluator`)."""

    images: int
    threshold: float
    iou: dict[str, Num]
    dice: dict[str, Num]
    mean_iou: Num
    mean_dice: Num
    defect_iou: Num
    defect_dice: Num
    best_f1: dict[str, Num]
    best_f1_threshold: dict[str, Num]
    pixel_ap: dict[str, Num]
    pixel_auroc: dict[str, Num]
    macro_pixel_ap: Num
    defect_pixel_ap: Num
    defect_pixel_auroc: Num
    defect_best_f1: Num
    defect_best_f1_threshold: Num
    confusion: Confusion
    region: RegionMetrics
    area: Optional[AreaMetrics] = None  # absent in metrics.json files written before it existed
    region_per_class: Optional[dict[str, ClassRegions]] = None  # multi-class models: each class on its own
    image_level: ImageMetrics
    # per image group, when the scored images carry two groups or more (absent before groups were scored)
    groups: Optional[dict[str, GroupMetrics]] = None
    seconds: float
    cost: Optional[CostMetrics] = None


# name -> how to read it: the headline metrics that benchmark rows and comparisons show
HEADLINE = {
    "defect_iou": lambda m: m.defect_iou, "defect_dice": lambda m: m.defect_dice, "mean_iou": lambda m: m.mean_iou,
    "pixel_ap": lambda m: m.defect_pixel_ap, "pixel_auroc": lambda m: m.defect_pixel_auroc,
    "best_f1": lambda m: m.defect_best_f1, "region_recall": lambda m: m.region.recall,
    "fp_regions_per_mp": lambda m: m.region.fp_regions_per_megapixel, "pro": lambda m: m.region.pro,
    "predicted_area_ratio": lambda m: m.area.predicted_to_true if m.area else None,
    "fp_area_fraction": lambda m: m.area.false_positive_fraction if m.area else None,
    "image_auroc": lambda m: m.image_level.auroc, "image_ap": lambda m: m.image_level.ap,
    "image_f1": lambda m: m.image_level.f1,
    "mp_per_s": lambda m: m.cost.megapixels_per_second if m.cost else None,
    "latency_s": lambda m: m.cost.latency_mean_s if m.cost else None,
    "gflops_per_tile": lambda m: m.cost.gflops_per_tile if m.cost else None,
    "parameters": lambda m: m.cost.parameters if m.cost else None,
    "peak_rss_mb": lambda m: m.cost.peak_rss_mb if m.cost else None,
}
HEADLINE_METRICS = tuple(HEADLINE)


class EvalSummary(_Result):
    """metrics.json: what was evaluated, how, where, and the metrics."""

    schema_version: int = EVAL_SCHEMA_VERSION
    model: str
    checkpoint: str
    encoder: str
    arch: str
    data: str
    format: str
    split: str
    split_source: str
    sample: Optional[str] = None  # how a limit picked `images` from the split (first, random); None: no limit applied
    images: list[str]
    hardware: str
    versions: dict[str, str]
    created: str
    command: str
    options: EvalOptions
    trained_on_images: Optional[int] = None
    class_map: dict[str, str] = {}  # dataset class -> the model class it was scored as, where the names differ
    precision: Optional[str] = None  # what the forward passes computed in (float32, mixed bfloat16, ...)
    metrics: Metrics

    @field_validator("images")
    @classmethod
    def _plain_names(cls, images: list[str]) -> list[str]:
        """Image stems name files inside the evaluation directory (predictions/<stem>.png): never a path."""
        for stem in images:
            if not stem or stem in (".", "..") or "/" in stem or "\\" in stem:
                raise ValueError(f"image names must be plain file stems, got {stem!r}")
        return images

    def headline(self) -> dict[str, Any]:
        """The headline metrics by name (`HEADLINE_METRICS`), None where undefined."""
        return {name: get(self.metrics) for name, get in HEADLINE.items()}

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"

    @classmethod
    def read(cls, path: str | Path) -> "EvalSummary":
        """Parse a metrics.json; a malformed or foreign file is one clear error line."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DefectscanError(f"{path}: not a readable metrics.json ({type(exc).__name__})") from None
        if not isinstance(raw, dict):
            raise DefectscanError(f"{path}: not a defectscan metrics.json (expected an object)")
        version = raw.get("schema_version", 1)  # files written before versioning are version 1
        if not isinstance(version, int) or version > EVAL_SCHEMA_VERSION:
            raise DefectscanError(f"{path}: metrics.json schema version {version!r} is newer than this defectscan "
                                  f"reads ({EVAL_SCHEMA_VERSION})")
        try:
            return cls.model_validate({**raw, "schema_version": version})
        except ValidationError as exc:
            raise DefectscanError(f"{path}: " + describe_validation_error(exc, "metrics.json key")) from None


# ---- study files (configs/benchmark/*.yaml) ------------------------------------------------------------------
class PretrainSpec(_Options):
    """Self-supervised pretraining for a study row: a `defectscan pretrain` config (path relative to the study
    file) and overrides; the encoder, dataset and test split come from the row's training config."""

    config: str
    set: list[str] = []


class BackboneSpec(_Options):
    """One row of a study: a name, the training-config overrides that make it, and optionally the pretraining
    whose encoder every cell of the row starts from (run once, cached, its time counted in the row's cost)."""

    name: str = Field(min_length=1)
    set: list[str] = []
    pretrain: Optional[PretrainSpec] = None

    @field_validator("name")
    @classmethod
    def _usable_in_paths(cls, value: str) -> str:
        if "__" in value or "/" in value:  # part of cell directory names: <backbone>__n<labeled>__s<seed>
            raise ValueError(f"backbone name {value!r} may not contain '__' or '/'")
        return value


class StudyEvaluate(_Options):
    """How every cell is evaluated (the rest comes from the cell's training config)."""

    # unused: the labeled training images a cell's label budget left out; many more validation images than a
    # 20-label budget leaves, for choosing a small-data recipe without the test split
    split: Literal["test", "val", "train", "all", "unused"] = "test"
    limit: Optional[int] = Field(None, ge=1)
    # how `limit` picks its images: the first N by name, or N drawn at random with a fixed seed (a name-ordered
    # sample can hold one kind of image only where file names group by kind)
    sample: Literal["first", "random"] = "first"
    seam_images: int = Field(1, ge=0)
    examples: int = Field(3, ge=0)
    region_criterion: Literal["coverage", "iou"] = "coverage"
    region_threshold: float = Field(0.5, ge=0.0, le=1.0)
    pro_fpr_limit: float = Field(0.3, gt=0.0, le=1.0)
    tta: bool = False  # average over flips, as `evaluate --tta` (and `infer --tta`) would


class StudySpec(_Options):
    """A study file: backbones x labeled-image counts x seeds, one training config, one way to evaluate."""

    name: Optional[str] = None
    train_config: str
    set: list[str] = []
    backbones: list[BackboneSpec] = Field(min_length=1)
    labeled: list[Optional[int]] = Field(min_length=1)  # None = every training image ('all' in the file)
    seeds: list[int] = Field(min_length=1)
    metric: str = "defect_dice"
    evaluate: StudyEvaluate = StudyEvaluate()
    records: Optional[str] = None  # directory (relative to the study file) for one durable record per finished cell

    @field_validator("labeled", mode="before")
    @classmethod
    def _all_is_none(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        for n in value:
            if not (n is None or n == "all" or (isinstance(n, int) and not isinstance(n, bool) and n > 0)):
                raise ValueError(f"labeled counts must be positive integers or 'all', got {n!r}")
        return [None if n == "all" else n for n in value]

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError("seeds must be distinct integers")
        return value

    @field_validator("backbones")
    @classmethod
    def _unique_names(cls, value: list[BackboneSpec]) -> list[BackboneSpec]:
        if len({b.name for b in value}) != len(value):
            raise ValueError("backbone names must be unique")
        return value

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        if value not in HEADLINE:
            raise ValueError(f"unknown metric '{value}' (choose {', '.join(HEADLINE)})")
        return value

    @model_validator(mode="after")
    def _unused_needs_a_budget(self) -> "StudySpec":
        if self.evaluate.split == "unused" and None in self.labeled:
            raise ValueError("evaluate.split 'unused' scores the images a label budget left out: 'all' leaves none "
                             "(give labeled counts only)")
        return self
