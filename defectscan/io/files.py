"""Files that appear whole or not at all: atomic file and directory writes, CSV text, output-directory checks."""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from defectscan.errors import DefectscanError

if TYPE_CHECKING:  # only a type here: file helpers do not import torch
    from defectscan.distributed import Shard

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `final`; rename it into place only if the block succeeds.

    Readers therefore see either the old file or the complete new one, never a half-written output.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.stem}.{os.getpid()}.", suffix=".tmp" + final.suffix, dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs should get the usual permissions
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MB blocks (checkpoints and graphs are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | Path):
    """A JSON file's content; text that is not JSON is a one-line error naming the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DefectscanError(f"{path}: not valid JSON ({exc})") from None


def csv_text(rows: list[dict], fieldnames: list[str] | None = None) -> str:
    """Rows as CSV text with a header (every key of the rows, in first-seen order, unless given), one row per line;
    a row without a column (e.g. written by an older version) leaves it empty."""
    buf = io.StringIO()
    if rows or fieldnames:
        w = csv.DictWriter(buf, fieldnames=fieldnames or list(dict.fromkeys(k for r in rows for k in r)),
                           lineterminator="\n", restval="")
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        swap_dir_into_place(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def shared_atomic_dir(final: str | Path, shard: Shard) -> Iterator[Path]:
    """`atomic_dir` for the processes of one sharded command: each writes its files into its own temporary folder
    next to `final`; when the block ends, rank 0 moves the others' files into its folder and swaps it into place.
    `final` must be on a filesystem every process sees (one node, or a shared mount)."""
    if shard.world == 1:
        with atomic_dir(final) as tmp:
            yield tmp
        return
    final = Path(final)
    if shard.is_main:
        with atomic_dir(final) as tmp:
            yield tmp
            for folder in map(Path, shard.gather(str(tmp))[1:]):
                if not folder.is_dir():
                    raise DefectscanError(f"{folder}: another process's output folder is not visible here; the "
                                          f"output must be on a filesystem every process sees")
                for f in sorted(p for p in folder.rglob("*") if p.is_file()):
                    dest = tmp / f.relative_to(folder)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(f, dest)
        shard.barrier()  # the others keep their folders until the moves are done
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        shard.gather(str(tmp))
        shard.barrier()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def swap_dir_into_place(new: Path, final: Path) -> None:
    """Replace directory `final` (an earlier run's, if any) by the finished directory `new`, with renames only.

    Two processes writing the same output race here; each step tolerates the other's renames, and the last one
    to finish wins with a complete directory.
    """
    olds: list[Path] = []
    for _ in range(20):
        old = final.with_name(f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")  # unique, even per thread
        try:
            os.replace(final, old)
            olds.append(old)
        except FileNotFoundError:
            pass  # no earlier output, or another process just moved it away
        try:
            os.replace(new, final)
            break
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):  # not a race: give the earlier output back
                _restore(olds, final)
                raise DefectscanError(f"{final}: cannot be replaced ({exc.strerror})") from None
            # another process put its output there between our two renames: move it aside again
    else:
        _restore(olds, final)
        raise DefectscanError(f"{final}: could not be replaced (another process keeps writing it)")
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)


def _restore(olds: list[Path], final: Path) -> None:
    """Put the output this swap moved aside back, if nothing took its place meanwhile."""
    if olds and not final.exists():
        with contextlib.suppress(OSError):
            os.replace(olds.pop(), final)
    for old in olds:
        shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # gone, or a number no process can have
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's) or cannot tell: keep its files
    return True


def _leftover_pattern(name: str | None) -> re.Pattern:
    """Names our atomic writes give their temporaries: `.<name>.<pid>.<8 random>.partial|.tmp<suffix>` (tempfile's
    random part) and `.<name>.old-<pid>-<8 hex>`; `name` limits it to one output's."""
    stem = re.escape(name) if name else r".+"
    return re.compile(rf"^\.{stem}\.(?:(\d+)\.[a-z0-9_]{{8}}\.(?:partial|tmp(?:\.[^./]*)?)|old-(\d+)-[0-9a-f]{{8}})$")


def remove_leftovers(directory: str | Path, name: str | None = None) -> list[str]:
    """Delete what killed defectscan processes left in `directory`: temporary files and `.partial` folders of
    atomic writes, `.old-<pid>-<hex>` folders of interrupted swaps; with `name`, only those of that output (for
    folders that hold other things, like the parent of an `evaluate --out`). Only where the process that made
    them is gone on this machine (a live writer's files are kept). Returns the names removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    pattern = _leftover_pattern(name)
    removed = []
    for entry in directory.iterdir():
        m = pattern.match(entry.name)
        if not m or _pid_alive(int(m.group(1) or m.group(2))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry.name)
    return removed


@contextlib.contextmanager
def exclusive_lock(path: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on file `path` (created if needed) for the block; refused at once if another
    process holds it. The lock goes away with the process, so a killed run never leaves a stale lock."""
    path = Path(path)
    try:
        fh = open(path, "a+b")
    except OSError as exc:
        raise DefectscanError(f"{path}: cannot create the lock file of this {what} ({exc.strerror})") from None
    try:
        try:
            if os.name == "nt":
                import msvcrt

                msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise DefectscanError(f"{path.parent}: another defectscan process is using this {what}; wait for "
                                      f"it to finish or choose another directory") from None
            raise DefectscanError(f"{path.parent}: cannot lock this {what} ({exc.strerror}; some network file "
                                  "systems do not support locks: use a local directory)") from None
        yield
    finally:
        fh.close()


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
