"""Model factory (decoder x encoder by name) and safe checkpoints."""

from defectscan.models.checkpoint import default_checkpoint, load_checkpoint, save_checkpoint
from defectscan.models.factory import ENCODERS, DECODERS, EncoderInfo, ModelSpec, build_model, register_encoder

__all__ = [
    "DECODERS",
    "ENCODERS",
    "EncoderInfo",
    "ModelSpec",
    "build_model",
    "default_checkpoint",
    "load_checkpoint",
    "register_encoder",
    "save_checkpoint",
]
