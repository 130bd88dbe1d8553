"""Backbones of our own, each one self-contained module registered with the factory (ViTAE, plain ViT)."""
