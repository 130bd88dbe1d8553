"""Files that appear whole or not at all: atomic file and directory writes, CSV text, output-directory checks."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from defectscan.errors import DefectscanError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `final`; rename it into place only if the block succeeds.

    Readers therefore see either the old file or the complete new one, never a half-written output.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=".tmp" + final.suffix, dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs should get the usual permissions
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def csv_text(rows: list[dict], fieldnames: list[str] | None = None) -> str:
    """Rows as CSV text with a header (the first row's keys unless given), one row per line."""
    buf = io.StringIO()
    if rows or fieldnames:
        w = csv.DictWriter(buf, fieldnames=fieldnames or list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def read_csv(path: str | Path) -> list[dict[str, str]]:
    """Rows of a CSV file with a header (as `csv_text` writes it); no rows when the file does not exist."""
    path = Path(path)
    return list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8")))) if path.is_file() else []


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary directory next to `final`; it replaces `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        swap_dir_into_place(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def swap_dir_into_place(new: Path, final: Path) -> None:
    """Replace directory `final` (an earlier run's, if any) by the finished directory `new`, with renames only."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(new, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_output_dir(path: str | Path) -> Path:
    """Refuse an output directory that cannot be created or written, before any work starts: an existing file in
    its place or on its path, or a read-only parent."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DefectscanError(f"{path}: exists and is not a directory; choose another output directory")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise DefectscanError(f"{path}: cannot be created, {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DefectscanError(f"{path}: cannot write in {parent} (read-only or no permission)")
    return path
