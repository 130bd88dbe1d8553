"""Helpers shared by the tests: small synthetic labeled data, running the CLI in-process."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable

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


def bsdata_like(root: Path, count: int, split_of: Callable[[int], str | None], seed: int = 0) -> Path:
    """A small dataset in BSData's layout: images/, LabelMe files in masks/ with an embedded imageData (as BSData's
    have), image_data.json with each image's split (`split_of(i)`; None: unlabeled, no LabelMe file). Odd images
    hold one pitting polygon."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(seed)
    entries = []
    for i in range(count):
        name = f"im{i:02d}"
        write_image(root / "images" / f"{name}.png", rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
        entry = {"filename": f"{name}.png", "train_test_split": split_of(i)}
        if entry["train_test_split"]:
            shapes = [{"label": "Pitting", "shape_type": "polygon",
                       "points": [[5 + i, 5], [20 + i, 6], [12 + i, 30]]}] if i % 2 else []
            (root / "masks" / f"{name}.json").write_text(json.dumps(
                {"version": "5.0", "shapes": shapes, "imagePath": f"{name}.png", "imageData": "c3RhbmQtaW4=",
                 "imageHeight": 40, "imageWidth": 48}))
            entry["annotations"] = f"{name}.json"
        entries.append(entry)
    (root / "image_data.json").write_text(json.dumps({"images": entries}))
    return root


def load_script(name: str) -> ModuleType:
    """A module of scripts/ (not a package), loaded from its file."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
