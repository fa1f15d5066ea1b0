"""The SQLite index of a lineage repository: versions, parent edges, refs, annotations, HEAD,
and which versions are pruned.

The index answers the queries a dashboard makes (log of a branch, versions with metrics,
children of a version) without reading records. It is written LAST, in one transaction,
after every object a version needs and the version record itself are durable on disk, so a
version is visible (indexed, reachable from a ref) only once it is whole.

Annotations (metrics, certificate) live only here: they are not part of a version's id.
A *pruned* version (table `pruned`) keeps its record, annotations and index row, but the
store no longer holds (or never fetched) its tensors, optimizer state and files: see
`retention.py`. Repositories made before the table existed get it when opened
(`_patch_pruned_table`).
The database runs in WAL mode with `synchronous=FULL`, so a committed transaction
survives a crash of the process or the machine.
"""

from __future__ import annotations

import heapq
import json
import logging
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import msgpack

from p2pmodel.lineage.objects import Annotations, Version
from p2pmodel.lineage.refs import BRANCH_PREFIX, TAG_PREFIX, RefConflict

__all__ = ["Index", "VersionInfo", "ANY"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: the `pruned` table

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- insertion order, the last tie-break of log order
    id TEXT NOT NULL UNIQUE,
    round INTEGER,
    time REAL NOT NULL,
    message TEXT NOT NULL,
    author TEXT NOT NULL,
    n_tensors INTEGER NOT NULL,
    metrics TEXT,            -- JSON object, NULL when the version has none
    certificate BLOB         -- msgpack, NULL when none
);
CREATE TABLE IF NOT EXISTS parents (
    child TEXT NOT NULL, idx INTEGER NOT NULL, parent TEXT NOT NULL,
    PRIMARY KEY (child, idx)
);
CREATE INDEX IF NOT EXISTS parents_by_parent ON parents (parent);
CREATE TABLE IF NOT EXISTS refs (name TEXT PRIMARY KEY, target TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pruned (id TEXT PRIMARY KEY);  -- versions kept as records only
"""

_PRUNED_TABLE = "CREATE TABLE IF NOT EXISTS pruned (id TEXT PRIMARY KEY)"


class _Any:
    def __repr__(self) -> str:
        return "ANY"


ANY: Any = _Any()  # `old` value for set_ref meaning "whatever the ref holds now"


@dataclass(frozen=True)
class VersionInfo:
    """A version as the index knows it (no record read)."""

    id: str
    parents: tuple[str, ...]
    round: int | None
    time: float  # unix seconds
    message: str
    author: str
    n_tensors: int
    metrics: dict[str, float] | None
    pruned: bool = False  # record only: its tensors and optimizer state are not in this store


class Index:
    """The SQLite index. Thread-safe: one connection, serialised by a lock."""

    def __init__(self, path: str, create: bool = False, durable: bool = True):
        self._lock = threading.RLock()
        # isolation_level=None: we issue BEGIN ourselves, so a transaction is exactly what we say
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed transaction survives power loss; NORMAL (WAL) still survives a killed process
        self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        self._db.execute("PRAGMA foreign_keys=OFF")
        if create:
            with self.transaction() as db:
                for statement in _SCHEMA.split(";"):  # not executescript: it would COMMIT early
                    if statement.strip():
                        db.execute(statement)
                db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
                db.execute("INSERT OR IGNORE INTO meta VALUES ('HEAD', ?)", (BRANCH_PREFIX + "main",))
        else:
            self._patch_pruned_table()

    def _patch_pruned_table(self) -> None:
        """Schema 1 -> 2: add the (empty) `pruned` table to a repository made before it existed."""
        if self._q("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'pruned'"):
            return
        with self.transaction() as db:
            db.execute(_PRUNED_TABLE)
            db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        logger.info("lineage index upgraded to schema %d: added the pruned-versions table", SCHEMA_VERSION)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error); takes the write lock up front."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _q(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # --- meta ---------------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        rows = self._q("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # --- versions -----------------------------------------------------------------------
    def add_version(self, db: sqlite3.Connection, v: Version, ann: Annotations | None, pruned: bool = False) -> None:
        """Insert a version and its parent edges (inside `db`'s transaction); idempotent.

        Annotations given for an already-indexed version replace the stored ones. `pruned`
        indexes a new version as a record only; a whole version (pruned=False) given for a
        pruned one makes it whole again (its objects were fetched back), never the reverse.
        """
        exists = db.execute("SELECT 1 FROM versions WHERE id = ?", (v.id,)).fetchone()
        if not exists:
            db.execute(
                "INSERT INTO versions (id, round, time, message, author, n_tensors) VALUES (?,?,?,?,?,?)",
                (v.id, v.round, v.time, v.message, v.author, len(v.tensors)),
            )
            db.executemany("INSERT INTO parents VALUES (?,?,?)", [(v.id, i, p) for i, p in enumerate(v.parents)])
            if pruned:
                db.execute("INSERT OR IGNORE INTO pruned VALUES (?)", (v.id,))
        if not pruned:
            db.execute("DELETE FROM pruned WHERE id = ?", (v.id,))
        if ann is not None:
            self.set_annotations(db, v.id, ann)

    def set_annotations(self, db: sqlite3.Connection, vid: str, ann: Annotations) -> None:
        metrics = json.dumps(dict(ann.metrics), sort_keys=True) if ann.metrics else None
        cert = msgpack.packb(ann.certificate, use_bin_type=True) if ann.certificate is not None else None
        db.execute("UPDATE versions SET metrics = ?, certificate = ? WHERE id = ?", (metrics, cert, vid))

    def annotations(self, vid: str) -> Annotations | None:
        rows = self._q("SELECT metrics, certificate FROM versions WHERE id = ?", (vid,))
        if not rows:
            return None
        metrics, cert = rows[0]
        return Annotations(
            metrics=json.loads(metrics) if metrics else {},
            certificate=msgpack.unpackb(cert, raw=False) if cert is not None else None,
        )

    def has_version(self, vid: str) -> bool:
        return bool(self._q("SELECT 1 FROM versions WHERE id = ?", (vid,)))

    # --- pruned versions ----------------------------------------------------------------
    def is_pruned(self, vid: str) -> bool:
        return bool(self._q("SELECT 1 FROM pruned WHERE id = ?", (vid,)))

    def pruned_ids(self) -> set[str]:
        return {r[0] for r in self._q("SELECT id FROM pruned")}

    def mark_pruned(self, db: sqlite3.Connection, ids: list[str]) -> None:
        """Inside `db`'s transaction: record `ids` (indexed versions) as pruned."""
        db.executemany("INSERT OR IGNORE INTO pruned SELECT id FROM versions WHERE id = ?", [(vid,) for vid in ids])

    def ids_with_prefix(self, prefix: str, limit: int = 50) -> list[str]:
        # range scan on the unique index instead of LIKE (which ignores the index)
        hi = prefix + "g"  # 'g' sorts after every hex digit
        return [r[0] for r in self._q("SELECT id FROM versions WHERE id >= ? AND id < ? LIMIT ?", (prefix, hi, limit))]

    def all_ids(self) -> list[str]:
        return [r[0] for r in self._q("SELECT id FROM versions ORDER BY seq")]

    def parents_of(self, vid: str) -> tuple[str, ...]:
        return tuple(r[0] for r in self._q("SELECT parent FROM parents WHERE child = ? ORDER BY idx", (vid,)))

    def children(self, vid: str) -> list[str]:
        return [
            r[0]
            for r in self._q(
                "SELECT p.child FROM parents p JOIN versions v ON v.id = p.child WHERE p.parent = ? ORDER BY v.time, v.seq",
                (vid,),
            )
        ]

    _INFO_COLUMNS = "v.id, v.round, v.time, v.message, v.author, v.n_tensors, v.metrics, p.id IS NOT NULL"
    _INFO_FROM = "versions v LEFT JOIN pruned p ON p.id = v.id"

    def info(self, vid: str) -> VersionInfo | None:
        rows = self._q(f"SELECT {self._INFO_COLUMNS} FROM {self._INFO_FROM} WHERE v.id = ?", (vid,))
        return self._info(rows[0]) if rows else None

    def _info(self, row: tuple) -> VersionInfo:
        vid, rnd, t, msg, author, n, metrics, pruned = row
        return VersionInfo(vid, self.parents_of(vid), rnd, t, msg, author, n, json.loads(metrics) if metrics else None, bool(pruned))

    def versions(self, with_metrics: bool = False) -> list[VersionInfo]:
        """Every indexed version, oldest first; only those with metrics if asked."""
        where = "WHERE v.metrics IS NOT NULL" if with_metrics else ""
        rows = self._q(f"SELECT {self._INFO_COLUMNS} FROM {self._INFO_FROM} {where} ORDER BY v.time, v.seq")
        return [self._info(r) for r in rows]

    def ancestry(self, tip: str, limit: int | None = None) -> list[VersionInfo]:
        """`tip` and its ancestors, newest first, in topological order (a version before its parents).

        Among versions whose children are all listed, the newest (time, then insertion) comes first.
        """
        with self._lock:
            rows = self._db.execute(
                """WITH RECURSIVE anc(id) AS (
                       SELECT ? UNION SELECT p.parent FROM parents p JOIN anc ON p.child = anc.id)
                   SELECT v.id, v.round, v.time, v.message, v.author, v.n_tensors, v.metrics, v.seq, p.id IS NOT NULL
                   FROM versions v JOIN anc ON v.id = anc.id LEFT JOIN pruned p ON p.id = v.id""",
                (tip,),
            ).fetchall()
            edges = self._db.execute(
                """WITH RECURSIVE anc(id) AS (
                       SELECT ? UNION SELECT p.parent FROM parents p JOIN anc ON p.child = anc.id)
                   SELECT p.child, p.parent FROM parents p JOIN anc ON p.child = anc.id ORDER BY p.child, p.idx""",
                (tip,),
            ).fetchall()
        by_id = {r[0]: r for r in rows}
        parents: dict[str, list[str]] = {}
        pending_children: dict[str, int] = {vid: 0 for vid in by_id}
        for child, parent in edges:
            parents.setdefault(child, []).append(parent)
            if parent in pending_children:
                pending_children[parent] += 1
        out: list[VersionInfo] = []
        heap = [(-by_id[tip][2], -by_id[tip][7], tip)] if tip in by_id else []
        while heap and (limit is None or len(out) < limit):
            _, _, vid = heapq.heappop(heap)
            r = by_id[vid]
            out.append(VersionInfo(vid, tuple(parents.get(vid, ())), r[1], r[2], r[3], r[4], r[5], json.loads(r[6]) if r[6] else None, bool(r[8])))
            for p in parents.get(vid, ()):
                if p in pending_children:
                    pending_children[p] -= 1
                    if pending_children[p] == 0:
                        heapq.heappush(heap, (-by_id[p][2], -by_id[p][7], p))
        return out

    def remove_versions(self, db: sqlite3.Connection, ids: list[str]) -> None:
        for vid in ids:
            db.execute("DELETE FROM versions WHERE id = ?", (vid,))
            db.execute("DELETE FROM parents WHERE child = ?", (vid,))
            db.execute("DELETE FROM pruned WHERE id = ?", (vid,))

    # --- refs ---------------------------------------------------------------------------
    def ref(self, name: str) -> str | None:
        rows = self._q("SELECT target FROM refs WHERE name = ?", (name,))
        return rows[0][0] if rows else None

    def refs(self, prefix: str = "refs/") -> dict[str, str]:
        return dict(self._q("SELECT name, target FROM refs WHERE name >= ? AND name < ? ORDER BY name", (prefix, prefix + "\uffff")))

    def branches(self) -> dict[str, str]:
        return {k[len(BRANCH_PREFIX):]: v for k, v in self.refs(BRANCH_PREFIX).items()}

    def tags(self) -> dict[str, str]:
        return {k[len(TAG_PREFIX):]: v for k, v in self.refs(TAG_PREFIX).items()}

    def swap_ref(self, db: sqlite3.Connection, name: str, new: str | None, old: Any = ANY) -> bool:
        """Inside `db`'s transaction: set `name` to `new` (None deletes) if it holds `old`
        (None = must be absent, ANY = don't check). Returns False when it did not."""
        row = db.execute("SELECT target FROM refs WHERE name = ?", (name,)).fetchone()
        current = row[0] if row else None
        if old is not ANY and current != old:
            return False
        if new is None:
            db.execute("DELETE FROM refs WHERE name = ?", (name,))
        else:
            db.execute("INSERT OR REPLACE INTO refs VALUES (?, ?)", (name, new))
        return True

    def swap_ref_or_raise(self, db: sqlite3.Connection, name: str, new: str | None, old: Any) -> None:
        if not self.swap_ref(db, name, new, old):
            raise RefConflict(name, old, self._current(db, name))

    @staticmethod
    def _current(db: sqlite3.Connection, name: str) -> str | None:
        row = db.execute("SELECT target FROM refs WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def integrity(self) -> list[str]:
        """SQLite's own integrity check; [] when the database is sound."""
        rows = self._q("PRAGMA integrity_check")
        return [] if rows == [("ok",)] else [r[0] for r in rows]

    def raw_rows(self) -> Mapping[str, tuple]:
        """id -> (round, time, message, author, n_tensors) for consistency checks."""
        return {r[0]: r[1:] for r in self._q("SELECT id, round, time, message, author, n_tensors FROM versions")}

    def all_edges(self) -> list[tuple[str, int, str]]:
        return self._q("SELECT child, idx, parent FROM parents ORDER BY child, idx")
