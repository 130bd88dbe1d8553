"""Compose docs/sample_result.jpg from `defectscan infer datasets/sample/wafer.png` output.

    defectscan infer datasets/sample/wafer.png --out defectscan_results
    python scripts/make_readme_figure.py defectscan_results/wafer/overlay.jpg

Left: the whole overlay; right: a 2x enlarged crop around the most defect-dense window, so defects a few pixels
wide are visible at README size.
"""

import sys
from pathlib import Path

import cv2
import numpy as np

from defectscan.io.images import write_image

ROOT = Path(__file__).resolve().parent.parent


def main(overlay_path: str, side: int = 760, crop: int = 380) -> None:
    overlay = cv2.imread(overlay_path)
    table = Path(overlay_path).with_name("defects.json")
    import json

    regions = json.loads(table.read_text())["defects"]
    # window with most small regions (thin or tiny defects are the point of the picture)
    h, w = overlay.shape[:2]
    best, best_xy = -1, (0, 0)
    for y in range(0, h - crop, crop // 4):
        for x in range(0, w - crop, crop // 4):
            n = sum(x <= r["centroid_x"] < x + crop and y <= r["centroid_y"] < y + crop and r["area_px"] < 2000
                    for r in regions)
            if n > best:
                best, best_xy = n, (x, y)
    x, y = best_xy
    left = cv2.resize(overlay, (side, side), interpolation=cv2.INTER_AREA)
    f = side / w
    cv2.rectangle(left, (int(x * f), int(y * f)), (int((x + crop) * f), int((y + crop) * f)), (255, 255, 255), 2)
    right = cv2.resize(overlay[y : y + crop, x : x + crop], (side, side), interpolation=cv2.INTER_NEAREST)
    out = np.concatenate([left, np.full((side, 8, 3), 255, np.uint8), right], axis=1)
    write_image(ROOT / "docs" / "sample_result.jpg", out, rgb=False, params=[cv2.IMWRITE_JPEG_QUALITY, 88])
    print(f"wrote docs/sample_result.jpg (crop at x={x}, y={y}, {best} regions)")


if __name__ == "__main__":
    main(sys.argv[1])
