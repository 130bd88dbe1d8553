"""A PNG writer that takes rows strip by strip, so a 16384^2 map is written from one strip in memory.

OpenCV's `imwrite` needs the whole image; the tiling engine finishes rows in order, so probability maps and masks
can be encoded as they are made. Rows use PNG's 'Up' filter (the difference to the row above: probability maps
and masks change slowly, so most bytes become 0) and zlib level 1 with run-length strategy, like OpenCV's default.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from types import TracebackType

import numpy as np

from defectscan.errors import DefectscanError

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOR_TYPE = {1: 0, 3: 2}  # grayscale, RGB
_IDAT_BYTES = 1 << 20  # compressed bytes gathered before a chunk is written


class PngRowWriter:
    """8-bit grayscale (rows (r, W)) or RGB (rows (r, W, 3)) PNG, written top to bottom by `write(rows)`.

    Use as a context manager: `close` checks that every row was written; a writer left on an exception closes
    its file without claiming it complete (callers write into a temporary directory, see `io.files.atomic_dir`).
    """

    def __init__(self, path: str | Path, height: int, width: int, channels: int = 1, level: int = 1) -> None:
        if channels not in _COLOR_TYPE:
            raise ValueError(f"PNG rows need 1 or 3 channels, got {channels}")
        self.path, self.height, self.width, self.channels = Path(path), height, width, channels
        self.rows_written = 0
        self.previous = np.zeros((1, width * channels), np.uint8)
        self.zip = zlib.compressobj(level, zlib.DEFLATED, zlib.MAX_WBITS, 9, zlib.Z_RLE)
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        try:
            self.file = open(self.path, "wb")
            self.file.write(_SIGNATURE)
            self._chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, _COLOR_TYPE[channels], 0, 0, 0))
        except OSError as exc:
            raise DefectscanError(f"{self.path}: could not write output ({exc.strerror})") from None

    def write(self, rows: np.ndarray) -> None:
        """Append the next rows: (r, W) for grayscale, (r, W, 3) RGB, uint8."""
        flat = rows.reshape(rows.shape[0], -1)
        if rows.dtype != np.uint8 or flat.shape[1] != self.width * self.channels:
            raise ValueError(f"rows {rows.shape} {rows.dtype} do not fit a {self.width}-px, {self.channels}-channel "
                             "8-bit PNG")
        if self.rows_written + len(flat) > self.height:
            raise ValueError(f"{self.path}: more than {self.height} rows written")
        filtered = np.empty((len(flat), flat.shape[1] + 1), np.uint8)
        filtered[:, 0] = 2  # filter type Up
        np.subtract(flat, np.concatenate([self.previous, flat[:-1]]), out=filtered[:, 1:])  # uint8 wraps, as PNG
        self.previous = flat[-1:].copy()
        self.rows_written += len(flat)
        self._add(self.zip.compress(filtered.data))

    def close(self) -> None:
        if self.rows_written != self.height:
            self.file.close()
            raise ValueError(f"{self.path}: {self.rows_written} of {self.height} rows written")
        self._add(self.zip.flush(), force=True)
        self._chunk(b"IEND", b"")
        self._close_file()

    def _add(self, data: bytes, force: bool = False) -> None:
        if data:
            self.pending.append(data)
            self.pending_bytes += len(data)
        if self.pending and (force or self.pending_bytes >= _IDAT_BYTES):
            self._chunk(b"IDAT", b"".join(self.pending))
            self.pending, self.pending_bytes = [], 0

    def _chunk(self, kind: bytes, data: bytes) -> None:
        try:
            self.file.write(struct.pack(">I", len(data)) + kind + data
                            + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind))))
        except OSError as exc:
            raise DefectscanError(f"{self.path}: could not write output ({exc.strerror})") from None

    def _close_file(self) -> None:
        try:
            self.file.close()
        except OSError as exc:
            raise DefectscanError(f"{self.path}: could not write output ({exc.strerror})") from None

    def __enter__(self) -> "PngRowWriter":
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:
            self.file.close()
