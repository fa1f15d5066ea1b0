"""Repository commands: init, commit, log, show, diff, export, branch, tag, verify, gc.

Human output is aligned columns with ids shortened to 12 hex digits, as git does. Progress
for long operations (commit, export, diff) goes to stderr, only on a terminal.

Why one long file: each command is a short function over LineageStore plus its flags, and they
share the output helpers (tables, JSON, short ids); the seam to split next is `log` with its
graph drawing, the largest part.

`--json` output (stable; fields are only ever added). Times are unix seconds (float),
ids are full 64-hex strings, shapes are lists of ints, bytes are ints:

- `log --json`: a list, newest first, of
  `{"id", "parents": [id], "time", "message", "author", "round": int|null,
    "metrics": {name: float}|null, "n_tensors", "refs": [name], "head": bool,
    "contributors": [str], "pruned": bool}`
  where `refs` holds the full names of the refs pointing at the version
  (`refs/heads/main`, `refs/tags/v1`), `head` is true for the current branch's tip and
  `contributors` are the peer ids whose work the version merges (empty for a local commit);
  `pruned` is true when only the version's record is kept (its tensors were pruned: `gc --prune`).
- `show --json`: `{"id", "parents", "refs", "head", "time", "message", "author", "round",
  "merge": object|null, "contributors": [str], "metrics": {..}, "certificate": object|null
  (bytes as hex strings), "tensors": {name: {"oid", "dtype", "shape", "nbytes"}},
  "files": {name: oid}, "optimizer_state": {name: {"oid", "dtype", "shape", "nbytes"}},
  "total_bytes"}`.
- `diff --json`: `DiffReport.to_json()` (see p2pmodel.lineage.diff): `{"a", "b",
  "tensors": [{"name", "status", "dtype_a", "dtype_b", "shape_a", "shape_b", "l2_change",
  "norm_a", "norm_b", "relative_change", "changed_entries", "changed_fraction", "numel",
  "reshaped"}], "totals": {"counts": {status: n}, "l2_change", "norm_a",
  "relative_change", "changed_entries", "compared_entries", "changed_fraction"},
  "files": {name: status}}`; non-finite floats appear as the strings "inf"/"nan".
- `verify --json`: `{"ok", "objects_checked", "bytes_checked", "versions_checked",
  "unreferenced_objects", "stray_temp_files", "problems": [{"oid", "kind", "versions", "detail"}]}`;
  with `--repair-from REPO...` also `"repaired": [oid]` (the checks are those after repairing).
- `gc --json`: `{"removed_objects", "bytes_freed", "removed_versions", "removed_temp_files",
  "kept_objects"}`; with `--prune` also `"pruned_versions": [id]` (those newly pruned).

Exit codes: 0 success; 1 an error p2pmodel diagnosed (one line on stderr), or damage found
by `verify`; 2 a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from p2pmodel.checkpoint import OutputExists, open_checkpoint, write_hf_folder, write_safetensors
from p2pmodel.errors import P2PModelError, UsageError
from p2pmodel.lineage import LineageStore, RetentionPolicy, TensorEntry, Version, apply_retention
from p2pmodel.lineage.diff import DiffReport, diff_versions
from p2pmodel.lineage.refs import TAG_PREFIX
from p2pmodel.progress import Progress, format_bytes

__all__ = ["register", "draw_graph", "FileSystemError"]

SHORT = 12  # hex digits shown for an id


class FileSystemError(P2PModelError):
    """The operating system refused a file operation (permissions, disk full, ...)."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}")


class RefExists(P2PModelError):
    def __init__(self, kind: str, name: str):
        self.kind, self.name = kind, name
        super().__init__(f"{kind} {name!r} already exists")


