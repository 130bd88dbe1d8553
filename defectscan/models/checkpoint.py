"""Checkpoints: weights in safetensors plus a JSON sidecar with everything `infer` needs to rebuild the model.

Nothing here unpickles: safetensors holds only tensors, and foreign `.pth` files go through
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from defectscan.errors import DefectscanError
from defectscan.io.files import atomic_path, file_sha256, read_json, write_text
from defectscan.io.provenance import library_versions
from defectscan.models.factory import ModelSpec, build_model, describe
from defectscan.models.weights import load_state_file, match_state_dict

FORMAT = "defectscan-checkpoint"
FORMAT_VERSION = 2  # 2: the model section records its stitch mode


def checkpoint_paths(path: str | Path) -> tuple[Path, Path]:
    """(weights, sidecar) for a path given as either file or as the common stem."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def save_checkpoint(
    model: nn.Module,
    spec: ModelSpec,
    path: str | Path,
    *,
    half: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write `<stem>.safetensors` and `<stem>.json` atomically; returns the weights path.

    `half` stores float tensors as float16 (half the size; loading converts back to float32).
    """
    from safetensors.torch import save_file

    weights, sidecar = checkpoint_paths(path)
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if half and v.is_floating_point():
            v = v.half()
        state[k] = v.contiguous()
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": spec.to_dict(),
        "weights_file": weights.name,
        "weights_sha256": file_sha256(weights),
        "versions": library_versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **({"extra": dict(extra)} if extra else {}),
    }
    write_text(sidecar, json.dumps(meta, indent=2) + "\n")
    return weights


def set_threshold(path: str | Path, threshold: float, record: Mapping[str, Any], out: str | Path | None = None) -> Path:
    """Store a chosen decision threshold in a checkpoint: the sidecar's `model.threshold`, with how it was chosen
    in `extra.threshold` (`record`). The weights are not rewritten (their checksum is verified first); with `out`,
    weights and sidecar are written there and the original is left as it was. Returns the weights path."""
    weights, sidecar = checkpoint_paths(path)
    meta = read_sidecar(path)
    if meta.get("weights_sha256") and file_sha256(weights) != meta["weights_sha256"]:
        raise DefectscanError(f"{weights}: weights do not match their sidecar (checksum differs; file replaced or damaged?)")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    meta["model"] = {**meta["model"], "threshold": threshold}
    meta["extra"] = {**meta.get("extra", {}), "threshold": dict(record)}
    if out is not None:
        weights_out, sidecar = checkpoint_paths(out)
        if weights_out.resolve() != weights.resolve():
            with atomic_path(weights_out) as tmp:
                shutil.copyfile(weights, tmp)
            meta["weights_file"] = weights_out.name
        weights = weights_out
    write_text(sidecar, json.dumps(meta, indent=2) + "\n")
    return weights


def read_sidecar(path: str | Path) -> dict[str, Any]:
    weights, sidecar = checkpoint_paths(path)
    if not sidecar.parent.is_dir():
        raise DefectscanError(f"{path}: no such checkpoint (folder {sidecar.parent} does not exist)")
    if not sidecar.is_file() and not weights.is_file():
        raise DefectscanError(f"{path}: no such checkpoint (neither {weights.name} nor {sidecar.name} exists)")
    if not sidecar.is_file():
        raise DefectscanError(f"{sidecar}: checkpoint sidecar not found (a defectscan checkpoint is <name>.safetensors + <name>.json)")
    if not weights.is_file():
        raise DefectscanError(f"{weights}: checkpoint weights not found")
    meta = read_json(sidecar)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DefectscanError(f"{sidecar}: not a defectscan checkpoint sidecar")
    version = meta.get("format_version", 0)
    if not isinstance(version, int):
        raise DefectscanError(f"{sidecar}: 'format_version' must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise DefectscanError(f"{sidecar}: written by a newer defectscan (format {version})")
    if not isinstance(meta.get("model"), dict):
        raise DefectscanError(f"{sidecar}: no 'model' section (the architecture, classes and tile of the network)")
    return meta


def load_checkpoint(
    path: str | Path, *, expect: ModelSpec | None = None, verify: bool = True
) -> tuple[nn.Module, ModelSpec, dict[str, Any]]:
    """(model in eval mode, its spec, the sidecar) from a checkpoint.

    `expect`: the architecture the caller needs (e.g. when resuming training); a checkpoint of another
    architecture is refused before any weights are touched.
    """
    weights, sidecar = checkpoint_paths(path)
    meta = read_sidecar(path)
    try:
        spec = ModelSpec.from_dict(meta["model"])
    except (TypeError, ValueError, DefectscanError) as exc:  # missing, unknown or mistyped fields
        raise DefectscanError(f"{sidecar}: bad 'model' section ({exc})") from None
    if expect is not None:
        for name in ("arch", "encoder", "classes", "head", "in_channels"):
            if getattr(spec, name) != getattr(expect, name):
                raise DefectscanError(
                    f"{weights}: checkpoint is {describe(spec)}, but {describe(expect)} was asked for ({name} differs)"
                )
    if verify and meta.get("weights_sha256") and file_sha256(weights) != meta["weights_sha256"]:
        raise DefectscanError(f"{weights}: weights do not match their sidecar (checksum differs; file replaced or damaged?)")
    model = build_model(spec)
    match_state_dict(model, load_state_file(weights), source=f"{weights} ({describe(spec)})")
    return model.eval(), spec, meta


def default_checkpoint() -> Path:
    """The bundled demo model, trained by `defectscan train configs/default_wafer_model.yaml` on synthetic wafers."""
    return Path(__file__).resolve().parent.parent / "weights" / "wafer_unet_r10t.safetensors"
