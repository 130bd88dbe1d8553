"""Training: config validation, crop sampling, losses, overfitting one image, resume after a kill, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from defectscan.data import load_dataset
from defectscan.errors import DefectscanError
from defectscan.evaluation import evaluate
from defectscan.inference import Predictor
from defectscan.schemas import EvalOptions, InferOptions
from defectscan.io.images import write_image
from defectscan.metrics import read_validation_scores
from defectscan.models import ModelSpec, build_model, load_checkpoint, read_sidecar
from defectscan.training import RunDir, load_config, train
from defectscan.training.losses import build_loss
from defectscan.training.config import LossTerm
from defectscan.data.sampling import CropDataset, build_augment, group_shares, group_weights
from defectscan.training.optim import block_key, lr_at, param_groups, set_lr, weight_average

from _helpers import defect_image, folder_dataset, load_script  # noqa: E402 - tests/ is on sys.path under pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = [  # a small, fast network and short epochs
    "model.encoder=resnet10t", "model.tile=128", "model.overlap=32", "model.arch_kwargs={decoder_channels: [32, 16, 16, 8, 8]}",
    "sampling.crop=64", "sampling.batch_size=4", "sampling.steps_per_epoch=3", "training.epochs=3",
    "training.device=cpu", "augment=[{HorizontalFlip: {p: 0.5}}, {RandomRotate90: {p: 0.5}}]",
]


# --- config -------------------------------------------------------------------------------------------------------

def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(DefectscanError, match="unknown config key 'training.epoch'"):
        load_config(None, ["training.epoch=3"])
    with pytest.raises(DefectscanError, match="unknown config key 'trainin'"):
        load_config(None, ["trainin.epochs=3"])
    with pytest.raises(DefectscanError, match=r"'training.epochs': .*valid integer.*\(got 'many'\)"):
        load_config(None, ["training.epochs=many"])
    with pytest.raises(DefectscanError, match=r"'sampling.defect_share': a share from 0 to 1, or auto \(got 1.5\)"):
        load_config(None, ["sampling.defect_share=1.5"])
    with pytest.raises(DefectscanError, match=r"'model.overlap': must be smaller than model.tile \(512\)"):
        load_config(None, ["model.overlap=512"])  # refused before any training, not after the first epoch
    with pytest.raises(DefectscanError, match="loss\\[0\\]"):
        load_config(None, ["loss=[{name: dice, wieght: 1}]"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [1\n")
    with pytest.raises(DefectscanError, match="invalid YAML"):
        load_config(bad)
    cfg = load_config(None, ["optim.lr=3e-4", "data.classes=[a, b]", "training.epochs=7"])
    assert cfg.optim.lr == 3e-4 and cfg.data.classes == ["a", "b"] and cfg.training.epochs == 7
    assert load_config(None, ["training.amp=off"]).training.amp == "off"  # YAML's bare `off` is the boolean false


def test_config_base_inheritance(tmp_path):
    (tmp_path / "base.yaml").write_text("optim:\n  lr: 0.01\n  weight_decay: 0.5\ntraining:\n  epochs: 4\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\noptim:\n  lr: 0.002\n")
    cfg = load_config(tmp_path / "child.yaml", ["training.seed=3"])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.training.epochs, cfg.training.seed) == (0.002, 0.5, 4, 3)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(DefectscanError, match="loops back"):
        load_config(tmp_path / "loop.yaml")


@pytest.mark.parametrize("preset", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_presets_are_valid(preset):
    cfg = load_config(preset)
    build_augment(cfg.augment)


def test_bad_augment_and_loss_are_clear_errors():
    with pytest.raises(DefectscanError, match="no transform 'Flipp'"):
        build_augment([{"Flipp": {}}])
    with pytest.raises(DefectscanError, match="augment\\[0\\]"):
        build_augment([{"HorizontalFlip": {"p": 7}}])
    with pytest.raises(DefectscanError, match="unknown loss"):
        build_loss([LossTerm(name="hinge")], "sigmoid", 1)


def test_lr_schedule_warms_up_then_decays():
    lrs = [lr_at(s, 100, 10, 1.0, 0.01) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(0.01, abs=1e-3)


# --- sampling and losses ------------------------------------------------------------------------------------------

def test_crops_are_deterministic_and_oversample_defects():
    image, mask = defect_image(256, 3)
    m = (mask > 0).astype(np.uint8)
    ds = CropDataset([image], [m], 2, crop=32, defect_share=1.0, seed=5)
    a, b = ds[17], ds[17]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[0].shape == (3, 32, 32)
    hit = np.mean([ds[i][1].any().item() for i in range(100)])
    ds0 = CropDataset([image], [m], 2, crop=32, defect_share=0.0, seed=5)
    base = np.mean([ds0[i][1].any().item() for i in range(100)])
    assert hit == 1.0 and base < 0.8
    small = CropDataset([image[:20, :24]], [m[:20, :24]], 2, crop=32, defect_share=0.5, seed=0)
    assert small[0][0].shape == (3, 32, 32)  # images smaller than the crop are mirrored out


def test_zoomed_crops_show_defects_at_other_pixel_sizes():
    image = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    m = np.zeros((256, 256), np.uint8)
    m[124:132, 124:132] = 1  # one 8x8 defect, far from the borders
    plain = CropDataset([image], [m], 2, crop=32, defect_share=1.0, seed=5)
    same = CropDataset([image], [m], 2, crop=32, defect_share=1.0, seed=5, scale=(1.0, 1.0))
    assert all(torch.equal(plain[i][0], same[i][0]) for i in range(5))  # (1, 1) draws nothing: the old crops
    assert {int(plain[i][1].sum()) for i in range(20)} == {64}
    half = CropDataset([image], [m], 2, crop=32, defect_share=1.0, seed=5, scale=(0.5, 0.5))
    assert {tuple(half[i][0].shape) for i in range(20)} == {(3, 32, 32)}
    assert {int(half[i][1].sum()) for i in range(20)} == {16}  # a 64 px window shrunk to 32: the defect is 4x4
    ranged = CropDataset([image], [m], 2, crop=32, defect_share=1.0, seed=5, scale=(0.5, 2.0))
    sizes = [int(ranged[i][1].sum()) for i in range(40)]
    assert min(sizes) < 40 and max(sizes) > 100 and set(np.unique(ranged[0][1].numpy())) <= {0, 1}
    strip = CropDataset([image[:40]], [m[:40]], 2, crop=32, defect_share=0.0, seed=0, scale=(0.25, 0.25))
    assert strip[0][0].shape == (3, 32, 32)  # the window stops at the image's shorter side
    assert load_config(None, ["sampling.scale=[0.5, 2.0]"]).sampling.scale == [0.5, 2.0]
    for bad in ("[2.0, 1.0]", "[0.5]", "[0.0, 1.0]"):
        with pytest.raises(DefectscanError, match="sampling.scale"):
            load_config(None, [f"sampling.scale={bad}"])


def test_balance_groups_gives_a_small_group_its_share_of_crops():
    """Three images of group a, one of b, each with one defect: the image a crop is cut from follows the group
    weights for defect-centred and background crops alike; balance 0 keeps the unweighted crops exactly."""
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    m = np.zeros((64, 64), np.uint8)
    m[30:34, 30:34] = 1
    groups = ["a", "a", "a", "b"]

    def share_of_b(balance: float, defect_share: float) -> float:
        ds = CropDataset([image] * 4, [m] * 4, 2, crop=32, defect_share=defect_share, seed=3,
                         groups=groups, balance_groups=balance)
        return float(np.mean([ds._window(np.random.default_rng([3, i]))[0] == 3 for i in range(2000)]))

    for defect_share in (1.0, 0.0):
        assert abs(share_of_b(0.0, defect_share) - 0.25) < 0.04
        assert abs(share_of_b(1.0, defect_share) - 0.5) < 0.04
        assert abs(share_of_b(0.5, defect_share) - 1 / (1 + 3**0.5)) < 0.04  # sqrt(1) : sqrt(3)
    plain = CropDataset([image] * 4, [m] * 4, 2, crop=32, defect_share=0.5, seed=3)
    off = CropDataset([image] * 4, [m] * 4, 2, crop=32, defect_share=0.5, seed=3, groups=groups, balance_groups=0.0)
    one = CropDataset([image] * 4, [m] * 4, 2, crop=32, defect_share=0.5, seed=3, groups=["a"] * 4,
                      balance_groups=1.0)
    assert all(torch.equal(plain[i][1], off[i][1]) and torch.equal(plain[i][1], one[i][1]) for i in range(20))
    assert group_shares(groups, group_weights(groups, 4, 1.0)) == {"a": (3, 0.5), "b": (1, 0.5)}
    with pytest.raises(DefectscanError, match="sampling.balance_groups"):
        load_config(None, ["sampling.balance_groups=1.5"])


def test_auto_defect_share_follows_how_rare_defective_images_are():
    image, mask = defect_image(128, 3)
    m = (mask > 0).astype(np.uint8)
    clean = np.zeros_like(m)
    every = CropDataset([image] * 4, [m] * 4, 2, crop=32, defect_share="auto", seed=0)
    one_in_ten = CropDataset([image] * 10, [m] + [clean] * 9, 2, crop=32, defect_share="auto", seed=0)
    assert every.defect_share == 0.5  # every image has a defect: half the crops on defects, as before
    assert one_in_ten.defect_share == pytest.approx(0.5 * np.sqrt(0.1), abs=1e-4)
    assert CropDataset([image], [clean], 2, crop=32, defect_share="auto", seed=0).defect_share == 0.0
    assert load_config(None, []).sampling.defect_share == "auto"
    with pytest.raises(DefectscanError, match="sampling.defect_share"):
        load_config(None, ["sampling.defect_share=often"])


def test_loader_workers_auto_is_none_on_a_cpu_and_a_few_per_gpu_process(monkeypatch):
    from defectscan.training import loop

    monkeypatch.setattr(loop, "usable_cores", lambda: 16)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert loop.loader_workers("auto", cpu) == 0 and loop.loader_workers(3, cpu) == 3
    assert loop.loader_workers("auto", gpu) == 4 and loop.loader_workers("auto", gpu, processes=8) == 1
    monkeypatch.setattr(loop, "usable_cores", lambda: 1)
    assert loop.loader_workers("auto", gpu) == 0
    assert load_config(None, ["sampling.workers=2"]).sampling.workers == 2
    with pytest.raises(DefectscanError, match="sampling.workers"):
        load_config(None, ["sampling.workers=-1"])


def test_optimizer_groups_scale_the_encoder_and_spare_norms_from_decay():
    spec = ModelSpec(arch="unet", encoder="resnet18", classes=("defect",), head="sigmoid", tile=64, overlap=0)
    model = build_model(spec, encoder_weights=None)
    groups = param_groups(model, weight_decay=0.05, encoder_lr_scale=0.3, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert len(scale) == len(list(model.parameters()))  # every parameter in exactly one group
    enc = dict(model.encoder.named_parameters())
    assert scale[id(enc["layer4.1.conv2.weight"])] == pytest.approx(0.3)  # the last block: encoder_lr_scale
    assert scale[id(enc["layer4.0.conv1.weight"])] == pytest.approx(0.15)  # one group earlier: halved
    assert scale[id(enc["conv1.weight"])] == pytest.approx(0.3 * 0.5 ** 9)  # stem: conv1, bn1, 8 blocks after it
    assert all(scale[id(p)] == 1.0 for p in model.decoder.parameters())
    assert decay[id(enc["bn1.weight"])] == 0.0 and decay[id(enc["conv1.weight"])] == 0.05
    assert block_key("model.blocks.3.2.conv_dw.weight") == "model.blocks.3"
    assert block_key("model.layers_1.blocks.0.attn.qkv.weight") == "model.layers_1"
    opt = torch.optim.AdamW(groups, lr=1e-3)
    set_lr(opt, 2e-3)
    assert {round(g["lr"], 9) for g in opt.param_groups} >= {2e-3, 6e-4}


@pytest.mark.parametrize("head,outputs", [("sigmoid", 1), ("sigmoid", 3), ("softmax", 4)])
def test_losses_fit_each_head(head, outputs):
    target = torch.randint(0, 4 if head == "softmax" else outputs + 1, (2, 16, 16))
    good = torch.zeros(2, outputs, 16, 16)
    for c in range(outputs):
        cls = c if head == "softmax" else c + 1
        good[:, c] = (target == cls).float() * 20 - 10
    fn = build_loss([LossTerm(name="dice"), LossTerm(name="bce"), LossTerm(name="focal", weight=0.5)], head, outputs)
    assert fn(good, target) < fn(torch.zeros_like(good), target)


# --- training ------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_training_overfits_one_image(tmp_path):
    data = folder_dataset(tmp_path / "data", 1, size=128)
    cfg = load_config(None, TINY + [
        f"data.root={data}", "sampling.crop=128", "sampling.steps_per_epoch=50", "training.epochs=4",
        "optim.lr=0.01", "optim.warmup_epochs=0.2", "sampling.defect_share=0"])
    result = train(cfg, tmp_path / "run", log=lambda m: None)
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    losses = [float(r.split(",")[3]) for r in rows[1:]]
    assert losses[-1] < 0.5 * losses[0], losses
    ds = load_dataset(data)
    model, spec, _ = load_checkpoint(tmp_path / "run" / "best.safetensors")
    opts = EvalOptions(min_area=1, seam_images=0, examples=0, cost=False)
    m = evaluate(Predictor(model, spec, InferOptions(min_area=1)), ds, ds.labeled, opts).metrics()
    assert m.iou["defect"] > 0.9, m
    assert result.best_epoch == 4 and result.test is None
    for name in ("config.yaml", "splits.json", "best.json", "last.safetensors", "last_state.pt", "metrics.csv",
                 "curves.png", "train.log"):
        assert (tmp_path / "run" / name).is_file(), name


def test_training_with_validation_and_test_split(tmp_path):
    data = folder_dataset(tmp_path / "data", 6, size=96, seed=10)
    cfg = load_config(None, TINY + [f"data.root={data}", "data.val_fraction=0.2", "data.test_fraction=0.2"])
    result = train(cfg, tmp_path / "run", log=lambda m: None)
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    assert len(splits["train"]) == 4 and len(splits["val"]) == 1 and len(splits["test"]) == 1
    assert not set(splits["test"]) & set(splits["train"])
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]
    assert "val_mean_iou" in header and "val_defect_ap" in header
    # one validation image cannot pick an epoch: with training.pick_epoch auto the last one is kept
    logs: list[str] = []
    auto = train(load_config(None, TINY + [f"data.root={data}", "data.val_fraction=0.2", "data.test_fraction=0.2",
                                           "training.pick_epoch=auto", "validation.test=false"]),
                 tmp_path / "auto", log=logs.append)
    assert auto.best_epoch == 3 and any("fewer than" in m for m in logs)
    best, last = (load_file(tmp_path / "auto" / f"{name}.safetensors") for name in ("best", "last"))
    assert best.keys() == last.keys() and all(torch.equal(best[k], last[k]) for k in best)
    # each epoch's validation image counts, which scripts/epoch_selection.py replays as small validation sets
    per_image = RunDir(tmp_path / "run").read_validation_images()
    assert [(r["epoch"], Path(r["image"]).stem) for r in per_image] == [(str(e), splits["val"][0]) for e in (1, 2, 3)]
    assert all(int(r["tp_px"]) + int(r["fn_px"]) == int(r["gt_defect_px"]) > 0 for r in per_image)
    # ... and their score histograms, which also replay choosing the threshold; the best epoch's are the ones its
    # checkpoint chose the threshold from
    epochs, names, pos, neg = RunDir(tmp_path / "run").read_validation_scores()
    assert list(epochs) == [1, 2, 3] and [Path(n).stem for n in names] == splits["val"] and pos.shape == neg.shape
    stored = load_checkpoint(tmp_path / "run" / "best.safetensors")[2]["extra"]["validation_scores"]["per_image"]
    assert pos[result.best_epoch - 1].tolist() == stored["pos"] and neg[result.best_epoch - 1].tolist() == stored["neg"]
    history = RunDir(tmp_path / "run").read_history()
    assert all(0 <= float(h["val_defect_iou_at_threshold"]) <= 1 and 0 < float(h["val_threshold"]) < 1
               for h in history)
    test = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    assert test["images"] == 1 and 0 <= test["defect_pixel_ap"] <= 1 and result.test["mean_iou"] == test["mean_iou"]
    # the run's checkpoint works with `infer` unchanged
    model, spec, meta = load_checkpoint(tmp_path / "run" / "best.safetensors")
    assert spec.head == "sigmoid" and spec.classes == ("defect",) and meta["extra"]["epoch"] == result.best_epoch
    # the threshold was chosen on the validation image (best pixel F1 of the best epoch's validation pass) and the
    # test metrics use it
    chosen = meta["extra"]["threshold"]
    images, pooled_only = read_validation_scores(meta["extra"]["validation_scores"])
    assert not pooled_only and len(images) == 1
    assert chosen["rule"] == "stable_f1" and chosen["split"] == "validation" and chosen["images"] == 1
    # one validation image cannot measure a threshold's sampling error: the trained 0.5 is kept, saying why
    assert spec.threshold == chosen["threshold"] == 0.5 == chosen["default"] and "too few" in chosen["note"]
    assert chosen["best_f1_threshold"] == round(images[0].best_f1()[1], 6)
    assert chosen["positives"] == images[0].pos.sum() > 0 and test["threshold"] == spec.threshold
    assert "threshold" in (tmp_path / "run" / "train.log").read_text()
    from defectscan.evaluation.calibrate import calibrate_threshold

    with pytest.raises(DefectscanError, match="test images"):  # a run's test images never choose its threshold
        calibrate_threshold(tmp_path / "run" / "best.safetensors", data, split="all",
                            run_splits=RunDir(tmp_path / "run").split_source())
    # fixed: model.threshold is kept
    cfg = load_config(None, TINY + [f"data.root={data}", "data.val_fraction=0.2", "data.test_fraction=0.2",
                                    "training.epochs=1", "validation.threshold=fixed", "model.threshold=0.3"])
    train(cfg, tmp_path / "fixed", log=lambda m: None)
    _, spec, meta = load_checkpoint(tmp_path / "fixed" / "best.safetensors")
    assert spec.threshold == 0.3 and "threshold" not in meta["extra"]


KILL_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from defectscan.training import load_config, train
    calls = 0
    original = torch.optim.AdamW.step
    def step(self, *a, **k):  # a hard kill (no cleanup, no finally) in the middle of epoch 2
        global calls
        calls += 1
        if calls == int(sys.argv[3]):
            os._exit(137)
        return original(self, *a, **k)
    torch.optim.AdamW.step = step
    train(load_config(None, sys.argv[4:]), sys.argv[1], log=lambda m: None, resume=sys.argv[2] == "resume")
""")


