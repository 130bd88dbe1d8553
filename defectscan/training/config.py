"""Training configuration: typed sections (pydantic) read from YAML, every field overridable with
`--set section.key=value`.

Unknown keys and values of the wrong type or range are errors that name the key and the value, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from defectscan.errors import DefectscanError, one_line
from defectscan.metrics import STABLE_F1_TOLERANCE
from defectscan.schemas import Amp, describe_validation_error, error_key


# A path stored absolute (against the working directory when the config is read): a saved run resumes and evaluates
# from any working directory.
AbsolutePath = Annotated[str, AfterValidator(lambda p: os.path.abspath(Path(p).expanduser()) if p else p)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    arch: str = "unet"
    encoder: str = "resnet34"
    encoder_weights: Optional[str] = None  # none | imagenet | path to an encoder state dict
    # fine-tuning: start from every weight of this defectscan checkpoint (same arch, encoder, classes, decoder)
    init_checkpoint: Optional[AbsolutePath] = None
    head: Literal["auto", "sigmoid", "softmax"] = "auto"  # auto: sigmoid for one defect class, softmax for several
    tile: int = Field(512, ge=32)  # inference/validation tile
    overlap: int = Field(64, ge=0)
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    arch_kwargs: dict = Field(default_factory=dict)  # decoder options, e.g. decoder_channels
    encoder_kwargs: dict = Field(default_factory=dict)  # e.g. drop_path_rate (timm), drop_path / pcm_norm (ViTAE)

    @field_validator("overlap")
    @classmethod
    def _overlap_fits(cls, overlap: int, info: ValidationInfo) -> int:
        tile = info.data.get("tile")
        if tile is not None and overlap >= tile:  # caught now, not after the first epoch's validation
            raise ValueError(f"must be smaller than model.tile ({tile})")
        return overlap


class DataConfig(_Section):
    root: Optional[AbsolutePath] = None
    format: Literal["auto", "folder", "labelme", "coco", "mvtec"] = "auto"
    classes: Optional[list[str]] = None  # defect class names; default: from the data
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)  # of the labeled training images, without a val split of its own
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0)  # only when the dataset has no split of its own
    split_seed: int = 0
    # a label budget: the first N images of the nested labeled order, validation included (val_fraction of N)
    labeled: Optional[int] = Field(None, ge=1)
    labeled_fraction: Optional[float] = Field(None, gt=0.0, le=1.0)
    subset_seed: int = 0
    # where decoded training images live: memory, or memory-mapped files in the decode cache (data/cache.py);
    # auto: on disk when they would take over half of the available memory
    cache: Literal["auto", "memory", "disk"] = "auto"
    # self-training: a folder from `defectscan pseudolabel` (a teacher's masks for unlabeled images of this dataset);
    # its crops are mixed with the labeled ones at sampling.pseudo_share
    pseudo_labels: Optional[AbsolutePath] = None


class SamplingConfig(_Section):
    crop: int = Field(256, ge=32)  # training crop side in px (a multiple of the model's stride)
    # share of crops centred on a defect pixel (class picked first); auto: 0.5 * sqrt(share of training images with
    # a defect), so rare defective images are oversampled without teaching that defects are everywhere
    defect_share: Union[float, Literal["auto"]] = "auto"
    # zoom range of the training crops (data/sampling.py): [0.5, 2.0] shows each crop between half and twice its
    # pixel size, for images whose defects appear at more than one scale (two cameras, two magnifications)
    scale: list[float] = Field(default_factory=lambda: [1.0, 1.0])
    # reweight images by their group (Sample.group: camera, product type): a group of n images gets crops in
    # proportion to n^(1 - balance_groups); 0: every image alike, 1: every group alike (data/sampling.py)
    balance_groups: float = Field(0.0, ge=0.0, le=1.0)
    batch_size: int = Field(8, ge=1)
    steps_per_epoch: int = Field(100, ge=1)
    # with data.pseudo_labels: the share of crops cut from pseudo-labeled images (the rest from labeled ones)
    pseudo_share: float = Field(0.5, ge=0.0, le=1.0)
    # DataLoader worker processes (0: crops are made in the main process); auto: none on a CPU, up to 4 per process
    # on a GPU (`training.loop.loader_workers`)
    workers: Union[Annotated[int, Field(ge=0)], Literal["auto"]] = "auto"

    @field_validator("defect_share", mode="before")
    @classmethod
    def _share_or_auto(cls, value: Any) -> Any:
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"a share from 0 to 1, or auto (got {value!r})")
        return float(value)

    @field_validator("scale")
    @classmethod
    def _zoom_range(cls, value: list[float]) -> list[float]:
        if len(value) != 2 or not 0 < value[0] <= value[1] or value[1] > 8 or value[0] < 1 / 8:
            raise ValueError(f"two zoom factors [lo, hi] with 1/8 <= lo <= hi <= 8 (got {value})")
        return value


class LossTerm(_Section):
    name: str = "dice"  # dice, bce, ce, focal, lovasz, tversky, jaccard
    weight: float = 1.0
    params: dict = Field(default_factory=dict)


class OptimConfig(_Section):
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    warmup_epochs: float = Field(1.0, ge=0.0)
    min_lr_ratio: float = Field(0.01, ge=0.0, le=1.0)  # cosine decays to lr * min_lr_ratio
    clip_grad: float = Field(1.0, ge=0.0)  # max gradient norm; 0 disables clipping
    # fine-tuning a pretrained encoder (training/optim.py): its rate is lr * encoder_lr_scale, lowered further by
    # layer_decay per block group towards the input (1.0: off)
    encoder_lr_scale: float = Field(1.0, gt=0.0, le=10.0)
    layer_decay: float = Field(1.0, gt=0.0, le=1.0)


class TrainingConfig(_Section):
    epochs: int = Field(30, ge=1)
    seed: int = 0
    device: str = "auto"
    amp: Amp = "auto"  # auto (mixed precision on CUDA only), off, bf16, fp16
    val_every: int = Field(1, ge=1)
    early_stop: int = Field(0, ge=0)  # stop after this many validations without improvement; 0: never
    select: Literal["iou", "dice"] = "iou"  # validation metric that picks the best checkpoint (mean over classes)
    # which epoch becomes the `best` checkpoint: the best validation score, the last epoch, or auto: the best only
    # with at least training.loop.PICK_MIN_IMAGES validation images (fewer pick noise; scripts/epoch_selection.py)
    pick_epoch: Literal["auto", "best", "last"] = "auto"
    # exponential moving average of the weights (training/optim.weight_average): the cap of its decay, 0: off.
    # Validation, the best/last checkpoints and the test score use the averaged weights
    ema: float = Field(0.0, ge=0.0, lt=1.0)
    half_checkpoints: bool = False  # store best/last weights in float16 (half the size; loaded back as float32)
    log_every: int = Field(25, ge=0)  # a train.log line every N steps (loss, lr, steps/s, ETA); 0: per epoch only


class ValidationConfig(_Section):
    stitch: Literal["center", "gaussian"] = "center"
    batch_size: int = Field(4, ge=1)
    min_area: int = Field(4, ge=0)
    test: bool = True  # evaluate the best checkpoint on the test split at the end (benchmarks run `evaluate` instead)
    # the decision threshold stored in the checkpoint: chosen on the validation split after training (stable_f1:
    # best pixel F1 with the one-standard-error rule towards model.threshold, see metrics.choose_threshold;
    # best_f1: the raw argmax; or the loosest threshold reaching a target precision / the strictest reaching a
    # target recall), or `fixed` (model.threshold). Without a validation split model.threshold is kept, with a note.
    threshold: Literal["fixed", "stable_f1", "best_f1", "precision", "recall"] = "stable_f1"
    threshold_target: Optional[float] = Field(None, gt=0.0, le=1.0)  # for precision / recall
    threshold_tolerance: float = Field(STABLE_F1_TOLERANCE, ge=0.0)  # stable_f1: standard errors (0: best F1)

    @model_validator(mode="after")
    def _target_for_rule(self) -> "ValidationConfig":
        if self.threshold in ("precision", "recall") and self.threshold_target is None:
            raise ValueError(f"threshold '{self.threshold}' needs threshold_target in (0, 1], e.g. 0.9")
        return self


DEFAULT_AUGMENT: list = [
    {"HorizontalFlip": {"p": 0.5}},
    {"VerticalFlip": {"p": 0.5}},
    {"RandomRotate90": {"p": 0.5}},
    {"RandomBrightnessContrast": {"brightness_limit": 0.15, "contrast_limit": 0.15, "p": 0.5}},
]


class Config(_Section):
    """A training configuration (pydantic): every section typed and range-checked."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    augment: list[dict] = Field(default_factory=lambda: [dict(t) for t in DEFAULT_AUGMENT])  # albumentations, in order
    loss: list[LossTerm] = Field(default_factory=lambda: [LossTerm(name="dice"), LossTerm(name="bce")], min_length=1)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)

    @field_validator("loss", mode="before")
    @classmethod
    def _loss_names(cls, value: Any) -> Any:
        """`loss: [dice, bce]` is short for `[{name: dice}, {name: bce}]`."""
        return [{"name": v} if isinstance(v, str) else v for v in value] if isinstance(value, list) else value

    @field_validator("augment")
    @classmethod
    def _one_transform_each(cls, value: list[dict]) -> list[dict]:
        for t in value:
            if len(t) != 1:
                raise ValueError("each entry is {TransformName: {params}}")
        return value

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="python")


