"""verify (git fsck) and gc for a LineageStore.

`verify` reads every object and re-derives its id, decodes every indexed version's record,
checks that each object a manifest names is present, intact and of the declared type,
dtype and shape, and that the index agrees with the records. It reports each problem once
(object, kind, versions affected). Leftovers of interrupted writes (temp files, objects no
version refers to) are counted, not reported as problems: they are what a kill -9 leaves.

`repair` (verify --repair-from) copies intact copies of missing or corrupt objects from other
repositories (another node's home, a backup): objects are content-addressed, so any copy
that hashes to its id is the right one, whoever holds it. A running node does the same from
its peers when a read fails (sync refetches, and the write replaces the damaged file).

`gc` deletes objects that no ref reaches. It first reads every reachable record (refusing
to run if one is damaged, since it could not know what that record needs), holds the
store's lock exclusively so no write is in flight, un-indexes unreachable versions, and
only then unlinks files.

Pruned versions (store.py, retention.py) are records only: `verify` checks their record and
index entry but not their tensors, optimizer state or files, and `gc` keeps their records but
not the objects only they reference. `free_pruned` deletes just those objects, touching nothing
else (unindexed or unreachable versions, temp files): the running node calls it.
"""

from __future__ import annotations

import os
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Protocol

from p2pmodel.atomic import TMP_PREFIX
from p2pmodel.lineage.index import Index
from p2pmodel.lineage.objects import _HEX64, InvalidObject, LineageError, Version, check_object, parse_header

__all__ = ["verify", "repair", "gc", "free_pruned", "iter_object_files", "Problem", "VerifyReport", "RepairReport", "GcReport", "GcRefused"]


class Store(Protocol):
    """What these functions need of a `LineageStore`.

    `store.py` imports this module (its `verify`, `repair` and `gc` methods call it), so this
    module names the store's members instead of importing it: the dependency runs one way.
    `_lock` and `_path` are the store's private locking and object layout; maintenance is the
    store's own back office.
    """

    objects_dir: str
    index: Index

    def _lock(self, exclusive: bool = False) -> AbstractContextManager[None]: ...
    def _path(self, oid: str) -> str: ...
    def has_object(self, oid: str) -> bool: ...
    def has_intact_object(self, oid: str) -> bool: ...
    def read_object(self, oid: str, needed_by: str | None = None) -> bytes: ...
    def write_object(self, oid: str, data: bytes) -> None: ...
    def get_version(self, ref: str) -> Version: ...
    def verify(self) -> VerifyReport: ...


class GcRefused(LineageError):
    """gc stopped before deleting anything: it could not read what a reachable version needs."""

    def __init__(self, cause: LineageError):
        self.cause = cause
        super().__init__(f"gc refused to run, the repository is damaged ({cause}); run verify")


@dataclass(frozen=True)
class Problem:
    """One thing `verify` found wrong."""

    oid: str  # the damaged object (or the version whose index entry is wrong)
    kind: str  # "missing" | "corrupt" | "mismatch" (manifest disagrees with the blob) | "index" | "foreign"
    versions: tuple[str, ...]  # indexed versions affected
    detail: str

    def __str__(self) -> str:
        who = f" needed by {', '.join(v[:12] for v in self.versions)}" if self.versions else ""
        return f"{self.kind}: {self.oid}{who}: {self.detail}"


@dataclass
class VerifyReport:
    """What `verify` checked and found; `ok` is True when nothing is damaged."""

    objects_checked: int = 0
    bytes_checked: int = 0
    versions_checked: int = 0
    unreferenced_objects: int = 0  # leftovers of interrupted writes or gc'able history; not a problem
    stray_temp_files: int = 0  # leftovers of interrupted writes; not a problem
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class GcReport:
    """What `gc` removed and kept."""

    removed_objects: int = 0
    bytes_freed: int = 0
    removed_versions: int = 0  # indexed versions no ref reaches
    removed_temp_files: int = 0
    kept_objects: int = 0


def iter_object_files(store: Store) -> Iterator[tuple[str, str]]:
    """(name, path) of every file under objects/; name is the oid for well-named files."""
    try:
        folders = sorted(os.scandir(store.objects_dir), key=lambda e: e.name)
    except FileNotFoundError:
        return
    for folder in folders:
        if not folder.is_dir():
            yield folder.name, folder.path
            continue
        for entry in sorted(os.scandir(folder.path), key=lambda e: e.name):
            yield folder.name + entry.name if not entry.name.startswith(TMP_PREFIX) else entry.name, entry.path