@pytest.mark.slow
@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_resume_after_kill_reproduces_uninterrupted_weights(tmp_path, ema):
    data = folder_dataset(tmp_path / "data", 3, size=96, seed=20)
    overrides = TINY + [f"data.root={data}", "data.val_fraction=0", "training.epochs=3", f"training.ema={ema}"]
    train(load_config(None, overrides), tmp_path / "straight", log=lambda m: None)
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "killed"), "new", "5", *overrides], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 137, proc.stderr
    state = torch.load(tmp_path / "killed" / "last_state.pt", weights_only=True)
    assert json.loads(state["progress"])["epoch"] == 1  # killed during epoch 2
    train(load_config(tmp_path / "killed" / "config.yaml"), tmp_path / "killed", resume=True, log=lambda m: None)
    a = load_file(tmp_path / "straight" / "last.safetensors")
    b = load_file(tmp_path / "killed" / "last.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = (tmp_path / "killed" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3"]
    state = torch.load(tmp_path / "killed" / "last_state.pt", weights_only=True)
    saved = load_checkpoint(tmp_path / "killed" / "last.safetensors")[0].state_dict()
    if ema:  # the checkpoint holds the averaged weights, the state both
        assert all(torch.equal(saved[k], state["averaged"][k]) for k in saved)
        assert not all(torch.equal(saved[k], state["model"][k]) for k in saved if saved[k].is_floating_point())
    else:
        assert "averaged" not in state and all(torch.equal(saved[k], state["model"][k]) for k in saved)
    # killed before the first epoch ended: nothing to continue from, so --resume starts over (same result)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "early"), "new", "2", *overrides], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 137 and not (tmp_path / "early" / "last_state.pt").exists()
    train(load_config(tmp_path / "early" / "config.yaml"), tmp_path / "early", resume=True, log=lambda m: None)
    c = load_file(tmp_path / "early" / "last.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_weight_average_warms_up_its_decay_to_the_cap():
    net = torch.nn.Linear(1, 1, bias=False)
    avg = weight_average(net, decay=0.5)
    expected = None
    for step in range(1, 6):  # the weight is `step` after optimizer step `step`
        net.weight.data.fill_(float(step))
        avg.update(net, step=step)
        decay = min(0.5, 1 - step ** (-2 / 3))  # 0 at step 1 (a copy), 0.37 at 2, then the cap
        expected = float(step) if expected is None else decay * expected + (1 - decay) * step
        assert avg.module.weight.item() == pytest.approx(expected, rel=1e-6)
    assert weight_average(net, 0.9999).get_decay(100) == pytest.approx(0.954, abs=5e-4)  # the docstring's figure


@pytest.mark.slow
def test_unaveraged_checkpoint_holds_the_weights_of_the_same_run_without_averaging(tmp_path, capsys):
    # scripts/unaveraged_checkpoint.py pairs an averaged run with itself: its raw weights must be exactly those of
    # the run without training.ema (the average draws no random numbers)
    script = load_script("unaveraged_checkpoint")
    data = folder_dataset(tmp_path / "data", 4, size=96, seed=21)
    overrides = TINY + [f"data.root={data}", "data.val_fraction=0", "training.epochs=2"]
    train(load_config(None, overrides), tmp_path / "plain", log=lambda m: None)
    assert script.main([str(tmp_path / "plain")]) == 2
    assert "did not average its weights" in capsys.readouterr().err
    train(load_config(None, overrides + ["training.ema=0.9"]), tmp_path / "ema", log=lambda m: None)
    written = script.write_unaveraged(tmp_path / "ema")
    raw = load_checkpoint(written)[0].state_dict()
    plain = load_file(tmp_path / "plain" / "last.safetensors")
    averaged = load_file(tmp_path / "ema" / "last.safetensors")
    assert raw.keys() == plain.keys() and all(torch.equal(raw[k], plain[k]) for k in plain)
    assert not all(torch.equal(averaged[k], plain[k]) for k in plain if plain[k].is_floating_point())
    meta = read_sidecar(written)  # calibrate starts again from model.threshold, not the average's choice
    assert meta["model"]["threshold"] == 0.5 and "threshold" not in meta["extra"]


def test_training_refuses_bad_runs(tmp_path):
    data = folder_dataset(tmp_path / "data", 2, size=64)
    with pytest.raises(DefectscanError, match="no dataset"):
        train(load_config(None, TINY), tmp_path / "r0", log=lambda m: None)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    with pytest.raises(DefectscanError, match="not empty"):
        train(load_config(None, TINY + [f"data.root={data}"]), tmp_path / "busy", log=lambda m: None)
    with pytest.raises(DefectscanError, match="nothing to resume"):
        train(load_config(None, TINY + [f"data.root={data}"]), tmp_path / "r1", resume=True, log=lambda m: None)
    with pytest.raises(DefectscanError, match="multiple of the model's stride"):
        train(load_config(None, TINY + [f"data.root={data}", "sampling.crop=100"]), tmp_path / "r2", log=lambda m: None)
    assert not (tmp_path / "r2").exists(), "a run that fails its set-up writes nothing"
    unlabeled = tmp_path / "unlabeled"
    (unlabeled / "images").mkdir(parents=True)
    (unlabeled / "masks").mkdir()
    write_image(unlabeled / "images" / "a.png", np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(DefectscanError, match="no labeled images"):
        train(load_config(None, TINY + [f"data.root={unlabeled}"]), tmp_path / "r3", log=lambda m: None)


def test_cli_train_and_data_check(tmp_path, monkeypatch, capsys):
    from test_cli import error_lines, run_cli

    data = folder_dataset(tmp_path / "data", 3, size=96, seed=30)
    code, out, err = run_cli(monkeypatch, capsys, "data", "check", data)
    assert code == 0 and "no problems found" in out + err
    cv2.imwrite(str(data / "masks" / "s00.png"), np.zeros((10, 10), np.uint8))
    code, out, err = run_cli(monkeypatch, capsys, "data", "check", data)
    assert code == 1 and len(error_lines(err)) == 1 and "fatal problem" in err
    cv2.imwrite(str(data / "masks" / "s00.png"), defect_image(96, 30)[1])
    args = ["train", "--data", data, "--out", tmp_path / "run", "--epochs", "1"]
    for item in TINY + ["data.val_fraction=0"]:
        args += ["--set", item]
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    assert "best epoch 1" in err and (tmp_path / "run" / "best.safetensors").is_file()
    code, out, err = run_cli(monkeypatch, capsys, "infer", data / "images" / "s01.png", "--model",
                             tmp_path / "run" / "best.safetensors", "--out", tmp_path / "res")
    assert code == 0, err
    assert (tmp_path / "res" / "s01" / "mask.png").is_file()
    code, out, err = run_cli(monkeypatch, capsys, "train", "--data", data, "--set", "training.epoch=2")
    assert code == 1 and error_lines(err) == [error_lines(err)[0]] and "training.epoch" in err


def test_run_directory_lock_leftovers_resume_from_elsewhere_and_extend(tmp_path, monkeypatch, capsys):
    from test_cli import error_lines, run_cli

    from defectscan.io.files import exclusive_lock

    folder_dataset(tmp_path / "data", 3, size=96, seed=31)
    monkeypatch.chdir(tmp_path)
    args = ["train", "--data", "data", "--out", "run", "--epochs", "1"]
    for item in TINY + ["data.val_fraction=0", "training.log_every=1", "optim.warmup_epochs=2"]:
        args += ["--set", item]
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    assert "step 1/3 loss" in err and "steps/s, ETA" in err  # redirected output: a line per log_every steps
    assert "warning: the warm-up (2.0 epochs) is not shorter than the run (1 epochs)" in err
    log = (tmp_path / "run" / "train.log").read_text()
    assert "step 2/3 loss" in log and "(bf16: " in log and "float32" in log
    assert json.loads((tmp_path / "run" / "best.json").read_text())["extra"]["precision"] == "float32"
    run = tmp_path / "run"
    history = (run / "metrics.csv").read_text()
    # what a killed run leaves (pid long gone) is removed by the next process; a live process's files are kept
    dead, live = run / ".last.99999999.x1y2_abc.tmp.safetensors", run / f".last.{os.getpid()}.x1y2_abc.tmp.safetensors"
    dead.write_text("half")
    live.write_text("half")
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)  # data.root was stored absolute: resuming works from any directory
    code, _, err = run_cli(monkeypatch, capsys, "train", "--resume", run)
    assert code == 0, err
    assert "the run is complete (1 of 1 epochs)" in err and "--epochs N" in err
    assert (run / "metrics.csv").read_text() == history
    assert not dead.exists() and live.exists()
    live.unlink()
    # another process holds the run: --resume and a new run into it are refused, and nothing is touched
    with exclusive_lock(run / ".lock", "run directory"):
        code, _, err = run_cli(monkeypatch, capsys, "train", "--resume", run, "--epochs", "2")
        assert code == 1 and len(error_lines(err)) == 1 and "another defectscan process" in err
    assert (run / "metrics.csv").read_text() == history
    (tmp_path / "fresh").mkdir()
    with exclusive_lock(tmp_path / "fresh" / ".lock", "run directory"):
        fresh_args = [{"run": tmp_path / "fresh", "data": tmp_path / "data"}.get(a, a) for a in args]
        code, _, err = run_cli(monkeypatch, capsys, *fresh_args)
        assert code == 1 and "another defectscan process" in err
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir()) == [".lock"]
    # a finished run is extended by --resume --epochs N; other overrides are refused
    code, _, err = run_cli(monkeypatch, capsys, "train", "--resume", run, "--set", "optim.lr=0.1")
    assert code == 1 and "except --epochs N" in err
    code, _, err = run_cli(monkeypatch, capsys, "train", "--resume", run, "--epochs", "2")
    assert code == 0 and "extending the run from 1 to 2 epochs" in err, err
    assert [r.split(",")[0] for r in (run / "metrics.csv").read_text().splitlines()[1:]] == ["1", "2"]
    assert load_config(run / "config.yaml").training.epochs == 2
    # evaluating every image of a run's dataset says how many of them the model trained on
    code, _, err = run_cli(monkeypatch, capsys, "evaluate", "--model", run / "best.safetensors", "--data",
                           tmp_path / "data", "--split", "all", "--seam-images", "0", "--out", tmp_path / "ev")
    trained = len(json.loads((run / "splits.json").read_text())["train"])
    assert code == 0 and f"{trained} of the 3 were training images of this model" in err, err
    # fine-tuning: a new run starts from every weight of a checkpoint of the same architecture
    code, _, err = run_cli(monkeypatch, capsys, *[{"run": tmp_path / "tuned", "data": tmp_path / "data"}.get(a, a)
                                                  for a in args], "--finetune", run / "best.safetensors",
                           "--set", "training.epochs=1", "--set", "optim.lr=1e-12")
    assert code == 0 and "starting from the weights of" in err, err
    before, after = load_file(run / "last.safetensors"), load_file(tmp_path / "tuned" / "last.safetensors")
    moved = max(float((before[k].float() - after[k].float()).abs().max()) for k in before
                if before[k].is_floating_point() and "running" not in k and "num_batches" not in k)
    assert moved < 1e-6  # measured ~1e-12: a learning rate of 1e-12 leaves the loaded weights where they were
    code, _, err = run_cli(monkeypatch, capsys, *[{"run": tmp_path / "other", "data": tmp_path / "data"}.get(a, a)
                                                  for a in args], "--finetune", run / "best.safetensors",
                           "--set", "model.encoder=resnet18")
    assert code == 1 and "resnet18" in err and "encoder differs" in err


