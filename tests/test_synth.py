"""Tests for the synthetic wafer generator: determinism, geometry and mask/image consistency."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from defectscan.data.synth import CLASSES, generate_wafer, write_dataset


@pytest.fixture(scope="module")
def wafer_1024() -> tuple[np.ndarray, np.ndarray]:
    return generate_wafer(1024, seed=0)


def _class_mask(mask: np.ndarray, name: str) -> np.ndarray:
    return (mask == CLASSES.index(name)).astype(np.uint8)


def test_classes_order() -> None:
    assert CLASSES == ("background", "scratch", "particle", "crack", "stain", "edge_chip")


@pytest.mark.parametrize("size", [256, 300, 1024])
def test_shapes_and_dtypes(size: int) -> None:
    image, mask = generate_wafer(size, seed=1)
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    assert mask.shape == (size, size) and mask.dtype == np.uint8
    assert mask.max() < len(CLASSES)


def test_deterministic_per_seed() -> None:
    a_img, a_mask = generate_wafer(512, seed=7)
    b_img, b_mask = generate_wafer(512, seed=7)
    assert a_img.tobytes() == b_img.tobytes() and a_mask.tobytes() == b_mask.tobytes()
    c_img, c_mask = generate_wafer(512, seed=8)
    assert c_img.tobytes() != a_img.tobytes() and c_mask.tobytes() != a_mask.tobytes()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_every_class_present_at_1024(seed: int) -> None:
    _, mask = generate_wafer(1024, seed=seed)
    assert set(np.unique(mask).tolist()) == set(range(len(CLASSES)))


def test_zero_density_has_no_defects() -> None:
    _, mask = generate_wafer(512, seed=3, defect_density=0.0)
    assert not mask.any()


def test_defects_only_inside_nominal_wafer(wafer_1024) -> None:
    image, mask = wafer_1024
    size = mask.shape[0]
    c, radius = (size - 1) / 2, int(0.47 * size)
    yy, xx = np.ogrid[:size, :size]
    disc = (yy - c) ** 2 + (xx - c) ** 2 <= (radius + 0.5) ** 2
    assert not mask[~disc].any()
    # Outside the wafer is dark background; edge chips show that same dark background.
    assert image[~disc].mean() < 60
    chip = mask == CLASSES.index("edge_chip")
    assert image[chip].mean() < 60 < image[disc & (mask == 0)].mean()


@pytest.mark.parametrize("name,kernel", [("scratch", 5), ("crack", 5)])
def test_thin_defects_are_thin(wafer_1024, name: str, kernel: int) -> None:
    _, mask = wafer_1024
    m = _class_mask(mask, name)
    eroded = cv2.erode(m, np.ones((kernel, kernel), np.uint8))
    assert m.sum() > 0 and eroded.sum() <= 0.1 * m.sum()


@pytest.mark.parametrize("seed", [0, 5])
def test_defects_are_visible_in_image(seed: int) -> None:
    """Each defect must differ from the clean surface around it, or a model cannot learn it."""
    image, mask = generate_wafer(1024, seed=seed)
    grey = image.astype(np.float32).mean(axis=2)
    min_contrast = {"scratch": 8, "particle": 20, "crack": 15, "stain": 2.5, "edge_chip": 20}
    for name, threshold in min_contrast.items():
        n, labels = cv2.connectedComponents(_class_mask(mask, name), connectivity=8)
        diffs = []
        for k in range(1, n):
            comp = (labels == k).astype(np.uint8)
            around = cv2.dilate(comp, np.ones((9, 9), np.uint8)).astype(bool) & (mask == 0)
            if around.sum() >= 5:
                diffs.append(abs(grey[comp.astype(bool)].mean() - grey[around].mean()))
        assert diffs and np.median(diffs) > threshold, (name, diffs)


def test_defect_size_does_not_scale_with_image() -> None:
    """Particle blobs stay small on a big image, so downscaling it would lose them."""
    _, mask = generate_wafer(2048, seed=4)
    n, _, stats, _ = cv2.connectedComponentsWithStats(_class_mask(mask, "particle"), connectivity=8)
    assert n > 10
    assert stats[1:, cv2.CC_STAT_WIDTH].max() <= 2 * 12 * 1.6 + 3


def test_write_dataset(tmp_path) -> None:
    seen: list[int] = []
    pairs = write_dataset(tmp_path / "ds", size=256, count=2, seed=5, progress=seen.append)
    root = tmp_path / "ds"
    assert seen == [1, 2]
    names = ["wafer_256px_s5.png", "wafer_256px_s6.png"]
    assert pairs == [(root / "images" / n, root / "masks" / n) for n in names]
    assert json.loads((root / "classes.json").read_text()) == {"classes": list(CLASSES)}
    for i, (img_path, mask_path) in enumerate(pairs):
        image, mask = generate_wafer(256, seed=5 + i)
        read_img = cv2.imread(str(img_path), cv2.IMREAD_COLOR)
        read_mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(cv2.cvtColor(read_img, cv2.COLOR_BGR2RGB), image)
        assert read_mask.ndim == 2 and np.array_equal(read_mask, mask)
    assert not [p for p in root.rglob("*") if ".tmp" in p.name]