def _os_errors(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Report OSError (not our bug: the environment's) as one line, like any diagnosed error."""

    @functools.wraps(handler)
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except OSError as e:
            if isinstance(e, BrokenPipeError):
                raise
            raise FileSystemError(e.filename or "", e.strerror or str(e)) from None

    return wrapped


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the repository subcommands to the `p2pmodel` parser."""

    def add(name: str, handler: Callable, help: str) -> argparse.ArgumentParser:
        p = subparsers.add_parser(name, help=help, description=help)
        p.set_defaults(func=_os_errors(handler))
        return p

    add("init", cmd_init, "create an empty lineage repository")

    p = add("commit", cmd_commit, "record a checkpoint (.safetensors file or folder) as a new version")
    p.add_argument("path", help="a .safetensors file, or a folder of them (config.json and tokenizer files are kept)")
    p.add_argument("-m", "--message", required=True, help="what changed")
    p.add_argument("--branch", help="branch to commit to (default: the current branch); a new branch starts at HEAD")
    p.add_argument("--metric", action="append", default=[], metavar="NAME=VALUE", help="attach a metric (repeatable)")
    p.add_argument("--author", default=os.environ.get("P2PMODEL_AUTHOR", ""), help="author (default: $P2PMODEL_AUTHOR)")

    p = add("log", cmd_log, "list versions, newest first")
    p.add_argument("ref", nargs="?", default="HEAD", help="where to start (default: HEAD)")
    p.add_argument("--all", action="store_true", help="every branch and tag, not just REF")
    p.add_argument("--graph", action="store_true",
                   help="draw the ancestry graph (branches and merges) with each version's round, metrics, "
                        "contributors, CI result and screened-out deltas")
    p.add_argument("--json", action="store_true", help="machine-readable output (see the module docs)")
    p.add_argument("-n", "--max-count", type=int, default=None, metavar="N", help="show at most N versions")

    p = add("show", cmd_show, "show one version: record, metrics, tensors, files")
    p.add_argument("ref", nargs="?", default="HEAD")
    p.add_argument("--json", action="store_true")

    p = add("diff", cmd_diff, "per-tensor change between two versions (L2, relative, changed fraction)")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--all", action="store_true", help="also list unchanged tensors")
    p.add_argument("--json", action="store_true")

    p = add("export", cmd_export, "write a version out as a .safetensors file or a Hugging Face folder")
    p.add_argument("ref")
    p.add_argument("-o", "--output", required=True, help="output file or folder")
    p.add_argument("--format", choices=("safetensors", "hf"), default=None,
                   help="default: safetensors if OUTPUT ends with .safetensors, else hf")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--max-shard-size", type=_size, default=5 * 10**9, metavar="BYTES",
                   help="hf: largest shard (e.g. 2GB, 500MB; default 5GB)")

    p = add("branch", cmd_branch, "list branches, create one (NAME [START]), or delete one (-d NAME)")
    p.add_argument("name", nargs="?")
    p.add_argument("start", nargs="?", default="HEAD")
    p.add_argument("-d", "--delete", metavar="NAME", help="delete a branch (not the current one)")

    p = add("tag", cmd_tag, "list tags, or tag a version (NAME [REF])")
    p.add_argument("name", nargs="?")
    p.add_argument("ref", nargs="?", default="HEAD")
    p.add_argument("-d", "--delete", metavar="NAME", help="delete a tag")

    p = add("verify", cmd_verify, "check every object and record; exit 1 if anything is damaged")
    p.add_argument("--json", action="store_true")
    p.add_argument("--repair-from", nargs="+", metavar="REPO", default=[],
                   help="restore missing or corrupt objects from intact copies in these repositories (e.g. another node's HOME/lineage)")

    p = add("gc", cmd_gc, "delete objects no branch or tag reaches; report bytes freed")
    p.add_argument("--json", action="store_true")
    p.add_argument("--prune", action="store_true",
                   help="also drop the tensors and optimizer state of old versions, keeping their records, "
                        "metrics and certificates (log and history stay whole)")
    p.add_argument("--keep-last", type=int, default=RetentionPolicy.keep_last, metavar="K",
                   help="with --prune: keep the newest K versions of every branch and tag whole "
                        "(default: %(default)s; at least 2)")
    p.add_argument("--keep-every", type=int, default=RetentionPolicy.keep_every, metavar="N",
                   help="with --prune: also keep every version whose round is a multiple of N whole "
                        "(default: %(default)s; 0: none)")


# ----------------------------------------------------------------------------- helpers


def _size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    try:
        value = float(num) * units[t[len(num):]]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500MB, 2GB)") from None
    if value < 1:
        raise argparse.ArgumentTypeError("size must be positive")
    return int(value)


def _open(args: argparse.Namespace) -> LineageStore:
    return LineageStore.open(args.repo)


def _print_json(obj: Any) -> None:
    def default(o: Any) -> Any:
        if isinstance(o, (bytes, bytearray, memoryview)):
            return bytes(o).hex()
        if isinstance(o, (set, frozenset, tuple)):
            return list(o)
        if isinstance(o, os.PathLike):
            return os.fspath(o)
        raise TypeError(f"not JSON-serialisable: {type(o).__name__}")

    json.dump(_finite(obj), sys.stdout, indent=2, sort_keys=False, default=default)
    sys.stdout.write("\n")


def _finite(obj: Any) -> Any:
    """JSON has no inf/nan: write them as strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def _full_refs_by_id(store: LineageStore) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, vid in sorted(store.branches().items()):
        out.setdefault(vid, []).append(f"refs/heads/{name}")
    for name, vid in sorted(store.tags().items()):
        out.setdefault(vid, []).append(f"{TAG_PREFIX}{name}")
    return out


def _head_id(store: LineageStore) -> str | None:
    return store.branches().get(store.head_branch())


def _refs_by_id(store: LineageStore) -> dict[str, list[str]]:
    head = store.head_branch()
    out: dict[str, list[str]] = {}
    for name, vid in sorted(store.branches().items()):
        out.setdefault(vid, []).append(f"HEAD -> {name}" if name == head else name)
    for name, vid in sorted(store.tags().items()):
        out.setdefault(vid, []).append(f"tag: {name}")
    for names in out.values():
        names.sort(key=lambda n: not n.startswith("HEAD"))
    return out


def _metrics_text(metrics: dict[str, float] | None) -> str:
    return "  ".join(f"{k}={v:.6g}" for k, v in sorted((metrics or {}).items()))


def _round_text(round_: int | None, metrics: dict[str, float] | None, version: Version, certificate: Any) -> str:
    """`log --graph`'s summary of a version: round, metrics, contributors, CI, screened deltas.

    Each part appears only when the version records it. CI: a committed round's certificate
    holds the votes of the peers whose CI gate passed the version (a peer whose gate fails does
    not vote), so "passed(N votes)"; a version without one (a local commit) shows no CI result.
    """
    parts = [f"round={round_}"] if round_ is not None else []
    if metrics:
        parts.append(_metrics_text(metrics))
    if version.contributors:
        parts.append(f"contributors={len(version.contributors)}")
    votes = certificate.get("votes") if isinstance(certificate, Mapping) else None
    if votes:
        parts.append(f"ci=passed({len(votes)} votes)")
    screened = (version.merge or {}).get("screened")
    if screened is not None:  # deltas the merge's screen left out (p2pmodel.screening)
        parts.append(f"screened={len(screened)}")
    return "  ".join(parts)


def _table(rows: list[list[str]], right: Iterable[int] = ()) -> list[str]:
    """Rows of cells -> aligned lines; columns in `right` are right-aligned."""
    if not rows:
        return []
    right = set(right)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    return lines


def _parse_metrics(items: list[str]) -> dict[str, float]:
    metrics = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            metrics[name.strip()] = float(value)
        except ValueError:
            raise UsageError(f"--metric {item!r}: expected NAME=NUMBER, e.g. eval_loss=2.31") from None
        if not math.isfinite(metrics[name.strip()]):
            raise UsageError(f"--metric {item!r}: the value must be finite")
    return metrics


# ----------------------------------------------------------------------------- commands


def cmd_init(args: argparse.Namespace) -> int:
    store = LineageStore.init(args.repo)
    store.close()
    print(f"Initialized empty p2pmodel repository in {os.path.abspath(args.repo)}")
    return 0


def cmd_commit(args: argparse.Namespace) -> int:
    metrics = _parse_metrics(args.metric)
    with _open(args) as store, open_checkpoint(args.path) as reader:
        branch = args.branch or store.head_branch()
        tip = store.branches().get(branch)
        parents: list[str] | None = None  # None: the branch's tip
        started_from = ""
        if tip is None:
            try:  # a new branch starts where HEAD is, as `git checkout -b` does
                head = store.resolve("HEAD")
                parents, started_from = [head], f", from {head[:SHORT]}"
            except P2PModelError:
                parents = []  # an empty repository: this is the first version
        if len(reader) == 0:
            raise UsageError(f"{args.path}: holds no tensors")
        with Progress(reader.nbytes(), "commit") as progress:
            def stream() -> Iterator[tuple[str, Any]]:
                for name in reader.names():
                    t = reader.get(name)
                    yield name, t
                    progress.update(reader.nbytes(name), name)

            version = store.commit(
                stream(), parents=parents, message=args.message, branch=branch, metrics=metrics or None,
                author=args.author, files=reader.extra_files() or None,
            )
        prev = store.get_version(version.parents[0]).tensors if version.parents else {}
    changed = sum(1 for n, e in version.tensors.items() if prev.get(n) is None or prev[n].oid != e.oid)
    total = sum(e.nbytes for e in version.tensors.values())
    root = " (root)" if not version.parents else ""
    print(f"[{branch}{root} {version.id[:SHORT]}] {version.message}")
    details = f" {len(version.tensors)} tensors ({format_bytes(total)}), {changed} new or changed{started_from}"
    if version.files:
        details += f"; files: {', '.join(version.files)}"
    print(details)
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    if args.max_count is not None and args.max_count < 0:
        raise UsageError("-n must be >= 0")
    with _open(args) as store:
        if args.all:
            tips = set(store.branches().values()) | set(store.tags().values())
            infos = _topo_union([store.log_info(t) for t in tips])[: args.max_count]
        else:
            infos = store.log_info(args.ref, args.max_count)
        refs, full, head = _refs_by_id(store), _full_refs_by_id(store), _head_id(store)
        # contributors and the merge spec live in the version record, not the index: read the
        # records only when asked for them, so a plain `log` stays an index query
        records = {i.id: store.get_version(i.id) for i in infos} if args.json or args.graph else {}
        certificates = {i.id: store.annotations(i.id).certificate for i in infos} if args.graph else {}
    if args.json:
        _print_json([
            {"id": i.id, "parents": list(i.parents), "time": i.time, "message": i.message, "author": i.author,
             "round": i.round, "metrics": i.metrics, "n_tensors": i.n_tensors, "refs": full.get(i.id, []),
             "head": i.id == head, "contributors": list(records[i.id].contributors), "pruned": i.pruned}
            for i in infos
        ])
        return 0
    texts = []
    for i in infos:
        deco = f"({', '.join(refs[i.id])}) " if i.id in refs else ""
        first_line = i.message.splitlines()[0] if i.message else ""
        if args.graph:
            extra = _round_text(i.round, i.metrics, records[i.id], certificates[i.id])
        else:
            extra = _metrics_text(i.metrics)
        mark = "  (pruned)" if i.pruned else ""  # record only: its tensors are not kept here
        texts.append(f"{i.id[:SHORT]}  {_when(i.time)}  {deco}{first_line}" + (f"  [{extra}]" if extra else "") + mark)
    if args.graph:
        lines = draw_graph([(i.id, i.parents) for i in infos], texts)
    else:
        lines = texts
    for line in lines:
        print(line)
    return 0


def _topo_union(logs: list[list[Any]]) -> list[Any]:
    """Merge several newest-first ancestries into one topological order, newest first."""
    import heapq

    by_id = {i.id: i for log in logs for i in log}
    pending = {vid: 0 for vid in by_id}
    for i in by_id.values():
        for p in i.parents:
            if p in pending:
                pending[p] += 1
    heap = [(-i.time, i.id) for i in by_id.values() if pending[i.id] == 0]
    heapq.heapify(heap)
    out = []
    while heap:
        _, vid = heapq.heappop(heap)
        out.append(by_id[vid])
        for p in by_id[vid].parents:
            if p in pending:
                pending[p] -= 1
                if pending[p] == 0:
                    heapq.heappush(heap, (-by_id[p].time, p))
    return out


def draw_graph(nodes: list[tuple[str, tuple[str, ...]]], texts: list[str]) -> list[str]:
    """An ASCII ancestry graph in the style of `git log --graph`.

    `nodes` are `(id, parents)` in topological order (children first); `texts[k]` is printed
    beside node k. Each lane holds the id it is waiting for; after a node, its lane waits
    for its first parent and further parents open lanes to its right. Connector rows move
    every line at most one lane per row (`\\` right, `/` left) until lanes are settled.
    """
    lanes: list[str] = []
    out: list[str] = []
    for (vid, parents), text in zip(nodes, texts):
        if vid not in lanes:
            lanes.append(vid)
        col = lanes.index(vid)
        out.append(" ".join("*" if j == col else "|" for j in range(len(lanes))) + "  " + text)
        # Where each line goes: (from position, id it waits for). Lanes never hold the same id
        # twice (`new` dedupes), so only this node's lane splits, into one line per parent.
        moves: list[tuple[int, str]] = []
        new: list[str] = []
        for j, waiting in enumerate(lanes):
            for target in (parents if j == col else (waiting,)):
                moves.append((j, target))
                if target not in new:
                    new.append(target)
        targets = [(j, new.index(t)) for j, t in moves]
        out.extend(_connectors(targets))
        lanes = new
    return out


def _connectors(moves: list[tuple[int, int]]) -> list[str]:
    """Rows that carry lines from lane positions to target positions, one step per row."""
    cur = list(moves)
    rows = []
    while any(a != b for a, b in cur):
        width = 2 * (max(max(a, b) for a, b in cur) + 1)
        row = [" "] * width
        nxt = []
        for a, b in cur:
            if a == b:
                row[2 * a] = "|"
                nxt.append((a, b))
            elif b > a:
                row[2 * a + 1] = "\\"
                nxt.append((a + 1, b))
            else:
                row[2 * a - 1] = "/"
                nxt.append((a - 1, b))
        rows.append("".join(row).rstrip())
        cur = sorted(set(nxt))
    return rows


def _entry_json(e: TensorEntry) -> dict[str, Any]:
    return {"oid": e.oid, "dtype": e.dtype, "shape": list(e.shape), "nbytes": e.nbytes}


def cmd_show(args: argparse.Namespace) -> int:
    with _open(args) as store:
        vid = store.resolve(args.ref)
        v = store.get_version(vid)
        ann = store.annotations(vid)
        refs, full, head = _refs_by_id(store).get(vid, []), _full_refs_by_id(store).get(vid, []), _head_id(store)
    total = sum(e.nbytes for e in v.tensors.values())
    if args.json:
        _print_json({
            "id": v.id, "parents": list(v.parents), "refs": full, "head": v.id == head, "time": v.time, "message": v.message,
            "author": v.author, "round": v.round, "merge": _plain(v.merge), "contributors": list(v.contributors),
            "metrics": dict(ann.metrics), "certificate": _plain(ann.certificate),
            "tensors": {n: _entry_json(e) for n, e in v.tensors.items()},
            "files": dict(v.files),
            "optimizer_state": {n: _entry_json(e) for n, e in v.optimizer_state.items()},
            "total_bytes": total,
        })
        return 0
    head = [["version", v.id + (f"  ({', '.join(refs)})" if refs else "")]]
    head += [["parent", p] for p in v.parents] or [["parent", "(none: a root version)"]]
    head.append(["date", time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(v.time))])
    if v.author:
        head.append(["author", v.author])
    if v.round is not None:
        head.append(["round", str(v.round)])
    if v.merge is not None:
        head.append(["merge", json.dumps(_plain(v.merge), sort_keys=True, default=str)])
    if v.contributors:
        head.append(["contributors", ", ".join(v.contributors)])
    if ann.metrics:
        head.append(["metrics", _metrics_text(dict(ann.metrics))])
    if ann.certificate is not None:
        head.append(["certificate", "present"])
    for line in _table(head):
        print(line)
    print()
    for line in (v.message or "(no message)").splitlines():
        print(f"    {line}")
    print()
    print(f"tensors: {len(v.tensors)}, {format_bytes(total)}")
    rows = [[n, e.dtype, "x".join(map(str, e.shape)) or "scalar", format_bytes(e.nbytes), e.oid[:SHORT]]
            for n, e in v.tensors.items()]
    for line in _table(rows, right=(3,)):
        print(f"  {line}")
    if v.files:
        print(f"files: {len(v.files)}")
        for line in _table([[n, oid[:SHORT]] for n, oid in v.files.items()]):
            print(f"  {line}")
    if v.optimizer_state:
        print(f"optimizer state: {len(v.optimizer_state)} tensors, "
              f"{format_bytes(sum(e.nbytes for e in v.optimizer_state.values()))}")
    return 0


def _plain(x: Any) -> Any:
    """Frozen mappings and tuples from a record -> JSON-friendly dicts and lists."""
    if isinstance(x, dict) or (hasattr(x, "items") and hasattr(x, "keys")):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _fmt(x: float | None, spec: str = ".4g") -> str:
    if x is None:
        return "-"
    return format(x, spec) if math.isfinite(x) else str(x)


def cmd_diff(args: argparse.Namespace) -> int:
    with _open(args) as store:
        va = store.get_version(store.resolve(args.a))
        vb = store.get_version(store.resolve(args.b))
        names = set(va.tensors) | set(vb.tensors)
        with Progress(len(names), "diff", unit="tensors") as progress:
            report = diff_versions(store, va.id, vb.id, on_tensor=lambda n: progress.update(1, n))
    if args.json:
        _print_json(report.to_json())
        return 0
    _print_diff(report, show_all=args.all)
    return 0


def _print_diff(report: DiffReport, show_all: bool) -> None:
    print(f"diff {report.a[:SHORT]} -> {report.b[:SHORT]}")
    rows = [["", "tensor", "l2 change", "relative", "changed", "shape"]]
    for t in report.tensors:
        if t.status == "unchanged" and not show_all:
            continue
        mark = {"added": "+", "removed": "-", "changed": "M", "unchanged": " "}[t.status]
        if t.reshaped:
            shape = f"{'x'.join(map(str, t.shape_a))} -> {'x'.join(map(str, t.shape_b))}"
        else:
            shape = "x".join(map(str, t.shape_b if t.shape_b is not None else t.shape_a)) or "scalar"
        frac = t.changed_fraction
        rows.append([mark, t.name, _fmt(t.l2_change), _fmt(t.relative_change),
                     "-" if frac is None else f"{100 * frac:.1f}%", shape])
    if len(rows) > 1:
        for line in _table(rows, right=(2, 3, 4)):
            print(line)
    tot = report.totals
    c = tot.counts
    print(f"{c['changed']} changed, {c['added']} added, {c['removed']} removed, {c['unchanged']} unchanged; "
          f"l2 change {_fmt(tot.l2_change)}, relative {_fmt(tot.relative_change)} (over changed tensors), "
          f"{100 * tot.changed_fraction:.2f}% of entries changed")
    for name, status in report.files.items():
        print(f"file {name}: {status}")


def cmd_export(args: argparse.Namespace) -> int:
    out = Path(args.output)
    fmt = args.format or ("safetensors" if out.suffix == ".safetensors" else "hf")
    if out.exists() and not args.force:
        raise OutputExists(out)
    if fmt == "safetensors" and out.is_dir():
        raise UsageError(f"{out} is a folder; --format safetensors writes a file (use --format hf for a folder)")
    with _open(args) as store:
        v = store.get_version(store.resolve(args.ref))
        layout = {n: (e.dtype, e.shape) for n, e in v.tensors.items()}
        total = sum(e.nbytes for e in v.tensors.values())
        with Progress(total, "export") as progress:
            def stream() -> Iterator[tuple[str, Any]]:
                for name, entry in v.tensors.items():
                    yield name, store.get_tensor(entry, needed_by=v.id)

            def on_tensor(name: str, n: int) -> None:
                progress.update(n, name)

            if fmt == "safetensors":
                write_safetensors(out, stream(), {"format": "pt", "p2pmodel_version": v.id},
                                  layout=layout, overwrite=args.force, on_tensor=on_tensor)
            else:
                files = {n: store.get_file(oid, needed_by=v.id) for n, oid in v.files.items()}
                write_hf_folder(out, stream(), files, layout=layout, overwrite=args.force,
                                max_shard_bytes=args.max_shard_size, on_tensor=on_tensor)
    print(f"exported {v.id[:SHORT]} to {out} ({fmt}, {len(v.tensors)} tensors, {format_bytes(total)})")
    if fmt == "hf" and "config.json" not in v.files:
        print("note: this version has no config.json, so transformers cannot load the folder as is",
              file=sys.stderr)
    if fmt == "safetensors" and v.files:
        print(f"note: side files ({', '.join(v.files)}) are written only with --format hf", file=sys.stderr)
    return 0


def cmd_branch(args: argparse.Namespace) -> int:
    with _open(args) as store:
        if args.delete:
            if args.name:
                raise UsageError("branch -d takes one name")
            if args.delete == store.head_branch():
                raise UsageError(f"cannot delete {args.delete!r}: it is the current branch")
            if args.delete not in store.branches():
                raise UsageError(f"no branch named {args.delete!r}")
            old = store.branches()[args.delete]
            store.set_ref(args.delete, None, old=old)
            print(f"Deleted branch {args.delete} (was {old[:SHORT]})")
            return 0
        if args.name:
            target = store.resolve(args.start)
            if not store.set_ref(args.name, target, old=None):
                raise RefExists("branch", args.name)
            print(f"Created branch {args.name} at {target[:SHORT]}")
            return 0
        head = store.head_branch()
        rows = []
        for name, vid in sorted(store.branches().items()):
            info = store.index.info(vid)
            msg = info.message.splitlines()[0] if info and info.message else ""
            rows.append(["*" if name == head else " ", name, vid[:SHORT], msg])
    for line in _table(rows):
        print(line)
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    with _open(args) as store:
        if args.delete:
            if args.name:
                raise UsageError("tag -d takes one name")
            old = store.tags().get(args.delete)
            if old is None:
                raise UsageError(f"no tag named {args.delete!r}")
            store.set_ref(TAG_PREFIX + args.delete, None, old=old)
            print(f"Deleted tag {args.delete} (was {old[:SHORT]})")
            return 0
        if args.name:
            target = store.resolve(args.ref)
            if not store.set_ref(TAG_PREFIX + args.name, target, old=None):
                raise RefExists("tag", args.name)
            print(f"Tagged {target[:SHORT]} as {args.name}")
            return 0
        rows = [[name, vid[:SHORT]] for name, vid in sorted(store.tags().items())]
    for line in _table(rows):
        print(line)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    repaired: list[str] = []
    with _open(args) as store:
        if args.repair_from:
            sources = [LineageStore.open(path) for path in args.repair_from]
            try:
                result = store.repair(sources)
            finally:
                for src in sources:
                    src.close()
            repaired, report = result.repaired, result.after
            if not args.json:
                for oid in repaired:
                    print(f"repaired: {oid}")
        else:
            report = store.verify()
    if args.json:
        d = dataclasses.asdict(report)
        d["ok"] = report.ok
        if args.repair_from:
            d["repaired"] = repaired
        _print_json(d)
        return 0 if report.ok else 1
    for p in report.problems:
        print(f"damaged: {p}", file=sys.stderr)
    summary = (f"checked {report.objects_checked} objects ({format_bytes(report.bytes_checked)}) "
               f"and {report.versions_checked} versions")
    notes = []
    if report.unreferenced_objects:
        notes.append(f"{report.unreferenced_objects} unreferenced objects (p2pmodel gc removes them)")
    if report.stray_temp_files:
        notes.append(f"{report.stray_temp_files} leftover temp files")
    if report.ok:
        print(f"{summary}: ok" + (f"; {'; '.join(notes)}" if notes else ""))
        return 0
    print(f"{summary}: {len(report.problems)} problem(s)")
    return 1


def cmd_gc(args: argparse.Namespace) -> int:
    pruned: tuple[str, ...] = ()
    if not args.prune and (args.keep_last != RetentionPolicy.keep_last or args.keep_every != RetentionPolicy.keep_every):
        raise UsageError("--keep-last and --keep-every apply only with --prune")
    with _open(args) as store:
        if args.prune:
            policy = RetentionPolicy(keep_last=args.keep_last, keep_every=args.keep_every)  # InvalidRetention: one line
            result = apply_retention(store, policy, full_gc=True)
            pruned, report = result.pruned, result.freed
        else:
            report = store.gc()
    if args.json:
        d = dataclasses.asdict(report)
        if args.prune:
            d["pruned_versions"] = list(pruned)
        _print_json(d)
        return 0
    if args.prune:
        print(f"pruned {len(pruned)} versions (records, metrics and certificates kept)")
    print(f"removed {report.removed_objects} objects and {report.removed_versions} unreachable versions, "
          f"freed {format_bytes(report.bytes_freed)} ({report.bytes_freed} bytes); kept {report.kept_objects} objects")
    return 0
