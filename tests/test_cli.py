"""`defectscan` command line end to end: outputs of `infer`, `synth`, and every bad-input case."""

from __future__ import annotations

import csv
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from defectscan.io.images import write_image
from defectscan.models import ModelSpec, build_model, default_checkpoint, save_checkpoint
from defectscan.data.synth import generate_wafer

from _helpers import run_cli  # noqa: E402 - tests/ is on sys.path under pytest

OUTPUT_FILES = {"defects.csv", "defects.json", "mask.png", "overlay.jpg"}


ROOT = Path(__file__).resolve().parents[1]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def wafer(tmp_path_factory):
    d = tmp_path_factory.mktemp("wafer")
    image, mask = generate_wafer(448, seed=11)
    write_image(d / "wafer.png", image)
    return d / "wafer.png", mask


def test_infer_with_bundled_model_writes_every_output(monkeypatch, capsys, tmp_path, wafer):
    assert default_checkpoint().is_file(), "the bundled model is part of the package"
    path, _ = wafer
    code, out, err = run_cli(monkeypatch, capsys, "infer", path, "--out", tmp_path / "res")
    assert code == 0, err
    res = tmp_path / "res" / "wafer"
    names = {p.name for p in res.iterdir()}
    assert OUTPUT_FILES <= names
    assert {f"prob_{c}.png" for c in ("scratch", "particle", "crack", "stain", "edge_chip")} <= names
    table = json.loads((res / "defects.json").read_text())
    assert table["width"] == table["height"] == 448 and table["tiles"] == 1
    assert table["precision"] == "float32"  # --amp auto on a CPU: float32 for a model not trained in bf16
    mask = cv2.imread(str(res / "mask.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (448, 448) and mask.dtype == np.uint8 and set(np.unique(mask)) <= set(range(6))
    with open(res / "defects.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(table["defects"])
    # every listed region lies on mask pixels of its class
    for r in table["defects"]:
        box = mask[r["y"] : r["y"] + r["height"], r["x"] : r["x"] + r["width"]]
        assert (box == r["class_id"]).sum() >= r["area_px"]
    assert "wafer.png" in out  # summary table
    assert not [p for p in (tmp_path / "res").iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_infer_directory_gaussian_tta_and_repeat_run_replaces_outputs(monkeypatch, capsys, tmp_path, wafer):
    path, _ = wafer
    src = tmp_path / "imgs"
    src.mkdir()
    image = cv2.imread(str(path))
    cv2.imwrite(str(src / "a.png"), image[:200, :300])
    cv2.imwrite(str(src / "b.jpg"), image[100:, 50:])
    (src / "notes.txt").write_text("ignored")
    for _ in range(2):
        code, out, err = run_cli(monkeypatch, capsys, "infer", src, "--out", tmp_path / "o", "--stitch", "gaussian",
                               "--tta", "--tile", "256", "--overlap", "64", "--threshold", "0.3")
        assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a", "b", "summary.csv"]
    rows = list(csv.DictReader((tmp_path / "o" / "summary.csv").open()))
    assert [(r["output"], r["status"], r["width"]) for r in rows] == [("a", "ok", "300"), ("b", "ok", "398")]
    assert "all 2 images" in out  # the console table's batch total
    meta = json.loads((tmp_path / "o" / "a" / "defects.json").read_text())
    assert (meta["width"], meta["height"], meta["stitch"], meta["tta"], meta["threshold"]) == (300, 200, "gaussian", True, 0.3)


def test_grayscale_16bit_and_alpha_inputs_are_converted(monkeypatch, capsys, tmp_path, wafer):
    path, _ = wafer
    rgb = cv2.imread(str(path))[:160, :160]
    gray16 = cv2.cvtColor(rgb, cv2.COLOR_BGR2GRAY).astype(np.uint16) * 257
    cv2.imwrite(str(tmp_path / "g16.png"), gray16)
    cv2.imwrite(str(tmp_path / "rgba.png"), np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]))
    code, _, err = run_cli(monkeypatch, capsys, "infer", tmp_path / "g16.png", tmp_path / "rgba.png", "--out", tmp_path / "o")
    assert code == 0, err
    assert (tmp_path / "o" / "g16" / "overlay.jpg").is_file() and (tmp_path / "o" / "rgba" / "mask.png").is_file()


def _truncated(tmp_path, name):
    p = tmp_path / name
    cv2.imwrite(str(p), np.full((300, 300, 3), 128, np.uint8) + np.random.default_rng(0).integers(0, 50, (300, 300, 3), dtype=np.uint8))
    p.write_bytes(p.read_bytes()[:2000])
    return p


def _bomb(tmp_path, name, width=100_000, height=100_000):
    """A tiny file whose header declares a huge image (a decompression bomb)."""
    p = tmp_path / name
    if name.endswith(".png"):
        def chunk(kind, data):
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
        p.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                      + chunk(b"IEND", b""))
    elif name.endswith(".bmp"):
        dib = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
        p.write_bytes(b"BM" + struct.pack("<IHHI", 54 + 64, 0, 0, 54) + dib + b"\0" * 64)
    else:  # JPEG: a real small file whose start-of-frame claims the huge size
        cv2.imwrite(str(p), np.zeros((16, 16, 3), np.uint8))
        data = bytearray(p.read_bytes())
        sof = data.index(b"\xff\xc0")
        data[sof + 5:sof + 9] = struct.pack(">HH", min(height, 65535), min(width, 65535))
        p.write_bytes(bytes(data))
    return p


def _nan_tiff(tmp_path):
    p = tmp_path / "nan.tif"
    a = np.ones((64, 64), np.float32)
    a[3, 5], a[7, 9] = np.nan, np.inf
    tifffile.imwrite(p, a)
    return p


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.png", "no such file"),
        (lambda d: _bomb(d, "bomb.png"), "header declares 100000 x 100000 px"),
        (lambda d: _bomb(d, "bomb.bmp"), "header declares 100000 x 100000 px"),
        (lambda d: _bomb(d, "bomb.jpg"), "header declares 65535 x 65535 px"),
        (lambda d: _bomb(d, "bomb.jpg").rename(d / "innocent.png") or d / "innocent.png",  # the content decides
         "header declares 65535 x 65535 px"),
        (lambda d: _nan_tiff(d), "2 pixels are NaN or infinite"),
        (lambda d: (d / "x.gif").write_bytes(b"GIF89a") and d / "x.gif", "unsupported image format"),
        (lambda d: (d / "fake.png").write_bytes(b"hello") and d / "fake.png", "cannot decode"),
        (lambda d: _truncated(d, "cut.png"), "cannot decode"),
        (lambda d: _truncated(d, "cut.jpg"), "truncated"),
    ],
)
def test_bad_images_give_one_line_error_and_no_output(monkeypatch, capsys, tmp_path, make, message):
    bad = make(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, "infer", bad, "--out", tmp_path / "o")
    assert code == 1
    lines = error_lines(err)
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err and "nothing written" in err
    assert not (tmp_path / "o").exists()


