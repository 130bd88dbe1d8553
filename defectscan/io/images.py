"""Reading images of any size into 8-bit RGB, region by region; writing images atomically.

The tiling engine never asks for the whole image as float: it asks an `ImageSource` for one region at a time,
and the source converts that region (16-bit, grayscale, alpha, float) to uint8 RGB. Large uncompressed TIFFs
are memory-mapped, so only the regions being tiled are ever read from disk; huge PNG and JPEG files are decoded
row by row (libvips) as the tiler moves down the image (`StreamedImageSource`).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
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
        self._describe(data.shape, data.dtype, bgr=bgr, name=name)
        self.data = data
        try:
            self._offset, self._scale = _value_scale(data)
        except DefectscanError as exc:
            raise DefectscanError(f"{name}: float image: {exc}") from None

    def _describe(self, shape: tuple[int, ...], dtype: np.dtype, *, bgr: bool, name: str) -> None:
        if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (3, 4)):
            raise DefectscanError(f"{name}: unsupported image layout {shape} (expected HxW, HxWx3 or HxWx4)")
        if shape[0] == 0 or shape[1] == 0:
            raise DefectscanError(f"{name}: image is empty ({shape})")
        if not (dtype == np.uint8 or np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
            raise DefectscanError(f"{name}: unsupported pixel type {dtype}")
        self.bgr = bgr
        self.name = name
        self.height, self.width = int(shape[0]), int(shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def _rows(self, r0: int, r1: int) -> np.ndarray:
        """Stored rows [r0, r1), all columns, in the stored type and channel order."""
        return self.data[r0:r1]

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Region [y0:y1, x0:x1] (inside the image) as a (h, w, 3) uint8 RGB array."""
        return self.convert(self._rows(y0, y1)[:, x0:x1])

    def read_rows(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Pixels at the outer product of index arrays (used for reflection padding at borders)."""
        r0, r1 = int(rows.min()), int(rows.max()) + 1
        c0, c1 = int(cols.min()), int(cols.max()) + 1
        window = self._rows(r0, r1)[:, c0:c1]
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


# Decoded size from which PNG and JPEG files are decoded row by row instead of whole: 2^24 px (4096^2, 48 MB as RGB).
# Below it OpenCV's whole-image decode is as fast and simplest; above it the decoded image (and OpenCV's second
# copy while decoding) would dominate the memory of `infer`.
STREAM_MIN_PIXELS = 1 << 24
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_VIPS_FORMATS = {"uchar": np.uint8, "ushort": np.uint16}


def _vips():
    """pyvips, or None where libvips cannot be loaded (then images are decoded whole, as below the threshold)."""
    os.environ.setdefault("VIPS_WARNING", "0")  # libvips warns on stderr; errors are reported as our one line
    try:
        import pyvips
    except (ImportError, OSError):
        return None
    return pyvips


def _vips_error(path: Path, exc: Exception) -> DefectscanError:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return DefectscanError(f"{path}: cannot decode image ({lines[-1] if lines else type(exc).__name__})")


class StreamedImageSource(ImageSource):
    """A PNG or JPEG decoded top to bottom by libvips, holding only the rows asked for since the last request.

    The tiling engine asks for tile rows in order, so memory holds one band of tile rows instead of the whole
    decoded image (805 MB for a 16384^2 RGB PNG, and OpenCV needs twice that while decoding). Asking for rows
    above the held band starts a new decode from the top (counted in `passes`); the overlay preview after tiling
    is such a second pass. Pixels are identical to OpenCV's decode (same libpng/libjpeg-turbo output).
    """

    def __init__(self, path: Path, vips_image, pyvips) -> None:
        bands = vips_image.bands
        dtype = np.dtype(_VIPS_FORMATS[vips_image.format])
        # Gray+alpha keeps only the gray band (alpha carries no inspection information), like RGBA below.
        shape = (vips_image.height, vips_image.width) + (() if bands <= 2 else (bands,))
        self._describe(shape, dtype, bgr=False, name=str(path))
        self.path, self._pyvips, self._bands, self._dtype = path, pyvips, bands, dtype
        self._lock = threading.Lock()
        self.passes = 0
        self._start()
        self._offset, self._scale = 0.0, 1.0
        if dtype != np.uint8:  # 16-bit: the value scale needs the image maximum, one streamed pass to find it
            top = int(self._open().max())
            self._offset, self._scale = _value_scale(np.array([top], dtype))

    def _open(self):
        try:
            return self._pyvips.Image.new_from_file(str(self.path), access="sequential", fail_on="truncated")
        except self._pyvips.Error as exc:
            raise _vips_error(self.path, exc) from None

    def _start(self) -> None:
        self._region = self._pyvips.Region.new(self._open())
        self._lo = self._hi = 0
        self._held = np.empty((0, self.width, self._bands), self._dtype)
        self.passes += 1

    def _decode(self, n: int) -> np.ndarray:
        try:
            data = self._region.fetch(0, self._hi, self.width, n)
        except self._pyvips.Error as exc:
            raise _vips_error(self.path, exc) from None
        self._hi += n
        return np.frombuffer(data, self._dtype).reshape(n, self.width, self._bands)

    def _rows(self, r0: int, r1: int) -> np.ndarray:
        with self._lock:
            if r0 < self._lo:
                self._start()
            if r0 >= self._hi:  # nothing held is wanted: decode past the gap in bounded chunks
                while self._hi < r0:
                    self._decode(min(256, r0 - self._hi))
                self._held, self._lo = self._held[:0], r0
            else:
                self._held, self._lo = self._held[r0 - self._lo :], r0
            if r1 > self._hi:
                self._held = np.concatenate([self._held, self._decode(r1 - self._hi)])
            rows = self._held[: r1 - r0]
        return rows[:, :, 0] if self._bands <= 2 else rows


def _check_jpeg_complete(path: Path) -> None:
    # libjpeg decodes a truncated file into a half-grey image and only warns; the end-of-image marker tells.
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - 4096))
        tail = fh.read()
    if b"\xff\xd9" not in tail:
        raise DefectscanError(f"{path}: JPEG file is truncated (no end-of-image marker)")


def _ends_like_an_image(path: Path, magic: bytes) -> bool:
    """Whether the file ends with PNG's IEND chunk or JPEG's end-of-image marker (in its last 64 KB: writers may
    append a little). A streamed decode would only fail on a cut file minutes into tiling; the whole decode
    reports it at once."""
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        fh.seek(max(0, fh.tell() - 65536))
        tail = fh.read()
    return (b"IEND" if magic == _PNG_MAGIC else b"\xff\xd9") in tail


def _open_streamed(path: Path) -> StreamedImageSource | None:
    """A row-by-row source for a PNG or JPEG of at least STREAM_MIN_PIXELS; None for smaller images, layouts libvips
    would convert differently from OpenCV (CMYK, palette+alpha, float), or where libvips is missing."""
    with open(path, "rb") as fh:
        magic = fh.read(8)
    size = header_size(path)
    if not (magic == _PNG_MAGIC or magic[:2] == b"\xff\xd8") or size is None or size[0] * size[1] < STREAM_MIN_PIXELS:
        return None
    if not _ends_like_an_image(path, magic):
        return None
    pyvips = _vips()
    if pyvips is None:
        return None
    try:
        image = pyvips.Image.new_from_file(str(path), access="sequential", fail_on="truncated")
    except pyvips.Error as exc:
        raise _vips_error(path, exc) from None
    if image.format not in _VIPS_FORMATS or image.interpretation not in ("srgb", "b-w", "rgb16", "grey16"):
        return None
    return StreamedImageSource(path, image, pyvips)


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
    streamed = _open_streamed(path)
    if streamed is not None:
        return streamed
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
