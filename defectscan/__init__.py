"""defectscan: pixel-level defect detection on high-resolution industrial images."""

__version__ = "0.1.0"
