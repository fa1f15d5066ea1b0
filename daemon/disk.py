"""Whether the node's disk has room for another round: a full disk pauses training, not the node.

A round writes a version (the model's tensors) and holds deltas; a node whose disk filled
would otherwise fail every merge and sync with ENOSPC deep in a traceback. `DiskWatch` is
checked every few seconds (and told about ENOSPC errors): under `min_free` bytes free the
node says so in `status` ("disk": {"full": true, ...}), stops training (it still relays
records, serves what it holds and follows the swarm), and resumes once space returns.
"""

from __future__ import annotations

import errno
import shutil
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

__all__ = ["DiskWatch", "is_disk_full_error"]

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def is_disk_full_error(exc: BaseException | None) -> bool:
    """True for "no space left on device" and "disk quota exceeded", also when wrapped (__cause__)."""
    return _full_error(exc) is not None


def _full_error(exc: BaseException | None) -> OSError | None:
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


class _Usage(NamedTuple):
    total: int
    used: int
    free: int


class DiskWatch:
    """Free space under `path` against `min_free` bytes; `full` flips with hysteresis (x1.5 to clear)."""

    def __init__(self, path: str | Path, min_free: int, usage: Callable[[str], _Usage] = shutil.disk_usage):
        self.path, self.min_free, self._usage = str(path), int(min_free), usage
        self.full = False
        self.free: int | None = None
        self.since: float | None = None  # wall time the disk was found full
        self.reason = ""

    def check(self) -> bool:
        """Read the free space; returns True when the state changed (the caller logs it)."""
        try:
            self.free = int(self._usage(self.path).free)
        except OSError:
            return False  # the folder vanished or the FS is gone: the writes will say so
        if not self.full and self.free < self.min_free:
            return self._set(True, f"{self.free} bytes free, under the {self.min_free} a round needs")
        if self.full and self.free >= self.min_free * 3 // 2:
            return self._set(False, "")
        return False

    def on_error(self, exc: BaseException) -> bool:
        """An error from a write: True if it was a full disk (and the watch now says full)."""
        cause = _full_error(exc)
        if cause is None:
            return False
        if not self.full:
            self._set(True, f"a write failed: {cause.strerror or cause}")
        return True

    def _set(self, full: bool, reason: str) -> bool:
        self.full, self.reason = full, reason
        self.since = time.time() if full else None
        return True

    def status(self) -> dict[str, Any]:
        return {"full": self.full, "free_bytes": self.free, "min_free_bytes": self.min_free, "since": self.since, "reason": self.reason}
