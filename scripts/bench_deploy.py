"""Deployment cost per backbone: size, speed and accuracy of torch fp32, torch bf16, ONNX fp32 and ONNX int8.

    python scripts/bench_deploy.py --run RUN_DIR... --data ../shared/datasets/bsdata     # trained models: + test IoU
    python scripts/bench_deploy.py --family swin_t vitae_t_win vit_s                      # untrained: size and speed
    python scripts/bench_deploy.py --exported EXPORT_DIR...     # `defectscan export` output: ONNX Runtime providers

Speed: megapixels per second through the tiling engine (`Predictor.probabilities`, tile and overlap of the
checkpoint, batch 4) on one synthetic 2048 px wafer, median of `--repeats` passes after a warm-up, every variant in
this one process with the same threads. Accuracy (`--run`): `defectscan evaluate` on the run's test split at the
checkpoint's own threshold, one command per variant; int8 is calibrated on tiles of the run's training images
(`--calibration-tiles`), never the test images. Untrained families (`--family`) are exported from random weights
and calibrated on synthetic wafers: their speed and size are real, their accuracy is not measured.

Providers (`--exported`): the exported fp32 and int8 graphs under the CPU execution provider and under each
accelerated provider this onnxruntime has (OpenVINO, CUDA, TensorRT: `--device auto` picks the first), MP/s and
the share of mask pixels (at the model's threshold) that differ from the CPU provider's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from defectscan.errors import DefectscanError

VARIANTS = (("torch fp32", "model", "off"), ("torch bf16", "model", "bf16"), ("ONNX fp32", "onnx", "auto"),
            ("ONNX int8", "int8", "auto"))


def timed_predictions(model: Path, amp: str, image: np.ndarray, repeats: int,
                      providers: list[str] | None = None) -> tuple[float, np.ndarray]:
    """(MP/s, defect mask) through the tiling engine; `providers` pins ONNX Runtime's (the first is timed)."""
    from defectscan.inference import Predictor
    from defectscan.inference.onnx_backend import OnnxTiles, read_onnx_model
    from defectscan.schemas import InferOptions

    options = InferOptions(device="cpu", amp=amp, batch_size=4)
    if providers:
        spec, meta = read_onnx_model(model)
        tiles = OnnxTiles(model, meta, spec, providers=providers)
        if tiles.provider != providers[0]:
            raise SystemExit(f"{model.name}: ONNX Runtime fell back to {tiles.provider} from {providers[0]}")
        predictor = Predictor(None, spec, options, checkpoint=model, meta=meta, tiles=tiles)
    else:
        predictor = Predictor.from_checkpoint(model, options)
    predictor.probabilities(image[:1024, :1024])  # warm-up: allocations, oneDNN / ORT kernel selection (compile)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        probs = predictor.probabilities(image)
        times.append(time.perf_counter() - t0)
    mask = probs[0] >= round(predictor.threshold * 255)
    return image.shape[0] * image.shape[1] / 1e6 / statistics.median(times), mask


def megapixels_per_second(model: Path, amp: str, image: np.ndarray, repeats: int) -> float:
    return timed_predictions(model, amp, image, repeats)[0]


def provider_table(folders: list[Path], image: np.ndarray, repeats: int) -> None:
    """Each exported graph under the CPU provider and under every installed accelerated one."""
    import onnxruntime

    from defectscan.inference.onnx_backend import ACCELERATED_PROVIDERS

    accelerated = [p for p in ACCELERATED_PROVIDERS if p in onnxruntime.get_available_providers()]
    if not accelerated:
        print(f"# no accelerated provider in this onnxruntime ({onnxruntime.get_available_providers()}): "
              "pip install onnxruntime-openvino (CPU), onnxruntime-gpu (CUDA); the CPU provider only")
    print("| " + " | ".join(["model", "graph", "MP/s CPU provider",
                             *(f"MP/s {p} | mask pixels differing" for p in accelerated)]) + " |")
    print("|---|---|---|" + "---|---|" * len(accelerated))
    for folder in folders:
        for graph in ("model.onnx", "model.int8.onnx"):
            if not (folder / graph).is_file():
                continue
            cpu, cpu_mask = timed_predictions(folder / graph, "auto", image, repeats,
                                              providers=["CPUExecutionProvider"])
            cells = [f"{cpu:.2f}"]
            for provider in accelerated:
                try:
                    speed, mask = timed_predictions(folder / graph, "auto", image, repeats,
                                                    providers=[provider, "CPUExecutionProvider"])
                except DefectscanError as exc:  # a provider that cannot run this graph is a result, not a crash
                    print(f"# {folder.name}/{graph} under {provider}: {exc}", flush=True)
                    cells += ["fails (above)", "-"]
                    continue
                cells += [f"{speed:.2f}", f"{np.mean(mask != cpu_mask):.4%}"]
            print(f"| {folder.name} | {graph} | " + " | ".join(cells) + " |", flush=True)


