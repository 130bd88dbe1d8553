"""Reading tiles: reflection padding at the image border and a background thread that fills batches ahead."""

from __future__ import annotations

import queue
import threading
from typing import Iterator

import numpy as np
import torch

from defectscan.io.images import ImageSource
from defectscan.tiling.layout import TileLayout


def _reflect(index: np.ndarray, n: int) -> np.ndarray:
    """Mirror indices into [0, n) without repeating the edge pixel (like numpy 'reflect'), for any distance."""
    if n == 1:
        return np.zeros_like(index)
    period = 2 * (n - 1)
    m = np.mod(index, period)
    return np.where(m >= n, period - m, m)


def read_tile(source: ImageSource, y0: int, x0: int, th: int, tw: int) -> np.ndarray:
    """Tile (th, tw, 3) uint8 whose top-left pixel is image (y0, x0); parts outside the image are reflected."""
    h, w = source.shape
    if y0 >= 0 and x0 >= 0 and y0 + th <= h and x0 + tw <= w:
        return source.read(y0, y0 + th, x0, x0 + tw)
    rows = _reflect(np.arange(y0, y0 + th), h)
    cols = _reflect(np.arange(x0, x0 + tw), w)
    return source.read_rows(rows, cols)


class TilePrefetcher:
    """Reads batches of tiles in a background thread so slicing overlaps with the network's work.

    Batches are written into a ring of reusable (pinned, on CUDA) uint8 buffers; the ring is three longer than the
    queue, so a buffer is never refilled before the consumer has finished with the batch that used it, although
    the consumer keeps one batch in flight (its copy to a GPU may still run while it takes the next batch).
    """

    def __init__(self, source: ImageSource, layout: TileLayout, batch_size: int, pin: bool, depth: int = 2) -> None:
        self.source, self.layout, self.batch_size = source, layout, batch_size
        th, tw = layout.tile_shape
        self.buffers = [
            torch.empty((batch_size, th, tw, 3), dtype=torch.uint8, pin_memory=pin) for _ in range(depth + 3)
        ]
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="defectscan-tile-reader", daemon=True)

    def _run(self) -> None:
        try:
            th, tw = self.layout.tile_shape
            tiles = list(self.layout.tiles())
            for b, start in enumerate(range(0, len(tiles), self.batch_size)):
                chunk = tiles[start : start + self.batch_size]
                buf = self.buffers[b % len(self.buffers)]
                view = buf.numpy()
                for i, (iy, ix) in enumerate(chunk):
                    view[i] = read_tile(self.source, self.layout.rows.origin(iy), self.layout.cols.origin(ix), th, tw)
                while not self.stop.is_set():
                    try:
                        self.queue.put((chunk, buf[: len(chunk)]), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return
            self.queue.put(None)
        except BaseException as exc:  # surfaced in the consumer thread
            self.queue.put(exc)

    def __iter__(self) -> Iterator[tuple[list[tuple[int, int]], torch.Tensor]]:
        self.thread.start()
        try:
            while True:
                item = self.queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.stop.set()
            self.thread.join(timeout=5)


