"""Direct tests of the pieces every command goes through: Predictor, RunDir, the report renderers, the schemas."""

from __future__ import annotations

import base64
import json
import re

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from _helpers import folder_dataset  # tests/ is on sys.path under pytest
from defectscan.errors import DefectscanError
from defectscan.inference import Predictor, write_prediction
from defectscan.io.images import ImageSource
from defectscan.models import ModelSpec, build_model, save_checkpoint
from defectscan.reporting import plots
from defectscan.reporting.html import fmt, png_bytes_uri, png_uri, render
from defectscan.reporting.overlays import outcome_preview, render_overlay
from defectscan.schemas import EvalOptions, EvalSummary, InferOptions, Region, validated
from defectscan.training import RunDir, load_config


class Checker(nn.Module):
    """Softmax head with 3 channels (background, a, b): class a where red > 128, class b where green > 128."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r, g = x[:, :1], x[:, 1:2]
        a, b = 40.0 * (r > 0).float(), 40.0 * (g > 0).float()
        return torch.cat([torch.full_like(a, 20.0), a, b], dim=1)


SPEC = ModelSpec(arch="unet", encoder="resnet10t", classes=("background", "a", "b"), head="softmax", tile=64,
                 overlap=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _image() -> np.ndarray:
    img = np.zeros((100, 130, 3), np.uint8)
    img[10:30, 10:50, 0] = 255  # class a, 20 x 40
    img[60:70, 80:83, 1] = 255  # class b, 10 x 3
    img[90:91, 0:2, 0] = 255  # class a, 2 px: below min_area 4
    return img


# ---- Predictor -----------------------------------------------------------------------------------------------
def test_predictor_mask_regions_and_class_mapping():
    model = Checker()
    p = Predictor(model, SPEC, InferOptions(min_area=4))
    assert p.class_names == {1: "a", 2: "b"} and p.tile == (64, 64) and p.threshold == 0.5
    pred = p.predict(_image())
    assert pred.probs.shape == (3, 100, 130) and pred.mask.dtype == np.uint8
    assert int((pred.mask == 1).sum()) == 800 and int((pred.mask == 2).sum()) == 30
    assert pred.mask[90, 0] == 0  # 2-px region dropped from mask and table alike
    assert [(r.class_name, r.area_px, r.x, r.y) for r in pred.regions] == [("a", 800, 10, 10), ("b", 30, 80, 60)]
    assert pred.summary["regions_per_class"] == {"a": 1, "b": 1}
    assert pred.score.shape == (100, 130) and int(pred.score[20, 20]) == 255 - int(pred.probs[0, 20, 20])


def test_segment_rows_streams_what_predict_keeps():
    """The strip API (what evaluate and write_prediction use) gives predict's probabilities, score and mask."""
    p = Predictor(Checker(), SPEC, InferOptions(min_area=4, batch_size=1))
    image = np.tile(_image(), (3, 1, 1))  # 300 rows: several tile rows, so several strips
    pred = p.predict(image)
    strips, scores = [], []
    seen = p.segment_rows(image, on_strip=lambda y0, probs, score: (strips.append((y0, probs.copy())),
                                                                      scores.append(score.copy())))
    assert len(strips) > 1 and [y0 for y0, _ in strips] == sorted(y0 for y0, _ in strips)
    assert (np.concatenate([b for _, b in strips], axis=1) == pred.probs).all()
    assert (np.concatenate(scores) == pred.score).all()
    assert seen.regions == pred.regions
    before = seen.seconds
    mask_strips = list(seen.mask_rows())
    assert [y0 for y0, _ in mask_strips] == [y0 for y0, _ in strips]  # the same strips in pass 2
    assert (np.concatenate([m for _, m in mask_strips]) == pred.mask).all() and seen.seconds >= before
    assert p.predict(image, keep_probs=False).probs is None


