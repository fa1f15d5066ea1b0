"""How two versions differ, tensor by tensor: norms of the change, relative change, changed fraction.

For every tensor name in either version:

- `added` / `removed`: present on one side only (nothing is loaded);
- `unchanged`: the same content hash on both sides (nothing is loaded: equal oid, equal bytes);
- `changed`: different bytes. Both tensors are loaded, one pair at a time, and compared in
  float64 in chunks, so memory stays near the two tensors:

      l2_change        = ||b - a||_2
      relative_change  = ||b - a||_2 / ||a||_2      (0 if both are 0, inf if only a is 0)
      changed_fraction = #{i : a_i != b_i} / numel   (NaN equals NaN here; -0.0 equals 0.0)

  If the shapes differ the tensors cannot be subtracted: the norms are None, every entry
  counts as changed, and `reshaped` is True.

Totals treat the model as one long vector: `l2_change = sqrt(sum of l2_change^2)`;
`norm_a` is the norm of side a over the *changed* tensors only (unchanged ones are never
loaded, so their norms are unknown), and `relative_change = l2_change / norm_a`, i.e. how
far the tensors that moved have moved; `changed_fraction = changed entries / compared
entries`, where compared means present on both sides with equal shapes (unchanged included).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import torch

__all__ = ["TensorDiff", "DiffTotals", "DiffReport", "compare_tensors", "diff_manifests", "diff_versions"]

_CHUNK = 1 << 22  # elements per float64 chunk: 32 MiB per operand

STATUSES = ("added", "removed", "changed", "unchanged")


@dataclass(frozen=True)
class TensorDiff:
    """One tensor's line in a diff. Fields that need both sides loaded are None otherwise."""

    name: str
    status: str  # "added" | "removed" | "unchanged" | "changed"
    dtype_a: str | None  # safetensors dtype name on side a (None if added)
    dtype_b: str | None
    shape_a: tuple[int, ...] | None
    shape_b: tuple[int, ...] | None
    l2_change: float | None = None  # ||b - a||_2; 0.0 when unchanged
    norm_a: float | None = None  # ||a||_2 (only computed for changed tensors)
    norm_b: float | None = None
    relative_change: float | None = None  # l2_change / norm_a
    changed_entries: int | None = None  # entries where a != b
    numel: int = 0  # entries on side b (side a if removed)
    reshaped: bool = False  # shapes differ, so the change has no norm

    @property
    def changed_fraction(self) -> float | None:
        if self.changed_entries is None:
            return None
        return self.changed_entries / self.numel if self.numel else 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape_a"] = list(self.shape_a) if self.shape_a is not None else None
        d["shape_b"] = list(self.shape_b) if self.shape_b is not None else None
        d["changed_fraction"] = self.changed_fraction
        for k in ("l2_change", "norm_a", "norm_b", "relative_change"):
            d[k] = _json_float(d[k])
        return d


@dataclass(frozen=True)
class DiffTotals:
    """Whole-model figures (see the module docstring for how they are aggregated)."""

    counts: Mapping[str, int]  # status -> number of tensors
    l2_change: float
    norm_a: float
    relative_change: float
    changed_entries: int
    compared_entries: int  # entries of tensors present on both sides with equal shapes

    @property
    def changed_fraction(self) -> float:
        return self.changed_entries / self.compared_entries if self.compared_entries else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "counts": dict(self.counts),
            "l2_change": _json_float(self.l2_change),
            "norm_a": _json_float(self.norm_a),
            "relative_change": _json_float(self.relative_change),
            "changed_entries": self.changed_entries,
            "compared_entries": self.compared_entries,
            "changed_fraction": self.changed_fraction,
        }


@dataclass(frozen=True)
class DiffReport:
    """The diff of version `a` -> version `b`."""

    a: str
    b: str
    tensors: list[TensorDiff]  # sorted by name
    totals: DiffTotals
    files: Mapping[str, str] = field(default_factory=dict)  # side file name -> status (no "unchanged")

    def to_json(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "tensors": [t.to_json() for t in self.tensors],
            "totals": self.totals.to_json(),
            "files": dict(self.files),
        }


def _json_float(x: float | None) -> float | str | None:
    # JSON has no inf/nan; keep them readable and round-trippable through float().
    if x is None or math.isfinite(x):
        return x
    return str(x)


