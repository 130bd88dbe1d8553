"""Self-supervised pretraining: masked crops, the loss falls, resume reproduces, weights load in training, errors."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from _helpers import folder_dataset, run_cli  # tests/ is on sys.path under pytest
from defectscan.errors import DefectscanError
from defectscan.models import ModelSpec, build_model
from defectscan.training import RunDir, load_config
from defectscan.training.config import PretrainConfig
from defectscan.training.pretrain import MaskedCrops, pretrain

TINY = ["model.encoder=resnet10t", "sampling.crop=64", "sampling.batch_size=4", "sampling.steps_per_epoch=3",
        "training.epochs=2", "training.device=cpu", "mask.patch=16"]


def _data(root: Path) -> Path:
    folder_dataset(root, 3, size=96, seed=1)
    for i in range(2):  # unlabeled images take part too
        texture = cv2.GaussianBlur(np.random.default_rng(i).normal(128, 40, (96, 96, 3)), (0, 0), 2)
        cv2.imwrite(str(root / "images" / f"u{i}.png"), texture.clip(0, 255).astype(np.uint8))
    return root


def _cfg(data: Path, *extra: str) -> PretrainConfig:
    return load_config(None, [*TINY, f"data.root={data}", *extra], schema=PretrainConfig)


def test_masked_crops_are_deterministic_and_hide_the_ratio():
    images = [np.random.default_rng(k).integers(0, 255, (80 + 10 * k, 100, 3), dtype=np.uint8) for k in range(3)]
    crops = MaskedCrops(images, crop=64, patch=16, ratio=0.6, seed=3)
    x, hidden = crops[7]
    assert x.shape == (3, 64, 64) and x.dtype == torch.uint8 and hidden.shape == (4, 4)
    assert int(hidden.sum()) == round(0.6 * 16)
    x2, hidden2 = MaskedCrops(images, crop=64, patch=16, ratio=0.6, seed=3)[7]
    assert torch.equal(x, x2) and torch.equal(hidden, hidden2)
    assert not torch.equal(crops[8][0], x)
    with pytest.raises(DefectscanError, match="smaller than the crop"):
        MaskedCrops(images, crop=96, patch=16, ratio=0.6, seed=0)


def test_pretraining_learns_writes_encoder_weights_that_training_loads(tmp_path):
    data = _data(tmp_path / "data")
    result = pretrain(_cfg(data, "training.epochs=4"), tmp_path / "run", log=lambda m: None)
    run = tmp_path / "run"
    history = [float(r["train_loss"]) for r in RunDir(run).read_history()]
    assert len(history) == 4 and history[-1] < history[0]  # the masked-pixel loss falls
    assert (run / "curves.png").is_file() and (run / "config.yaml").is_file()
    picture = cv2.imread(str(run / "reconstructions.png"))
    assert picture.shape == (4 * 64 + 3 * 4, 4 * 64 + 3 * 4, 3)  # 4 crops x (crop, seen, output, pasted)
    meta = json.loads((run / "encoder.json").read_text())
    assert meta["encoder"] == "resnet10t" and meta["steps"] == 12
    # every image but the one a training run would test on (3 labeled, test_fraction 0.2 -> 1 test image)
    assert meta["images"] == 4 and meta["labeled"] == 2 and meta["test_images_left_out"] == 1
    weights = load_file(str(result.encoder_weights))
    model = build_model(ModelSpec(arch="fpn", encoder="resnet10t", classes=("d",)), encoder_weights=result.encoder_weights)
    for k, v in weights.items():
        assert torch.equal(model.encoder.state_dict()[k], v), k
    # a training config takes it as model.encoder_weights
    from defectscan.training import train

    cfg = load_config(None, ["model.encoder=resnet10t", "model.tile=64", "model.overlap=16", "sampling.crop=64",
                             "sampling.batch_size=2", "sampling.steps_per_epoch=1", "training.epochs=1",
                             "training.device=cpu", f"data.root={data}", "data.val_fraction=0",
                             "data.test_fraction=0", f"model.encoder_weights={result.encoder_weights}"])
    train(cfg, tmp_path / "ft", log=lambda m: None)


def test_interrupted_pretraining_resumes_to_the_same_weights(tmp_path, monkeypatch):
    data = _data(tmp_path / "data")
    whole = pretrain(_cfg(data), tmp_path / "whole", log=lambda m: None)
    original = RunDir.write_history

    def stop_after_first_epoch(self, history):  # a kill after epoch 1's state was saved
        original(self, history)
        raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "write_history", stop_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        pretrain(_cfg(data), tmp_path / "cut", log=lambda m: None)
    monkeypatch.setattr(RunDir, "write_history", original)
    assert not (tmp_path / "cut" / "encoder.safetensors").exists()  # nothing half-written
    resumed = pretrain(_cfg(data), tmp_path / "cut", resume=True, log=lambda m: None)
    a, b = load_file(str(whole.encoder_weights)), load_file(str(resumed.encoder_weights))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(DefectscanError, match="configuration differs"):
        pretrain(_cfg(data, "mask.ratio=0.5"), tmp_path / "cut", resume=True, log=lambda m: None)


def test_vit_pretrains_through_the_same_objective(tmp_path):
    data = _data(tmp_path / "data")
    result = pretrain(_cfg(data, "model.encoder=vit_s", "training.epochs=1", "sampling.steps_per_epoch=1",
                           "sampling.batch_size=2", "data.exclude_test=false"), tmp_path / "vit", log=lambda m: None)
    assert any(k.startswith("vit.blocks.") for k in load_file(str(result.encoder_weights)))
    assert json.loads((tmp_path / "vit" / "encoder.json").read_text())["images"] == 5  # the test image too


def test_pretrain_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    data = _data(tmp_path / "data")
    (tmp_path / "empty").mkdir()
    cases = [
        ([str(tmp_path / "empty"), "-e", "resnet10t"], "no images found"),
        ([str(data), "-e", "resnet_nope"], "unknown encoder"),
        ([str(data), "-e", "resnet10t", "--set", "sampling.crop=128"], "smaller than the crop"),
        ([str(data), "-e", "resnet10t", "--set", "mask.patch=50"], "multiple of mask.patch"),
        ([], "give the dataset"),
    ]
    for args, expected in cases:
        code, _, err = run_cli(monkeypatch, capsys, "pretrain", *args, "-o", tmp_path / "o", "--set", "training.device=cpu")
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert code == 1 and len(lines) == 1 and expected in lines[0] and "Traceback" not in err, (args, err)
        assert not (tmp_path / "o" / "encoder.safetensors").exists()
    # a folder of images in no annotated layout is a set of unlabeled images
    code, out, err = run_cli(monkeypatch, capsys, "pretrain", str(data / "images"), "-e", "resnet10t", "-o",
                             tmp_path / "bare", *[a for kv in TINY[1:] for a in ("--set", kv)], "--epochs", "1")
    assert code == 0 and "5 images" in err and (tmp_path / "bare" / "encoder.safetensors").is_file(), err


@pytest.mark.parametrize("preset", sorted((Path(__file__).resolve().parents[1] / "configs" / "pretrain").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_pretrain_presets_are_valid(preset):
    assert load_config(preset, schema=PretrainConfig).sampling.crop % 32 == 0
