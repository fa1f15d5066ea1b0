"""The dashboard's read-only JSON API over the node's lineage, and its static files.

Routes (all GET; every answer is JSON; errors are `{"error": ..., "status": code}` with a 4xx/5xx):

    /api/lineage?limit=N    versions of HEAD's branch, newest first (topological), N in 1..500
    /api/version/<id>       one version: merge spec, contributors, metrics, CI votes, screened deltas
    /api/diff/<id>?top=K    the version against its first parent: totals and the K (1..100) tensors
                            that moved most
    /api/credits?limit=N    the contributor leaderboard (`p2pmodel.credits`) over the last N
                            versions of HEAD's branch, N in 1..5000, with the display names and
                            samples this node saw each peer announce (`certificate["observed"]`)

`<id>` is a full id or a unique hex prefix of 4 or more digits, never a ref or a path: nothing a
client sends becomes a file name. Every call is blocking (SQLite and object reads), so the
status server runs it in a thread. Records are immutable, so their summaries are cached by id;
annotations (metrics, certificate) can change and are read every time, from the index.

`dashboard_file(name)` serves the front end in `dashboard/` from a fixed table of names.
"""

from __future__ import annotations

import json
import math
import re
import threading
import urllib.parse
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from p2pmodel.credits import leaderboard, observed_of

if TYPE_CHECKING:  # the lineage imports torch: `p2pmodel status` imports this module and stays fast
    from p2pmodel.lineage import LineageStore

__all__ = ["DASHBOARD_FILES", "ApiReply", "LineageApi", "dashboard_file"]

_ID = re.compile(r"[0-9a-f]{4,64}")
_LINEAGE_LIMIT = (1, 500, 100)  # (min, max, default) versions per /api/lineage
_CREDITS_LIMIT = (1, 5000, 1000)
_DIFF_TOP = (1, 100, 20)
_SUMMARY_CACHE = 4096  # version summaries kept (a few hundred bytes each)
_DIFF_CACHE = 64

# name under /dashboard/ -> (file under daemon/dashboard/, content type); nothing else is served
DASHBOARD_FILES: dict[str, tuple[str, str]] = {
    "": ("index.html", "text/html; charset=utf-8"),
    "index.html": ("index.html", "text/html; charset=utf-8"),
    "app.js": ("app.js", "text/javascript; charset=utf-8"),
    "app.css": ("app.css", "text/css; charset=utf-8"),
    "vendor/uPlot.iife.min.js": ("vendor/uPlot.iife.min.js", "text/javascript; charset=utf-8"),
    "vendor/uPlot.min.css": ("vendor/uPlot.min.css", "text/css; charset=utf-8"),
    "vendor/LICENSE.uPlot": ("vendor/LICENSE.uPlot", "text/plain; charset=utf-8"),
}


@dataclass(frozen=True)
class ApiReply:
    status: int  # HTTP status code
    content_type: str
    body: bytes

    @classmethod
    def json(cls, obj: Any, status: int = 200) -> ApiReply:
        return cls(status, "application/json", json.dumps(jsonable(obj), sort_keys=True).encode())

    @classmethod
    def error(cls, status: int, message: str) -> ApiReply:
        return cls.json({"error": message, "status": status}, status)


class _Refused(Exception):
    """Internal: end a request with this status and message."""

    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


@dataclass(frozen=True)
class _Summary:
    """What the API needs of a version record (the tensor manifest is left behind)."""

    id: str
    parents: tuple[str, ...]
    round: int | None
    time: float
    message: str
    author: str
    merge: Mapping[str, Any] | None  # plain dicts and lists
    contributors: tuple[str, ...]
    n_tensors: int
    total_bytes: int
    files: tuple[str, ...]


