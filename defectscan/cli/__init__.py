"""Command line: one module per command, thin wrappers around the library; printing lives here.

Every user error is one line on stderr and exit code 1, never a traceback.
"""

from __future__ import annotations

import sys

from defectscan.cli import (benchmark, calibrate, compare, data, evaluate, export, infer, models, pretrain,  # noqa: F401
                            pseudolabel, synth, train)  # registers the commands
from defectscan.cli.common import app, console, print_error
from defectscan.errors import DefectscanError

__all__ = ["app", "main"]


def main() -> None:
    """Console entry point: user errors become one line and exit code 1, never a traceback."""
    try:
        app(standalone_mode=True)
    except DefectscanError as exc:
        print_error(exc)
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
