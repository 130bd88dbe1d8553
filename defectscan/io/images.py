"""Reading images of any size into 8-bit RGB, region by region; writing images atomically.

The tiling engine never asks for the whole image as float: it asks an `ImageSource` for one region at a time,
and the source converts that region (16-bit, grayscale, alpha, float) to uint8 RGB. Large uncompressed TIFFs
are memory-mapped, so only the regions being tiled are ever read from disk.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from defectscan.errors import DefectscanError
from defectscan.io.files import atomic_path

SUPPORTED_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

# Largest image (width x height) decoded before a user says otherwise: 2^30 px (32768^2, 3 GB as RGB) is OpenCV's
# own default and covers 20k+ px line-scan images; a bigger header is usually a decompression bomb.
MAX_PIXELS_ENV = "DEFECTSCAN_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 1 << 30


def max_pixels() -> int:
    """The pixel limit: `DEFECTSCAN_MAX_PIXELS` (set by `--max-pixels`) or 2^30."""
    value = os.environ.get(MAX_PIXELS_ENV, "")
    try:
        limit = int(value) if value else DEFAULT_MAX_PIXELS
    except ValueError:
        raise DefectscanError(f"{MAX_PIXELS_ENV}={value!r} is not a whole number of pixels") from None
    if limit < 1:
        raise DefectscanError(f"{MAX_PIXELS_ENV}={value!r} must be at least 1")
    return limit


def set_max_pixels(limit: int) -> None:
    """Set the pixel limit for this process (`--max-pixels`). OpenCV's own limit is lifted in `defectscan/__init__`."""
    os.environ[MAX_PIXELS_ENV] = str(limit)


def _png_size(head: bytes) -> tuple[int, int] | None:
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    return None


def _bmp_size(head: bytes) -> tuple[int, int] | None:
    if head[:2] == b"BM" and len(head) >= 26:
        if int.from_bytes(head[14:18], "little") == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
            return int.from_bytes(head[18:20], "little"), int.from_bytes(head[20:22], "little")
        width = int.from_bytes(head[18:22], "little", signed=True)
        height = int.from_bytes(head[22:26], "little", signed=True)  # negative: top-down rows
        return abs(width), abs(height)
    return None


def _jpeg_size(path: Path) -> tuple[int, int] | None:
    """Width and height from the first start-of-frame marker (walks the marker segments, reads no pixels)."""
    with open(path, "rb") as fh:
        if fh.read(2) != b"\xff\xd8":
            return None
        while True:
            byte = fh.read(1)
            while byte and byte != b"\xff":
                byte = fh.read(1)
            while byte == b"\xff":  # fill bytes
                byte = fh.read(1)
            if not byte:
                return None
            marker = byte[0]
            if marker in (0x01, *range(0xD0, 0xD8)):  # stand-alone markers carry no length
                continue
            length = int.from_bytes(fh.read(2), "big")
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                data = fh.read(5)
                if len(data) < 5:
                    return None
                return int.from_bytes(data[3:5], "big"), int.from_bytes(data[1:3], "big")
            if length < 2:
                return None
            fh.seek(length - 2, os.SEEK_CUR)