def iou_on_test_split(model: Path, data: Path, amp: str, out: Path) -> float:
    cmd = [sys.executable, "-m", "defectscan", "evaluate", "-m", str(model), "-d", str(data), "--split", "test",
           "-o", str(out), "--device", "cpu", "--amp", amp]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((out / "metrics.json").read_text())["metrics"]["defect_iou"]


def training_images(run: Path, data: Path) -> list[Path]:
    """The run's training images (its splits.json), for int8 calibration."""
    from defectscan.data import load_dataset

    names = set(json.loads((run / "splits.json").read_text())["train"])
    return [s.image for s in load_dataset(data).samples if s.image.stem in names]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", nargs="*", type=Path, default=[], help="training run folders (best.safetensors)")
    ap.add_argument("--data", type=Path, help="the runs' dataset (test IoU and calibration images)")
    ap.add_argument("--family", nargs="*", default=[], help="untrained encoders: size and speed only")
    ap.add_argument("--exported", nargs="*", type=Path, default=[],
                    help="`defectscan export` folders: their graphs under each installed ONNX Runtime provider")
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calibration-tiles", type=int, default=32)
    ap.add_argument("--defect-share", type=float, default=0.5)
    ap.add_argument("--calibration-method", default="minmax")
    ap.add_argument("--keep-float", nargs="*", default=[], help="module paths left in float in the int8 graph")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    from defectscan.data.synth import generate_wafer, write_dataset
    from defectscan.deploy import export_onnx
    from defectscan.io.provenance import hardware
    from defectscan.models import ModelSpec, build_model, save_checkpoint
    from defectscan.models.checkpoint import read_sidecar
    from defectscan.runtime import set_threads

    set_threads(args.threads)
    image, _ = generate_wafer(args.size, seed=7)
    import onnxruntime

    print(f"# {hardware()}; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; "
          f"speed on a {args.size} px wafer, median of {args.repeats}")
    if args.exported:
        provider_table(args.exported, image, args.repeats)
    if not (args.run or args.family):
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models: list[tuple[str, Path, list[Path], Path | None]] = []  # (label, checkpoint, calibration, data)
        for run in args.run:
            meta = read_sidecar(run / "best.safetensors")
            models.append((f"{meta['model']['encoder']} ({run.parent.name if run.name == 'run' else run.name})",
                           run / "best.safetensors", training_images(run, args.data), args.data))
        if args.family:
            write_dataset(work / "synth", size=1024, count=4, seed=3)
        for encoder in args.family:
            spec = ModelSpec(arch="unet", encoder=encoder, classes=("defect",), tile=512, overlap=64)
            torch.manual_seed(0)
            save_checkpoint(build_model(spec), spec, work / encoder / "model")
            models.append((f"{encoder} (untrained)", work / encoder / "model.safetensors",
                           [work / "synth" / "images"], None))
        print("| model | MB torch / ONNX / int8 | MP/s torch fp32 | torch bf16 | ONNX fp32 | ONNX int8 | "
              "test IoU fp32 | bf16 | ONNX fp32 | ONNX int8 | int8 defect IoU with fp32 (calibration tiles) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for label, ckpt, calibration, data in models:
            out = work / "export" / label.replace(" ", "_").replace("/", "_")
            export_onnx(ckpt, out, int8=True, calibration=calibration, calibration_tiles=args.calibration_tiles,
                        defect_share=args.defect_share, calibration_method=args.calibration_method,
                        keep_float=args.keep_float,
                        log=lambda m: print(f"  {label}: {m}", file=sys.stderr))
            paths = {"model": ckpt, "onnx": out / "model.onnx", "int8": out / "model.int8.onnx"}
            sizes = [paths[k].stat().st_size / 2**20 for k in ("model", "onnx", "int8")]
            speed = [megapixels_per_second(paths[k], amp, image, args.repeats) for _, k, amp in VARIANTS]
            iou = ([iou_on_test_split(paths[k], data, amp, work / "eval" / f"{out.name}-{k}-{amp}") for _, k, amp in VARIANTS]
                   if data else [None] * 4)
            agreement = json.loads((out / "model.int8.json").read_text())["check"]["defect_iou_with_float32"]
            print(f"| {label} | {sizes[0]:.1f} / {sizes[1]:.1f} / {sizes[2]:.1f} | "
                  + " | ".join(f"{s:.2f}" for s in speed) + " | "
                  + " | ".join("-" if v is None else f"{v:.3f}" for v in iou)
                  + f" | {agreement:.3f} |", flush=True)


if __name__ == "__main__":
    main()
