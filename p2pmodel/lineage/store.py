"""LineageStore: a lineage repository in a folder (objects on disk + the SQLite index).

Layout of a repository folder:

    objects/ab/cdef...   one file per object, named by its sha256 (canonical bytes, see objects.py)
    index.sqlite         versions, parent edges, refs, HEAD, annotations (index.py)
    lock                 flock: writers hold it shared, gc holds it exclusive

Write order, which is what makes a kill -9 at any moment harmless: each object goes to a
temp file in its final folder, is fsynced and renamed into place (folders fsynced before
anything refers to them); then the version record is written the same way; then, LAST and
in one transaction, the index row and the ref move. Until that transaction commits the new
version is invisible; after it, everything it needs is on disk. Leftovers of an interrupted
write are stray temp files and unreferenced objects, which `verify` tolerates and `gc` removes.

Every read re-hashes what it read; a mismatch raises ObjectCorrupt, an absent file
ObjectMissing, each naming the object and the version that needed it.

A *pruned* version keeps its record, annotations and index row (history, log, credits and the
commit chain a joiner checks stay whole) while its tensors, optimizer state and files may be
gone: `prune` marks versions so (retention.py decides which), `gc` then frees what only they
needed, and reading their tensors raises VersionPruned. A joiner's shallow history is indexed
the same way (`put_version(..., pruned=True)`: records without objects).

Why one ~650-line module: the write order above spans objects, records, the index and refs, and
every method here takes part in it. The seam to split next is revision resolution (`resolve`,
`_resolve_base`, ~60 lines), which only reads the index and could join refs.py.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
import time as _time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Mapping

import torch

from p2pmodel.atomic import atomic_write, fsync_dir
from p2pmodel.dtypes import dtype_name
from p2pmodel.lineage.index import ANY, Index, VersionInfo
from p2pmodel.lineage.maintenance import GcReport, RepairReport, VerifyReport, free_pruned, gc, repair, verify
from p2pmodel.lineage.objects import (
    _HEX64,
    Annotations,
    InvalidObject,
    LineageError,
    TensorEntry,
    Version,
    check_object,
    decode_tensor,
    encode_file,
    encode_tensor_header,
    parse_header,
    tensor_raw_view,
)
from p2pmodel.lineage.refs import (
    BRANCH_PREFIX,
    MIN_PREFIX,
    TAG_PREFIX,
    AmbiguousRef,
    RefNotFound,
    check_ref_name,
    full_ref_name,
    parse_revision,
    short_ref_name,
)

__all__ = [
    "LineageStore",
    "ObjectMissing",
    "ObjectCorrupt",
    "VersionPruned",
    "PruneRefused",
    "RepositoryNotFound",
    "RepositoryExists",
]


def _needed(needed_by: str | None) -> str:
    return f" (needed by version {needed_by})" if needed_by else ""


class ObjectMissing(LineageError):
    """An object that a version (or the caller) needs is not in the store."""

    def __init__(self, oid: str, needed_by: str | None = None):
        self.oid = oid
        self.needed_by = needed_by
        super().__init__(f"object {oid} is missing{_needed(needed_by)}")


class ObjectCorrupt(LineageError):
    """An object whose bytes do not hash to its id, or do not decode as what was expected."""

    def __init__(self, oid: str, needed_by: str | None = None, reason: str = "content does not match its hash"):
        self.oid = oid
        self.needed_by = needed_by
        self.reason = reason
        super().__init__(f"object {oid} is corrupt{_needed(needed_by)}: {reason}")


class VersionPruned(ObjectMissing):
    """A version's tensors were pruned here (its record is kept). An ObjectMissing, so code that
    fetches missing objects from peers handles it as it handles any absent object."""

    def __init__(self, version_id: str, oid: str | None = None):
        self.version_id, self.oid, self.needed_by = version_id, oid or version_id, version_id
        LineageError.__init__(self, f"version {version_id[:12]} is pruned (only its record is kept here); "
                                    "fetch it from a peer or use a later version")  # fmt: skip


class PruneRefused(LineageError):
    """A version a ref points to cannot be pruned (its tip must stay readable). Field: version_id, ref."""

    def __init__(self, version_id: str, ref: str):
        self.version_id, self.ref = version_id, ref
        super().__init__(f"cannot prune {version_id[:12]}: {ref} points to it")


class RepositoryNotFound(LineageError):
    def __init__(self, path: str):
        self.path = path
        super().__init__(f"no lineage repository at {path} (run `p2pmodel init`)")


class RepositoryExists(LineageError):
    def __init__(self, path: str):
        self.path = path
        super().__init__(f"a lineage repository already exists at {path}")


class LineageStore:
    """A lineage repository on local disk. Open with `LineageStore.init` or `LineageStore.open`.

    `durable=False` skips fsync (still safe against a killed process, not against power loss).
    """

    def __init__(self, root: str, index: Index, durable: bool = True):
        self.root = os.path.abspath(root)
        self.objects_dir = os.path.join(self.root, "objects")
        self.index = index
        self.durable = durable
        self._local = threading.local()  # .dirty: folders awaiting fsync while this thread batches writes

    # --- opening ------------------------------------------------------------------------
    @classmethod
    def init(cls, path: str | os.PathLike, durable: bool = True) -> "LineageStore":
        """Create a repository at `path` (the folder may exist, empty or not). Raises RepositoryExists."""
        root = os.fspath(path)
        if os.path.exists(os.path.join(root, "index.sqlite")):
            raise RepositoryExists(root)
        os.makedirs(os.path.join(root, "objects"), exist_ok=True)
        open(os.path.join(root, "lock"), "a").close()
        store = cls(root, Index(os.path.join(root, "index.sqlite"), create=True, durable=durable), durable)
        store._fsync_dir(root)
        return store

    @classmethod
    def open(cls, path: str | os.PathLike, durable: bool = True) -> "LineageStore":
        """Open an existing repository. Raises RepositoryNotFound."""
        root = os.fspath(path)
        if not os.path.isfile(os.path.join(root, "index.sqlite")) or not os.path.isdir(os.path.join(root, "objects")):
            raise RepositoryNotFound(root)
        return cls(root, Index(os.path.join(root, "index.sqlite"), durable=durable), durable)

    def close(self) -> None:
        self.index.close()

    def __enter__(self) -> "LineageStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LineageStore({self.root!r})"

    @contextmanager
    def _lock(self, exclusive: bool = False) -> Iterator[None]:
        with open(os.path.join(self.root, "lock"), "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    # --- objects ------------------------------------------------------------------------
    def _path(self, oid: str) -> str:
        if not isinstance(oid, str) or not _HEX64.fullmatch(oid):
            raise InvalidObject(str(oid), "not a sha256 hex id")
        return os.path.join(self.objects_dir, oid[:2], oid[2:])

    def _fsync_dir(self, path: str) -> None:
        if self.durable:
            fsync_dir(path)

    def _write(self, oid: str, chunks: Iterable[Any], size: int) -> bool:
        """Store canonical bytes atomically under `oid`; False if a whole, intact copy was already there.

        A copy of the right size is hashed before it counts: a flipped byte on disk must be
        repaired by the next write of the good bytes, not kept forever (`verify` would fail
        for good). Hashing runs at ~1.7 GB/s, and dedup hits are rare in a swarm (a round
        changes every tensor), so the check is cheap where it matters.
        """
        final = self._path(oid)
        try:
            if os.stat(final).st_size == size and self._intact(oid, final):
                return False
        except FileNotFoundError:
            pass
        folder = os.path.dirname(final)
        if not os.path.isdir(folder):
            os.makedirs(folder, exist_ok=True)
            self._sync_later(self.objects_dir)
        # mode 0600 as before (objects were written through mkstemp); folders are synced in batches
        atomic_write(final, chunks, mode=0o600, durable=self.durable, sync_dir=False)
        self._sync_later(folder)
        return True

    @staticmethod
    def _intact(oid: str, path: str) -> bool:
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        except OSError:
            return False
        return h.hexdigest() == oid

    def has_intact_object(self, oid: str) -> bool:
        """True if the object for `oid` exists and its bytes hash to `oid` (sync uses it: a
        corrupt copy is fetched again, and the write repairs it)."""
        try:
            return self._intact(oid, self._path(oid))
        except InvalidObject:
            return False

    def _sync_later(self, folder: str) -> None:
        dirty = getattr(self._local, "dirty", None)
        if dirty is None:
            self._fsync_dir(folder)
        else:
            dirty.add(folder)

    @contextmanager
    def _batch(self) -> Iterator[None]:
        """Defer folder fsyncs to the end of this thread's batch of writes (one fsync per folder)."""
        if getattr(self._local, "dirty", None) is not None:
            yield
            return
        self._local.dirty = set()
        try:
            yield
            # deepest first: a new objects/ab/ folder is durable only once objects/ is synced too
            for folder in sorted(self._local.dirty, key=len, reverse=True):
                self._fsync_dir(folder)
        finally:
            self._local.dirty = None

    def _read(self, oid: str, needed_by: str | None = None) -> bytearray:
        """The verified canonical bytes of `oid`, in a fresh writable buffer."""
        path = self._path(oid)
        try:
            with open(path, "rb", buffering=0) as f:
                buf = bytearray(os.fstat(f.fileno()).st_size)
                n = f.readinto(buf)
        except FileNotFoundError:
            raise ObjectMissing(oid, needed_by) from None
        if n != len(buf) or hashlib.sha256(buf).hexdigest() != oid:
            raise ObjectCorrupt(oid, needed_by)
        return buf

    def has_object(self, oid: str) -> bool:
        """True if an object file for `oid` exists (not verified; see `read_object`)."""
        try:
            return os.path.isfile(self._path(oid))
        except InvalidObject:
            return False

    def read_object(self, oid: str, needed_by: str | None = None) -> bytes:
        """Canonical bytes of an object, verified against its id. Raises ObjectMissing, ObjectCorrupt."""
        return bytes(self._read(oid, needed_by))

    def write_object(self, oid: str, data: bytes) -> None:
        """Store canonical bytes received from elsewhere (e.g. a peer) after checking them.

        Raises InvalidObject when `data` does not hash to `oid` or is not a canonical object.
        A version record stored this way is not indexed until `put_version`.
        """
        check_object(oid, data)
        with self._lock():
            self._write(oid, [data], len(data))

    def put_tensor(self, t: torch.Tensor) -> TensorEntry:
        """Store a tensor (a no-op if its content is already stored) and return its manifest entry."""
        dtype, shape, raw = tensor_raw_view(t)
        header = encode_tensor_header(dtype, shape)
        h = hashlib.sha256(header)
        h.update(raw)
        oid = h.hexdigest()
        with self._lock():
            self._write(oid, [header, raw], len(header) + raw.nbytes)
        return TensorEntry(oid, dtype, shape)

    def get_tensor(self, entry_or_oid: TensorEntry | str, needed_by: str | None = None) -> torch.Tensor:
        """Read a tensor, verified against its hash (and against the entry's dtype and shape).

        The tensor owns a fresh buffer (no copy beyond the file read). Raises ObjectMissing, ObjectCorrupt.
        """
        oid = entry_or_oid.oid if isinstance(entry_or_oid, TensorEntry) else entry_or_oid
        try:
            buf = self._read(oid, needed_by)
        except ObjectMissing:
            if needed_by is not None and self.index.is_pruned(needed_by):
                raise VersionPruned(needed_by, oid) from None
            raise
        try:
            t = decode_tensor(buf, oid)
        except InvalidObject as e:
            raise ObjectCorrupt(oid, needed_by, e.reason) from None
        if isinstance(entry_or_oid, TensorEntry):
            e = entry_or_oid
            if dtype_name(t.dtype) != e.dtype or tuple(t.shape) != e.shape:
                raise ObjectCorrupt(
                    oid, needed_by, f"manifest says {e.dtype} {list(e.shape)}, blob holds {dtype_name(t.dtype)} {list(t.shape)}"
                )
        return t

    def put_file(self, data: bytes) -> str:
        """Store an extra file's bytes (config.json, tokenizer files, ...); returns its oid."""
        blob = encode_file(data)
        oid = hashlib.sha256(blob).hexdigest()
        with self._lock():
            self._write(oid, [blob], len(blob))
        return oid

    def get_file(self, oid: str, needed_by: str | None = None) -> bytes:
        """An extra file's bytes, verified. Raises ObjectMissing, ObjectCorrupt."""
        buf = self._read(oid, needed_by)
        try:
            kind, _, offset = parse_header(buf, oid)
        except InvalidObject as e:
            raise ObjectCorrupt(oid, needed_by, e.reason) from None
        if kind != "file":
            raise ObjectCorrupt(oid, needed_by, f"expected a file blob, found a {kind}")
        return bytes(buf[offset:])

    # --- versions -----------------------------------------------------------------------
    def commit(
        self,
        tensors: Mapping[str, torch.Tensor | TensorEntry] | Iterable[tuple[str, torch.Tensor | TensorEntry]],
        *,
        parents: Iterable[str] | None = None,
        message: str = "",
        branch: str | None = "main",
        metrics: Mapping[str, float] | None = None,
        certificate: Mapping[str, Any] | None = None,
        time: float | None = None,
        author: str = "",
        round: int | None = None,
        merge: Mapping[str, Any] | None = None,
        contributors: Iterable[str] = (),
        files: Mapping[str, bytes | str] | None = None,
        optimizer_state: Mapping[str, torch.Tensor | TensorEntry] | None = None,
    ) -> Version:
        """Store tensors (each once per content), then the version record, then index it and move `branch`.

        `tensors` may be a mapping or an iterable of (name, tensor) pairs (streamed one at a
        time); a value may be a TensorEntry already in the store. `parents` are revisions;
        None means the branch's current tip (no parent when the branch does not exist yet).
        `files` values are raw bytes or oids of stored file blobs. `branch=None` moves no ref.

        The branch moves by compare-and-swap from the tip seen when the commit started;
        raises RefConflict if another writer moved it meanwhile (nothing is indexed then;
        the stored objects are left for `gc`).
        """
        ref = full_ref_name(branch) if branch is not None else None
        if ref is not None:
            check_ref_name(ref)
        tip = self.index.ref(ref) if ref is not None else None
        if parents is None:
            parent_ids = [tip] if tip else []
        else:
            parent_ids = [self.resolve(p) for p in parents]
        with self._lock(), self._batch():
            items = tensors.items() if isinstance(tensors, Mapping) else tensors
            manifest = {name: self._entry(t) for name, t in items}
            opt = {name: self._entry(t) for name, t in (optimizer_state or {}).items()}
            file_ids = {name: (d if isinstance(d, str) else self._put_file_unlocked(d)) for name, d in (files or {}).items()}
        version = Version(
            parents=tuple(parent_ids),
            tensors=manifest,
            message=message,
            time=_time.time() if time is None else time,
            author=author,
            round=round,
            merge=merge,
            contributors=tuple(contributors),
            files=file_ids,
            optimizer_state=opt,
        )
        ann = Annotations(metrics=dict(metrics or {}), certificate=certificate) if (metrics or certificate) else None
        self._put_version(version, ann, ref, old=tip if ref is not None else ANY, check_old=True)
        return version

    def _entry(self, t: torch.Tensor | TensorEntry) -> TensorEntry:
        if isinstance(t, TensorEntry):
            return t
        dtype, shape, raw = tensor_raw_view(t)
        header = encode_tensor_header(dtype, shape)
        h = hashlib.sha256(header)
        h.update(raw)
        oid = h.hexdigest()
        self._write(oid, [header, raw], len(header) + raw.nbytes)
        return TensorEntry(oid, dtype, shape)

    def _put_file_unlocked(self, data: bytes) -> str:
        blob = encode_file(data)
        oid = hashlib.sha256(blob).hexdigest()
        self._write(oid, [blob], len(blob))
        return oid

    def put_version(
        self, version: Version, annotations: Annotations | None = None, branch: str | None = None, *, pruned: bool = False
    ) -> str:
        """Store and index a version whose objects and parents are already here; returns its id.

        `branch`, if given, is set to the version unconditionally (use `set_ref` for CAS).
        `pruned=True` indexes the record alone, as a pruned version (a joiner's shallow
        history: the commit chain without old tensors); a branch cannot point at it. Putting
        a pruned version again with `pruned=False` (its objects fetched back) makes it whole.
        Raises ObjectMissing naming the first absent object or unindexed parent.
        """
        ref = full_ref_name(branch) if branch is not None else None
        if ref is not None:
            check_ref_name(ref)
            if pruned:
                raise PruneRefused(version.id, ref)
        return self._put_version(version, annotations, ref, old=ANY, check_old=False, pruned=pruned)

    def _put_version(
        self, v: Version, ann: Annotations | None, ref: str | None, old: Any, check_old: bool, pruned: bool = False
    ) -> str:
        vid = v.id
        for p in v.parents:
            if not self.index.has_version(p):
                raise ObjectMissing(p, vid)
        data = v.to_bytes()
        with self._lock():
            # checked under the lock: a concurrent prune (exclusive lock) frees objects either
            # before this check or after the version is indexed, when they are no longer freeable
            if not pruned:
                for oid in v.referenced_objects():
                    if not self.has_object(oid):
                        raise ObjectMissing(oid, vid)
            self._write(vid, [data], len(data))
            # the index row and the ref move together: a lost CAS leaves only an unindexed record
            with self.index.transaction() as db:
                self.index.add_version(db, v, ann, pruned=pruned)
                if ref is not None and check_old:
                    self.index.swap_ref_or_raise(db, ref, vid, old)
                elif ref is not None:
                    self.index.swap_ref(db, ref, vid)
        return vid

    def get_version(self, ref: str) -> Version:
        """The version record for an id or any revision, verified. Raises RefNotFound, ObjectMissing, ObjectCorrupt."""
        vid = ref if (isinstance(ref, str) and _HEX64.fullmatch(ref)) else self.resolve(ref)
        buf = self._read(vid)
        try:
            return Version.from_bytes(bytes(buf))
        except InvalidObject as e:
            raise ObjectCorrupt(vid, None, e.reason) from None

    def annotations(self, ref: str) -> Annotations:
        """Metrics and certificate stored with a version (empty when none)."""
        vid = self.resolve(ref)
        return self.index.annotations(vid) or Annotations()

    def annotate(self, ref: str, *, metrics: Mapping[str, float] | None = None, certificate: Mapping[str, Any] | None = None) -> None:
        """Replace a version's metrics and/or certificate (an argument left None is kept)."""
        vid = self.resolve(ref)
        cur = self.index.annotations(vid) or Annotations()
        new = Annotations(
            metrics=dict(metrics) if metrics is not None else dict(cur.metrics),
            certificate=certificate if certificate is not None else cur.certificate,
        )
        with self.index.transaction() as db:
            self.index.set_annotations(db, vid, new)

    def state_dict(self, ref: str = "HEAD") -> dict[str, torch.Tensor]:
        """Every tensor of a version, verified, by name."""
        return dict(self.iter_tensors(ref))

    def iter_tensors(self, ref: str = "HEAD") -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) pairs of a version, read and verified one at a time.

        Raises VersionPruned (before yielding anything) when only the version's record is kept.
        """
        v = self.get_version(ref)
        if self.index.is_pruned(v.id):
            raise VersionPruned(v.id)
        for name, entry in v.tensors.items():
            yield name, self.get_tensor(entry, needed_by=v.id)

    # --- refs ---------------------------------------------------------------------------
    def resolve(self, ref: str) -> str:
        """The full id named by a revision (see refs.py for the grammar).

        Raises RefNotFound, AmbiguousRef.
        """
        base, ops = parse_revision(ref)
        vid = self._resolve_base(base, ref)
        for op, n in ops:
            if op == "~":
                for _ in range(n):
                    ps = self.index.parents_of(vid)
                    if not ps:
                        raise RefNotFound(ref, f"{vid[:12]} has no parent")
                    vid = ps[0]
            elif n:
                ps = self.index.parents_of(vid)
                if len(ps) < n:
                    raise RefNotFound(ref, f"{vid[:12]} has {len(ps)} parent(s), not {n}")
                vid = ps[n - 1]
        return vid

    def _resolve_base(self, base: str, ref: str) -> str:
        if base == "HEAD":
            branch = self.head_branch()
            target = self.index.ref(BRANCH_PREFIX + branch)
            if target is None:
                raise RefNotFound(ref, f"HEAD is branch {branch!r}, which has no versions yet")
            return target
        if base.startswith("refs/"):
            target = self.index.ref(base)
            if target is None:
                raise RefNotFound(ref)
            return target
        low = base.lower()
        if _HEX64.fullmatch(low):
            if not self.index.has_version(low):
                raise RefNotFound(ref, "no such version in the index")
            return low
        for prefix in (BRANCH_PREFIX, TAG_PREFIX):
            target = self.index.ref(prefix + base)
            if target is not None:
                return target
        if len(low) >= MIN_PREFIX and all(c in "0123456789abcdef" for c in low):
            found = self.index.ids_with_prefix(low)
            if len(found) > 1:
                raise AmbiguousRef(ref, found)
            if found:
                return found[0]
        raise RefNotFound(ref)

    def head_branch(self) -> str:
        """The current branch's short name (HEAD); `main` in a new repository."""
        return short_ref_name(self.index.meta("HEAD") or BRANCH_PREFIX + "main")

    def set_head(self, branch: str) -> None:
        """Make `branch` the current branch (it need not exist yet)."""
        ref = full_ref_name(branch)
        check_ref_name(ref)
        self.index.set_meta("HEAD", ref)

    def branches(self) -> dict[str, str]:
        """Branch short name -> version id."""
        return self.index.branches()

    def tags(self) -> dict[str, str]:
        """Tag short name -> version id."""
        return self.index.tags()

    def set_ref(self, name: str, new: str | None, old: Any = ANY) -> bool:
        """Compare-and-swap a ref: set `name` to `new` (None deletes it) if it now holds `old`.

        `name` is a branch short name or a full `refs/heads/...`/`refs/tags/...` name. `old`
        is the expected id, None for "must not exist", or ANY (default) for no check. `new`
        may be any revision; it must name an indexed version. Returns False when `old`
        did not match. Raises RefNotFound, InvalidRefName.
        """
        full = full_ref_name(name)
        check_ref_name(full)
        target = self.resolve(new) if new is not None else None
        with self.index.transaction() as db:
            return self.index.swap_ref(db, full, target, old)

    # --- queries (index only) -----------------------------------------------------------
    def log(self, ref: str = "HEAD", limit: int | None = None) -> list[Version]:
        """Ancestry of `ref`, newest first, each version before its parents (records read for the result only)."""
        return [self.get_version(info.id) for info in self.log_info(ref, limit)]

    def log_info(self, ref: str = "HEAD", limit: int | None = None) -> list[VersionInfo]:
        """Like `log`, answered from the index alone (ids, parents, round, time, message, author, metrics)."""
        return self.index.ancestry(self.resolve(ref), limit)

    def versions(self, with_metrics: bool = False) -> list[VersionInfo]:
        """Every indexed version (oldest first), or only those that carry metrics."""
        return self.index.versions(with_metrics)

    def children(self, ref: str) -> list[str]:
        """Ids of the indexed versions that have `ref` as a parent, oldest first."""
        return self.index.children(self.resolve(ref))

    # --- pruned versions ----------------------------------------------------------------
    def is_pruned(self, ref: str) -> bool:
        """True when only the record of the version `ref` names is kept (see the module docs)."""
        return self.index.is_pruned(self.resolve(ref))

    def pruned(self) -> set[str]:
        """Ids of every pruned version."""
        return self.index.pruned_ids()

    def prune(self, ids: Iterable[str]) -> list[str]:
        """Mark versions as pruned (their objects become garbage for `gc`/`free_pruned`).

        Returns the ids newly marked. Raises PruneRefused for a version a branch or tag points
        to (nothing is marked then), RefNotFound for an id not indexed.
        """
        wanted = [self.resolve(i) for i in ids]
        tips = {vid: name for name, vid in self.index.refs().items()}
        for vid in wanted:
            if vid in tips:
                raise PruneRefused(vid, tips[vid])
        before = self.index.pruned_ids()
        new = [vid for vid in dict.fromkeys(wanted) if vid not in before]
        with self.index.transaction() as db:
            self.index.mark_pruned(db, new)
        return new

    def free_pruned(self, grace_s: float = 0.0, versions: Iterable[str] | None = None) -> GcReport:
        """Delete only the objects that pruned versions (all, or `versions`) alone need; safe
        while a node runs (unindexed and unreachable versions are left alone); see
        maintenance.free_pruned."""
        return free_pruned(self, grace_s, versions)

    # --- maintenance --------------------------------------------------------------------
    def verify(self) -> VerifyReport:
        """Check every object, record and index entry; see maintenance.verify."""
        return verify(self)

    def repair(self, sources: "list[LineageStore]") -> RepairReport:
        """Restore missing or corrupt objects from intact copies in `sources`; see maintenance.repair."""
        return repair(self, sources)

    def gc(self, grace_s: float = 0.0) -> GcReport:
        """Remove what no ref reaches (objects younger than `grace_s` seconds are kept); see maintenance.gc."""
        return gc(self, grace_s)