class LineageApi:
    """Answers /api/* from a `LineageStore` (None: the node serves no lineage, every call is 503)."""

    def __init__(self, store: LineageStore | None):
        self._store = store
        self._lock = threading.Lock()  # guards the caches
        self._diffing = threading.Lock()  # one diff at a time: it loads tensors
        self._summaries: OrderedDict[str, _Summary] = OrderedDict()
        self._diffs: OrderedDict[tuple[str, int], dict[str, Any]] = OrderedDict()

    def handle(self, target: str) -> ApiReply:
        """Answer one request target (`/api/...?query`). Blocking; never raises for bad input."""
        from p2pmodel.lineage import LineageError

        path, _, query = target.partition("?")
        try:
            params = urllib.parse.parse_qs(query, keep_blank_values=True, max_num_fields=8, strict_parsing=False)
        except ValueError:
            return ApiReply.error(400, "too many query parameters")
        try:
            if self._store is None:
                raise _Refused(503, "this node serves no lineage")
            parts = path.split("/")  # ["", "api", route, arg?]
            route, args = (parts[2] if len(parts) > 2 else ""), parts[3:]
            if route == "lineage" and not args:
                return ApiReply.json(self.lineage(_int(params, "limit", _LINEAGE_LIMIT)))
            if route == "credits" and not args:
                return ApiReply.json(self.credits(_int(params, "limit", _CREDITS_LIMIT)))
            if route == "version" and len(args) == 1:
                return ApiReply.json(self.version(self._resolve(args[0])))
            if route == "diff" and len(args) == 1:
                return ApiReply.json(self.diff(self._resolve(args[0]), _int(params, "top", _DIFF_TOP)))
            raise _Refused(404, "no such API; try /api/lineage, /api/version/<id>, /api/diff/<id>, /api/credits")
        except _Refused as e:
            return ApiReply.error(e.status, e.message)
        except LineageError as e:  # damage in the store: say so, keep serving
            return ApiReply.error(500, f"lineage error: {e}")

    # ---------------------------------------------------------------------------- routes

    def lineage(self, limit: int) -> dict[str, Any]:
        """HEAD's branch, newest first: one row per version, with counts for the graph."""
        store = self._store
        infos = self._log(limit + 1)
        refs: dict[str, list[str]] = {}
        for name, vid in store.branches().items():
            refs.setdefault(vid, []).append(name)
        rows = []
        for info in infos[:limit]:
            s = self._summary(info.id)
            merge = s.merge or {}
            ann = store.annotations(info.id)
            rows.append({
                "id": info.id, "parents": list(info.parents), "round": info.round, "time": info.time,
                "message": info.message, "author": info.author, "metrics": info.metrics or {},
                "contributors": len(s.contributors), "screened": len(merge.get("screened") or ()),
                "excluded": len(merge.get("excluded") or ()), "ci_votes": _vote_count(ann.certificate),
                "refs": refs.get(info.id, []),
            })
        return {"branch": store.head_branch(), "head": infos[0].id if infos else None,
                "versions": rows, "truncated": len(infos) > limit, "limit": limit}

    def credits(self, limit: int | None) -> dict[str, Any]:
        """The leaderboard over the newest `limit` versions of HEAD's branch (None: all of them),
        with the names and samples this node saw announced (see p2pmodel/credits.py)."""
        infos = self._log(None if limit is None else limit + 1)
        counted = infos if limit is None else infos[:limit]
        observed = {i.id: observed_of(self._store.annotations(i.id).certificate) for i in counted}
        board = leaderboard((self._summary(i.id) for i in counted), observed)
        return {"branch": self._store.head_branch(), "peers": [c.to_json() for c in board], "versions": len(counted),
                "truncated": len(counted) < len(infos), "limit": limit}

    def version(self, vid: str) -> dict[str, Any]:
        s = self._summary(vid)
        ann = self._store.annotations(vid)
        merge = s.merge or {}
        cert = ann.certificate if isinstance(ann.certificate, Mapping) else None
        return {
            "id": s.id, "parents": list(s.parents), "children": self._store.children(vid), "round": s.round,
            "time": s.time, "message": s.message, "author": s.author, "merge": s.merge,
            "contributors": list(s.contributors), "metrics": dict(ann.metrics),
            "screened": [_reason(e) for e in merge.get("screened") or ()],
            "excluded": [_reason(e) for e in merge.get("excluded") or ()],
            "ci": None if cert is None else {
                "round": cert.get("round"), "proposal": cert.get("proposal"),
                "votes": [_vote(env, vid) for env in cert.get("votes") or ()],
            },
            "n_tensors": s.n_tensors, "total_bytes": s.total_bytes, "files": list(s.files),
        }

    def diff(self, vid: str, top: int) -> dict[str, Any]:
        with self._lock:
            if (vid, top) in self._diffs:
                return self._diffs[(vid, top)]
        s = self._summary(vid)
        if not s.parents:
            return {"id": vid, "parent": None, "totals": None, "tensors": [], "files": {}}
        from p2pmodel.lineage.diff import diff_versions

        if not self._diffing.acquire(blocking=False):
            raise _Refused(503, "another diff is being computed; retry in a moment")
        try:
            report = diff_versions(self._store, s.parents[0], vid)
        finally:
            self._diffing.release()
        moved = sorted((t for t in report.tensors if t.status != "unchanged"), key=_most_moved_first)
        out = {"id": vid, "parent": s.parents[0], "totals": report.totals.to_json(),
               "tensors": [t.to_json() for t in moved[:top]], "tensors_moved": len(moved), "files": dict(report.files)}
        with self._lock:
            self._diffs[(vid, top)] = out
            while len(self._diffs) > _DIFF_CACHE:
                self._diffs.popitem(last=False)
        return out

    # ---------------------------------------------------------------------------- helpers

    def _log(self, limit: int | None) -> list:
        from p2pmodel.lineage import RefNotFound

        try:
            return self._store.log_info("HEAD", limit)
        except RefNotFound:
            return []  # a lineage with no versions yet

    def _resolve(self, text: str) -> str:
        """A full id or a unique hex prefix -> full id; anything else is refused before any lookup."""
        if not _ID.fullmatch(text):
            raise _Refused(400, "a version is named by 4 to 64 lowercase hex digits")
        index = self._store.index
        if len(text) == 64:
            if not index.has_version(text):
                raise _Refused(404, f"no version {text[:12]} in this node's lineage")
            return text
        found = index.ids_with_prefix(text, limit=2)
        if not found:
            raise _Refused(404, f"no version {text} in this node's lineage")
        if len(found) > 1:
            raise _Refused(400, f"{text} names more than one version; give more digits")
        return found[0]

    def _summary(self, vid: str) -> _Summary:
        with self._lock:
            if vid in self._summaries:
                self._summaries.move_to_end(vid)
                return self._summaries[vid]
        v = self._store.get_version(vid)
        s = _Summary(v.id, tuple(v.parents), v.round, v.time, v.message, v.author,
                     _plain(v.merge) if v.merge is not None else None, tuple(v.contributors),
                     len(v.tensors), sum(e.nbytes for e in v.tensors.values()), tuple(sorted(v.files)))
        with self._lock:
            self._summaries[vid] = s
            while len(self._summaries) > _SUMMARY_CACHE:
                self._summaries.popitem(last=False)
        return s


