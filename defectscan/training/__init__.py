"""Training on a user's dataset: configuration, crop sampling, losses and the resumable training loop."""

from defectscan.training.config import Config, load_config
from defectscan.training.trainer import TrainResult, train

__all__ = ["Config", "TrainResult", "load_config", "train"]
