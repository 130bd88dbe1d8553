"""Self-contained HTML reports rendered from Jinja2 templates (templates/), pictures embedded as data URIs.

One HTML file can be mailed or attached to a ticket: no side files, no JavaScript, no network. Values are
escaped by the template engine (autoescape), never pasted into HTML by hand.
"""

from __future__ import annotations

import base64
from functools import lru_cache
from typing import Any

import cv2
import numpy as np
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from defectscan.reporting.overlays import FN_COLOR, FP_COLOR, TP_COLOR


def fmt(v: Any) -> str:
    """Numbers as people read them in a table: 4 significant digits, '-' for undefined."""
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:  # NaN
            return "-"
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def png_uri(image_rgb: np.ndarray, quality: int | None = None) -> str:
    """An RGB image as a data URI (JPEG when `quality` is given: previews of photos are much smaller)."""
    bgr = np.ascontiguousarray(image_rgb[:, :, ::-1])
    if quality:
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
        mime = "jpeg"
    else:
        ok, buf = cv2.imencode(".png", bgr)
        mime = "png"
    if not ok:
        raise ValueError("could not encode image")
    return f"data:image/{mime};base64," + base64.b64encode(buf.tobytes()).decode()


def png_bytes_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


@lru_cache(maxsize=1)
def _environment() -> Environment:
    env = Environment(loader=PackageLoader("defectscan.reporting", "templates"),
                      autoescape=select_autoescape(default=True, default_for_string=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = fmt
    env.globals["outcome_colors"] = {"true positive": TP_COLOR, "false positive": FP_COLOR,
                                     "missed (false negative)": FN_COLOR}
    return env


def render(template: str, **context: Any) -> str:
    """Render `templates/<template>` with `context`."""
    return _environment().get_template(template).render(**context)
