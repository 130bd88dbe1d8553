"""The tiling engine: layout, tile reading, stitching and `tiled_rows` / `tiled_inference(predict, image, ...)`."""

from defectscan.tiling.engine import TilePredictor, tiled_inference, tiled_rows
from defectscan.tiling.layout import AxisLayout, TileLayout, plan_tiles, validate_tile
from defectscan.tiling.readers import read_tile
from defectscan.tiling.stitching import STITCH_MODES, StitchMode, check_stitch

__all__ = ["STITCH_MODES", "AxisLayout", "StitchMode", "TileLayout", "TilePredictor", "check_stitch", "plan_tiles",
           "read_tile", "tiled_inference", "tiled_rows", "validate_tile"]
