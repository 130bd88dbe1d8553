"""The CUDA paths: tiled inference with pinned tile buffers and autocast, training with bf16 / fp16 (GradScaler) and
DataLoader workers, resume, pretraining, evaluation's GPU memory, DDP over NCCL, and checkpoints that load on a
CPU. CI has no GPU, so these skip there; run them where one is lent: `python -m pytest tests/test_cuda.py`."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _helpers import folder_dataset  # tests/ is on sys.path under pytest
from defectscan.data import load_dataset
from defectscan.data.synth import generate_wafer
from defectscan.evaluation import evaluate
from defectscan.inference import Predictor
from defectscan.models import load_checkpoint
from defectscan.schemas import EvalOptions, InferOptions
from defectscan.training import load_config, train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")

TINY = [  # as tests/test_training.py's TINY, on the GPU
    "model.encoder=resnet10t", "model.tile=128", "model.overlap=32",
    "model.arch_kwargs={decoder_channels: [32, 16, 16, 8, 8]}", "sampling.crop=64", "sampling.batch_size=4",
    "sampling.steps_per_epoch=3", "augment=[{HorizontalFlip: {p: 0.5}}]", "training.device=cuda",
    "data.val_fraction=0.34", "data.test_fraction=0",
]


def _mask(amp: str, device: str, image: np.ndarray, stitch: str = "center") -> tuple[np.ndarray, Predictor]:
    predictor = Predictor.from_checkpoint(None, InferOptions(device=device, amp=amp, batch_size=4, stitch=stitch))
    return predictor.predict(image).mask, predictor


def test_tiled_inference_on_the_gpu_equals_the_cpu():
    """The bundled model on a synthetic wafer: CUDA float32 (pinned tile buffers, channels-last) against the CPU;
    bf16 autocast (what `--amp auto` picks on a GPU) within the bf16 rule of the README (<= 0.1 % of pixels)."""
    image, _ = generate_wafer(1024, seed=5)
    for stitch in ("gaussian", "center"):  # the engine copies float32 tiles, or center's uint8 ones, to the CPU
        reference, _ = _mask("off", "cpu", image, stitch)
        fp32, predictor = _mask("off", "cuda", image, stitch)
        assert predictor.tiles.pin_memory and predictor.tiles.device.type == "cuda" and predictor.precision == "float32"
        assert (fp32 != reference).mean() <= 1e-4, (stitch, (fp32 != reference).mean())
    auto, predictor = _mask("auto", "cuda", image)
    assert predictor.precision in ("mixed bfloat16", "mixed float16")
    assert (auto != reference).mean() <= 1e-3, (auto != reference).mean()
    assert (reference > 0).sum() > 1000  # the wafer has defects for the comparison to mean something


def test_evaluation_on_the_gpu_reports_its_memory_and_the_cpu_metrics(tmp_path):
    data = folder_dataset(tmp_path / "d", 3, size=256, seed=40)
    ds = load_dataset(data)
    checkpoint = _tiny_checkpoint(tmp_path)
    runs = {}
    for device in ("cpu", "cuda"):
        opts = EvalOptions(min_area=1, seam_images=1, examples=0, cost=True, amp="off", device=device)
        runs[device] = evaluate(Predictor.from_checkpoint(checkpoint, opts.infer_options()), ds, ds.labeled, opts)
    cpu, gpu = runs["cpu"], runs["cuda"]
    assert gpu.cost["peak_gpu_mb"] > 0 and gpu.cost["device"].startswith("cuda")
    assert gpu.metrics().iou["defect"] == pytest.approx(cpu.metrics().iou["defect"], abs=1e-3)


def _tiny_checkpoint(tmp_path: Path) -> Path:
    """A 2-epoch GPU run of the tiny network on a folder dataset."""
    data = folder_dataset(tmp_path / "train", 4, size=128, seed=50)
    train(load_config(None, TINY + [f"data.root={data}", "training.epochs=2"]), tmp_path / "run", log=lambda m: None)
    return tmp_path / "run" / "best.safetensors"


@pytest.mark.parametrize("amp, workers", [("bf16", 0), ("fp16", 2), ("off", 0)])
def test_training_on_the_gpu_resumes_and_its_checkpoint_loads_on_a_cpu(tmp_path, amp, workers):
    data = folder_dataset(tmp_path / "d", 4, size=128, seed=60)
    base = TINY + [f"data.root={data}", f"training.amp={amp}", f"sampling.workers={workers}"]
    train(load_config(None, base + ["training.epochs=2"]), tmp_path / "run", log=lambda m: None)
    result = train(load_config(None, base + ["training.epochs=3"]), tmp_path / "run", log=lambda m: None, resume=True)
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and result.best_epoch in (1, 2, 3)
    assert all(math.isfinite(float(r["train_loss"])) for r in rows)  # fp16 overflow would show as inf / nan here
    model, spec, meta = load_checkpoint(tmp_path / "run" / "last.safetensors")  # no map_location needed
    assert next(model.parameters()).device.type == "cpu"
    assert meta["extra"]["precision"] == {"bf16": "mixed bfloat16", "fp16": "mixed float16", "off": "float32"}[amp]
    if amp == "off":  # IEEE float32 convolutions, not cuDNN's default TF32
        assert not torch.backends.cudnn.allow_tf32
    image = (np.random.default_rng(0).random((128, 160, 3)) * 255).astype(np.uint8)
    assert Predictor(model.eval(), spec, InferOptions(device="cpu", amp="off")).predict(image).mask.shape == (128, 160)


def test_pretraining_on_the_gpu(tmp_path):
    from defectscan.training.config import PretrainConfig
    from defectscan.training.pretrain import pretrain

    data = folder_dataset(tmp_path / "d", 4, size=96, seed=70)
    cfg = load_config(None, ["model.encoder=resnet10t", "sampling.crop=64", "sampling.batch_size=4",
                             "sampling.steps_per_epoch=3", "training.epochs=2", "training.device=cuda",
                             "mask.patch=16", f"data.root={data}"], schema=PretrainConfig)
    result = pretrain(cfg, tmp_path / "run", log=lambda m: None)
    assert result.encoder_weights.is_file() and (tmp_path / "run" / "reconstructions.png").is_file()


def test_ddp_on_one_gpu_talks_nccl(tmp_path):
    data = folder_dataset(tmp_path / "d", 3, size=128, seed=80)
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "defectscan",
            "train", "--data", str(data), "--out", str(tmp_path / "run"), "--device", "cuda"]
    args += [a for kv in TINY + ["training.epochs=1"] for a in ("--set", kv)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "best.safetensors").is_file()