def test_resume_of_an_early_stopped_run_trains_nothing(tmp_path):
    data = folder_dataset(tmp_path / "data", 3, size=96, seed=32)
    overrides = TINY + [f"data.root={data}", "data.val_fraction=0.34", "data.test_fraction=0", "training.epochs=2"]
    run = tmp_path / "run"
    train(load_config(None, overrides), run, log=lambda m: None)
    # make it a run of 4 planned epochs that early stopping ended after epoch 2 (which validations trigger that
    # depends on the metric; the saved state is what --resume reads)
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("epochs: 2", "epochs: 4")
                                     .replace("early_stop: 0", "early_stop: 1"))
    state = torch.load(run / "last_state.pt", weights_only=True)
    progress = json.loads(state["progress"])
    progress["bad_validations"] = 1
    state["progress"] = json.dumps(progress)
    torch.save(state, run / "last_state.pt")
    history = (run / "metrics.csv").read_text()
    said = []
    result = train(load_config(run / "config.yaml"), run, resume=True, log=said.append)
    assert any("the run is stopped early (2 of 4 epochs)" in m for m in said), said
    assert result.epochs_run == 2 and (run / "metrics.csv").read_text() == history
    with pytest.raises(DefectscanError, match="already trained 2 epochs; --epochs 1 cannot undo them"):
        train(load_config(run / "config.yaml", ["training.epochs=1"]), run, resume=True, log=lambda m: None)
    # a longer schedule extends it, with its patience back
    said = []
    train(load_config(run / "config.yaml", ["training.epochs=5"]), run, resume=True, log=said.append)
    assert any("extending the run from 4 to 5 epochs" in m for m in said), said
    assert len((run / "metrics.csv").read_text().splitlines()) >= 4  # at least one more epoch was trained