def _tiff_size(path: Path) -> tuple[int, int, int] | None:
    """(width, height, planes) of the first series, which is what tifffile reads: a stack counts every page."""
    import tifffile

    try:
        with quiet_stderr(), tifffile.TiffFile(str(path)) as tif:
            page, shape = tif.pages[0], tuple(tif.series[0].shape)
            w, h = int(page.imagewidth), int(page.imagelength)
    except Exception:  # not a readable TIFF: the decode reports it
        return None
    total = math.prod(shape) if shape else w * h
    channels = int(page.samplesperpixel) if page.samplesperpixel else 1
    return w, h, max(1, total // max(1, w * h * channels))


def header_size(path: Path) -> tuple[int, int, int] | None:
    """(width, height, planes) as the file's header declares it, from its content (not its suffix: a JPEG named
    .png is still a JPEG), without decoding; None when the header is not one this reader knows."""
    with open(path, "rb") as fh:
        head = fh.read(32)
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return _tiff_size(path)
    size = _png_size(head) or _bmp_size(head) or (_jpeg_size(path) if head[:2] == b"\xff\xd8" else None)
    return (*size, 1) if size else None


def check_pixel_limit(path: Path) -> None:
    """Refuse an image whose header declares more pixels than the limit, before anything is allocated; a file whose
    header this reader does not know is refused too, since the decoder would allocate whatever it declares."""
    size = header_size(path)
    if size is None:
        if path.suffix.lower() in (".tif", ".tiff"):
            return  # tifffile reads (and reports) it without trusting a size
        raise DefectscanError(f"{path}: cannot decode image (its header is not that of a PNG, JPEG, BMP or TIFF)")
    w, h, planes = size
    limit = max_pixels()
    if w * h * planes > limit:
        stack = f" x {planes} pages" if planes > 1 else ""
        raise DefectscanError(
            f"{path}: header declares {w} x {h} px{stack} ({w * h * planes / 1e6:,.0f} MP), over the limit of "
            f"{limit / 1e6:,.0f} MP (a decompression bomb or a really huge image; raise it with --max-pixels or "
            f"{MAX_PIXELS_ENV})"
        )


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence libpng/libjpeg/libtiff, which print straight to fd 2 on bad files; we report our own one line."""
    try:
        saved = os.dup(2)
    except OSError:  # no usable fd 2 (some embedded interpreters): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _value_scale(arr: np.ndarray) -> tuple[float, float]:
    """(offset, scale) mapping the image's value range to 0..255, decided once for the whole image.

    16-bit industrial cameras usually store 10/12/14-bit data; scaling by the smallest bit depth that holds the
    maximum keeps such images bright instead of nearly black (x/257 would).
    """
    if arr.dtype == np.uint8:
        return 0.0, 1.0
    if np.issubdtype(arr.dtype, np.integer):
        top = int(arr.max())
        bits = max(8, top.bit_length())
        return 0.0, 255.0 / float((1 << bits) - 1)
    lo, hi = float(np.min(arr)), float(np.max(arr))
    if not (np.isfinite(lo) and np.isfinite(hi)):  # NaN or inf would turn the whole image black
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise DefectscanError(f"{bad:,} pixels are NaN or infinite; replace them (e.g. with the valid minimum) first")
    if lo >= 0.0 and hi <= 1.0:
        return 0.0, 255.0
    return lo, 255.0 / max(hi - lo, 1e-12)


class ImageSource:
    """A 2-D image (H, W[, C]) of any dtype, read as uint8 RGB one region at a time.

    `data` may be an in-memory array or a `numpy.memmap`; conversion happens per region so a memory-mapped
    16-bit image is never converted (or loaded) as a whole.
    """

    def __init__(self, data: np.ndarray, *, bgr: bool = False, name: str = "image") -> None:
        if data.ndim == 3 and data.shape[2] == 1:
            data = data[:, :, 0]
        if data.ndim not in (2, 3) or (data.ndim == 3 and data.shape[2] not in (3, 4)):
            raise DefectscanError(f"{name}: unsupported image layout {data.shape} (expected HxW, HxWx3 or HxWx4)")
        if data.shape[0] == 0 or data.shape[1] == 0:
            raise DefectscanError(f"{name}: image is empty ({data.shape})")
        if not (data.dtype == np.uint8 or np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
            raise DefectscanError(f"{name}: unsupported pixel type {data.dtype}")
        self.data = data
        self.bgr = bgr
        self.name = name
        self.height, self.width = int(data.shape[0]), int(data.shape[1])
        try:
            self._offset, self._scale = _value_scale(data)
        except DefectscanError as exc:
            raise DefectscanError(f"{name}: float image: {exc}") from None

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Region [y0:y1, x0:x1] (inside the image) as a (h, w, 3) uint8 RGB array."""
        return self.convert(self.data[y0:y1, x0:x1])

    def read_rows(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Pixels at the outer product of index arrays (used for reflection padding at borders)."""
        r0, r1 = int(rows.min()), int(rows.max()) + 1
        c0, c1 = int(cols.min()), int(cols.max()) + 1
        window = self.data[r0:r1, c0:c1]
        return self.convert(window[(rows - r0)[:, None], (cols - c0)[None, :]])

    def convert(self, region: np.ndarray) -> np.ndarray:
        if region.dtype != np.uint8:
            f = (region.astype(np.float32) - self._offset) * self._scale
            region = np.clip(f + 0.5, 0, 255).astype(np.uint8)
        if region.ndim == 2:
            return np.repeat(region[:, :, None], 3, axis=2)
        if region.shape[2] == 4:  # alpha carries no inspection information; the colour planes do
            region = region[:, :, :3]
        if self.bgr:
            region = region[:, :, ::-1]
        return np.ascontiguousarray(region)

    def to_rgb8(self) -> np.ndarray:
        """The whole image as uint8 RGB (for previews and small images)."""
        return self.read(0, self.height, 0, self.width)


def _check_jpeg_complete(path: Path) -> None:
    # libjpeg decodes a truncated file into a half-grey image and only warns; the end-of-image marker tells.
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - 4096))
        tail = fh.read()
    if b"\xff\xd9" not in tail:
        raise DefectscanError(f"{path}: JPEG file is truncated (no end-of-image marker)")


def _open_tiff(path: Path) -> np.ndarray | None:
    """Memory-map an uncompressed, contiguous TIFF (the usual format of huge line-scan images); None otherwise."""
    import tifffile

    try:
        with quiet_stderr():
            arr = tifffile.memmap(str(path), mode="r")
    except Exception:  # compressed, tiled or odd layout: fall back to a full decode
        return None
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[2] not in (3, 4):
        return None  # planar (C, H, W) layout; the full decode path handles it
    return arr


def imread_unchanged(path: Path) -> np.ndarray | None:
    """`cv2.imread` as stored (bit depth, channels): None when it cannot decode (OpenCV 5 raises instead)."""
    with quiet_stderr():
        try:
            return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        except cv2.error:
            return None


def open_image(path: str | Path) -> ImageSource:
    """Open an image file for tiled reading; every failure is a one-line `DefectscanError`."""
    path = Path(path)
    if not path.exists():
        raise DefectscanError(f"{path}: no such file")
    if path.is_dir():
        raise DefectscanError(f"{path}: is a directory, expected an image file")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DefectscanError(f"{path}: unsupported image format '{suffix}' (supported: {', '.join(SUPPORTED_SUFFIXES)})")
    check_pixel_limit(path)
    if suffix in (".jpg", ".jpeg"):
        _check_jpeg_complete(path)
    if suffix in (".tif", ".tiff"):
        arr = _open_tiff(path)
        if arr is not None:
            return ImageSource(arr, bgr=False, name=str(path))
        try:
            import tifffile

            with quiet_stderr():
                arr = tifffile.imread(str(path))
        except Exception as exc:
            raise DefectscanError(f"{path}: cannot read TIFF ({type(exc).__name__}: {exc})") from None
        if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[2] not in (3, 4):
            arr = np.moveaxis(arr, 0, -1)
        return ImageSource(arr, bgr=False, name=str(path))
    arr = imread_unchanged(path)
    if arr is None:
        raise DefectscanError(f"{path}: cannot decode image (corrupt, truncated or not really {suffix[1:].upper()})")
    return ImageSource(arr, bgr=arr.ndim == 3, name=str(path))


def read_image(path: str | Path) -> np.ndarray:
    """Whole image as uint8 RGB (H, W, 3)."""
    return open_image(path).to_rgb8()


def write_image(path: str | Path, image: np.ndarray, *, rgb: bool = True, params: list[int] | None = None) -> None:
    """Write an image atomically (RGB input is converted to OpenCV's BGR)."""
    path = Path(path)
    if rgb and image.ndim == 3:
        image = np.ascontiguousarray(image[:, :, ::-1])
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), image, params or []):
            raise DefectscanError(f"{path}: could not write image")
