"""numba, imported with an on-disk cache folder this process can write.

numba caches compiled kernels beside their source (`__pycache__`), else in the user's cache
folder; when neither is writable (a package installed by root and run by another user, or a
service user whose HOME is not its own) compiling a `cache=True` function raises "no locator
available". Then the cache goes to a per-user folder under the system's temp folder.
`NUMBA_CACHE_DIR`, when set, is left alone. Import numba from here, never directly.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _cache_dir_needed() -> bool:
    beside = Path(__file__).resolve().parent / "__pycache__"
    if beside.is_dir() and os.access(beside, os.W_OK):
        return False
    if not beside.exists() and os.access(beside.parent, os.W_OK):
        return False
    user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return not (os.access(user_cache, os.W_OK) or (not user_cache.exists() and os.access(user_cache.parent, os.W_OK)))


if "NUMBA_CACHE_DIR" not in os.environ and _cache_dir_needed():
    os.environ["NUMBA_CACHE_DIR"] = str(Path(tempfile.gettempdir()) / f"p2pmodel-numba-{os.getuid()}")

import numba  # noqa: E402

__all__ = ["numba"]
