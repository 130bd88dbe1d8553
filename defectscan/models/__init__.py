"""Models: encoder/decoder registry, the factory, safe weights loading and checkpoints; encoders/ holds our own
backbones (ViTAE)."""

from defectscan.models.checkpoint import default_checkpoint, load_checkpoint, read_sidecar, save_checkpoint, set_threshold
from defectscan.models.factory import ModelSpec, build_model, describe
from defectscan.models.registry import DECODERS, ENCODERS, EncoderInfo, encoder_info, register_encoder

__all__ = ["DECODERS", "ENCODERS", "EncoderInfo", "ModelSpec", "build_model", "default_checkpoint", "describe",
           "encoder_info", "load_checkpoint", "read_sidecar", "register_encoder", "save_checkpoint",
           "set_threshold"]
