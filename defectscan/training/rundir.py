"""A training run directory: the only code that knows its files, their formats and the resume state.

    config.yaml        the resolved configuration (defaults + file + overrides)
    splits.json        image stems per split (audit: test images never reach training)
    best.*, last.*     checkpoints as `infer` reads them (safetensors + JSON sidecar)
    last_state.pt      model + optimizer + progress, for --resume (tensors and plain data only: weights_only load)
    metrics.csv        one row per epoch; curves.png plots it
    validation_images.csv, validation_scores.npz
                       per epoch and validation image: pixel counts at the model threshold, score histograms
    test_metrics.json  the best checkpoint on the test split, when there is one
    train.log          the log
    evaluation/        `defectscan evaluate` output for the best checkpoint (default location)
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import yaml

from defectscan.errors import DefectscanError
from defectscan.evaluation import EVALUATION_DIR
from defectscan.io.files import atomic_path, csv_text, exclusive_lock, read_csv, remove_leftovers, write_text
from defectscan.metrics import ScoreHistogram
from defectscan.reporting import plots
from defectscan.training.config import Config, PretrainConfig, load_config, same_as_saved


class RunDir:
    CONFIG = "config.yaml"
    SPLITS = "splits.json"
    STATE = "last_state.pt"
    METRICS = "metrics.csv"
    VALIDATION_IMAGES = "validation_images.csv"
    VALIDATION_SCORES = "validation_scores.npz"
    CURVES = "curves.png"
    TEST_METRICS = "test_metrics.json"
    LOG = "train.log"
    LOCK = ".lock"  # held by the process training into this directory (see `locked`)

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ---- what a directory is ----------------------------------------------------------------------------------
    @classmethod
    def containing(cls, checkpoint: str | Path) -> "RunDir | None":
        """The run a checkpoint belongs to (its directory holds config.yaml and splits.json), else None."""
        run = cls(Path(checkpoint).parent)
        return run if run.is_run() and (run.path / cls.SPLITS).is_file() else None

    def is_run(self) -> bool:
        return (self.path / self.CONFIG).is_file()

    def is_empty(self) -> bool:
        return not self.path.exists() or not any(p.name != self.LOCK for p in self.path.iterdir())

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """This process alone trains into the directory (created if needed) inside the block; a second `train` or
        `--resume` into it is refused with one line. Temporary files of killed runs are removed first."""
        self.path.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(self.path / self.LOCK, "run directory"):
            remove_leftovers(self.path)
            yield

    def check_can_start(self, cfg: Config | PretrainConfig, resume: bool) -> None:
        """A new run needs an empty directory; a resumed one its config.yaml with the same settings (only
        training.epochs may change, to extend a run)."""
        if resume:
            if not self.is_run():
                raise DefectscanError(f"{self.path}: nothing to resume (no config.yaml; not a run directory)")
            if not self.same_config(cfg, ignore=("training.epochs",)):
                raise DefectscanError(f"{self.path}: the configuration differs from the run's config.yaml; resume "
                                      f"with the same settings (only training.epochs may change, to extend a run)")
        elif not self.is_empty():
            raise DefectscanError(f"{self.path}: run directory exists and is not empty; use --resume or another --out")

    def has_state(self) -> bool:
        return (self.path / self.STATE).is_file()

    def checkpoint(self, which: str = "best") -> Path:
        """Weights file of the 'best' or 'last' checkpoint (the sidecar sits beside it)."""
        return self.path / f"{which}.safetensors"

    def checkpoint_stem(self, which: str) -> Path:
        return self.path / which

    @property
    def evaluation_dir(self) -> Path:
        return self.path / EVALUATION_DIR

    # ---- configuration and splits -----------------------------------------------------------------------------
    def write_config(self, cfg: Config | PretrainConfig) -> None:
        write_text(self.path / self.CONFIG, yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    def read_config(self, overrides: Sequence[str] = (), schema: type = Config) -> Any:
        if not self.is_run():
            raise DefectscanError(f"{self.path}: not a run directory (no {self.CONFIG})")
        return load_config(self.path / self.CONFIG, list(overrides), schema=schema)

    def has_test_metrics(self) -> bool:
        return (self.path / self.TEST_METRICS).is_file()

    def same_config(self, cfg: Config | PretrainConfig, ignore: tuple[str, ...] = ()) -> bool:
        return same_as_saved(cfg, self.path / self.CONFIG, ignore=ignore)

    def write_splits(self, source: str, train: Sequence[str], unused: Sequence[str], val: Sequence[str],
                     test: Sequence[str]) -> None:
        write_text(self.path / self.SPLITS, json.dumps({"source": source, "train": list(train),
                                                        "train_unused": sorted(unused), "val": list(val),
                                                        "test": list(test)}, indent=1))

    def read_splits(self) -> dict[str, list[str]]:
        f = self.path / self.SPLITS
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DefectscanError(f"{f}: cannot read the run's splits ({type(exc).__name__})") from None
        if not isinstance(data, dict):
            raise DefectscanError(f"{f}: not a splits file")
        return data

    def split_source(self) -> tuple[dict[str, list[str]], Path]:
        """(stems per split, the file) as `evaluate` takes them."""
        return self.read_splits(), self.path / self.SPLITS

    def train_images(self) -> int:
        return len(self.read_splits().get("train", []))

    def labeled_images(self) -> int:
        """Labeled images the run used: trained on or validated with (its label budget)."""
        splits = self.read_splits()
        return len(splits.get("train", [])) + len(splits.get("val", []))

    # ---- resume state -----------------------------------------------------------------------------------------
    def save_state(self, model: torch.nn.Module, opt: torch.optim.Optimizer, progress: Mapping[str, Any],
                   averaged: torch.nn.Module | None = None) -> None:
        """What `--resume` continues from: the weights, the optimizer, the progress and (training.ema) the
        averaged weights."""
        payload = {"model": _cpu_state(model), "optimizer": opt.state_dict(), "progress": json.dumps(progress)}
        if averaged is not None:
            payload["averaged"] = _cpu_state(averaged)
        buf = io.BytesIO()
        torch.save(payload, buf)
        with atomic_path(self.path / self.STATE) as tmp:
            tmp.write_bytes(buf.getvalue())

    def load_state(self) -> dict:
        path = self.path / self.STATE
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            payload["progress"] = json.loads(payload["progress"])
        except Exception as exc:
            raise DefectscanError(f"{path}: cannot read training state ({type(exc).__name__})") from None
        return payload

    # ---- history and results ----------------------------------------------------------------------------------
    def write_history(self, history: list[dict], validation_images: list[dict] = ()) -> None:
        """metrics.csv (one row per epoch, the union of the rows' keys), curves.png and, with a validation split,
        validation_images.csv (one row per epoch and validation image: its pixel counts)."""
        if not history:
            return
        write_text(self.path / self.METRICS, csv_text(history))
        plots.write_png(plots.training_curves(history), self.path / self.CURVES)
        if validation_images:
            write_text(self.path / self.VALIDATION_IMAGES, csv_text(list(validation_images)))

    def read_history(self) -> list[dict[str, str]]:
        return read_csv(self.path / self.METRICS)

    def read_validation_images(self) -> list[dict[str, str]]:
        return read_csv(self.path / self.VALIDATION_IMAGES)

    def write_validation_scores(self, epoch: int, images: Sequence[str], hists: Sequence[ScoreHistogram]) -> None:
        """Add one epoch's per-image score histograms to validation_scores.npz (epochs from `epoch` on, left by
        an interrupted run, are replaced): what replays choosing an epoch *and* its threshold on a few validation
        images (scripts/epoch_selection.py)."""
        epochs, names, pos, neg = self.read_validation_scores()
        if list(names) != list(images):
            epochs, pos, neg = np.zeros(0, np.int64), None, None
        keep = epochs < epoch
        new_pos = np.stack([h.pos for h in hists])[None]
        new_neg = np.stack([h.neg for h in hists])[None]
        arrays = {"epochs": np.append(epochs[keep], epoch), "images": np.asarray(images, str),
                  "pos": new_pos if pos is None else np.concatenate([pos[keep], new_pos]),
                  "neg": new_neg if neg is None else np.concatenate([neg[keep], new_neg])}
        with atomic_path(self.path / self.VALIDATION_SCORES) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    def read_validation_scores(self) -> tuple[np.ndarray, list[str], np.ndarray | None, np.ndarray | None]:
        """(epochs, image names, pos[epoch, image, bin], neg[...]); empty when the run has none."""
        path = self.path / self.VALIDATION_SCORES
        if not path.exists():
            return np.zeros(0, np.int64), [], None, None
        try:
            with np.load(path) as z:
                return z["epochs"], [str(n) for n in z["images"]], z["pos"], z["neg"]
        except Exception as exc:
            raise DefectscanError(f"{path}: cannot read validation scores ({type(exc).__name__})") from None

    def seconds(self) -> float:
        """Training plus validation time over the recorded epochs."""
        return sum(float(h.get("train_seconds") or 0) + float(h.get("val_seconds") or 0) for h in self.read_history())

    def write_test_metrics(self, result: Mapping[str, Any]) -> None:
        write_text(self.path / self.TEST_METRICS, json.dumps(result, indent=2) + "\n")

    def open_log(self):
        self.path.mkdir(parents=True, exist_ok=True)
        return open(self.path / self.LOG, "a", encoding="utf-8")


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}
