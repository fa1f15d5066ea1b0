"""Merge inputs that are lineage versions: `VersionReader` reads a version as a checkpoint.

`p2pmodel merge` takes each input (and `--base`) as a path or a revision of the repository
(`main`, `v1`, `main~2`, an id prefix: whatever `LineageStore.resolve` accepts, as `p2pmodel
show` does). `resolve_input` decides which: an existing file or folder wins, as git treats an
argument that names both a path and a revision as ambiguous and we prefer the file on disk.
The engine reads a `VersionReader` exactly as a `CheckpointReader` (names, meta, get, extra
files), one tensor at a time from the object store, so nothing is exported first.
"""

from __future__ import annotations

from pathlib import Path

import torch

from p2pmodel.errors import P2PModelError, UsageError
from p2pmodel.lineage import LineageStore, Version

__all__ = ["VersionReader", "UnknownInput", "resolve_input"]


class UnknownInput(UsageError):
    """An input names neither a file or folder nor a revision of the repository."""

    def __init__(self, text: str, repo: str, reason: str):
        self.text, self.repo, self.reason = text, repo, reason
        super().__init__(f"{text!r} is neither a file or folder nor a version in {repo} ({reason})")


class VersionReader:
    """The subset of `CheckpointReader` the merge engine uses, over one stored version."""

    def __init__(self, store: LineageStore, vid: str, text: str):
        self.store, self.id = store, vid
        self.version: Version = store.get_version(vid)
        self.label = f"{text} ({vid[:12]})" if not vid.startswith(text) else vid[:12]
        self.path = Path(self.label)

    def names(self) -> list[str]:
        return sorted(self.version.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.version.tensors

    def __len__(self) -> int:
        return len(self.version.tensors)

    def meta(self, name: str) -> tuple[str, tuple[int, ...]]:
        e = self.version.tensors[name]
        return e.dtype, tuple(e.shape)

    def file_of(self, name: str) -> Path:
        return self.path

    def get(self, name: str) -> torch.Tensor:
        return self.store.get_tensor(self.version.tensors[name], needed_by=self.id)

    def extra_files(self) -> dict[str, bytes]:
        return {n: self.store.get_file(oid, needed_by=self.id) for n, oid in sorted(self.version.files.items())}

    def close(self) -> None:
        """Nothing to release: the store stays open for the caller."""


def resolve_input(text: str, repo: str, store: LineageStore | None) -> str | VersionReader:
    """`text` as a path when one exists, else as a revision of `store` (opened from `repo`).

    Raises `UnknownInput` (one line: the text, the repository, why the revision failed).
    """
    if Path(text).exists():
        return text
    if store is None:
        raise UnknownInput(text, repo, "no repository there")
    try:
        return VersionReader(store, store.resolve(text), text)
    except P2PModelError as e:
        raise UnknownInput(text, repo, str(e)) from None
