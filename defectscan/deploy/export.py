"""`defectscan export`: a checkpoint -> an ONNX graph (+ an int8 one) that ONNX Runtime runs as `infer --model`.

The graph is the network alone (normalised input -> logits; `inference.onnx_backend`). It is exported with dynamic
height and width where the network allows it, by TorchScript tracing first (seconds) and torch.export second
(minutes on some CNNs, but it exports operators tracing cannot), and kept only if it agrees with torch at a second
tile size too. A network whose graph does not stay size-independent is exported at the tile size instead, stated
in the sidecar and on screen. Every export is checked against torch on random and real tiles (probabilities within
`FP32_TOLERANCE`) and refused otherwise; nothing is written unless every file is.

int8: ONNX Runtime static quantisation (QDQ, int8 weights per output channel, activations calibrated on tiles cut
from the training images, `--calibration`, half of them where the float model sees defects; `--keep-float` modules
stay float). Its distance to the float graph is measured and recorded, not bounded: the accuracy cost is what
`evaluate --model model.int8.onnx` reports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from defectscan.errors import DefectscanError, one_line
from defectscan.inference.backends import TorchTiles
from defectscan.inference.onnx_backend import (INPUT_NAME, ONNX_FORMAT, ONNX_FORMAT_VERSION, OUTPUT_NAME, OnnxTiles,
                                               onnx_sidecar_path)
from defectscan.inference.writers import collect_images
from defectscan.io.files import atomic_dir, file_sha256, write_text
from defectscan.io.images import open_image
from defectscan.io.provenance import library_versions
from defectscan.models import ModelSpec, describe, load_checkpoint
from defectscan.models.checkpoint import checkpoint_paths
from defectscan.tiling import validate_tile
from defectscan.tiling.readers import read_tile

FP32_TOLERANCE = 1e-4  # max |probability difference| between the float graph and torch
KEEP_FLOAT_AUTO = "auto"  # --keep-float auto: search the encoder stages to keep in float (int8_target, default 0.95:
# on BSData's Lite0, masks at IoU 0.96 with float32 kept validation IoU, at 0.81-0.83 they lost 0.06-0.08; README)
INT8_DEFECT_IOU_NOTE = 0.9  # below it, int8 lost 0.06-0.08 validation IoU on BSData (README, deployment)
OPSETS = (18, 23)  # what torch's exporter writes and onnxruntime runs (both ends tested)


@dataclasses.dataclass
class ExportResult:
    files: list[Path]
    dynamic_hw: bool
    checks: dict


def _tiles_from_images(paths: list[Path], tile: int, count: int, seed: int) -> np.ndarray:
    """`count` tile-sized crops (N, tile, tile, C) uint8 at random places, spread evenly over the images (reflection-
    padded where an image is smaller than the tile). One image is open at a time: calibration images may be huge."""
    rng = np.random.default_rng(seed)
    if len(paths) > count:  # images spread over the whole (sorted) list, not its first lot
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, count).round().astype(int)]
    per_image = -(-count // len(paths))
    out: list[np.ndarray] = []
    for path in paths:
        if len(out) == count:
            break
        src = open_image(path)
        h, w = src.shape
        for _ in range(min(per_image, count - len(out))):
            y0, x0 = int(rng.integers(0, max(h - tile, 0) + 1)), int(rng.integers(0, max(w - tile, 0) + 1))
            out.append(read_tile(src, y0, x0, tile, tile))
    return np.stack(out)


def _defect_masks(probs: torch.Tensor, head: str, threshold: float) -> torch.Tensor:
    """(B, K, H, W) probabilities -> boolean masks of the defect classes (a softmax background left out)."""
    return (probs[:, 1:] if head == "softmax" else probs) >= threshold


def _defect_fraction(reference: TorchTiles, spec: ModelSpec, tiles: np.ndarray, batch: int = 4) -> np.ndarray:
    """Per tile, the fraction of pixels the float model calls a defect (any defect class at its threshold)."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(tiles), batch):
            masks = _defect_masks(reference(torch.from_numpy(tiles[i : i + batch])), spec.head, spec.threshold)
            out.append(masks.any(dim=1).float().mean(dim=(1, 2)).numpy())
    return np.concatenate(out)


