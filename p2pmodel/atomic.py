"""Atomic file writes: a temp file beside the target, fsync, rename, then the folder fsynced.

A reader (or a process that restarts after a crash) finds the old file or the new one, never
half of one. Temp files are named `.tmp-<name>.<random>`: hidden, in the target's own folder
(a rename is atomic only within one filesystem), and recognisable, so `LineageStore.gc`
removes the ones a killed writer left behind.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["TMP_PREFIX", "atomic_write", "fsync_dir", "replacing"]

TMP_PREFIX = ".tmp-"

Chunks = bytes | bytearray | memoryview | Iterable[bytes | bytearray | memoryview]


def fsync_dir(path: str | os.PathLike, *, strict: bool = True) -> None:
    """fsync a folder, so that a rename or a new name in it survives a power loss.

    With `strict=False` an OSError is ignored: some filesystems refuse fsync on folders, and
    the rename is atomic all the same.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if strict:
            raise
        return
    try:
        os.fsync(fd)
    except OSError:
        if strict:
            raise
    finally:
        os.close(fd)


def _tmp_path(dest: Path) -> Path:
    return dest.parent / f"{TMP_PREFIX}{dest.name}.{uuid.uuid4().hex[:8]}"


@contextmanager
def replacing(dest: str | os.PathLike, *, sync_dir: bool = True) -> Iterator[Path]:
    """Yield a temp path beside `dest`; the caller writes (and fsyncs) the file there.

    When the block ends normally the temp file is renamed over `dest` and, with `sync_dir`,
    the folder is fsynced, best effort (the new file is in place by then; an error there
    would report a write that happened as failed). When the block raises, the temp file is
    removed and `dest` is untouched.
    """
    dest = Path(dest)
    tmp = _tmp_path(dest)
    try:
        yield tmp
        os.replace(tmp, dest)
        if sync_dir:
            fsync_dir(dest.parent, strict=False)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(
    dest: str | os.PathLike,
    data: Chunks,
    *,
    mode: int = 0o666,
    durable: bool = True,
    sync_dir: bool = True,
) -> None:
    """Write `data` (bytes, or an iterable of byte chunks) to `dest` atomically.

    Args:
        dest: the file to create or replace.
        data: what it holds.
        mode: permission bits of the new file (before the umask); 0o600 for secrets.
        durable: fsync the file before the rename (without it: safe against a killed
            process, not against a power loss).
        sync_dir: fsync the folder after the rename; a caller batching many writes into
            one folder passes False and fsyncs it once (`fsync_dir`).
    Raises OSError from the filesystem; `dest` is then as it was.
    """
    chunks = (data,) if isinstance(data, (bytes, bytearray, memoryview)) else data
    with replacing(dest, sync_dir=sync_dir) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            if durable:
                os.fsync(f.fileno())
