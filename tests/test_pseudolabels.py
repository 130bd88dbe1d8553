"""Self-training: the uncertainty band, ignored pixels in the loss, mixed crop sources, `pseudolabel` -> `train`."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from _helpers import defect_image, folder_dataset, run_cli  # tests/ is on sys.path under pytest
from defectscan.data.dataset import IGNORE_INDEX
from defectscan.data.sampling import CropDataset, MixedCrops
from defectscan.errors import DefectscanError
from defectscan.io.images import write_image
from defectscan.training import load_config, train
from defectscan.training.config import LossTerm
from defectscan.training.losses import build_loss
from defectscan.training.pseudolabels import MANIFEST, uncertain_pixels

TINY = ["model.encoder=resnet10t", "model.tile=128", "model.overlap=32",
        "model.arch_kwargs={decoder_channels: [32, 16, 16, 8, 8]}", "sampling.crop=64", "sampling.batch_size=4",
        "sampling.steps_per_epoch=3", "training.epochs=1", "training.device=cpu", "validation.test=false"]


def test_uncertain_pixels_are_a_band_in_logits_around_the_threshold():
    score = np.arange(256, dtype=np.uint8)
    p = score / 255.0
    at_half = uncertain_pixels(score, 0.5, 2.0)
    logit = np.log(np.clip(p, 0.5 / 255, 1 - 0.5 / 255) / np.clip(1 - p, 0.5 / 255, 1))
    assert np.array_equal(at_half, np.abs(logit) < 2.0)
    assert at_half[128] and not at_half[0] and not at_half[255]  # 0.5 unsure; 0 and 1 sure
    # the same band means the same odds ratio around a high threshold: only near-certain pixels stay defects
    high = uncertain_pixels(score, 0.95, 2.0)
    assert high[int(0.95 * 255)] and not high[int(0.5 * 255)] and not high[255]
    assert not uncertain_pixels(score, 0.5, 0.0).any()


@pytest.mark.parametrize("head,outputs", [("sigmoid", 1), ("softmax", 3)])
def test_ignored_pixels_get_no_gradient_and_leave_overlap_losses_unchanged(head, outputs):
    torch.manual_seed(0)
    logits = torch.randn(2, outputs, 8, 8, requires_grad=True)
    target = torch.randint(0, outputs if head == "softmax" else 2, (2, 8, 8))
    partial = target.clone()
    partial[:, :4] = IGNORE_INDEX
    loss = build_loss([LossTerm(name="dice"), LossTerm(name="bce")], head, outputs)(logits, partial)
    loss.backward()
    assert logits.grad[:, :, :4].abs().max() == 0 and logits.grad[:, :, 4:].abs().max() > 0
    dice = build_loss([LossTerm(name="dice")], head, outputs)
    assert torch.isclose(dice(logits, partial), dice(logits[:, :, 4:], target[:, 4:]), atol=1e-5)


def _crops(value: int, seed: int) -> CropDataset:
    images = [np.full((80, 80, 3), value, np.uint8)]
    return CropDataset(images, [np.zeros((80, 80), np.uint8)], 2, 32, 0.0, seed)


def test_mixed_crops_draw_each_source_by_index_at_the_share():
    base, extra = _crops(10, 0), _crops(200, 1)
    assert all(torch.equal(MixedCrops(base, extra, 0.0, 5)[i][0], base[i][0]) for i in range(20))
    assert all(int(MixedCrops(base, extra, 1.0, 5)[i][0][0, 0, 0]) == 200 for i in range(20))
    mixed = MixedCrops(base, extra, 0.3, 5)
    picks = [int(mixed[i][0][0, 0, 0]) == 200 for i in range(400)]
    assert 0.22 < np.mean(picks) < 0.38
    assert picks == [int(MixedCrops(base, extra, 0.3, 5)[i][0][0, 0, 0]) == 200 for i in range(400)]  # by index
    with pytest.raises(DefectscanError, match="share"):
        MixedCrops(base, extra, 1.5, 0)


def _data(root: Path) -> Path:
    folder_dataset(root, 5, size=96, seed=3)
    for i in range(3):  # unlabeled: images without a mask file
        write_image(root / "images" / f"u{i}.png", defect_image(96, 40 + i)[0])
    return root


def test_pseudolabel_then_train_on_labeled_and_pseudo_labeled_crops(tmp_path, monkeypatch, capsys):
    data = _data(tmp_path / "data")
    train(load_config(None, TINY + [f"data.root={data}"]), tmp_path / "teacher", log=lambda m: None)
    teacher = tmp_path / "teacher" / "best.safetensors"
    code, out, err = run_cli(monkeypatch, capsys, "pseudolabel", data, "-m", teacher, "-o", tmp_path / "pl",
                             "--device", "cpu", "--band", "1.5")
    assert code == 0, err
    assert "3 of 3 unlabeled image(s)" in out
    manifest = json.loads((tmp_path / "pl" / MANIFEST).read_text())
    assert [r["stem"] for r in manifest["images"]] == ["u0", "u1", "u2"]
    assert manifest["band"] == 1.5 and manifest["classes"] == ["defect"]
    for row in manifest["images"]:
        mask = cv2.imread(str(tmp_path / "pl" / "masks" / f"{row['stem']}.png"), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (96, 96) and set(np.unique(mask)) <= {0, 1, IGNORE_INDEX}
        assert row["ignored_share"] == pytest.approx(float((mask == IGNORE_INDEX).mean()), abs=1e-6)

    lines: list[str] = []
    cfg = load_config(None, TINY + [f"data.root={data}", f"data.pseudo_labels={tmp_path / 'pl'}",
                                    "sampling.pseudo_share=0.5"])
    result = train(cfg, tmp_path / "student", log=lines.append)
    assert result.epochs_run == 1 and (tmp_path / "student" / "best.safetensors").is_file()
    assert any("self-training: 3 pseudo-labeled image(s)" in line and "50% of the crops" in line for line in lines)


def test_pseudo_labels_are_refused_when_they_cannot_be_trusted(tmp_path, monkeypatch, capsys):
    data = _data(tmp_path / "data")
    train(load_config(None, TINY + [f"data.root={data}"]), tmp_path / "teacher", log=lambda m: None)
    teacher = tmp_path / "teacher" / "best.safetensors"
    labeled_only = folder_dataset(tmp_path / "labeled", 3, size=96)
    code, _, err = run_cli(monkeypatch, capsys, "pseudolabel", labeled_only, "-m", teacher, "-o", tmp_path / "none",
                           "--device", "cpu")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and "no unlabeled images" in errors[0] and "Traceback" not in err
    assert "pseudo-labeling with" not in err  # no empty progress bar above the error
    assert not (tmp_path / "none").exists()

    code, _, err = run_cli(monkeypatch, capsys, "pseudolabel", data, "-m", teacher, "-o", tmp_path / "pl",
                           "--device", "cpu", "--limit", "2", "--sample", "random")
    assert code == 0, err
    assert "pseudo-labeling with" in err and "2/2" in err

    def refused(folder: Path, match: str) -> None:
        cfg = load_config(None, TINY + [f"data.root={data}", f"data.pseudo_labels={folder}"])
        with pytest.raises(DefectscanError, match=match):
            train(cfg, tmp_path / f"student-{folder.name}", log=lambda m: None)
        assert not (tmp_path / f"student-{folder.name}" / "best.safetensors").exists()

    refused(tmp_path / "nothing", "no pseudolabels.json")
    manifest = json.loads((tmp_path / "pl" / MANIFEST).read_text())
    stem = manifest["images"][0]["stem"]
    for name, change in [("labeled", lambda m: m["images"][0].update(stem="s00")),
                         ("classes", lambda m: m.update(classes=["scratch"])),
                         ("size", lambda m: m["images"][0].update(height=50))]:
        copy = tmp_path / f"bad-{name}"
        (copy / "masks").mkdir(parents=True)
        edited = json.loads(json.dumps(manifest))
        change(edited)
        (copy / MANIFEST).write_text(json.dumps(edited))
        for row in edited["images"]:
            src = tmp_path / "pl" / "masks" / f"{stem if row['stem'] == 's00' else row['stem']}.png"
            (copy / "masks" / f"{row['stem']}.png").write_bytes(src.read_bytes())
        refused(copy, {"labeled": "labeled, validation or test", "classes": "do not match",
                       "size": "missing or not 50x96"}[name])