def select_calibration_tiles(paths: list[Path], reference: TorchTiles, spec: ModelSpec, count: int, seed: int,
                             defect_share: float) -> np.ndarray:
    """`count` calibration tiles: a `defect_share` of them are the candidates (4x `count` random tiles) where the
    float model sees most defect pixels, the rest random candidates. Defects are rare on industrial images: random
    tiles are almost all background, so neither the calibration nor the int8 check (defect-mask IoU with float32)
    would see defects. On BSData this changed int8 accuracy little (README, deployment); the check needs it."""
    focused = int(round(count * defect_share))
    if not focused:
        return _tiles_from_images(paths, spec.tile, count, seed)
    candidates = _tiles_from_images(paths, spec.tile, 4 * count, seed)
    order = np.argsort(-_defect_fraction(reference, spec, candidates), kind="stable")
    rest = np.random.default_rng(seed).permutation(order[focused:])[: count - focused]
    return candidates[np.sort(np.concatenate([order[:focused], rest]))]


def _synthetic_tiles(tile: int, count: int, seed: int, channels: int) -> np.ndarray:
    """Tiles of a synthetic wafer (structured images with defects) when no images were given."""
    from defectscan.data.synth import generate_wafer
    from defectscan.io.images import ImageSource

    image, _ = generate_wafer(max(2 * tile, 512), seed=seed)
    source = ImageSource(image if channels == 3 else np.repeat(image[..., :1], channels, axis=2))
    rng = np.random.default_rng(seed)
    h, w = source.shape
    return np.stack([read_tile(source, int(rng.integers(0, h - tile + 1)), int(rng.integers(0, w - tile + 1)),
                               tile, tile) for _ in range(count)])


def _export(model: torch.nn.Module, spec: ModelSpec, path: Path, opset: int, *, dynamic: bool, dynamo: bool) -> None:
    """One export attempt. TorchScript tracing (`dynamo=False`, deprecated by torch but seconds where torch.export
    takes minutes on some CNNs) records sizes the Python code computed as constants; the graph is then only kept
    if it matches torch at a second size too (`export_onnx`)."""
    example = torch.zeros(2, spec.in_channels, spec.tile, spec.tile)
    kwargs: dict = {}
    if dynamic and dynamo:  # sizes stay multiples of the encoder's stride: what the tiling engine feeds
        dim, stride = torch.export.Dim, spec.stride
        kwargs["dynamic_shapes"] = ({0: dim("batch", min=1, max=1024),
                                     2: stride * dim("h", min=1, max=65536 // stride),
                                     3: stride * dim("w", min=1, max=65536 // stride)},)
    elif dynamo:  # the batch stays free: the tiling engine's last batch is smaller
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=1024)},)
    else:
        axes = {0: "batch", 2: "height", 3: "width"} if dynamic else {0: "batch"}
        kwargs["dynamic_axes"] = {INPUT_NAME: axes, OUTPUT_NAME: axes}
    with warnings.catch_warnings(), _quiet_exporter(), _native_output_silenced():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model.eval(), (example,), None if dynamo else str(path),
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset,
                                    dynamo=dynamo, external_data=False, verbose=False, **kwargs)
    if dynamo:
        program.save(str(path), external_data=False)


@contextlib.contextmanager
def _native_output_silenced():
    """Point file descriptors 1 and 2 at a scratch file for the block: the TorchScript exporter prints whole graphs
    from C++ when an operator is not supported, which Python's redirect_stdout cannot catch."""
    sys.stdout.flush(), sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        try:
            os.dup2(sink.fileno(), 1), os.dup2(sink.fileno(), 2)
            yield
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])