def compare_tensors(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float, int]:
    """`(||b - a||, ||a||, ||b||, changed entries)` for equal-shaped tensors, in float64, chunked.

    Raises ValueError if the shapes differ.
    """
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    fa, fb = a.reshape(-1), b.reshape(-1)
    sq_d = sq_a = sq_b = 0.0
    changed = 0
    for i in range(0, fa.numel(), _CHUNK):
        ca, cb = fa[i:i + _CHUNK], fb[i:i + _CHUNK]
        xa, xb = ca.to(torch.float64), cb.to(torch.float64)
        if a.dtype == b.dtype and not a.is_floating_point():
            same = ca == cb  # exact for integers beyond float64's 53-bit mantissa
        else:
            same = (xa == xb) | (torch.isnan(xa) & torch.isnan(xb))
        changed += int((~same).sum())
        d = torch.where(same, torch.zeros_like(xa), xb - xa)
        sq_d += float(torch.dot(d, d))
        sq_a += float(torch.dot(xa, xa))
        sq_b += float(torch.dot(xb, xb))
    return math.sqrt(sq_d), math.sqrt(sq_a), math.sqrt(sq_b), changed


def _relative(change: float, base: float) -> float:
    if base > 0:
        return change / base
    return 0.0 if change == 0 else math.inf


def diff_manifests(
    a: Mapping[str, Any],
    b: Mapping[str, Any],
    load_a: Callable[[str], torch.Tensor],
    load_b: Callable[[str], torch.Tensor],
    *,
    a_id: str = "",
    b_id: str = "",
    on_tensor: Callable[[str], None] | None = None,
) -> DiffReport:
    """Diff two tensor manifests (name -> entry with `oid`, `dtype`, `shape`).

    `load_a(name)` / `load_b(name)` are called only for tensors whose oids differ, one pair
    at a time; `on_tensor(name)` is called after each tensor (for progress displays).
    """
    lines: list[TensorDiff] = []
    sq_d = sq_a = 0.0
    changed_total = compared = 0
    for name in sorted(set(a) | set(b)):
        ea, eb = a.get(name), b.get(name)
        if ea is None:
            line = TensorDiff(name, "added", None, eb.dtype, None, tuple(eb.shape), numel=math.prod(eb.shape))
        elif eb is None:
            line = TensorDiff(name, "removed", ea.dtype, None, tuple(ea.shape), None, numel=math.prod(ea.shape))
        elif ea.oid == eb.oid:
            n = math.prod(eb.shape)
            line = TensorDiff(name, "unchanged", ea.dtype, eb.dtype, tuple(ea.shape), tuple(eb.shape),
                              l2_change=0.0, relative_change=0.0, changed_entries=0, numel=n)
            compared += n
        elif tuple(ea.shape) != tuple(eb.shape):
            n = math.prod(eb.shape)
            line = TensorDiff(name, "changed", ea.dtype, eb.dtype, tuple(ea.shape), tuple(eb.shape),
                              changed_entries=n, numel=n, reshaped=True)
        else:
            ta, tb = load_a(name), load_b(name)
            l2, na, nb, changed = compare_tensors(ta, tb)
            del ta, tb
            n = math.prod(eb.shape)
            line = TensorDiff(name, "changed", ea.dtype, eb.dtype, tuple(ea.shape), tuple(eb.shape),
                              l2_change=l2, norm_a=na, norm_b=nb, relative_change=_relative(l2, na),
                              changed_entries=changed, numel=n)
            sq_d += l2 * l2
            sq_a += na * na
            changed_total += changed
            compared += n
        lines.append(line)
        if on_tensor:
            on_tensor(name)
    counts = {s: sum(1 for t in lines if t.status == s) for s in STATUSES}
    l2 = math.sqrt(sq_d)
    totals = DiffTotals(counts, l2, math.sqrt(sq_a), _relative(l2, math.sqrt(sq_a)), changed_total, compared)
    return DiffReport(a_id, b_id, lines, totals)


def diff_files(a: Mapping[str, str], b: Mapping[str, str]) -> dict[str, str]:
    """Side files (name -> oid) that differ: name -> "added" | "removed" | "changed"."""
    out = {}
    for name in sorted(set(a) | set(b)):
        if name not in a:
            out[name] = "added"
        elif name not in b:
            out[name] = "removed"
        elif a[name] != b[name]:
            out[name] = "changed"
    return out


def diff_versions(store: Any, a: str, b: str, *, on_tensor: Callable[[str], None] | None = None) -> DiffReport:
    """Diff the versions that refs `a` and `b` resolve to in a `LineageStore`.

    Streams: at most one tensor of each side is loaded at a time, and only for changed tensors.
    Raises the store's errors (unknown ref, missing or corrupt object naming the version).
    """
    ida, idb = store.resolve(a), store.resolve(b)
    va, vb = store.get_version(ida), store.get_version(idb)
    report = diff_manifests(
        va.tensors, vb.tensors,
        lambda n: store.get_tensor(va.tensors[n], needed_by=ida),
        lambda n: store.get_tensor(vb.tensors[n], needed_by=idb),
        a_id=ida, b_id=idb, on_tensor=on_tensor,
    )
    return DiffReport(report.a, report.b, report.tensors, report.totals,
                      diff_files(dict(va.files), dict(vb.files)))
