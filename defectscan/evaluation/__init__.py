"""Measuring models: the streaming evaluator (through `Predictor`), evaluate's outputs, compare, cost."""

from defectscan.evaluation.evaluator import Evaluation, evaluate
from defectscan.evaluation.outputs import EVALUATION_DIR, SPLITS, load_metrics, run_evaluation, select_samples

__all__ = ["EVALUATION_DIR", "SPLITS", "Evaluation", "evaluate", "load_metrics", "run_evaluation", "select_samples"]
