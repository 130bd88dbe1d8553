"""`defectscan models`: the encoders and decoders the factory builds."""

from __future__ import annotations


from rich.console import Console
from rich.table import Table

from defectscan.cli.common import app


@app.command()
def models() -> None:
    """List the encoders and decoders the model factory can build."""
    from defectscan.models import DECODERS, ENCODERS

    table = Table(title="encoders (each works under every decoder unless noted)")
    for col in ("encoder", "family", "stride", "notes"):
        table.add_column(col)
    for name, info in ENCODERS.items():
        notes = [] if info.output_stride_16 else ["no deeplabv3plus"]
        if info.offline_package:
            notes.append(f"imagenet offline via {info.offline_package}")
        if info.imagenet is not None:
            notes.append("imagenet through the timm hub (internet)")
        table.add_row(name, info.family, str(info.stride), "; ".join(notes))
    Console().print(table)
    Console().print("decoders: " + ", ".join(DECODERS))
