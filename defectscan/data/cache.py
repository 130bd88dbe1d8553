"""Training images decoded once to disk and memory-mapped, for datasets larger than RAM.

A crop cannot be cut out of a PNG or JPEG without decoding the file from its top, so reading crops lazily from
the files themselves would decode a whole image per crop. Instead each training image (and its mask) is decoded
once, row by row, into an uncompressed `.npy` file, and crops index its memory map: the OS keeps the pages that
crops touch in its page cache and drops them under memory pressure, so RAM never has to hold the dataset.

Files are named by a hash of what they were decoded from (paths, sizes and modification times of the image and
its annotation, the dataset's classes), so an edited image or mask is decoded again. The cache folder
(`DEFECTSCAN_CACHE`, default `~/.cache/defectscan/decoded`) may be deleted at any time.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import psutil

from defectscan.data.dataset import Sample, SegmentationDataset
from defectscan.io.files import atomic_path
from defectscan.io.images import header_size

CACHE_ENV = "DEFECTSCAN_CACHE"
CACHE_VERSION = 1  # bump when decoding or mask rules change what a cached file holds
ROWS_PER_WRITE = 1024
# Decoded training data (RGB + mask, 4 bytes per pixel) above this share of the available memory goes to disk
# under `data.cache: auto`: the rest is needed by the model, its activations and the OS.
AUTO_DISK_SHARE = 0.5

CacheMode = Literal["auto", "memory", "disk"]


def cache_root() -> Path:
    """Where decoded images are kept: `DEFECTSCAN_CACHE`, else $XDG_CACHE_HOME or ~/.cache, then defectscan/decoded."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "defectscan" / "decoded"


class DiskArray:
    """A read-only `.npy` memory map that pickles as its path: DataLoader worker processes reopen the file
    instead of receiving a copy of its contents."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._array: np.ndarray | None = None

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    @property
    def size(self) -> int:
        return self.array.size

    def __getitem__(self, key) -> np.ndarray:
        return self.array[key]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        if copy or (dtype is not None and np.dtype(dtype) != self.array.dtype):
            return np.array(self.array, dtype=dtype)
        return self.array

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.path, self._array = state["path"], None


def decoded_bytes(samples: list[Sample]) -> int:
    """RGB image plus mask bytes of the samples, from their file headers (nothing is decoded)."""
    total = 0
    for s in samples:
        size = header_size(s.image)
        total += size[0] * size[1] * 4 if size else s.image.stat().st_size * 4
    return total


def choose_mode(mode: CacheMode, samples: list[Sample]) -> Literal["memory", "disk"]:
    """'auto' keeps the decoded data in memory when it takes under AUTO_DISK_SHARE of the available memory."""
    if mode != "auto":
        return mode
    return "disk" if decoded_bytes(samples) > AUTO_DISK_SHARE * psutil.virtual_memory().available else "memory"


def _stat(path: Path | None) -> list | None:
    if path is None or not Path(path).is_file():
        return None
    st = Path(path).stat()
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


def sample_key(ds: SegmentationDataset, sample: Sample) -> str:
    """Names what the decoded pair depends on: the files, the annotation and how the dataset reads masks."""
    lut = None if ds.label_lut is None else np.asarray(ds.label_lut).tolist()
    what = {"version": CACHE_VERSION, "image": _stat(sample.image), "mask": _stat(sample.mask_path),
            "annotation": _stat(sample.annotation), "label": sample.label, "shapes": repr(sample.shapes),
            "size": sample.size, "classes": list(ds.classes),
            "file_classes": list(ds.file_classes or []), "binary": ds.binary_masks, "lut": lut}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cached_image(ds: SegmentationDataset, sample: Sample, root: Path | None = None) -> DiskArray:
    """The sample's (H, W, 3) uint8 RGB image as a memory map, decoded on first use, row by row (a huge PNG never
    exists whole in RAM) into a file written atomically (an interrupted run leaves no half-decoded file)."""
    folder = root or cache_root()
    folder.mkdir(parents=True, exist_ok=True)
    image_path = folder / f"{sample_key(ds, sample)}.image.npy"
    if not image_path.is_file():
        source = ds.open_source(sample)
        h, w = source.shape
        with atomic_path(image_path) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(h, w, 3))
            for y0 in range(0, h, ROWS_PER_WRITE):
                out[y0 : y0 + ROWS_PER_WRITE] = source.read(y0, min(h, y0 + ROWS_PER_WRITE), 0, w)
            out.flush()
            del out
    return DiskArray(image_path)


def cached_pair(ds: SegmentationDataset, sample: Sample, root: Path | None = None) -> tuple[DiskArray, DiskArray]:
    """The sample's image (`cached_image`) and (H, W) class-index mask as memory maps, decoded on first use."""
    folder = root or cache_root()
    image = cached_image(ds, sample, folder)
    mask_path = folder / f"{sample_key(ds, sample)}.mask.npy"
    if not mask_path.is_file():
        mask = ds.load_mask(sample, image.shape[:2])
        with atomic_path(mask_path) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, mask)
    return image, DiskArray(mask_path)


def load_images(ds: SegmentationDataset, samples: list[Sample], mode: Literal["memory", "disk"],
                progress: Callable[[int, int], None] | None = None) -> list:
    """Images alone (labeled or not, e.g. for self-supervised pretraining): arrays in memory or memory maps."""
    images = []
    for i, s in enumerate(samples):
        images.append(cached_image(ds, s) if mode == "disk" else ds.load_image(s))
        if progress:
            progress(i + 1, len(samples))
    return images


def load_training_pairs(ds: SegmentationDataset, samples: list[Sample], mode: Literal["memory", "disk"],
                        progress: Callable[[int, int], None] | None = None) -> tuple[list, list]:
    """Images and masks for `CropDataset`: decoded arrays in memory, or memory-mapped files from the cache."""
    images, masks = [], []
    for i, s in enumerate(samples):
        if mode == "disk":
            image, mask = cached_pair(ds, s)
        else:
            image = ds.load_image(s)
            mask = ds.load_mask(s, image.shape[:2])
        images.append(image)
        masks.append(mask)
        if progress:
            progress(i + 1, len(samples))
    return images, masks
