"""Training configuration: typed sections read from YAML, every field overridable with `--set section.key=value`.

Unknown keys and values of the wrong type are errors that name the key, so a typo never silently falls back to
a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from defectscan.errors import DefectscanError


@dataclass
class ModelConfig:
    arch: str = "unet"
    encoder: str = "resnet34"
    encoder_weights: Optional[str] = None  # none | imagenet | path to an encoder state dict
    head: str = "auto"  # auto: sigmoid for one defect class, softmax for several
    tile: int = 512  # inference/validation tile
    overlap: int = 64
    threshold: float = 0.5
    arch_kwargs: dict = field(default_factory=dict)  # decoder options, e.g. decoder_channels
    encoder_kwargs: dict = field(default_factory=dict)  # e.g. drop_path_rate (timm), drop_path / pcm_norm (ViTAE)


@dataclass
class DataConfig:
    root: Optional[str] = None
    format: str = "auto"
    classes: Optional[list] = None  # defect class names; default: from the data
    val_fraction: float = 0.15  # of the labeled training images, when the dataset has no val split of its own
    test_fraction: float = 0.2  # only when the dataset has no split of its own
    split_seed: int = 0
    labeled: Optional[int] = None  # train on the first N images of the nested labeled order
    labeled_fraction: Optional[float] = None
    subset_seed: int = 0


@dataclass
class SamplingConfig:
    crop: int = 256  # training crop side in px (a multiple of the model's stride)
    defect_share: float = 0.5  # share of crops centred on a defect pixel (class picked uniformly first)
    batch_size: int = 8
    steps_per_epoch: int = 100
    workers: int = 0  # DataLoader worker processes (0: crops are made in the main process)


@dataclass
class LossTerm:
    name: str = "dice"  # dice, bce, ce, focal, lovasz, tversky, jaccard
    weight: float = 1.0
    params: dict = field(default_factory=dict)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01  # cosine decays to lr * min_lr_ratio
    clip_grad: float = 1.0  # max gradient norm; 0 disables clipping


@dataclass
class TrainingConfig:
    epochs: int = 30
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"  # auto (CUDA only), off, bf16, fp16
    val_every: int = 1
    early_stop: int = 0  # stop after this many validations without improvement; 0: never
    select: str = "iou"  # validation metric that picks the best checkpoint: iou or dice (mean over defect classes)


@dataclass
class ValidationConfig:
    stitch: str = "center"
    batch_size: int = 4
    min_area: int = 4
    test: bool = True  # evaluate the best checkpoint on the test split at the end (benchmarks run `evaluate` instead)


DEFAULT_AUGMENT: list = [
    {"HorizontalFlip": {"p": 0.5}},
    {"VerticalFlip": {"p": 0.5}},
    {"RandomRotate90": {"p": 0.5}},
    {"RandomBrightnessContrast": {"brightness_limit": 0.15, "contrast_limit": 0.15, "p": 0.5}},
]


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    augment: list = field(default_factory=lambda: [dict(t) for t in DEFAULT_AUGMENT])  # albumentations, in order
    loss: list = field(default_factory=lambda: [LossTerm("dice"), LossTerm("bce")])
    optim: OptimConfig = field(default_factory=OptimConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """(accepted, converted value) for a YAML value against a field annotation."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        if value is None:
            return type(None) in typing.get_args(tp), None
        for arg in typing.get_args(tp):
            if arg is not type(None):
                ok, v = _type_ok(value, arg)
                if ok:
                    return True, v
        return False, value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is str:
        return isinstance(value, str), value
    if tp in (list, dict):
        return isinstance(value, tp), value
    return True, value


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise DefectscanError(f"config '{where}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise DefectscanError(f"unknown config key '{key}' (known{' in ' + where if where else ''}: {', '.join(sorted(known))})")
    obj = cls()
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            setattr(obj, name, _build(tp, value, key))
            continue
        if cls is Config and name == "loss":
            if not isinstance(value, list) or not value:
                raise DefectscanError("config 'loss' must be a non-empty list of {name, weight, params}")
            value = [_build(LossTerm, v if isinstance(v, dict) else {"name": v}, f"loss[{i}]") for i, v in enumerate(value)]
            setattr(obj, name, value)
            continue
        ok, converted = _type_ok(value, tp)
        if not ok:
            raise DefectscanError(f"config '{key}': expected {_type_name(tp)}, got {value!r}")
        setattr(obj, name, converted)
    return obj


def _type_name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args:
        return f"{' or '.join(a.__name__ for a in args)} or null"
    return getattr(tp, "__name__", str(tp))


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
        raise DefectscanError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise DefectscanError(f"{path}: a config is a mapping of sections")
    base = data.pop("base", None)
    if base is not None:
        data = _merge(_read_yaml(path.parent / str(base), seen + (path.resolve(),)), data)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file (and the files it names as `base`) <- `key=value` overrides, validated."""
    data = _read_yaml(Path(path)) if path is not None else {}
    for item in overrides:
        key, value = parse_override(item)
        _set_path(data, key, value)
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Value checks beyond types."""
    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise DefectscanError(f"config '{key}': {msg}")

    need(cfg.sampling.crop >= 32, "sampling.crop", "must be >= 32")
    need(0 <= cfg.sampling.defect_share <= 1, "sampling.defect_share", "must be in [0, 1]")
    need(cfg.sampling.batch_size >= 1, "sampling.batch_size", "must be >= 1")
    need(cfg.sampling.steps_per_epoch >= 1, "sampling.steps_per_epoch", "must be >= 1")
    need(cfg.sampling.workers >= 0, "sampling.workers", "must be >= 0")
    need(cfg.training.epochs >= 1, "training.epochs", "must be >= 1")
    need(cfg.training.val_every >= 1, "training.val_every", "must be >= 1")
    need(cfg.training.early_stop >= 0, "training.early_stop", "must be >= 0")
    need(cfg.training.select in ("iou", "dice"), "training.select", "must be iou or dice")
    need(cfg.optim.lr > 0, "optim.lr", "must be > 0")
    need(cfg.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    need(cfg.optim.warmup_epochs >= 0, "optim.warmup_epochs", "must be >= 0")
    need(0 <= cfg.optim.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
    need(cfg.optim.clip_grad >= 0, "optim.clip_grad", "must be >= 0")
    need(cfg.model.head in ("auto", "sigmoid", "softmax"), "model.head", "must be auto, sigmoid or softmax")
    need(0 <= cfg.model.threshold <= 1, "model.threshold", "must be in [0, 1]")
    need(cfg.validation.stitch in ("center", "gaussian"), "validation.stitch", "must be center or gaussian")
    need(cfg.data.labeled is None or cfg.data.labeled >= 1, "data.labeled", "must be >= 1")
    for i, t in enumerate(cfg.augment):
        need(isinstance(t, dict) and len(t) == 1, f"augment[{i}]", "each entry is {TransformName: {params}}")


def same_as_saved(cfg: Config, saved: str | Path, ignore: tuple[str, ...] = ()) -> bool:
    """Whether `cfg` equals the config.yaml a run saved, leaving out the `section.key` entries in `ignore`."""
    def plain(data: dict) -> dict:
        for key in ignore:
            section, name = key.split(".")
            data.get(section, {}).pop(name, None)
        return data

    current = yaml.safe_load(yaml.safe_dump(cfg.to_dict()))  # through YAML, as the trainer saved it
    return plain(yaml.safe_load(Path(saved).read_text()) or {}) == plain(current)