def test_paths_given_as_options_are_not_read_as_yaml(tmp_path, monkeypatch, capsys):
    from test_cli import run_cli

    data = folder_dataset(tmp_path / "lot #2", 2, size=96, seed=33)  # '#' starts a YAML comment
    args = ["train", "--data", data, "--out", tmp_path / "null", "--epochs", "1"]
    for item in TINY + ["data.val_fraction=0", "data.test_fraction=0"]:
        args += ["--set", item]
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    assert load_config(tmp_path / "null" / "config.yaml").data.root == str(data)


# ---- decode cache: training data larger than RAM ---------------------------------------------------------------
def test_disk_cache_gives_the_same_crops_as_memory_and_pickles_as_paths(tmp_path, monkeypatch):
    import pickle

    from defectscan.data import cache

    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    ds = load_dataset(folder_dataset(tmp_path / "d", 3, size=96))
    in_memory = cache.load_training_pairs(ds, ds.labeled, "memory")
    on_disk = cache.load_training_pairs(ds, ds.labeled, "disk")
    assert all(isinstance(a, cache.DiskArray) for a in on_disk[0] + on_disk[1])
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 6
    for a, b in zip(in_memory[0] + in_memory[1], on_disk[0] + on_disk[1]):
        assert np.array_equal(a, np.asarray(b))
    augment = build_augment([{"HorizontalFlip": {"p": 0.5}}, {"RandomRotate90": {"p": 0.5}}])
    mem = CropDataset(*in_memory, 2, crop=64, defect_share=0.5, seed=3, augment=augment)
    disk = CropDataset(*on_disk, 2, crop=64, defect_share=0.5, seed=3, augment=augment)
    for i in range(8):
        for x, y in zip(mem[i], disk[i]):
            assert torch.equal(x, y)
    blob = pickle.dumps(disk)  # what a DataLoader worker receives: paths, not pixels
    assert len(blob) < 30_000 and torch.equal(pickle.loads(blob)[5][0], mem[5][0])


