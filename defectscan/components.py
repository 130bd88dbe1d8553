"""8-connected components of a binary image that arrives as row strips, top to bottom.

Each strip is labelled on its own (OpenCV); a strip's labels are numbered after the previous strips' (global
label = `offset` + local label), and labels touching across a strip border are linked. `finish` joins linked
labels into components: exactly those of labelling the whole image at once, in memory that holds one strip's
labels and a few numbers per label. Callers keep whatever per-label sums they need and add them up per component.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


@dataclass
class StripLabels:
    """One strip's labelling: local labels 1..n-1 are global labels offset+1..offset+n-1; `labels` is None (and
    n is 1) for a strip without foreground."""

    offset: int
    n: int
    labels: np.ndarray | None  # (rows, W) int32, 0 = background
    stats: np.ndarray | None  # OpenCV's (n, 5) left, top, width, height, area; row 0 = background


class StripComponents:
    """Feed strips with `add`, then `finish` for the component of every global label."""

    def __init__(self) -> None:
        self.count = 0  # global labels handed out so far
        self.links: list[np.ndarray] = []
        self.last_row: np.ndarray | None = None  # global labels of the previous strip's last row

    def add(self, binary: np.ndarray) -> StripLabels:
        """Label the next (rows, W) strip (bool or 0/1 uint8)."""
        binary = binary.view(np.uint8) if binary.dtype == bool else binary
        if not binary.any():
            self.last_row = None
            return StripLabels(self.count, 1, None, None)
        n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8, ltype=cv2.CV_32S)
        offset, width = self.count, binary.shape[1]
        first = np.where(labels[0] > 0, labels[0] + offset, 0)
        if self.last_row is not None:  # 8-connectivity: pixel x above touches x-1, x and x+1 below
            for dx in (-1, 0, 1):
                a = self.last_row[max(0, -dx) : width - max(0, dx)]
                b = first[max(0, dx) : width - max(0, -dx)]
                both = (a > 0) & (b > 0)
                if both.any():
                    self.links.append(np.unique(np.stack([a[both], b[both]], 1), axis=0))
        self.last_row = np.where(labels[-1] > 0, labels[-1] + offset, 0)
        self.count += n - 1
        return StripLabels(offset, n, labels, stats)

    def finish(self) -> tuple[int, np.ndarray]:
        """(number of components, component index of global label g at [g - 1])."""
        count = self.count
        if not self.links:
            return count, np.arange(count)
        pairs = np.concatenate(self.links) - 1
        graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(count, count))
        return connected_components(graph, directed=False)