class PretrainModelConfig(_Section):
    encoder: str = "resnet34"
    arch: str = "unet"  # the decoder that reconstructs the masked pixels during pretraining (then discarded)
    init_weights: Optional[str] = None  # start from: none, imagenet, or an encoder weights file
    encoder_kwargs: dict = Field(default_factory=dict)


class PretrainDataConfig(_Section):
    root: Optional[AbsolutePath] = None
    # auto: a dataset layout when there is one, else every image under the folder (`images`)
    format: Literal["auto", "folder", "labelme", "coco", "mvtec", "images"] = "auto"
    cache: Literal["auto", "memory", "disk"] = "auto"
    # leave out the images `train` would test on (the dataset's own test split, else the seeded one that
    # test_fraction and split_seed give, as in `train`): a test image seen in pretraining is no longer unseen
    exclude_test: bool = True
    test_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    split_seed: int = 0


class PretrainSamplingConfig(_Section):
    crop: int = Field(192, ge=32)  # a multiple of the mask patch and of the encoder's stride
    batch_size: int = Field(8, ge=1)
    steps_per_epoch: int = Field(50, ge=1)


class MaskConfig(_Section):
    patch: int = Field(32, ge=4)  # side of the square patches hidden from the encoder (SimMIM: 32)
    ratio: float = Field(0.6, gt=0.0, lt=1.0)  # share of patches hidden


