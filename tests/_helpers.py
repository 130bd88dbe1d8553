"""Helpers shared by the tests: small synthetic labeled data, running the CLI in-process."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

from defectscan.cli import main
from defectscan.io.images import write_image


def defect_image(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Textured grey surface with dark pits and bright scratches; binary 0/255 mask."""
    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur(rng.normal(128, 25, (size, size)).astype(np.float32), (0, 0), 1.5)
    mask = np.zeros((size, size), np.uint8)
    for _ in range(4):
        cv2.circle(mask, tuple(int(v) for v in rng.integers(8, size - 8, 2)), int(rng.integers(2, 6)), 255, -1)
    pits = mask > 0
    for _ in range(2):
        p = rng.integers(0, size, 4)
        cv2.line(mask, (int(p[0]), int(p[1])), (int(p[2]), int(p[3])), 255, 2)
    base[pits] -= 70
    base[(mask > 0) & ~pits] += 70
    image = np.repeat(np.clip(base, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)
    return image, mask


def folder_dataset(root: Path, count: int, size: int = 128, seed: int = 0) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(count):
        image, mask = defect_image(size, seed + i)
        write_image(root / "images" / f"s{i:02d}.png", image)
        cv2.imwrite(str(root / "masks" / f"s{i:02d}.png"), mask)
    return root


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["defectscan", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err
