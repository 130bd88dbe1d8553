"""`defectscan export` and ONNX Runtime models: every family equals torch, tiled inference equals torch's, int8
runs end to end with its accuracy measured, and bad input is refused on one line with nothing written."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason='ONNX export is an extra: pip install "defectscan[onnx]"')

from _helpers import defect_image, run_cli  # noqa: E402
from defectscan.deploy import export_onnx  # noqa: E402
from defectscan.errors import DefectscanError  # noqa: E402
from defectscan.inference import Predictor, TorchTiles  # noqa: E402
from defectscan.inference.onnx_backend import OnnxTiles, read_onnx_model  # noqa: E402
from defectscan.models import ModelSpec, build_model, save_checkpoint  # noqa: E402
from defectscan.schemas import InferOptions  # noqa: E402
from test_distributed import _checkpoint  # noqa: E402
from test_evaluation import dataset_with_clean_images  # noqa: E402

FAMILIES = [pytest.param("resnet10t", id="cnn-resnet10t"),
            pytest.param("efficientnet_lite0", id="cnn-lite0", marks=pytest.mark.slow),
            pytest.param("efficientnet-b0", id="cnn-efficientnet-b0", marks=pytest.mark.slow),
            pytest.param("convnext_tiny", id="cnn-convnext_tiny", marks=pytest.mark.slow),
            pytest.param("swin_t", id="transformer-swin_t", marks=pytest.mark.slow),
            pytest.param("swinv2_t", id="transformer-swinv2_t", marks=pytest.mark.slow),
            pytest.param("vitae_t_win", id="hybrid-vitae_t_win", marks=pytest.mark.slow),
            pytest.param("vitae_t", id="hybrid-vitae_t", marks=pytest.mark.slow),
            pytest.param("vit_s", id="transformer-vit_s", marks=pytest.mark.slow)]


@pytest.mark.parametrize("encoder", FAMILIES)
def test_every_family_exports_with_dynamic_size_and_equals_torch(tmp_path, encoder):
    _export_and_compare(tmp_path, "unet", encoder)


@pytest.mark.slow
@pytest.mark.parametrize("arch,dynamic", [("fpn", True), ("deeplabv3plus", True), ("segformer", True),
                                          ("upernet", False)])  # UperNet's pyramid pooling: kernels from the size
def test_every_decoder_exports_and_equals_torch(tmp_path, arch, dynamic):
    notes: list[str] = []
    _export_and_compare(tmp_path, arch, "resnet10t", dynamic=dynamic, log=notes.append)
    assert any("fixed 64 px tile size" in n for n in notes) != dynamic  # a fixed-size export is said


def _export_and_compare(tmp_path, arch: str, encoder: str, dynamic: bool = True, log=lambda m: None) -> None:
    torch.manual_seed(0)
    spec = ModelSpec(arch=arch, encoder=encoder, classes=("defect",), tile=64, overlap=16)
    model = build_model(spec).eval()
    save_checkpoint(model, spec, tmp_path / "m")
    result = export_onnx(tmp_path / "m.safetensors", tmp_path / "out", log=log)
    assert result.dynamic_hw == dynamic and max(result.checks["max_abs_difference_random"],
                                                result.checks["max_abs_difference_real"]) <= 1e-4
    spec_onnx, meta = read_onnx_model(tmp_path / "out" / "model.onnx")
    assert spec_onnx == spec and meta["input"]["dynamic_hw"] == dynamic and meta["precision"] == "float32"
    # an independent check on tiles the export never saw (dynamic: a size it never saw, not square, not the tile)
    graph = OnnxTiles(tmp_path / "out" / "model.onnx", meta, spec_onnx, device="cpu")
    assert graph.provider == "CPUExecutionProvider"
    pinned = OnnxTiles(tmp_path / "out" / "model.onnx", meta, spec_onnx, providers=["CPUExecutionProvider"])
    assert pinned.provider == "CPUExecutionProvider"
    reference = TorchTiles(model, head="sigmoid", mean=spec.mean, std=spec.std, amp="off", device="cpu")
    shape = (3, 96, 160, 3) if dynamic else (3, 64, 64, 3)
    tiles = torch.from_numpy(np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8))
    assert float((graph(tiles) - reference(tiles)).abs().max()) <= 1e-4


def test_tiled_onnx_inference_equals_tiled_torch_inference(tmp_path):
    ckpt = _checkpoint(tmp_path / "m" / "model")
    export_onnx(ckpt, tmp_path / "out", log=lambda m: None)
    image = np.concatenate([defect_image(150, 0)[0], defect_image(150, 1)[0][:, :80]], axis=1)  # 150 x 230
    opts = InferOptions(device="cpu", threshold=0.45)
    torch_run = Predictor.from_checkpoint(ckpt, opts).predict(image)
    onnx_predictor = Predictor.from_checkpoint(tmp_path / "out" / "model.onnx", opts)
    onnx_run = onnx_predictor.predict(image)
    assert onnx_predictor.model is None and onnx_predictor.precision == "onnxruntime float32"
    assert np.mean(torch_run.mask != onnx_run.mask) <= 1e-4  # within 0.01 % of pixels
    assert np.abs(torch_run.probs.astype(int) - onnx_run.probs.astype(int)).max() <= 1  # one uint8 level


@pytest.mark.slow
def test_int8_export_runs_end_to_end_and_its_accuracy_is_measured(monkeypatch, capsys, tmp_path):
    data = dataset_with_clean_images(tmp_path / "d", defective=4, clean=2)
    ckpt = _checkpoint(tmp_path / "m" / "model")
    code, _, err = run_cli(monkeypatch, capsys, "export", ckpt, "-o", tmp_path / "x", "--int8",
                           "--calibration", data / "images", "--calibration-tiles", "8")
    assert code == 0, err
    meta = json.loads((tmp_path / "x" / "model.int8.json").read_text())
    assert meta["precision"] == "int8" and meta["check"]["calibration_tiles"] == 8
    assert 0.5 < meta["check"]["mask_agreement_with_float32"] <= 1.0
    assert 0.0 <= meta["check"]["defect_iou_with_float32"] <= 1.0 and meta["check"]["float_nodes"] == 0
    assert meta["check"]["max_abs_difference_to_float32"] > 0  # quantised: not the float graph
    assert (tmp_path / "x" / "model.int8.onnx").stat().st_size < 0.4 * (tmp_path / "x" / "model.onnx").stat().st_size
    scores = {}
    for name, model in (("fp32", ckpt), ("int8", tmp_path / "x" / "model.int8.onnx")):
        code, _, err = run_cli(monkeypatch, capsys, "evaluate", "-m", model, "-d", data, "--split", "all",
                               "-o", tmp_path / f"ev_{name}", "--threshold", "0.45", "--device", "cpu")
        assert code == 0, err
        scores[name] = json.loads((tmp_path / f"ev_{name}" / "metrics.json").read_text())["metrics"]
    assert "int8" in scores["int8"]["cost"]["device"] and scores["int8"]["cost"]["parameters"] > 0
    assert 0.0 <= scores["int8"]["defect_iou"] <= 1.0
    assert abs(scores["int8"]["defect_iou"] - scores["fp32"]["defect_iou"]) < 0.2  # computed, and not garbage


def test_int8_keeps_the_named_modules_in_float(tmp_path):
    import onnx

    data = dataset_with_clean_images(tmp_path / "d", defective=2, clean=0)
    ckpt = _checkpoint(tmp_path / "m" / "model")
    export_onnx(ckpt, tmp_path / "x", int8=True, calibration=[data / "images"], calibration_tiles=4,
                keep_float=["/decoder", "/segmentation_head"], log=lambda m: None)
    meta = json.loads((tmp_path / "x" / "model.int8.json").read_text())["check"]
    assert meta["kept_float"] == ["/decoder", "/segmentation_head"] and meta["float_nodes"] > 0
    nodes = onnx.load(str(tmp_path / "x" / "model.int8.onnx")).graph.node
    quantised = {n.name.split("/")[1] for n in nodes if n.op_type == "QuantizeLinear" and n.name.startswith("/")}
    assert "encoder" in quantised and not quantised & {"decoder", "segmentation_head"}
    with pytest.raises(DefectscanError, match="--keep-float /nowhere: no node"):
        export_onnx(ckpt, tmp_path / "y", int8=True, calibration=[data / "images"], calibration_tiles=4,
                    keep_float=["/nowhere"], log=lambda m: None)
    assert not (tmp_path / "y").exists()


def test_int8_keep_float_auto_searches_encoder_stages_from_the_input(tmp_path):
    from defectscan.deploy.export import _node_names, encoder_stages

    data = dataset_with_clean_images(tmp_path / "d", defective=2, clean=0)
    ckpt = _checkpoint(tmp_path / "m" / "model")
    export_onnx(ckpt, tmp_path / "x", int8=True, calibration=[data / "images"], calibration_tiles=4,
                keep_float=["auto"], int8_target=1.0, log=lambda m: None)  # unreachable: the search goes to the end
    stages = encoder_stages(_node_names(tmp_path / "x" / "model.onnx"))
    assert len(stages) >= 4 and len({s.count("/") for s in stages}) == 1  # one depth of module paths
    assert stages[0].endswith("/conv1") and stages.index(stages[0][:-5] + "layer1") < len(stages) - 1  # input first
    check = json.loads((tmp_path / "x" / "model.int8.json").read_text())["check"]
    tried = check["keep_float_search"]["tried"]
    assert [t["kept_float"] for t in tried] == [stages[:j] for j in range(len(stages))]  # never the whole encoder
    assert check["kept_float"] == stages[:-1] and check["float_nodes"] > 0
    assert check["defect_iou_with_float32"] == tried[-1]["defect_iou_with_float32"]
    export_onnx(ckpt, tmp_path / "y", int8=True, calibration=[data / "images"], calibration_tiles=4,
                keep_float=["auto"], int8_target=0.001, log=lambda m: None)  # met at once: all int8
    check = json.loads((tmp_path / "y" / "model.int8.json").read_text())["check"]
    assert check["kept_float"] == [] and len(check["keep_float_search"]["tried"]) == 1
    for bad, why in ((["auto", "/decoder"], "give it alone"),):
        with pytest.raises(DefectscanError, match=why):
            export_onnx(ckpt, tmp_path / "z", int8=True, calibration=[data / "images"], keep_float=bad)
    with pytest.raises(DefectscanError, match="--int8-target 1.5"):
        export_onnx(ckpt, tmp_path / "z", int8=True, calibration=[data / "images"], int8_target=1.5)
    assert not (tmp_path / "z").exists()


def test_export_refuses_bad_input_on_one_line_and_writes_nothing(monkeypatch, capsys, tmp_path):
    ckpt = _checkpoint(tmp_path / "m" / "model")
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not a checkpoint")
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    cases = [([junk], "sidecar"), ([ckpt, "--opset", "99"], "--opset 99"),
             ([ckpt, "--format", "tflite"], "only onnx"), ([ckpt, "--int8"], "--int8 needs --calibration"),
             ([ckpt, "--int8", "--calibration", tmp_path / "empty"], "no images"),
             ([ckpt, "--tile", "70"], "70"),
             ([ckpt, "--int8", "--calibration", tmp_path / "empty", "--calibration-method", "kl"], "minmax"),
             ([ckpt, "--defect-share", "2"], "--defect-share")]
    for args, message in cases:
        code, _, err = run_cli(monkeypatch, capsys, "export", *args, "-o", out)
        assert code == 1 and message in err and "Traceback" not in err, (args, err)
        assert len(err.strip().splitlines()) == 1 and not out.exists(), args


class _FailingSession:
    """An accelerated provider that loads a graph but cannot run it (OpenVINO on ViTAE's int8 graph, measured)."""

    def run(self, *args, **kwargs):
        raise RuntimeError("[OpenVINO-EP] Output names mismatch between OpenVINO and ONNX")


def test_a_provider_that_fails_on_the_graph_gives_way_to_the_cpu_one_only_when_not_asked_for(tmp_path):
    ckpt = _checkpoint(tmp_path / "m" / "model")
    export_onnx(ckpt, tmp_path / "out", log=lambda m: None)
    spec, meta = read_onnx_model(tmp_path / "out" / "model.onnx")
    x = torch.rand(2, 3, 64, 64)
    expected = OnnxTiles(tmp_path / "out" / "model.onnx", meta, spec, device="cpu").forward(x)
    auto = OnnxTiles(tmp_path / "out" / "model.onnx", meta, spec, device="auto")
    auto.session, auto.provider = _FailingSession(), "OpenVINOExecutionProvider"
    with pytest.warns(RuntimeWarning, match="OpenVINOExecutionProvider failed on this graph .*CPU provider"):
        out = auto.forward(x)
    assert auto.provider == "CPUExecutionProvider" and torch.equal(out, expected)
    assert auto.precision == "onnxruntime float32"  # only the CPU provider ran a batch
    # a provider that ran batches before giving way is named in what the evaluation records
    later = OnnxTiles(tmp_path / "out" / "model.onnx", meta, spec, device="auto")
    later.provider = "OpenVINOExecutionProvider"  # stands for it: the first batch runs (on the real session)
    later.forward(x)
    assert later.precision == "onnxruntime float32 (OpenVINO)"
    later.session = _FailingSession()
    with pytest.warns(RuntimeWarning, match="ran it on the CPU provider"):
        later.forward(x)
    assert later.precision == "onnxruntime float32 (OpenVINO, then CPU)"
    predictor = Predictor(None, spec, InferOptions(device="auto"), checkpoint=tmp_path / "out" / "model.onnx",
                          meta=meta, tiles=auto)
    assert any("ran it on the CPU provider" in note for note in predictor.notes)  # what `infer` prints after a run
    pinned = OnnxTiles(tmp_path / "out" / "model.onnx", meta, spec, providers=["CPUExecutionProvider"])
    pinned.session, pinned.provider = _FailingSession(), "OpenVINOExecutionProvider"
    with pytest.raises(DefectscanError, match="OpenVINOExecutionProvider failed on a 64x64 tile batch"):
        pinned.forward(x)


def test_onnx_model_without_or_with_a_mismatched_sidecar_is_refused(monkeypatch, capsys, tmp_path):
    ckpt = _checkpoint(tmp_path / "m" / "model")
    export_onnx(ckpt, tmp_path / "x", log=lambda m: None)
    image = tmp_path / "i.png"
    cv2.imwrite(str(image), defect_image(96, 0)[0])
    graph, sidecar = tmp_path / "x" / "model.onnx", tmp_path / "x" / "model.json"
    meta = json.loads(sidecar.read_text())

    def infer(expect: str) -> None:
        code, _, err = run_cli(monkeypatch, capsys, "infer", image, "-m", graph, "-o", tmp_path / "o")
        assert code == 1 and expect in err and "Traceback" not in err, err
        assert not (tmp_path / "o").exists()

    sidecar.write_text(json.dumps({**meta, "model": {**meta["model"], "in_channels": 1, "mean": [0.5],
                                                     "std": [0.5]}}))
    infer("graph takes 3 channels, its sidecar says 1")
    sidecar.write_text(json.dumps({**meta, "input": {**meta["input"], "dynamic_hw": False}}))
    infer("dynamic-size, its sidecar says otherwise")
    sidecar.write_text(json.dumps({k: v for k, v in meta.items() if k != "input"}))
    infer("no 'input' section")
    sidecar.unlink()
    infer("sidecar not found")
    sidecar.write_text(json.dumps(meta))
    graph.write_bytes(graph.read_bytes()[:-10] + b"0123456789")
    infer("checksum differs")
    code, _, err = run_cli(monkeypatch, capsys, "infer", image, "-m", tmp_path / "x" / "none.onnx", "-o",
                           tmp_path / "o")
    assert code == 1 and "no such ONNX model" in err


class _DarkIsDefect(torch.nn.Module):
    """A stand-in model that calls dark pixels defects: which tiles hold defects is known."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 20 * (0.3 - x[:, :1])


def test_calibration_tiles_include_the_tiles_where_the_model_sees_defects(tmp_path):
    from defectscan.deploy.export import _defect_fraction, select_calibration_tiles

    paths = []
    for i in range(4):  # bright images with one dark square each, at different places
        image = np.full((160, 160, 3), 200, np.uint8)
        image[60:84, 10 + 30 * i : 34 + 30 * i] = 10
        paths.append(tmp_path / f"{i}.png")
        cv2.imwrite(str(paths[-1]), image)
    spec = ModelSpec(arch="unet", encoder="resnet10t", classes=("defect",), tile=32, overlap=0,
                     mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    reference = TorchTiles(_DarkIsDefect(), head="sigmoid", mean=spec.mean, std=spec.std, amp="off", device="cpu")
    random = select_calibration_tiles(paths, reference, spec, 8, 0, defect_share=0.0)
    focused = select_calibration_tiles(paths, reference, spec, 8, 0, defect_share=0.5)
    assert random.shape == focused.shape == (8, 32, 32, 3)
    fraction = _defect_fraction(reference, spec, focused)
    assert (fraction > 0).sum() >= 4  # the focused half: tiles that hold some dark square
    assert fraction.mean() > _defect_fraction(reference, spec, random).mean()


def test_int8_check_compares_defect_masks_without_a_softmax_background():
    from defectscan.deploy.export import _compare

    def backend(defect_columns: int):
        def probabilities(tiles: torch.Tensor) -> torch.Tensor:  # softmax: background, defect
            p = torch.zeros(tiles.shape[0], 2, 8, 8)
            p[:, 1, :, :defect_columns] = 1.0
            p[:, 0] = 1.0 - p[:, 1]
            return p
        return probabilities

    tiles = np.zeros((2, 8, 8, 3), np.uint8)
    a = _compare(backend(2), backend(1), tiles, head="softmax")
    assert a.defect_iou == pytest.approx(0.5) and a.defect_fraction == pytest.approx(2 / 8)
    assert a.same_side == pytest.approx(1 - 2 * 8 / (2 * 8 * 8))  # one column differs in both channels
    # with the background counted as a class the masks would look 0.93 alike: not what the check reports
    assert _compare(backend(0), backend(0), tiles, head="softmax").defect_iou == 1.0
