"""defectscan: pixel-level defect detection on high-resolution industrial images."""

import os

# Image size is limited by our own header check (io.images.max_pixels, `--max-pixels`), which runs before any
# decode. OpenCV's built-in 2^30 px limit is fixed when cv2 loads, so it is lifted here, before cv2 is imported.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(1 << 40))

__version__ = "0.1.0"