def verify(store: Store) -> VerifyReport:
    """Check the whole repository; see the module docstring."""
    report = VerifyReport()
    problems: dict[tuple[str, str], tuple[set[str], str]] = {}

    def problem(oid: str, kind: str, detail: str, version: str | None = None) -> None:
        versions, first = problems.setdefault((oid, kind), (set(), detail))
        if version:
            versions.add(version)

    good: dict[str, tuple[str, dict]] = {}  # oid -> (type, header info)
    bad: dict[str, str] = {}  # oid -> kind of damage
    records: dict[str, Version] = {}
    for name, path in iter_object_files(store):
        if name.startswith(TMP_PREFIX):
            report.stray_temp_files += 1
            continue
        if not _HEX64.fullmatch(name):
            problem(path, "foreign", "unexpected file in objects/")
            continue
        with open(path, "rb") as f:
            data = f.read()
        report.objects_checked += 1
        report.bytes_checked += len(data)
        try:
            kind = check_object(name, data)
            _, info, _ = parse_header(data, name)
            good[name] = (kind, info)
            if kind == "version":
                records[name] = Version.from_bytes(data)
        except InvalidObject as e:
            bad[name] = "corrupt"
            problem(name, "corrupt", e.reason)

    def need(oid: str, vid: str, want: str, entry=None) -> None:  # noqa: ANN001
        if oid in bad:
            problem(oid, bad[oid], "", vid)
        elif oid not in good:
            problem(oid, "missing", f"{want} object not in the store", vid)
        else:
            kind, info = good[oid]
            if kind != want:
                problem(oid, "mismatch", f"expected a {want}, found a {kind}", vid)
            elif entry is not None and (info["dtype"], info["shape"]) != (entry.dtype, entry.shape):
                problem(oid, "mismatch", f"manifest says {entry.dtype} {list(entry.shape)}, blob holds {info['dtype']} {list(info['shape'])}", vid)

    rows = store.index.raw_rows()
    pruned = store.index.pruned_ids()
    edges: dict[str, list[str]] = {}
    for child, _, parent in store.index.all_edges():
        edges.setdefault(child, []).append(parent)
    referenced: set[str] = set()
    for vid, (rnd, t, msg, author, n) in rows.items():
        report.versions_checked += 1
        referenced.add(vid)
        need(vid, vid, "version")
        v = records.get(vid)
        if v is None:
            continue
        # a pruned version's objects may be gone: only its record (above) is needed
        for name, e in [] if vid in pruned else list(v.tensors.items()) + list(v.optimizer_state.items()):
            referenced.add(e.oid)
            need(e.oid, vid, "tensor", e)
        for oid in () if vid in pruned else v.files.values():
            referenced.add(oid)
            need(oid, vid, "file")
        if (v.round, v.time, v.message, v.author, len(v.tensors)) != (rnd, t, msg, author, n):
            problem(vid, "index", "index row disagrees with the record", vid)
        if tuple(edges.get(vid, ())) != v.parents:
            problem(vid, "index", "index parent edges disagree with the record", vid)
        for p in v.parents:
            if p not in rows:
                problem(p, "missing", "parent version not indexed", vid)
    for child in edges:
        if child not in rows:
            problem(child, "index", "parent edges of an unindexed version")
    for name, target in store.index.refs().items():
        if target not in rows:
            problem(target, "index", f"ref {name} points to a version that is not indexed")
        elif target in pruned:
            problem(target, "index", f"ref {name} points to a pruned version (its tensors are not here)", target)
    for line in store.index.integrity():
        problem("index.sqlite", "index", line)
    report.unreferenced_objects = len(set(good) - referenced)
    report.problems = [
        Problem(oid, kind, tuple(sorted(vs)), detail or "see above") for (oid, kind), (vs, detail) in sorted(problems.items())
    ]
    return report


@dataclass
class RepairReport:
    """What `repair` restored, and what `verify` still finds afterwards."""

    repaired: list[str] = field(default_factory=list)  # object ids written from a source
    after: VerifyReport = field(default_factory=VerifyReport)


