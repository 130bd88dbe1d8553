"""Studies above training and evaluation: the resumable limited-label benchmark and its report."""

from defectscan.studies.benchmark import Study, load_study, run_study
from defectscan.studies.report import aggregate, bootstrap_ci, write_report

__all__ = ["Study", "aggregate", "bootstrap_ci", "load_study", "run_study", "write_report"]