def _int(params: dict[str, list[str]], name: str, bounds: tuple[int, int, int]) -> int:
    lo, hi, default = bounds
    values = params.get(name)
    if not values:
        return default
    try:
        n = int(values[-1])
    except ValueError:
        raise _Refused(400, f"{name} must be an integer") from None
    if not lo <= n <= hi:
        raise _Refused(400, f"{name} must be between {lo} and {hi}")
    return n


def _most_moved_first(t: Any) -> tuple:
    # largest change first; NaN (a broken tensor) counts as the largest; no norm (added, removed,
    # reshaped) after every measured change
    change = t.l2_change
    if change is None:
        return (1, 0.0, t.name)
    return (0, -(math.inf if math.isnan(change) else change), t.name)


def _vote_count(certificate: Any) -> int:
    votes = certificate.get("votes") if isinstance(certificate, Mapping) else None
    return len(votes) if isinstance(votes, (list, tuple)) else 0


def _vote(envelope: Any, vid: str) -> dict[str, Any]:
    """One signed vote of a certificate, opened: who voted, what they measured, whether it checks."""
    from p2pmodel.protocols.errors import RemoteProtocolError
    from p2pmodel.protocols.messages import Vote
    from p2pmodel.protocols.signing import open_signed

    if not isinstance(envelope, (bytes, bytearray)):
        return {"valid": False, "error": "not a signed envelope"}
    try:
        vote, signer = open_signed(bytes(envelope), Vote)
    except RemoteProtocolError as e:  # open_signed raises nothing else: a bad vote to show
        return {"valid": False, "error": type(e).__name__}
    return {"valid": vote.version_id == vid, "voter": signer, "round": vote.round, "metrics": dict(vote.metrics)}


def _reason(entry: Any) -> dict[str, Any]:
    if isinstance(entry, (list, tuple)) and len(entry) >= 2:
        return {"peer": entry[0], "reason": entry[1]}
    return {"peer": None, "reason": repr(entry)}


def _plain(x: Any) -> Any:
    """Frozen mappings and tuples from a record -> dicts and lists; bytes -> hex."""
    if hasattr(x, "items") and hasattr(x, "keys"):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (bytes, bytearray)):
        return bytes(x).hex()
    return x


def jsonable(value: Any) -> Any:
    """JSON has no NaN/Infinity: None instead, so every client parses the answer (status too)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


_files_cache: dict[str, bytes] = {}


def dashboard_file(name: str) -> tuple[bytes, str] | None:
    """The front end's file `name` (relative to /dashboard/) and its content type; None if unknown."""
    entry = DASHBOARD_FILES.get(name)
    if entry is None:
        return None
    rel, ctype = entry
    if rel not in _files_cache:  # read once: they are package data and do not change
        _files_cache[rel] = resources.files("p2pmodel.daemon").joinpath("dashboard", *rel.split("/")).read_bytes()
    return _files_cache[rel], ctype

