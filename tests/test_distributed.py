"""Sharded `evaluate` and `infer` under torchrun (real processes, gloo on the CPU) equal one process."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from defectscan.distributed import SINGLE, Shard, current_shard
from defectscan.models import ModelSpec, build_model, save_checkpoint
from test_evaluation import TINY_UNET, dataset_with_clean_images

TIMING = {"seconds", "megapixels_per_second", "latency_mean_s", "latency_median_s", "latency_max_s", "peak_rss_mb",
          "peak_gpu_mb", "processes"}


def test_shards_are_disjoint_stable_and_cover_every_item():
    items = list("abcdefg")
    shares = [Shard(r, 3).take(items) for r in range(3)]
    assert sorted(i for share in shares for i, _ in share) == list(range(7))
    assert shares[1] == [(1, "b"), (4, "e")] and SINGLE.take(items) == list(enumerate(items))
    assert current_shard() == SINGLE and SINGLE.gather("x") == ["x"]  # no torchrun here: one process


def _checkpoint(path: Path) -> Path:
    torch.manual_seed(3)
    spec = ModelSpec(arch="unet", encoder="resnet10t", classes=("defect",), tile=64, overlap=16, arch_kwargs=TINY_UNET)
    save_checkpoint(build_model(spec), spec, path)
    return path.with_suffix(".safetensors")


def _run(args: list[str], processes: int, device: bool = True) -> subprocess.CompletedProcess:
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m",
               "defectscan"] if processes > 1 else [sys.executable, "-m", "defectscan"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(launch + args + (["--device", "cpu"] if device else []) + ["--threads", "1"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _without_timing(x):
    if isinstance(x, dict):
        return {k: _without_timing(v) for k, v in x.items() if k not in TIMING}
    if isinstance(x, list):
        return [_without_timing(v) for v in x]
    return x


@pytest.mark.slow
def test_sharded_evaluate_writes_what_one_process_writes(tmp_path):
    data = dataset_with_clean_images(tmp_path / "d", defective=4, clean=3)
    ckpt = _checkpoint(tmp_path / "m" / "model")
    common = ["evaluate", "-m", str(ckpt), "-d", str(data), "--split", "all", "--threshold", "0.45"]
    _run(common + ["-o", str(tmp_path / "one")], 1)
    _run(common + ["-o", str(tmp_path / "two")], 2)
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert two["metrics"]["cost"]["processes"] == 2
    for key in ("created", "command"):
        one.pop(key), two.pop(key)
    assert _without_timing(one) == _without_timing(two)  # every count, curve, region and seam figure
    assert one["metrics"]["images"] == 7 and one["metrics"]["cost"]["seam_check"]
    rows = [list(csv.DictReader((tmp_path / d / "per_image.csv").open())) for d in ("one", "two")]
    assert [_without_timing(r) for r in rows[0]] == [_without_timing(r) for r in rows[1]]
    masks = sorted(p.name for p in (tmp_path / "one" / "predictions").iterdir())
    assert masks == sorted(p.name for p in (tmp_path / "two" / "predictions").iterdir()) and len(masks) == 7
    for name in masks:
        assert (tmp_path / "one" / "predictions" / name).read_bytes() == \
            (tmp_path / "two" / "predictions" / name).read_bytes()
    assert "Worst images" in (tmp_path / "two" / "report.html").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no rank left a temporary folder


@pytest.mark.slow
def test_sharded_infer_writes_the_same_files(tmp_path):
    data = dataset_with_clean_images(tmp_path / "d", defective=3, clean=2)
    ckpt = _checkpoint(tmp_path / "m" / "model")
    for out, processes in (("one", 1), ("two", 2)):
        _run(["infer", str(data / "images"), "-m", str(ckpt), "-o", str(tmp_path / out), "--threshold", "0.45"],
             processes)
    assert_same_infer_outputs(tmp_path / "one", tmp_path / "two", images=5)


def assert_same_infer_outputs(one: Path, two: Path, images: int) -> None:
    """Two `infer` output folders hold the same files with the same contents, timings left out."""
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    assert len([f for f in files if f.name == "mask.png"]) == images
    for f in files:
        a, b = one / f, two / f
        if f.suffix == ".json":
            assert _without_timing(json.loads(a.read_text())) == _without_timing(json.loads(b.read_text())), f
        elif f.name == "summary.csv":  # one row per image, in input order
            ra, rb = (list(csv.DictReader(p.open())) for p in (a, b))
            assert [_without_timing(r) for r in ra] == [_without_timing(r) for r in rb]
        else:
            assert a.read_bytes() == b.read_bytes(), f

DDP_TINY = [  # a small network without batch norm (no CPU SyncBatchNorm) and a loss that is a mean over pixels
    "model.encoder=resnet10t", "model.tile=128", "model.overlap=32",
    "model.arch_kwargs={decoder_channels: [32, 16, 16, 8, 8], decoder_use_norm: false}",
    "model.encoder_kwargs={norm_layer: groupnorm1}", "loss=[bce]", "sampling.crop=64", "sampling.batch_size=4",
    "sampling.steps_per_epoch=3", "training.epochs=2", "augment=[{HorizontalFlip: {p: 0.5}}]",
    "data.val_fraction=0.34", "data.test_fraction=0",
]


@pytest.mark.slow
def test_ddp_training_with_two_processes_equals_one(tmp_path):
    from _helpers import folder_dataset
    from defectscan.models import load_checkpoint

    data = folder_dataset(tmp_path / "d", 6, size=96, seed=10)
    args = ["train", "--data", str(data)] + [a for kv in DDP_TINY for a in ("--set", kv)]
    _run(args + ["--out", str(tmp_path / "one")], 1)
    _run(args + ["--out", str(tmp_path / "two")], 2)
    one, two = (load_checkpoint(tmp_path / d / "last.safetensors")[0].state_dict() for d in ("one", "two"))
    # the same crops in the same global batches; only the order of float sums differs (the all-reduce's, and the
    # kernels' on half a batch). AdamW turns that noise into lr-sized steps for the few weights whose gradient nearly
    # cancels, so the largest difference depends on the CPU: on an AMX Xeon one process at 1 and at 2 threads
    # differ by up to 2e-3 in 0.3 % of the weights (mean 7e-6), as 1 and 2 processes do, while training on other
    # crops (another seed) moves 99.7 % of them by more than 1e-4 (mean 3e-2)
    diff = torch.cat([(one[k].float() - two[k].float()).abs().flatten() for k in one])
    assert float(diff.mean()) < 1e-4 and float((diff > 1e-4).float().mean()) < 0.01, (diff.max(), diff.mean())
    rows = [list(csv.DictReader((tmp_path / d / "metrics.csv").open())) for d in ("one", "two")]
    for a, b in zip(*rows):
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), abs=1e-4)
        assert float(a["val_mean_iou"]) == pytest.approx(float(b["val_mean_iou"]), abs=2e-3)
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == sorted(p.name for p in (tmp_path / "two").iterdir())


@pytest.mark.slow
def test_ddp_training_killed_with_sigkill_resumes_to_the_same_weights(tmp_path):
    import signal
    import time

    from _helpers import folder_dataset
    from defectscan.models import load_checkpoint

    data = folder_dataset(tmp_path / "d", 6, size=96, seed=10)
    args = ["train", "--data", str(data)] + [a for kv in DDP_TINY + ["training.epochs=5"] for a in ("--set", kv)]
    _run(args + ["--out", str(tmp_path / "whole")], 2)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "defectscan"]
    job = subprocess.Popen(launch + args + ["--out", str(tmp_path / "cut"), "--device", "cpu", "--threads", "1"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    history = tmp_path / "cut" / "metrics.csv"
    deadline = time.time() + 300
    while time.time() < deadline and job.poll() is None:
        if history.is_file() and len(history.read_text().splitlines()) >= 2:  # header + epoch 1 written
            break
        time.sleep(0.05)
    assert job.poll() is None, "the run ended before it could be killed"
    os.killpg(job.pid, signal.SIGKILL)  # torchrun and both workers, no clean-up
    job.wait()
    epochs_before = len(history.read_text().splitlines()) - 1
    assert 1 <= epochs_before < 5
    _run(["train", "--resume", str(tmp_path / "cut")], 2, device=False)  # the run's own config decides
    whole, cut = (load_checkpoint(tmp_path / d / "last.safetensors")[0].state_dict() for d in ("whole", "cut"))
    assert all(torch.equal(whole[k], cut[k]) for k in whole)  # the same processes, the same sums: the same bits
    assert len(history.read_text().splitlines()) == 6
