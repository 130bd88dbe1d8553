"""Exported models: an ONNX graph plus its JSON sidecar, run by ONNX Runtime as a tile predictor.

The graph holds the network only: normalised (B, C, H, W) float32 in, (B, K, H, W) logits out. The normalisation,
activation and flip TTA stay in `TileBackend`, shared with the torch backend, so the same tiles meet the same
arithmetic before and after the graph. The sidecar (`<name>.json` beside `<name>.onnx`) carries what the tiling
engine needs (classes, head, normalisation, tile, overlap, threshold, stitch) and the export's numerical check.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from defectscan.errors import DefectscanError, one_line
from defectscan.inference.backends import TileBackend
from defectscan.io.files import file_sha256, read_json
from defectscan.models import ModelSpec

ONNX_FORMAT = "defectscan-onnx"
ONNX_FORMAT_VERSION = 1
INPUT_NAME, OUTPUT_NAME = "image", "logits"
# providers tried in this order when the device is auto (those installed); the CPU one is always last
ACCELERATED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "OpenVINOExecutionProvider")
PROVIDER_NAMES = {"TensorrtExecutionProvider": "TensorRT", "CPUExecutionProvider": "CPU"}


def onnx_sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def read_onnx_model(path: str | Path) -> tuple[ModelSpec, dict[str, Any]]:
    """(spec, sidecar) of an exported model; a missing, foreign or mismatched sidecar is a one-line error."""
    path = Path(path)
    sidecar = onnx_sidecar_path(path)
    if not path.is_file():
        raise DefectscanError(f"{path}: no such ONNX model")
    if not sidecar.is_file():
        raise DefectscanError(f"{sidecar}: sidecar not found (an exported model is <name>.onnx + <name>.json, "
                              "as `defectscan export` writes them)")
    meta = read_json(sidecar)
    if not isinstance(meta, dict) or meta.get("format") != ONNX_FORMAT:
        raise DefectscanError(f"{sidecar}: not a defectscan ONNX sidecar")
    if meta.get("format_version", 0) > ONNX_FORMAT_VERSION:
        raise DefectscanError(f"{sidecar}: written by a newer defectscan (format {meta.get('format_version')})")
    if not isinstance(meta.get("input"), dict):
        raise DefectscanError(f"{sidecar}: no 'input' section (the graph's input name and size mode)")
    if meta.get("onnx_sha256") and file_sha256(path) != meta["onnx_sha256"]:
        raise DefectscanError(f"{path}: graph does not match its sidecar (checksum differs; file replaced or damaged?)")
    try:
        spec = ModelSpec.from_dict(meta["model"])
    except (KeyError, TypeError, ValueError, DefectscanError) as exc:
        raise DefectscanError(f"{sidecar}: bad 'model' section ({exc})") from None
    return spec, meta


def providers_for(device: str) -> list[str]:
    """ONNX Runtime execution providers for a defectscan device name (auto, cpu, cuda[:N])."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in available:
            raise DefectscanError(f"--device {device}: this onnxruntime has no CUDA provider "
                                  "(pip install onnxruntime-gpu)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in ACCELERATED_PROVIDERS if p in available] + ["CPUExecutionProvider"]


class OnnxTiles(TileBackend):
    """An exported graph under ONNX Runtime as a tile predictor: (B, th, tw, C) uint8 -> (B, K, th, tw) float32.

    Inputs are prepared by torch on the CPU (the same normalisation as `TorchTiles`) and handed to the session as
    numpy arrays; the session uses as many threads as torch (`--threads`)."""

    def __init__(self, path: str | Path, meta: dict[str, Any], spec: ModelSpec, *, tta: bool = False,
                 device: str = "auto", providers: list[str] | None = None) -> None:
        """`providers` pins ONNX Runtime's execution providers (default: `providers_for(device)`)."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise DefectscanError('ONNX models need onnxruntime: pip install "defectscan[onnx]"') from None
        self._options = ort.SessionOptions()
        self._options.intra_op_num_threads = torch.get_num_threads()
        self._options.log_severity_level = 3  # warnings about unused initialisers and the like are not the user's
        self.path, self.device, self.head, self.tta = str(path), torch.device("cpu"), spec.head, tta
        # with --device auto an accelerated provider that fails on this graph gives way to the CPU one; a provider
        # the caller asked for (a device, pinned providers) fails loudly instead
        self._may_fall_back = providers is None and device == "auto"
        self._ran: list[str] = []  # the providers that ran batches, in order (a fallback adds the CPU one)
        self._open(providers or providers_for(device))
        self._check_inputs(path, meta, spec)
        self.fixed_size = None if meta["input"].get("dynamic_hw") else (spec.tile, spec.tile)
        self._precision = f"onnxruntime {meta.get('precision', 'float32')}"
        self._set_normalisation(spec.mean, spec.std)

    def _open(self, providers: list[str]) -> None:
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(self.path, self._options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph / RuntimeException types
            raise DefectscanError(f"{self.path}: ONNX Runtime cannot load it ({one_line(exc)})") from None
        self.provider = self.session.get_providers()[0]  # the one that runs the graph (the CPU one takes the rest)

    def _check_inputs(self, path: Path, meta: dict[str, Any], spec: ModelSpec) -> None:
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if [i.name for i in inputs] != [INPUT_NAME] or [o.name for o in outputs] != [OUTPUT_NAME]:
            raise DefectscanError(f"{path}: graph inputs/outputs {[i.name for i in inputs]} -> "
                                  f"{[o.name for o in outputs]} are not a defectscan export "
                                  f"({INPUT_NAME} -> {OUTPUT_NAME})")
        _, channels, h, w = inputs[0].shape
        if channels != spec.in_channels:
            raise DefectscanError(f"{path}: graph takes {channels} channels, its sidecar says {spec.in_channels}")
        fixed = isinstance(h, int) and isinstance(w, int)
        if fixed and (h, w) != (spec.tile, spec.tile):
            raise DefectscanError(f"{path}: graph takes {h}x{w} tiles, its sidecar says tile {spec.tile}")
        if fixed == bool(meta["input"].get("dynamic_hw")):
            raise DefectscanError(f"{path}: graph input is {'fixed' if fixed else 'dynamic'}-size, its sidecar "
                                  "says otherwise")

    @property
    def precision(self) -> str:
        """The graph's number format, and the accelerated providers that ran it (their int8 kernels round otherwise
        than the CPU provider's: an evaluation says which one it measured), e.g. 'onnxruntime int8 (OpenVINO, then
        CPU)' after a fallback."""
        ran = self._ran or [self.provider]
        if ran == ["CPUExecutionProvider"]:
            return self._precision
        names = [PROVIDER_NAMES.get(p, p.removesuffix("ExecutionProvider")) for p in ran]
        return f"{self._precision} ({', then '.join(names)})"

    @property
    def parameters(self) -> int:
        """Weights in the graph (its initialisers' elements; int8 graphs count their quantised weights once)."""
        import onnx

        graph = onnx.load(self.path, load_external_data=False).graph
        return int(sum(np.prod(t.dims) for t in graph.initializer if t.data_type != onnx.TensorProto.INT64
                       and not t.name.endswith(("_scale", "_zero_point"))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed_size and tuple(x.shape[2:]) != self.fixed_size:
            raise DefectscanError(f"this ONNX model was exported for {self.fixed_size[0]}x{self.fixed_size[1]} tiles "
                                  f"only (fixed size); the tiling engine asked for {x.shape[2]}x{x.shape[3]}")
        feed = {INPUT_NAME: np.ascontiguousarray(x.numpy())}
        try:
            out = self.session.run([OUTPUT_NAME], feed)[0]
        except Exception as exc:  # e.g. OpenVINO's provider on some int8 attention graphs (measured: ViTAE-T-win)
            failed = self.provider
            if failed == "CPUExecutionProvider" or not self._may_fall_back:
                raise DefectscanError(f"{self.path}: ONNX Runtime's {failed} failed on a "
                                      f"{x.shape[2]}x{x.shape[3]} tile batch ({one_line(exc)})") from None
            self._open(["CPUExecutionProvider"])
            self.fallback_note = (f"{self.path}: {failed} failed on this graph ({one_line(exc)[:200]}); ran it on "
                                  f"the CPU provider instead")
            warnings.warn(self.fallback_note, RuntimeWarning, stacklevel=2)
            out = self.session.run([OUTPUT_NAME], feed)[0]
        if self.provider not in self._ran:
            self._ran.append(self.provider)
        return torch.from_numpy(out)