def test_predictor_options_are_validated_before_any_work():
    with pytest.raises(DefectscanError, match="multiple of 32"):
        Predictor(Checker(), SPEC, InferOptions(tile=100))
    with pytest.raises(DefectscanError, match="overlap"):
        Predictor(Checker(), SPEC, InferOptions(overlap=64))
    with pytest.raises(DefectscanError, match=r"option 'preview_size'.*\(got 0\)"):
        validated(InferOptions, preview_size=0)
    with pytest.raises(DefectscanError, match="option 'stitch'"):
        validated(EvalOptions, stitch="median")
    assert EvalOptions.model_validate({"amp": False}).amp == "off"  # a study YAML's bare `amp: off`


def test_predictor_from_checkpoint_and_written_outputs(tmp_path):
    torch.manual_seed(0)
    spec = ModelSpec(arch="unet", encoder="resnet10t", classes=("scratch", "pit"), head="sigmoid", tile=64, overlap=16,
                     arch_kwargs={"decoder_channels": [16, 16, 8, 8, 8]})
    save_checkpoint(build_model(spec), spec, tmp_path / "m")
    p = Predictor.from_checkpoint(tmp_path / "m.safetensors", InferOptions(threshold=0.0, preview_size=64))
    assert not p.model.training and p.class_names == {1: "scratch", 2: "pit"}
    image = _image()
    pred = p.predict(image)
    assert pred.mask.min() >= 1  # threshold 0: every pixel is a defect of class 1 or 2 (sigmoid channel c = class c+1)
    out = tmp_path / "out"
    summary = write_prediction(p, tmp_path / "x.png", ImageSource(image), out)
    names = sorted(f.name for f in out.iterdir())
    assert names == ["defects.csv", "defects.json", "mask.png", "overlay.jpg", "prob_pit.png", "prob_scratch.png"]
    prob_pit = cv2.imread(str(out / "prob_pit.png"), cv2.IMREAD_UNCHANGED)
    assert (prob_pit == pred.probs[1]).all()  # streamed outputs equal the in-memory prediction
    assert (cv2.imread(str(out / "mask.png"), cv2.IMREAD_UNCHANGED) == pred.mask).all()
    table = json.loads((out / "defects.json").read_text())
    assert table["defects"] == [r.to_dict() for r in pred.regions] and summary["regions"] == len(pred.regions)
    assert table["classes"] == {"1": "scratch", "2": "pit"} and table["mask_encoding"] == "class index"
    assert max(cv2.imread(str(out / "overlay.jpg")).shape[:2]) <= 64


