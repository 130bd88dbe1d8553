"""Training on a user's dataset: configuration, losses, the run directory and the resumable training loop."""

from defectscan.training.config import Config, load_config
from defectscan.training.loop import TrainResult, train
from defectscan.training.rundir import RunDir

__all__ = ["Config", "RunDir", "TrainResult", "load_config", "train"]
