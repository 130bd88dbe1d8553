"""Deployment: exported models for the runtimes a line ships (ONNX, int8) and what they cost."""

from defectscan.deploy.export import ExportResult, export_onnx

__all__ = ["ExportResult", "export_onnx"]