# ---- RunDir --------------------------------------------------------------------------------------------------
def test_rundir_owns_the_run_files(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.is_empty() and not run.is_run() and RunDir.containing(tmp_path / "run" / "best.safetensors") is None
    cfg = load_config(None, ["model.encoder=resnet10t", "training.epochs=2"])
    run.write_config(cfg)
    run.write_splits("seeded", ["a", "b"], {"c"}, ["d"], ["e"])
    assert run.is_run() and run.read_config().model.encoder == "resnet10t" and run.same_config(cfg)
    assert not run.same_config(load_config(None, ["model.encoder=resnet18", "training.epochs=2"]))
    assert RunDir.containing(run.checkpoint("best")).path == run.path
    stems, source = run.split_source()
    assert stems["test"] == ["e"] and stems["train_unused"] == ["c"] and source.name == "splits.json"
    assert run.train_images() == 2
    run.write_history([{"epoch": 1, "train_loss": 1.0, "train_seconds": 2.5},
                       {"epoch": 2, "train_loss": 0.5, "train_seconds": 2.0, "val_seconds": 1.0,
                        "val_mean_iou": 0.3}])
    assert [r["epoch"] for r in run.read_history()] == ["1", "2"] and run.seconds() == pytest.approx(5.5)
    assert (run.path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    model = nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    run.save_state(model, opt, {"epoch": 2})
    state = run.load_state()
    assert state["progress"] == {"epoch": 2} and torch.equal(state["model"]["weight"], model.weight.detach())
    (run.path / RunDir.STATE).write_bytes(b"not a torch file")
    with pytest.raises(DefectscanError, match="cannot read training state"):
        run.load_state()
    assert not list(run.path.glob("*.tmp*"))


# ---- reporting ----------------------------------------------------------------------------------------------
def _decoded(uri: str) -> np.ndarray:
    data = base64.b64decode(uri.split(",", 1)[1])
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


def test_templates_escape_values_and_embed_pictures():
    png = plots.precision_recall([("pit", np.linspace(0, 1, 5), np.linspace(1, 0.5, 5), 0.8)])
    html = render("compare.html.j2", title="t <script>", count=1, data="d&d", split="test", warning="",
                  header=["model", "x"], rows=[["<b>m</b>", 0.123456], ["n", None]],
                  scatters=[{"uri": png_bytes_uri(png), "caption": "cap"}], crops=[],
                  sources=[["m", "desc", "/dir"]])
    assert "<script>" not in html and "t &lt;script&gt;" in html and "&lt;b&gt;m&lt;/b&gt;" in html
    assert "d&amp;d" in html and "<td>0.1235</td>" in html and "<td>-</td>" in html
    uris = re.findall(r'src="(data:image/png;base64,[^"]+)"', html)
    assert len(uris) == 1 and _decoded(uris[0]).shape[2] == 3  # a real picture, not a placeholder
    assert fmt(float("nan")) == "-" and fmt(123456.0) == "123456"


def test_overlay_and_outcome_preview_pictures():
    image = np.full((400, 600, 3), 90, np.uint8)
    mask = np.zeros((400, 600), np.uint8)
    mask[100:103, 200:203] = 1  # 3 px wide: boxed at preview scale
    region = Region(1, 1, "pit", 200, 100, 3, 3, 9, 201.0, 101.0, 0.9, 0.8)
    out = render_overlay(ImageSource(image), mask, [region], class_names={1: "pit"}, max_side=200)
    assert out.shape == (134, 200, 3) and (out != 90).any(axis=2).sum() > 20  # legend, tint and box drawn
    gt = np.zeros((400, 600), bool)
    gt[50:60, 50:60] = True
    pred = np.zeros_like(gt)
    pred[55:70, 55:70] = True
    prev = outcome_preview(image, gt, pred, max_side=600, alpha=1.0)
    assert tuple(prev[57, 57]) == (40, 220, 60) and tuple(prev[65, 65]) == (255, 40, 40)
    assert tuple(prev[51, 51]) == (40, 140, 255)
    uri = png_uri(prev, quality=90)
    assert uri.startswith("data:image/jpeg;base64,") and _decoded(uri).shape == (400, 600, 3)


# ---- schemas -------------------------------------------------------------------------------------------------
def test_metrics_json_errors_are_one_line(tmp_path):
    for content, expected in (("{}", "metrics.json key"), ("[]", "expected an object"), ("{bad", "not a readable"),
                              ('{"schema_version": 99}', "newer")):
        f = tmp_path / "metrics.json"
        f.write_text(content)
        with pytest.raises(DefectscanError, match=expected) as err:
            EvalSummary.read(f)
        assert "\n" not in str(err.value)


def test_folder_of_synthetic_data_is_usable_by_the_predictor(tmp_path):
    """Predictor on real files: the same numbers as on the array it was read from."""
    from defectscan.data import load_dataset

    ds = load_dataset(folder_dataset(tmp_path / "d", 1, size=96))
    image = ds.load_image(ds.labeled[0])
    p = Predictor(Checker(), SPEC)
    a = p.predict(image).probs
    b = p.predict(ImageSource(image)).probs
    assert (a == b).all()


def test_usable_cores_follow_a_container_quota(monkeypatch):
    import defectscan.runtime as runtime

    monkeypatch.setattr(runtime, "_cgroup_cpu_limit", lambda: 1.5)
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert runtime.usable_cores() == 2  # 1.5 CPUs of quota: two threads, not the four the mask allows
    monkeypatch.setattr(runtime, "_cgroup_cpu_limit", lambda: None)
    assert runtime.usable_cores() == 4