def test_max_pixels_option_sets_the_image_size_limit(monkeypatch, capsys, tmp_path, wafer):
    path, _ = wafer  # 448 x 448
    monkeypatch.setenv("DEFECTSCAN_MAX_PIXELS", str(1 << 30))  # the option sets it: restored after the test
    code, _, err = run_cli(monkeypatch, capsys, "infer", path, "--out", tmp_path / "o", "--max-pixels", "100000")
    assert code == 1 and "header declares 448 x 448 px" in err and "--max-pixels" in err
    bomb = _bomb(tmp_path, "wide.png", 40_000, 30_000)  # 1.2 GP: over the default, under the raised limit
    code, _, err = run_cli(monkeypatch, capsys, "infer", bomb, "--out", tmp_path / "o", "--max-pixels", "2000000000")
    assert code == 1 and "cannot decode" in err  # passed the header check; the 64 stored bytes fail to decode


def test_one_bad_image_among_good_ones_still_fails_the_run(monkeypatch, capsys, tmp_path, wafer):
    path, _ = wafer
    bad = _truncated(tmp_path, "cut.png")
    code, _, err = run_cli(monkeypatch, capsys, "infer", path, bad, "--out", tmp_path / "o")
    assert code == 1 and "1 of 2 image(s) failed" in err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["summary.csv", "wafer"]
    rows = list(csv.DictReader((tmp_path / "o" / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["ok", "failed"] and "cannot decode" in rows[1]["error"]


def test_missing_and_unsupported_files_are_skipped_and_reported(monkeypatch, capsys, tmp_path, wafer):
    path, _ = wafer
    (tmp_path / "notes.gif").write_bytes(b"GIF89a")
    code, _, err = run_cli(monkeypatch, capsys, "infer", tmp_path / "gone.png", path, tmp_path / "notes.gif",
                           "--out", tmp_path / "o")
    assert code == 1 and "2 of 3 image(s) failed" in err
    assert "gone.png: no such file" in err and "unsupported image format '.gif'" in err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["summary.csv", "wafer"]


def test_directory_inputs_recurse_on_request_and_hint_at_images_folder(monkeypatch, capsys, tmp_path, wafer):
    path, _ = wafer
    (tmp_path / "data" / "images" / "lot1").mkdir(parents=True)
    (tmp_path / "data" / "images" / "lot1" / "a.png").write_bytes(path.read_bytes())
    code, _, err = run_cli(monkeypatch, capsys, "infer", tmp_path / "data", "--out", tmp_path / "o")
    assert code == 1 and "contains no images" in err and "did you mean" in err and "data/images?" in err
    code, _, err = run_cli(monkeypatch, capsys, "infer", tmp_path / "data" / "images", "--out", tmp_path / "o")
    assert code == 1 and "add --recursive" in err
    code, _, err = run_cli(monkeypatch, capsys, "infer", tmp_path / "data", "--recursive", "--out", tmp_path / "o")
    assert code == 0, err
    assert (tmp_path / "o" / "a" / "mask.png").is_file()
    # results written inside the searched folder, and hidden folders, are not inputs of the next run
    (tmp_path / "data" / ".cache").mkdir()
    (tmp_path / "data" / ".cache" / "thumb.png").write_bytes(path.read_bytes())
    code, _, err = run_cli(monkeypatch, capsys, "infer", tmp_path / "data", "--recursive", "--out",
                           tmp_path / "data" / "results")
    assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, "infer", tmp_path / "data", "--recursive", "--out",
                           tmp_path / "data" / "results")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "data" / "results").iterdir()) == ["a", "summary.csv"]


