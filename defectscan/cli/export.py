"""`defectscan export`: a checkpoint -> an ONNX graph (and an int8 one) checked against torch."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from defectscan.cli.common import app, apply_max_pixels, apply_threads, console, max_pixels_option, print_note, threads_option
from defectscan.errors import DefectscanError


@app.command()
def export(
    model: Path = typer.Argument(..., help="Checkpoint (.safetensors with its .json) to export."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: model.onnx + model.json (and model.int8.*)."),
    format: str = typer.Option("onnx", "--format", help="Export format (onnx)."),
    int8: bool = typer.Option(False, "--int8", help="Also write an int8 graph (ONNX Runtime static quantisation)."),
    calibration: List[Path] = typer.Option([], "--calibration", help="Images or folders (the training images) for "
                                           "int8 calibration and the real-tile check (repeatable)."),
    calibration_tiles: int = typer.Option(32, min=4, help="Tiles cut from the calibration images."),
    defect_share: float = typer.Option(0.5, help="Share of the calibration tiles picked where the "
                                       "float model sees most defect (from 4x as many random ones); the rest random."),
    calibration_method: str = typer.Option("minmax", help="Activation range calibration: minmax, percentile "
                                           "(99.99th) or entropy."),
    keep_float: List[str] = typer.Option([], "--keep-float", help="Module path left in float in the int8 graph "
                                         "(repeatable; e.g. /encoder/model/blocks.0), or auto: encoder stages kept "
                                         "in float from the input on until --int8-target is reached."),
    int8_target: float = typer.Option(0.95, help="With --keep-float auto: the defect mask IoU with float32, on the "
                                      "calibration tiles, that the int8 graph must reach."),
    tile: Optional[int] = typer.Option(None, help="Tile size in px (default: the checkpoint's); fixed-size "
                                       "graphs take only this size."),
    opset: int = typer.Option(18, help="ONNX opset (18..23)."),
    max_pixels: Optional[int] = max_pixels_option(),
    threads: Optional[int] = threads_option(),
) -> None:
    """Export a model for ONNX Runtime (`infer --model DIR/model.onnx`): dynamic tile size where the network
    allows it, checked against torch on random and real tiles (refused beyond 1e-4 in probability)."""
    if format != "onnx":
        raise DefectscanError(f"--format {format}: only onnx is supported")
    from defectscan.deploy import export_onnx

    apply_max_pixels(max_pixels)
    apply_threads(threads)
    result = export_onnx(model, out, opset=opset, tile=tile, int8=int8, calibration=calibration or None,
                         calibration_tiles=calibration_tiles, calibration_method=calibration_method,
                         defect_share=defect_share, keep_float=keep_float, int8_target=int8_target,
                         log=lambda m: print_note(m[len("note: "):]) if m.startswith("note: ") else console.print(
                             escape(m), highlight=False))
    console.print(f"wrote {', '.join(escape(str(f)) for f in result.files)} (+ .json sidecars)")