def test_disk_cache_decodes_once_and_again_when_the_image_changes(tmp_path, monkeypatch):
    from defectscan.data import cache

    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    ds = load_dataset(folder_dataset(tmp_path / "d", 1, size=64))
    sample = ds.labeled[0]
    image, _ = cache.cached_pair(ds, sample)
    first = image.path.stat().st_mtime_ns
    assert cache.cached_pair(ds, sample)[0].path.stat().st_mtime_ns == first  # reused, not decoded again
    write_image(sample.image, np.zeros((64, 64, 3), np.uint8))
    os.utime(sample.image, ns=(first + 10**9, first + 10**9))
    again, _ = cache.cached_pair(ds, sample)
    assert again.path != image.path and not np.asarray(again).any()
    assert not list((tmp_path / "cache").glob(".*"))  # no temporary files left behind


def test_cache_auto_uses_disk_only_when_memory_is_short(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from defectscan.data import cache

    ds = load_dataset(folder_dataset(tmp_path / "d", 2, size=64))
    assert cache.decoded_bytes(ds.labeled) == 2 * 64 * 64 * 4
    assert cache.choose_mode("auto", ds.labeled) == "memory"
    monkeypatch.setattr(cache.psutil, "virtual_memory", lambda: SimpleNamespace(available=30_000))
    assert cache.choose_mode("auto", ds.labeled) == "disk"
    assert cache.choose_mode("memory", ds.labeled) == "memory"


def test_training_from_the_disk_cache_in_worker_processes_equals_training_from_memory(tmp_path, monkeypatch):
    from defectscan.data import cache

    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    data = folder_dataset(tmp_path / "data", 2, size=96)
    losses = {}
    for mode, workers in (("memory", 0), ("disk", 1)):
        cfg = load_config(None, TINY + [f"data.root={data}", "sampling.crop=64", "sampling.steps_per_epoch=6",
                                        "training.epochs=1", f"data.cache={mode}", f"sampling.workers={workers}",
                                        "data.val_fraction=0"])
        logged = []
        train(cfg, tmp_path / mode, log=logged.append)
        losses[mode] = [r.split(",")[3] for r in (tmp_path / mode / "metrics.csv").read_text().splitlines()[1:]]
        assert any("decode cache" in m for m in logged) == (mode == "disk")
    assert losses["memory"] == losses["disk"] and len(losses["disk"]) == 1
    assert len(list((tmp_path / "cache").glob("*.image.npy"))) == len(list((tmp_path / "cache").glob("*.mask.npy"))) > 0


def test_validation_scores_of_a_redone_epoch_replace_the_interrupted_ones(tmp_path):
    from defectscan.metrics import ScoreHistogram

    run = RunDir(tmp_path)

    def hists(value: int) -> list[ScoreHistogram]:
        out = [ScoreHistogram(), ScoreHistogram()]
        for h in out:
            h.pos[value] = h.neg[0] = value
        return out

    for epoch, value in ((1, 1), (2, 2), (3, 3), (2, 7)):  # epoch 3 was written, then the run resumed after 1
        run.write_validation_scores(epoch, ["a.png", "b.png"], hists(value))
    epochs, names, pos, neg = run.read_validation_scores()
    assert list(epochs) == [1, 2] and names == ["a.png", "b.png"] and pos.shape == (2, 2, 256)
    assert pos[:, 0, 1].tolist() == [1, 0] and pos[:, 0, 7].tolist() == [0, 7]
    (tmp_path / RunDir.VALIDATION_SCORES).write_bytes(b"truncated")
    with pytest.raises(DefectscanError, match="cannot read validation scores"):
        run.read_validation_scores()


def test_epoch_selection_replay_with_thresholds_prefers_the_epoch_that_is_best_at_its_own_threshold(tmp_path, capsys):
    from defectscan.metrics import ScoreHistogram

    script = load_script("epoch_selection")
    rng = np.random.default_rng(0)
    run = RunDir(tmp_path)
    # epochs 1 and 3 separate defects (score ~130) from background (~100) poorly; epoch 2 separates them well
    # (~230 against ~150) but scores everything above 0.5: best at its own threshold, worst at 0.5
    for epoch, (defect, background) in enumerate([(130, 100), (230, 150), (130, 100)], start=1):
        hists = []
        for _ in range(8):
            h = ScoreHistogram()
            h.add(np.clip(rng.normal(defect, 12, 400), 0, 255).astype(np.uint8), np.ones(400))
            h.add(np.clip(rng.normal(background, 12, 4000), 0, 255).astype(np.uint8), np.zeros(4000))
            hists.append(h)
        run.write_validation_scores(epoch, [f"{i}.png" for i in range(8)], hists)
    last, at_default, own = script.replay_with_thresholds(*script.load_scores(tmp_path), [3], 20, 0, 0.5)[3]
    assert own > 0.8 and own > at_default + 0.2 and own > last + 0.2
    assert "best IoU at own threshold" in capsys.readouterr().out
