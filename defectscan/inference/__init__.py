"""From a model to per-image results: the torch tile backend, the mask rule, `Predictor` and the output writers."""

from defectscan.inference.backends import TorchTiles
from defectscan.inference.postprocess import ClassMap, defect_score, score_to_u8, segment
from defectscan.inference.predictor import Prediction, Predictor, SegmentedImage
from defectscan.inference.writers import collect_images, output_names, write_prediction

__all__ = ["ClassMap", "Prediction", "Predictor", "SegmentedImage", "TorchTiles", "collect_images", "defect_score",
           "output_names", "score_to_u8", "segment", "write_prediction"]
