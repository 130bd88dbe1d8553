"""Regenerate the example image shipped in datasets/sample/ (synthetic wafer, seed 7, 2048 px).

    python scripts/make_sample.py

Seed 7 is neither a training (1000..) nor a validation (2000..) seed of the bundled model.
"""

from pathlib import Path

import cv2

from defectscan.io.images import write_image
from defectscan.data.synth import generate_wafer

OUT = Path(__file__).resolve().parent.parent / "datasets" / "sample"

if __name__ == "__main__":
    image, mask = generate_wafer(2048, seed=7)
    best = [cv2.IMWRITE_PNG_COMPRESSION, 9]  # keeps the PNG under 5 MB
    write_image(OUT / "wafer.png", image, params=best)
    write_image(OUT / "wafer_mask.png", mask, rgb=False, params=best)
    print(f"wrote {OUT / 'wafer.png'} and {OUT / 'wafer_mask.png'}")
