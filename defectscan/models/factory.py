"""Build segmentation networks from names: a decoder (Unet, FPN, ...) composed with an encoder (ResNet, ...).

Encoders are registered in `ENCODERS`; later backbones (Swin, ViTAE) plug in by adding an `EncoderInfo` whose
`smp_name` segmentation-models-pytorch can build, so every decoder works with every encoder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Mapping

from torch import nn

from defectscan.errors import DefectscanError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EncoderInfo:
    """What defectscan needs to know about an encoder beyond building it."""

    smp_name: str
    family: str  # "cnn", "transformer", "hybrid": used to group results in reports
    stride: int = 32  # total downsampling: tile sizes must be multiples of it
    mean: tuple[float, float, float] = IMAGENET_MEAN  # normalisation its ImageNet weights were trained with
    std: tuple[float, float, float] = IMAGENET_STD


ENCODERS: dict[str, EncoderInfo] = {
    # resnet10t (timm): one block per stage; the bundled default model uses it to stay small and fast on CPU
    "resnet10t": EncoderInfo("tu-resnet10t", "cnn"),
    "resnet18": EncoderInfo("resnet18", "cnn"),
    "resnet34": EncoderInfo("resnet34", "cnn"),
    "resnet50": EncoderInfo("resnet50", "cnn"),
    "efficientnet-b0": EncoderInfo("efficientnet-b0", "cnn"),
    "convnext_tiny": EncoderInfo("tu-convnext_tiny", "cnn"),
}
ENCODER_ALIASES = {"tu-convnext_tiny": "convnext_tiny", "tu-resnet10t": "resnet10t"}

# decoder name -> smp class name; decoders with global pooling (UPerNet's PSP, DeepLab's ASPP image pooling)
# depend on the whole tile, so their tiled output is not exactly the whole-image output (see tiling docs).
DECODERS: dict[str, str] = {"unet": "Unet", "fpn": "FPN", "upernet": "UPerNet", "deeplabv3plus": "DeepLabV3Plus"}
GLOBAL_CONTEXT_DECODERS = frozenset({"upernet", "deeplabv3plus"})

Head = Literal["sigmoid", "softmax"]


def register_encoder(name: str, info: EncoderInfo) -> None:
    """Make an encoder available to every decoder under `name` (used by the Swin/ViTAE modules)."""
    ENCODERS[name] = info


def encoder_info(name: str) -> EncoderInfo:
    key = ENCODER_ALIASES.get(name, name)
    if key not in ENCODERS:
        raise DefectscanError(f"unknown encoder '{name}' (available: {', '.join(sorted(ENCODERS))})")
    return ENCODERS[key]


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model; stored in every checkpoint's JSON sidecar.

    `classes` names the output channels: for a softmax head the first is the background class; for a sigmoid
    head each channel is an independent defect class (binary segmentation: one class).
    """

    arch: str = "unet"
    encoder: str = "resnet18"
    classes: tuple[str, ...] = ("defect",)
    head: Head = "sigmoid"
    in_channels: int = 3
    tile: int = 512
    overlap: int = 64
    threshold: float = 0.5
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    arch_kwargs: Mapping[str, Any] = field(default_factory=dict)  # e.g. encoder_depth, decoder_channels

    def __post_init__(self) -> None:
        arch = self.arch.lower().replace("-", "").replace("_", "")
        if arch not in DECODERS:
            raise DefectscanError(f"unknown architecture '{self.arch}' (available: {', '.join(DECODERS)})")
        object.__setattr__(self, "arch", arch)
        object.__setattr__(self, "encoder", ENCODER_ALIASES.get(self.encoder, self.encoder))
        encoder_info(self.encoder)
        if self.head not in ("sigmoid", "softmax"):
            raise DefectscanError(f"unknown head '{self.head}' (sigmoid or softmax)")
        if not self.classes or (self.head == "softmax" and len(self.classes) < 2):
            raise DefectscanError("a softmax head needs a background class plus at least one defect class")
        for name in ("classes", "mean", "std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise DefectscanError("mean and std need one value per input channel")

    @property
    def stride(self) -> int:
        """Tile alignment: the encoder's downsampling, which a shallower encoder (encoder_depth) reduces."""
        depth = int(self.arch_kwargs.get("encoder_depth", 5))
        return min(encoder_info(self.encoder).stride, 2**depth)

    @property
    def defect_classes(self) -> tuple[str, ...]:
        return self.classes[1:] if self.head == "softmax" else self.classes

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["arch_kwargs"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.arch_kwargs.items()}
        for k in ("classes", "mean", "std"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelSpec":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise DefectscanError(f"unknown model fields: {', '.join(sorted(unknown))}")
        d = dict(data)
        kwargs = dict(d.get("arch_kwargs") or {})
        if "decoder_channels" in kwargs:
            kwargs["decoder_channels"] = tuple(kwargs["decoder_channels"])
        d["arch_kwargs"] = kwargs
        return cls(**d)


def _load_encoder_file(model: nn.Module, path: Path, encoder: str) -> None:
    from defectscan.models.checkpoint import load_state_file, match_state_dict

    state = load_state_file(path)
    # accept both bare encoder weights and full-model/`encoder.`-prefixed files
    if any(k.startswith("encoder.") for k in state):
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    match_state_dict(model.encoder, state, source=f"{path} (encoder weights for {encoder})", allow_unused=("fc.", "classifier.", "head."))


def build_model(spec: ModelSpec, encoder_weights: str | Path | None = None) -> nn.Module:
    """A segmentation model for `spec`.

    `encoder_weights`: None (random init), 'imagenet' (downloaded through the hub: needs internet) or the path
    of a local .safetensors/.pth file holding the encoder's state dict.
    """
    import segmentation_models_pytorch as smp

    info = encoder_info(spec.encoder)
    local = None
    if encoder_weights not in (None, "none", "imagenet"):
        local = Path(encoder_weights)
        if not local.is_file():
            raise DefectscanError(f"encoder weights file not found: {local}")
    cls = getattr(smp, DECODERS[spec.arch])
    try:
        model = cls(
            encoder_name=info.smp_name,
            encoder_weights="imagenet" if encoder_weights == "imagenet" else None,
            in_channels=spec.in_channels,
            classes=len(spec.classes),
            **dict(spec.arch_kwargs),
        )
    except (OSError, ConnectionError) as exc:
        raise DefectscanError(f"could not download ImageNet weights for {spec.encoder} (no internet?): {exc}") from None
    except (TypeError, ValueError, KeyError) as exc:
        raise DefectscanError(f"cannot build {spec.arch} with encoder {spec.encoder}: {exc}") from None
    if local is not None:
        _load_encoder_file(model, local, spec.encoder)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe(spec: ModelSpec) -> str:
    return f"{spec.arch}/{spec.encoder} ({spec.head}, classes: {', '.join(spec.defect_classes)})"