def repair(store: Store, sources: list[Store]) -> RepairReport:
    """Restore every missing or corrupt object that an intact copy in `sources` can replace.

    Index problems and foreign files are left for the user (they are not objects a copy can
    restore); `report.after` lists what remains.
    """
    report = RepairReport()
    for problem in store.verify().problems:
        if problem.kind not in ("missing", "corrupt") or not _HEX64.fullmatch(problem.oid):
            continue
        for source in sources:
            if not source.has_intact_object(problem.oid):
                continue
            try:
                data = source.read_object(problem.oid)  # verified against its id on read
                store.write_object(problem.oid, data)  # ... and again on write
            except LineageError:
                continue  # that copy changed under us: try the next source
            report.repaired.append(problem.oid)
            break
    report.after = store.verify()
    return report


def _reachable(store: Store) -> tuple[set[str], set[str]]:
    """(reachable version ids, every object id they need, records included; a pruned version
    needs only its record). Raises GcRefused."""
    versions: set[str] = set()
    for target in set(store.index.refs().values()):
        versions.update(info.id for info in store.index.ancestry(target))
    objects: set[str] = set(versions)
    pruned = store.index.pruned_ids()
    for vid in versions - pruned:
        try:
            v = store.get_version(vid)
        except LineageError as e:
            raise GcRefused(e) from None
        objects.update(v.referenced_objects())
    return versions, objects


def gc(store: Store, grace_s: float = 0.0) -> GcReport:
    """Remove what no ref reaches: index rows of unreachable versions, then their objects.

    Objects modified less than `grace_s` seconds ago are kept (for writers that stage
    objects before indexing them, e.g. a sync in progress in another process).
    """
    report = GcReport()
    cutoff = time.time() - grace_s
    with store._lock(exclusive=True):
        versions, keep = _reachable(store)

        def old_enough(path: str) -> bool:
            try:
                return os.stat(path).st_mtime <= cutoff
            except FileNotFoundError:
                return False

        drop = [vid for vid in store.index.all_ids() if vid not in versions and (not store.has_object(vid) or old_enough(store._path(vid)))]
        keep.update(vid for vid in store.index.all_ids() if vid not in drop)
        if drop:
            with store.index.transaction() as db:
                store.index.remove_versions(db, drop)
            report.removed_versions = len(drop)
        # keep objects still needed by versions we could not drop (too recent)
        pruned = store.index.pruned_ids()
        for vid in store.index.all_ids():
            if vid not in versions and vid not in pruned:
                try:
                    keep.update(store.get_version(vid).referenced_objects())
                except LineageError:
                    pass
        for name, path in iter_object_files(store):
            if name.startswith(TMP_PREFIX):
                if old_enough(path):  # no writer is in flight: we hold the lock exclusively
                    os.unlink(path)
                    report.removed_temp_files += 1
                continue
            if name in keep or not _HEX64.fullmatch(name) or not old_enough(path):
                report.kept_objects += 1
                continue
            size = os.stat(path).st_size
            os.unlink(path)
            report.removed_objects += 1
            report.bytes_freed += size
    return report


def free_pruned(store: Store, grace_s: float = 0.0, versions: Iterable[str] | None = None) -> GcReport:
    """Delete the objects that pruned versions reference and no other indexed version needs.

    Only those objects: unindexed records, objects a sync is staging, versions no ref reaches
    (one a node synced but has not committed yet) and temp files are left alone, so a running
    node can call this. `versions` limits the look to these pruned versions (those just
    pruned; earlier ones were freed before); None looks at every pruned version. Objects
    modified less than `grace_s` seconds ago are kept.

    Raises:
        GcRefused: the record of a version that is not pruned cannot be read (what it needs is
            unknown, so nothing is deleted).
    """
    report = GcReport()
    cutoff = time.time() - grace_s
    with store._lock(exclusive=True):
        pruned = store.index.pruned_ids()
        look = pruned if versions is None else pruned & set(versions)
        candidates: set[str] = set()
        for vid in look:
            try:
                candidates.update(store.get_version(vid).referenced_objects())
            except LineageError:
                continue  # a damaged pruned record: what it named is found by the next full gc
        keep: set[str] = set()
        for vid in store.index.all_ids():
            if vid in pruned:
                continue
            try:
                keep.update(store.get_version(vid).referenced_objects())
            except LineageError as e:
                raise GcRefused(e) from None
        for oid in sorted(candidates - keep):
            path = store._path(oid)
            try:
                st = os.stat(path)
                if st.st_mtime > cutoff:
                    report.kept_objects += 1
                    continue
                os.unlink(path)
            except FileNotFoundError:
                continue
            report.removed_objects += 1
            report.bytes_freed += st.st_size
    return report
