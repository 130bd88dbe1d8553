"""A study's durable record: one small JSON file per finished cell, kept where it survives the machine.

A cell's run directory (checkpoints, overlays) is large and lives on the machine that trained it; studies run
across sessions on machines that do not keep it. A study file with `records: DIR` (relative to the study file,
e.g. `results/<study>/` in the repository) gets, for every finished cell, `DIR/<cell>.json` holding what the
report needs and what proves the cell is the one the study asks for:

    {"cell": ..., "row": {result row}, "config": {resolved training config}, "evaluation": {split, options},
     "history": [per-epoch training and validation rows], "validation_images": [per epoch and validation image:
     its pixel counts], "hardware": ..., "versions": {...}, "recorded": ...}

A cell with a record is finished: it is not trained again on a machine without its run directory, and the report
is rebuilt from the records alone. A record made with other settings than the study now gives the cell is an
error, as for a finished cell directory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from defectscan.errors import DefectscanError
from defectscan.io.files import write_text
from defectscan.io.provenance import library_versions
from defectscan.schemas import SCORE_OPTIONS, EvalOptions
from defectscan.training.config import Config, drop_keys

RECORD_VERSION = 1
# Where a cell ran does not change what it measured: the device, the DataLoader workers (crops depend only on the
# seed and their index, data/sampling.py; "auto" picks by device), and where the dataset and the study's pretrained
# encoders were on that machine. The dataset is named by its directory's name, the encoder by its pretraining's
# config digest (its directory under the study).
MACHINE_KEYS = ("training.device", "sampling.workers")
# What a key absent from an older record meant (tta was not a study option then: its cells ran without; tile,
# overlap and threshold were not recorded: a study leaves them to the checkpoint, None)
EVAL_KEY_DEFAULTS = {"tta": False}


def record_path(records: Path, cell_name: str) -> Path:
    return records / f"{cell_name}.json"


def comparable_config(cfg: Config | dict, out: Path) -> dict[str, Any]:
    """The config as it decides a cell's result: machine-specific entries dropped, the study's pretrained encoder
    path made relative to the study directory. A stored dict goes through today's schema first, so a field added
    later (at its default) does not count as a change."""
    data = cfg if isinstance(cfg, dict) else cfg.to_dict()
    try:
        data = Config.model_validate(data).to_dict()
    except ValueError as exc:
        raise DefectscanError(f"the recorded training config is not valid today ({type(exc).__name__})") from None
    data = yaml.safe_load(yaml.safe_dump(data))  # plain types, as a saved config.yaml holds them
    drop_keys(data, MACHINE_KEYS)
    if data.get("data", {}).get("root"):
        data["data"]["root"] = Path(data["data"]["root"]).name
    weights = data.get("model", {}).get("encoder_weights")
    if weights:
        try:
            data["model"]["encoder_weights"] = Path(weights).resolve().relative_to(out.resolve()).as_posix()
        except ValueError:
            pass  # a named weight set (imagenet) or a file outside the study: kept as given
    return data


def write_record(path: Path, cell_name: str, row: dict, cfg: Config, opts: EvalOptions, split: str, out: Path,
                 history: list[dict], validation_images: list[dict], limit: int | None = None,
                 sample: str = "first") -> Path:
    """Write (atomically) the cell's record. The hardware is the row's (where the cell trained; None for a cell
    finished before rows named it); the library versions are those of the recording process, which is the training
    one unless the record was backfilled from an older cell directory."""
    record = {"version": RECORD_VERSION, "cell": cell_name, "row": row, "config": comparable_config(cfg, out),
              "evaluation": {"split": split, "limit": limit, **({"sample": sample} if limit else {}),
                             **{k: getattr(opts, k) for k in SCORE_OPTIONS}},
              "history": history, "validation_images": validation_images, "hardware": row.get("hardware"),
              "versions": library_versions(), "recorded": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_text(path, json.dumps(record, indent=1, default=str) + "\n")
    return path


def read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DefectscanError(f"{path}: cannot read the cell record ({type(exc).__name__}); delete it to recompute "
                              f"the cell") from None
    if not isinstance(record, dict) or not {"row", "config", "evaluation"} <= record.keys():
        raise DefectscanError(f"{path}: not a defectscan study cell record")
    return record


def same_subset(limit: int | None, sample: str, scored_sample: str | None, scored_images: int) -> bool:
    """Whether an evaluation that scored `scored_images` images, picked by `scored_sample` (None: made before the
    option, i.e. the first ones), is the subset that `limit` and `sample` ask for."""
    return limit is None or ((scored_sample or "first") == sample and scored_images <= limit)


def check_record(path: Path, record: dict, cfg: Config, opts: EvalOptions, split: str, out: Path,
                 limit: int | None = None, sample: str = "first") -> None:
    """A record stands for the cell only if it was made with this cell's settings (an older record without
    `limit` is held to it through the number of images it scored; one without `sample` took the first images)."""
    same_cfg = comparable_config(record["config"], out) == comparable_config(cfg, out)
    ev = record["evaluation"]
    same_eval = (ev.get("split") == split and ev.get("limit", limit) == limit
                 and all(ev.get(k, EVAL_KEY_DEFAULTS.get(k)) == getattr(opts, k) for k in SCORE_OPTIONS)
                 and same_subset(limit, sample, ev.get("sample"), record["row"].get("test_images", 0)))
    if not same_cfg or not same_eval:
        what = "training config" if not same_cfg else "evaluation"
        raise DefectscanError(f"{path}: recorded with another {what} than the study now gives this cell; point "
                              f"`records:` of the changed study at a new directory, or delete the record to "
                              f"recompute the cell")