_NOISY_LOGGERS = ("torch.export", "torch.onnx", "onnxscript", "torch._dynamo", "torch.fx", "")  # "": the root
# logger, which onnxruntime's quantisation tools use


@contextlib.contextmanager
def _quiet_exporter():
    """torch.export, onnxscript and onnxruntime.quantization log every pass at INFO/WARNING: not the user's business
    unless it fails (the failure itself is reported)."""
    levels = {n: logging.getLogger(n).level for n in _NOISY_LOGGERS}
    try:
        for n in _NOISY_LOGGERS:
            logging.getLogger(n).setLevel(logging.ERROR)
        yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


@dataclasses.dataclass
class Agreement:
    max_difference: float  # max |probability difference|, every channel
    same_side: float  # fraction of probabilities on the same side of the threshold, every channel
    defect_iou: float  # IoU of the two defect masks (1.0 when both are empty): what background cannot dilute
    defect_fraction: float  # share of defect (pixel, class) entries in the first backend's masks


def _compare(a: TorchTiles | OnnxTiles, b: OnnxTiles, tiles: np.ndarray, threshold: float = 0.5,
             head: str = "sigmoid", batch: int = 4) -> Agreement:
    """How closely two backends agree over `tiles`, in batches. Defect masks leave out a softmax background."""
    worst, same, total, inter, union, defect, cells = 0.0, 0, 0, 0, 0, 0, 0
    for i in range(0, len(tiles), batch):
        t = torch.from_numpy(tiles[i : i + batch])
        pa, pb = a(t), b(t)
        worst = max(worst, float((pa - pb).abs().max()))
        same += int(((pa >= threshold) == (pb >= threshold)).sum())
        total += pa.numel()
        ma, mb = _defect_masks(pa, head, threshold), _defect_masks(pb, head, threshold)
        inter, union = inter + int((ma & mb).sum()), union + int((ma | mb).sum())
        defect, cells = defect + int(ma.sum()), cells + ma.numel()
    return Agreement(worst, same / total, inter / union if union else 1.0, defect / cells)


def _sidecar(spec: ModelSpec, onnx_path: Path, *, source: Path, source_meta: dict, opset: int, dynamic: bool,
             precision: str, check: dict) -> dict:
    return {
        "format": ONNX_FORMAT, "format_version": ONNX_FORMAT_VERSION, "model": spec.to_dict(),
        "onnx_file": onnx_path.name, "onnx_sha256": file_sha256(onnx_path), "opset": opset, "precision": precision,
        "input": {"name": INPUT_NAME, "layout": "NCHW float32, (pixel / 255 - mean) / std", "dynamic_hw": dynamic,
                  "size_multiple": spec.stride, "tile": spec.tile},
        "output": {"name": OUTPUT_NAME, "layout": "NCHW float32 logits", "activation": spec.head},
        "source": {"checkpoint": str(source), "weights_sha256": source_meta.get("weights_sha256")},
        "check": check, "versions": {**library_versions(), **_runtime_versions()},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **({"extra": source_meta["extra"]} if "extra" in source_meta else {}),
    }


def _runtime_versions() -> dict:
    import onnx
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


CALIBRATION_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}  # -> CalibrationMethod


def _in_module(node_name: str, prefix: str) -> bool:
    """Whether a node belongs to module path `prefix` (/encoder/model/blocks.1 holds .../blocks.1/..., not
    .../blocks.10/...)."""
    prefix = prefix.rstrip("/")
    return node_name == prefix or node_name.startswith(prefix + "/")


def encoder_stages(node_names: Sequence[str], min_stages: int = 4) -> list[str]:
    """The encoder's module paths in the order the graph computes them, at the shallowest depth that splits the
    encoder into at least `min_stages` parts (EfficientNet-Lite0: /encoder/model/conv_stem, .../bn1,
    .../blocks.0, ...; ResNet: /encoder/conv1, ..., /encoder/layer1, ...)."""
    names = [n for n in node_names if n.startswith("/encoder/")]
    stages: list[str] = []
    for depth in range(2, 8):
        stages = list(dict.fromkeys("/".join(n.split("/")[: depth + 1]) for n in names if n.count("/") > depth))
        if len(stages) >= min_stages:
            break
    return stages