def test_bad_options_and_checkpoints(monkeypatch, capsys, tmp_path, wafer):
    path, _ = wafer
    cases = [
        (["--tile", "500"], "multiple of 32"),
        (["--overlap", "600"], "overlap"),
        (["--threshold", "1.5"], "threshold"),
        (["--stitch", "max"], "option 'stitch'"),
        (["--preview-size", "0"], "option 'preview_size'"),
        (["--tile", "0"], "option 'tile'"),
        (["--model", tmp_path / "nothing.safetensors"], "no such checkpoint (neither nothing.safetensors nor"),
        (["--model", tmp_path / "gone" / "best.safetensors"], f"folder {tmp_path / 'gone'} does not exist"),
        (["--device", "gpu"], "unknown device 'gpu'"),
    ]
    spec = ModelSpec(encoder="resnet18", tile=256)
    save_checkpoint(build_model(spec), spec, tmp_path / "r18")
    meta = json.loads((tmp_path / "r18.json").read_text())
    meta["model"]["encoder"] = "resnet34"
    meta.pop("weights_sha256")
    (tmp_path / "r18.json").write_text(json.dumps(meta))
    cases.append((["--model", tmp_path / "r18.safetensors"], "does not fit the model"))
    for extra, message in cases:
        code, _, err = run_cli(monkeypatch, capsys, "infer", path, "--out", tmp_path / "o", *extra)
        lines = error_lines(err)
        assert code == 1 and len(lines) == 1 and message in lines[0], (extra, err)
    assert not (tmp_path / "o").exists()


def test_checkpoint_stitch_mode_is_the_default_and_options_override_it(monkeypatch, capsys, tmp_path, wafer):
    path, _ = wafer
    spec = ModelSpec(encoder="resnet10t", tile=256, overlap=64, stitch="gaussian",
                     arch_kwargs={"decoder_channels": (32, 16, 16, 8, 8)})
    save_checkpoint(build_model(spec), spec, tmp_path / "g")
    for extra, expected in (([], "gaussian"), (["--stitch", "center"], "center")):
        code, _, err = run_cli(monkeypatch, capsys, "infer", path, "--model", tmp_path / "g.safetensors",
                               "--out", tmp_path / "o", *extra)
        assert code == 0, err
        assert json.loads((tmp_path / "o" / "wafer" / "defects.json").read_text())["stitch"] == expected


def test_infer_cleans_what_killed_runs_left_and_nothing_else(monkeypatch, capsys, tmp_path, wafer):
    path, _ = wafer
    out = tmp_path / "o"
    dead_partial, dead_old = out / ".wafer.99999999.k3j2_x9q.partial", out / ".wafer.old-99999999-0a1b2c3d"
    live_partial = out / f".wafer.{os.getpid()}.k3j2_x9q.partial"  # a writer still running: not ours to remove
    users = [out / ".mozilla.old-2023", out / ".cache.123.notours.partial"]  # look alike, are not ours
    for d in (dead_partial, dead_old, live_partial, *users):
        d.mkdir(parents=True)
        (d / "mask.png").write_bytes(b"half")
    (out / ".keep").write_text("the user's")
    code, _, err = run_cli(monkeypatch, capsys, "infer", path, "--out", out)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted([".keep", live_partial.name, *(u.name for u in users),
                                                            "summary.csv", "wafer"])


