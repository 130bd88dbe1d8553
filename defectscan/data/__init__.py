"""Datasets: layouts (folder, LabelMe, COCO, MVTec AD), validation reports, splits, labeled subsets, training crops
and synthetic wafers."""

from defectscan.data.check import DatasetReport, check_dataset
from defectscan.data.dataset import Problem, Sample, SegmentationDataset
from defectscan.data.formats import FORMATS, load_dataset
from defectscan.data.splits import Splits, label_budget, labeled_subset, split_dataset

__all__ = [
    "FORMATS", "DatasetReport", "Problem", "Sample", "SegmentationDataset", "Splits", "check_dataset",
    "label_budget", "labeled_subset", "load_dataset", "split_dataset",
]