@contextlib.contextmanager
def _quantisation_errors():
    """onnxruntime.quantization's chatter silenced; its plain Exceptions become one-line errors."""
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        try:
            yield
        except DefectscanError:
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime.quantization raises plain Exceptions
            raise DefectscanError(f"int8 quantisation failed: {type(exc).__name__}: {one_line(exc)[:200]}") from None


def _prepare_for_quantisation(fp32: Path, scratch: Path) -> tuple[Path, list[str]]:
    """The float graph as quantisation takes it (onnxruntime's pre-processing), once per export however many
    quantisations the --keep-float search tries, and its node names."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = scratch / "prepared.onnx"
    with _quantisation_errors():  # symbolic shape inference gives up on dynamic sizes (and leaves a file behind)
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    return prepared, _node_names(prepared)


def _node_names(graph: Path) -> list[str]:
    import onnx

    return [n.name for n in onnx.load(str(graph), load_external_data=False).graph.node]


def _quantize(prepared: Path, node_names: Sequence[str], int8: Path, tiles: np.ndarray, spec: ModelSpec,
              method: str, keep_float: Sequence[str] = ()) -> int:
    """Static QDQ quantisation of the `prepared` graph into `int8`; nodes of the `keep_float` modules (paths as
    the exporter names them, e.g. /decoder) stay in float. Returns how many nodes that kept."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    normalise = TorchTiles(torch.nn.Identity(), head="none", mean=spec.mean, std=spec.std, amp="off",
                           device="cpu", channels_last=False)

    class Tiles(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(range(0, len(tiles), 4))

        def get_next(self):
            i = next(self.items, None)
            if i is None:
                return None
            return {INPUT_NAME: normalise.normalise(torch.from_numpy(tiles[i : i + 4])).numpy()}

    exclude = [n for n in node_names if any(_in_module(n, p) for p in keep_float)]
    if keep_float and not exclude:
        raise DefectscanError(f"--keep-float {' '.join(keep_float)}: no node of the graph is named so "
                              "(names are module paths: /encoder/..., /decoder/...)")
    with _quantisation_errors():
        quantize_static(str(prepared), str(int8), Tiles(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[method]),
                        extra_options={"CalibPercentile": 99.99} if method == "percentile" else None,
                        nodes_to_exclude=exclude)
    return len(exclude)


def export_onnx(checkpoint: str | Path, out: str | Path, *, opset: int = 18, tile: int | None = None,
                int8: bool = False, calibration: list[Path] | None = None, calibration_tiles: int = 32,
                calibration_method: str = "minmax", defect_share: float = 0.5, keep_float: Sequence[str] = (),
                int8_target: float = 0.95, seed: int = 0, log: Callable[[str], None] = print) -> ExportResult:
    """Export `checkpoint` into folder `out` (model.onnx + model.json, and model.int8.onnx + model.int8.json with
    `int8`), each graph checked against torch first. `calibration`: image files or folders (real tiles for the
    check; needed for int8). `keep_float`: module paths (e.g. /encoder/model/blocks.0) left in float in the int8
    graph, or ["auto"]: encoder stages kept in float one by one from the input until the int8 defect masks of the
    calibration tiles reach IoU `int8_target` with float32's. The folder appears whole or not at all."""
    if not OPSETS[0] <= opset <= OPSETS[1]:
        raise DefectscanError(f"--opset {opset}: supported opsets are {OPSETS[0]}..{OPSETS[1]}")
    if calibration_method not in CALIBRATION_METHODS:
        raise DefectscanError(f"--calibration-method {calibration_method}: one of {', '.join(CALIBRATION_METHODS)}")
    if not 0 <= defect_share <= 1:
        raise DefectscanError(f"--defect-share {defect_share:g}: a fraction between 0 and 1")
    if KEEP_FLOAT_AUTO in keep_float and len(keep_float) > 1:
        raise DefectscanError("--keep-float auto searches the encoder stages itself: give it alone")
    if not 0 < int8_target <= 1:
        raise DefectscanError(f"--int8-target {int8_target:g}: a defect mask IoU in (0, 1]")
    if int8 and not calibration:
        raise DefectscanError("--int8 needs --calibration DATA: images (the training images) to calibrate "
                              "activation ranges on")
    weights, _ = checkpoint_paths(checkpoint)
    model, spec, meta = load_checkpoint(checkpoint)
    tile_hw = validate_tile(tile or spec.tile, spec.stride, model_name=describe(spec))
    spec = dataclasses.replace(spec, tile=tile_hw[0])
    reference = TorchTiles(model.float().eval(), head=spec.head, mean=spec.mean, std=spec.std, amp="off",
                           device="cpu", channels_last=False)
    paths = collect_images(calibration) if calibration else []
    real = (select_calibration_tiles(paths, reference, spec, max(calibration_tiles, 4), seed,
                                     defect_share if int8 else 0.0) if paths
            else _synthetic_tiles(spec.tile, 4, seed, spec.in_channels))
    rng = np.random.default_rng(seed)
    random = rng.integers(0, 256, (2, spec.tile, spec.tile, spec.in_channels), dtype=np.uint8)
    out = Path(out)
    with atomic_dir(out) as tmp:
        fp32 = tmp / "model.onnx"
        t0 = time.perf_counter()
        bigger = spec.tile + spec.stride
        wide = (_tiles_from_images(paths, bigger, 2, seed) if paths
                else _synthetic_tiles(bigger, 2, seed, spec.in_channels))
        tried: list[str] = []
        for dynamic, dynamo in ((True, False), (True, True), (False, True), (False, False)):
            how = f"{'dynamic' if dynamic else 'fixed'} size by {'torch.export' if dynamo else 'tracing'}"
            try:
                _export(model, spec, fp32, opset, dynamic=dynamic, dynamo=dynamo)
                graph = _session(fp32, spec, dynamic)
                if dynamic:  # a traced graph may hold the example's sizes as constants: try another size
                    other = _compare(reference, graph, wide).max_difference
                    if other > FP32_TOLERANCE:
                        tried.append(f"{how}: differs from torch by {other:.2g} at {bigger} px")
                        continue
                break
            except Exception as exc:  # noqa: BLE001 - each exporter refuses some operators; the next may not
                tried.append(f"{how}: {type(exc).__name__}: {one_line(exc)[:200]}")
        else:
            raise DefectscanError(f"{describe(spec)} does not export to ONNX opset {opset}: " + "; ".join(tried))
        why = "; ".join(tried)
        if not dynamic:
            log(f"note: {describe(spec)} exported at a fixed {spec.tile} px tile size ({why})")
        seconds = time.perf_counter() - t0
        diff_random = _compare(reference, graph, random).max_difference
        diff_real = _compare(reference, graph, real).max_difference
        if max(diff_random, diff_real) > FP32_TOLERANCE:
            raise DefectscanError(f"the ONNX graph of {describe(spec)} differs from torch by "
                                  f"{max(diff_random, diff_real):.2g} in probability (limit {FP32_TOLERANCE:g}); "
                                  "nothing written")
        check = {"tolerance": FP32_TOLERANCE, "max_abs_difference_random": diff_random,
                 "max_abs_difference_real": diff_real, "real_tiles": len(real),
                 "real_tiles_from": "calibration images" if paths else "a synthetic wafer",
                 "export_seconds": round(seconds, 1), "exporter": "torch.export" if dynamo else "tracing"}
        if why:
            check["attempts_refused"] = why
        files = [fp32]
        write_text(onnx_sidecar_path(fp32), json.dumps(_sidecar(spec, fp32, source=weights, source_meta=meta,
                   opset=opset, dynamic=dynamic, precision="float32", check=check), indent=2) + "\n")
        log(f"float32 graph: max |difference| to torch {max(diff_random, diff_real):.2g} "
            f"({'dynamic' if dynamic else 'fixed'} size)")
        if int8:
            q = tmp / "model.int8.onnx"
            t0 = time.perf_counter()
            auto = list(keep_float) == [KEEP_FLOAT_AUTO]
            prepared, node_names = _prepare_for_quantisation(fp32, tmp)
            stages = encoder_stages(_node_names(fp32)) if auto else []
            kept, searched = ([] if auto else list(keep_float)), []
            while True:
                float_nodes = _quantize(prepared, node_names, q, real, spec, calibration_method, kept)
                # against the float graph, which the int8 one was quantised from, at the model's threshold
                agreement = _compare(graph, _session(q, spec, dynamic), real, spec.threshold, spec.head)
                if not auto:
                    break
                searched.append({"kept_float": list(kept), "defect_iou_with_float32": agreement.defect_iou})
                log(f"int8 with {len(kept)} of {len(stages)} encoder stages in float"
                    + (f" (up to {kept[-1]})" if kept else "") + f": defect mask IoU with float32 "
                    f"{agreement.defect_iou:.3f} (target {int8_target:g})")
                if agreement.defect_iou >= int8_target or len(kept) >= len(stages) - 1:
                    break  # the whole encoder in float would be no int8 encoder at all
                kept = stages[: len(kept) + 1]
            prepared.unlink()
            qcheck = {"calibration_tiles": len(real), "calibration_images": len(paths),
                      "calibration_method": calibration_method, "defect_share": defect_share,
                      "calibration_defect_fraction": agreement.defect_fraction,
                      "kept_float": kept, "float_nodes": float_nodes,
                      **({"keep_float_search": {"target": int8_target, "tried": searched}} if auto else {}),
                      "max_abs_difference_to_float32": agreement.max_difference,
                      "mask_agreement_with_float32": agreement.same_side,
                      "defect_iou_with_float32": agreement.defect_iou,
                      "quantize_seconds": round(time.perf_counter() - t0, 1)}
            write_text(onnx_sidecar_path(q), json.dumps(_sidecar(spec, q, source=weights, source_meta=meta,
                       opset=opset, dynamic=dynamic, precision="int8", check=qcheck), indent=2) + "\n")
            files.append(q)
            log(f"int8 graph: defect mask IoU with float32 {agreement.defect_iou:.3f}, pixel agreement "
                f"{100 * agreement.same_side:.3f} %, max |difference| {agreement.max_difference:.3f} on {len(real)} "
                f"calibration tiles" + (f" ({float_nodes} nodes kept in float)" if kept else ""))
            if auto and agreement.defect_iou < int8_target:
                log(f"note: int8 did not reach defect mask IoU {int8_target:g} with float32 even with every encoder "
                    f"stage but the last in float ({agreement.defect_iou:.2f}): the float32 graph may be the one to "
                    "deploy")
            elif agreement.defect_iou < INT8_DEFECT_IOU_NOTE:
                log(f"note: int8 changes the defect masks of the calibration tiles (IoU {agreement.defect_iou:.2f} "
                    "with float32): check `evaluate` on validation images; --keep-float on the first encoder "
                    "stages recovered the loss of EfficientNet-Lite0 (README, deployment)")
    return ExportResult([out / f.name for f in files], dynamic, check)


def _session(path: Path, spec: ModelSpec, dynamic: bool) -> OnnxTiles:
    meta = {"input": {"dynamic_hw": dynamic}, "precision": "check"}
    return OnnxTiles(path, meta, spec, device="cpu")