def test_synth_command_writes_images_and_masks(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "synth", tmp_path / "s", "--size", "256", "--count", "2", "--seed", "4")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "s" / "images").iterdir()) == ["wafer_256px_s4.png", "wafer_256px_s5.png"]
    assert cv2.imread(str(tmp_path / "s" / "masks" / "wafer_256px_s5.png"), cv2.IMREAD_UNCHANGED).shape == (256, 256)
    # a second call adds to the same dataset (other size and seed) and records its wafers as validation images
    code, _, err = run_cli(monkeypatch, capsys, "synth", tmp_path / "s", "--size", "128", "--count", "1", "--seed",
                           "9", "--split", "val")
    assert code == 0, err
    assert len(list((tmp_path / "s" / "images").iterdir())) == 3
    assert json.loads((tmp_path / "s" / "split.json").read_text()) == {"val": ["wafer_128px_s9"]}
    from defectscan.data import load_dataset, split_dataset

    splits = split_dataset(load_dataset(tmp_path / "s"))
    assert [s.stem for s in splits.val] == ["wafer_128px_s9"] and len(splits.train) == 2 and splits.source == "dataset"
    code, _, err = run_cli(monkeypatch, capsys, "synth", tmp_path / "s", "--size", "128", "--split", "dev")
    assert code == 1 and "unknown split 'dev'" in err


def test_module_entry_point_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "defectscan", "infer", str(tmp_path / "nope.png")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[0] == f"error: {tmp_path / 'nope.png'}: no such file"
    assert "nothing written" in proc.stderr


def test_unwritable_outputs_are_refused_before_any_work(monkeypatch, capsys, tmp_path, wafer):
    path, _ = wafer
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    for out in (blocker, blocker / "sub"):
        code, _, err = run_cli(monkeypatch, capsys, "infer", path, "--out", out)
        assert code == 1 and len(error_lines(err)) == 1 and str(blocker) in error_lines(err)[0], err
        assert "Traceback" not in err
        code, _, err = run_cli(monkeypatch, capsys, "train", "--data", tmp_path, "--out", out)
        assert code == 1 and len(error_lines(err)) == 1 and str(blocker) in error_lines(err)[0], err
        for command in (["evaluate", "--model", default_checkpoint(), "--data", tmp_path],
                        ["compare", tmp_path], ["benchmark", ROOT / "configs" / "benchmark" / "bsdata_quick.yaml"]):
            code, _, err = run_cli(monkeypatch, capsys, *command, "--out", out)
            assert code == 1 and len(error_lines(err)) == 1 and str(blocker) in error_lines(err)[0], (command, err)
    assert blocker.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # nothing was started anywhere


def test_checkpoint_sidecar_without_model_section_is_one_line(monkeypatch, capsys, tmp_path, wafer):
    path, _ = wafer
    spec = ModelSpec(encoder="resnet18", tile=256)
    save_checkpoint(build_model(spec), spec, tmp_path / "m")
    meta = json.loads((tmp_path / "m.json").read_text())
    for broken in ({k: v for k, v in meta.items() if k != "model"}, {**meta, "model": {**meta["model"], "tile": "big"}},
                   {**meta, "format_version": "one"}):
        (tmp_path / "m.json").write_text(json.dumps(broken))
        code, _, err = run_cli(monkeypatch, capsys, "infer", path, "--model", tmp_path / "m.safetensors",
                               "--out", tmp_path / "o")
        assert code == 1 and len(error_lines(err)) == 1 and "m.json" in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_output_names_are_unique_against_every_name_given():
    from defectscan.inference import output_names

    names = output_names([Path("x/a.png"), Path("y/a.png"), Path("a_2.png"), Path("b.jpg")])
    assert names == ["a", "a_2", "a_2_2", "b"] and len(set(names)) == 4


def test_bundled_model_finds_the_defects_of_an_unseen_wafer():
    """A guard on the shipped weights: seed 5100 was never trained on (the preset uses 10000-14002)."""
    from defectscan.inference import Predictor
    from defectscan.metrics import region_stats

    image, mask = generate_wafer(1024, seed=5100)
    pred = Predictor.from_checkpoint(None).predict(image)
    found = region_stats(mask > 0, pred.mask > 0, None)
    assert found.gt_regions == 10
    assert found.found >= 8 and found.false_positive_regions <= 6  # measured: 9 found, 3 false (1.0 MP)


def test_the_precision_used_is_recorded(monkeypatch, capsys, tmp_path, wafer):
    path, _ = wafer
    code, out, err = run_cli(monkeypatch, capsys, "infer", path, "--out", tmp_path / "o", "--amp", "bf16")
    assert code == 0, err
    assert json.loads((tmp_path / "o" / "wafer" / "defects.json").read_text())["precision"] == "mixed bfloat16"
    assert "mixed bfloat16" in out  # in the table's title
