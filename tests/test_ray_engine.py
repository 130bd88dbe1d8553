"""`infer --engine ray`: a local Ray (2 CPUs, real worker processes) writes what the local engine writes."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _helpers import run_cli
from test_distributed import _checkpoint, assert_same_infer_outputs
from test_evaluation import dataset_with_clean_images


def _infer(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "defectscan", "infer", *args, "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_ray_engine_writes_the_same_files_as_the_local_engine(tmp_path):
    pytest.importorskip("ray", reason='the Ray engine is an extra: pip install "defectscan[ray]"')
    data = dataset_with_clean_images(tmp_path / "d", defective=3, clean=2)
    (data / "images" / "zz_truncated.png").write_bytes((data / "images").glob("*.png").__next__().read_bytes()[:300])
    ckpt = _checkpoint(tmp_path / "m" / "model")
    common = [str(data / "images"), "-m", str(ckpt), "--threshold", "0.45", "--threads", "1"]
    local = _infer(common + ["-o", str(tmp_path / "local")])
    ray = _infer(common + ["-o", str(tmp_path / "ray"), "--engine", "ray", "--workers", "2"])
    for done in (local, ray):  # the truncated image fails alone, on one line, and the exit status says so
        assert done.returncode == 1, done.stderr[-3000:]
        assert "zz_truncated.png" in done.stderr and "Traceback" not in done.stderr
    assert "2 Ray workers" in " ".join(ray.stdout.split())
    assert_same_infer_outputs(tmp_path / "local", tmp_path / "ray", images=5)
    rows = list(csv.DictReader((tmp_path / "ray" / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["ok"] * 5 + ["failed"] and rows[-1]["error"]
    assert not [p for p in (tmp_path / "ray").iterdir() if p.name.startswith(".")]  # no worker left a temp folder


def test_ray_options_are_checked_before_anything_starts(monkeypatch, capsys, tmp_path):
    image = Path(__file__).parents[1] / "datasets" / "sample" / "wafer.png"
    out = tmp_path / "o"
    for args, message in ((["--engine", "spark"], "--engine spark: use local or ray"),
                          (["--workers", "2"], "--address and --workers go with --engine ray")):
        code, _, err = run_cli(monkeypatch, capsys, "infer", str(image), "-o", str(out), *args)
        assert code == 1 and message in err and not out.exists()


def test_ray_engine_without_ray_installed_says_how_to_get_it(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    image = Path(__file__).parents[1] / "datasets" / "sample" / "wafer.png"
    code, _, err = run_cli(monkeypatch, capsys, "infer", str(image), "-o", str(tmp_path / "o"), "--engine", "ray")
    assert code == 1 and 'pip install "defectscan[ray]"' in err