class PretrainRunConfig(_Section):
    epochs: int = Field(10, ge=1)
    seed: int = 0
    device: str = "auto"
    amp: Amp = "auto"
    log_every: int = Field(25, ge=0)


class PretrainConfig(_Section):
    """Self-supervised pretraining (masked image modelling, `training.pretrain`)."""

    model: PretrainModelConfig = Field(default_factory=PretrainModelConfig)
    data: PretrainDataConfig = Field(default_factory=PretrainDataConfig)
    sampling: PretrainSamplingConfig = Field(default_factory=PretrainSamplingConfig)
    mask: MaskConfig = Field(default_factory=MaskConfig)
    optim: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=1.5e-3, weight_decay=0.05))
    training: PretrainRunConfig = Field(default_factory=PretrainRunConfig)

    @model_validator(mode="after")
    def _crop_fits_patches(self) -> "PretrainConfig":
        if self.sampling.crop % self.mask.patch:
            raise ValueError(f"sampling.crop ({self.sampling.crop}) must be a multiple of mask.patch "
                             f"({self.mask.patch})")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="python")


def _config_error(exc: ValidationError, schema: type[BaseModel] = None) -> DefectscanError:
    """The first problem as one line naming the key and the value; an unknown key lists the known ones."""
    err = exc.errors()[0]
    if err["type"] != "extra_forbidden":
        return DefectscanError(describe_validation_error(exc, "config"))
    loc = err["loc"]
    section: Any = schema or Config
    for part in loc[:-1]:
        field = section.model_fields.get(part) if isinstance(part, str) else None
        section = field.annotation if field is not None and isinstance(field.annotation, type) else LossTerm
    where = error_key(loc[:-1])
    return DefectscanError(f"unknown config key '{error_key(loc)}' "
                           f"(known{' in ' + where if where else ''}: {', '.join(sorted(section.model_fields))})")


def _set_path(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part, {}), dict):
            raise DefectscanError(f"--set {dotted}: '{part}' is not a section")
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """'training.epochs=30' -> ('training.epochs', 30); values are YAML (numbers, null, lists, ...)."""
    if "=" not in item:
        raise DefectscanError(f"--set expects key=value, got '{item}'")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise DefectscanError(f"--set {key}: cannot parse value '{raw}'") from None
    return key.strip(), value


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A config file; `base: other.yaml` (relative to the file) is read first and overridden section by section."""
    if not path.is_file():
        raise DefectscanError(f"{path}: config file not found")
    if path.resolve() in seen:
        raise DefectscanError(f"{path}: 'base' chain loops back to itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DefectscanError(f"{path}: invalid YAML ({one_line(exc)})") from None
    if not isinstance(data, dict):
        raise DefectscanError(f"{path}: a config is a mapping of sections")
    base = data.pop("base", None)
    if base is not None:
        data = _merge(_read_yaml(path.parent / str(base), seen + (path.resolve(),)), data)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *,
                schema: type[BaseModel] = Config) -> Any:
    """Defaults <- YAML file (and the files it names as `base`) <- `key=value` overrides, validated as `schema`
    (a training `Config`, or a `PretrainConfig`)."""
    data = _read_yaml(Path(path)) if path is not None else {}
    for item in overrides:
        key, value = parse_override(item)
        _set_path(data, key, value)
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise _config_error(exc, schema) from None


def drop_keys(data: dict, keys: tuple[str, ...]) -> dict:
    """`data` (a config as plain dicts) without its `section.key` entries in `keys`; changed in place."""
    for key in keys:
        section, name = key.split(".")
        data.get(section, {}).pop(name, None)
    return data


def same_as_saved(cfg: BaseModel, saved: str | Path, ignore: tuple[str, ...] = ()) -> bool:
    """Whether `cfg` equals the config.yaml a run saved, leaving out the `section.key` entries in `ignore`."""
    current = yaml.safe_load(yaml.safe_dump(cfg.to_dict()))  # through YAML, as the trainer saved it
    # the saved file goes through the same defaults, so a field added later (at its default) does not count
    before = yaml.safe_load(yaml.safe_dump(load_config(saved, schema=type(cfg)).to_dict()))
    return drop_keys(before, ignore) == drop_keys(current, ignore)
