"""Object types of the lineage and their canonical bytes (git's object model, for models).

Every object is stored and sent as its canonical bytes, `header + body`, and its id (oid) is
`sha256(header + body)` in hex, so a reader re-derives the id from what it holds (`check`).
The header names the object's type, dtype and shape or length, and ends with a NUL byte:

    tensor <DTYPE> [<d0>,<d1>,...]<spaces>\\0   raw little-endian C-contiguous elements
    file <nbytes>\\0                            raw bytes of an extra file (config.json, ...)
    version <nbytes>\\0                         canonical msgpack of a Version's core

A tensor header is padded with spaces to a multiple of 8 bytes so that the element data
of a file read into memory is aligned and can be viewed in place (`torch.frombuffer`).

A `Version`'s id covers its core only; CI metrics and the quorum certificate are
`Annotations` kept beside it (docs/ARCHITECTURE.md, "Departures").
"""

from __future__ import annotations

import hashlib
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import msgpack
import numpy as np
import torch

from p2pmodel.dtypes import DTYPES, ITEMSIZE, UnsupportedDtype, dtype_name
from p2pmodel.errors import P2PModelError

__all__ = [
    "LineageError",
    "InvalidObject",
    "UnsupportedDtype",
    "DTYPES",
    "TensorEntry",
    "Version",
    "Annotations",
    "tensor_oid",
    "encode_tensor_header",
    "tensor_raw_view",
    "encode_file",
    "parse_header",
    "decode_tensor",
    "object_type",
    "check_object",
    "VERSION_FORMAT",
]

VERSION_FORMAT = 1  # bump when the encoding of a Version's core changes


class LineageError(P2PModelError):
    """Base of every error raised by the lineage store."""


class InvalidObject(LineageError):
    """Bytes that do not decode as a canonical object of the expected type."""

    def __init__(self, oid: str | None, reason: str):
        self.oid = oid
        self.reason = reason
        where = f"object {oid}" if oid else "object"
        super().__init__(f"{where} is not a valid lineage object: {reason}")


_ALIGN = 8  # largest element size; tensor headers are padded to it
_HEX64 = re.compile(r"[0-9a-f]{64}")
_MAX_HEADER = 4096


def encode_tensor_header(dtype: str, shape: Iterable[int]) -> bytes:
    """The canonical header of a tensor blob (padded so the data that follows is aligned)."""
    text = f"tensor {dtype} [{','.join(str(int(d)) for d in shape)}]".encode()
    pad = (-(len(text) + 1)) % _ALIGN
    return text + b" " * pad + b"\0"


def tensor_raw_view(t: torch.Tensor) -> tuple[str, tuple[int, ...], np.ndarray]:
    """(dtype name, shape, uint8 array over the little-endian element bytes) of `t`.

    The array shares memory with `t` when `t` is already a contiguous CPU tensor, so hashing
    or writing it copies nothing.
    """
    name = dtype_name(t.dtype)
    shape = tuple(int(d) for d in t.shape)
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    raw = flat.view(torch.uint8).numpy()
    if sys.byteorder == "big" and flat.element_size() > 1:  # the format is little-endian
        raw = raw.reshape(-1, flat.element_size())[:, ::-1].reshape(-1).copy()
    return name, shape, raw


def tensor_oid(t: torch.Tensor) -> str:
    """The content id of tensor `t`: sha256 hex of its canonical blob bytes. A pure function."""
    name, shape, raw = tensor_raw_view(t)
    h = hashlib.sha256(encode_tensor_header(name, shape))
    h.update(raw)
    return h.hexdigest()


def encode_file(data: bytes) -> bytes:
    """Canonical bytes of a raw-file blob."""
    return b"file %d\0" % len(data) + bytes(data)


def object_type(data: bytes | bytearray | memoryview) -> str:
    """The type named by an object's header: 'tensor', 'file' or 'version'."""
    return parse_header(data)[0]


def parse_header(data: bytes | bytearray | memoryview, oid: str | None = None) -> tuple[str, dict, int]:
    """Parse and validate the header of canonical object bytes.

    Returns (type, info, body_offset); info is {"dtype", "shape"} for tensors and {"size"}
    for files and versions. Raises InvalidObject when the header is not canonical or does
    not match the body's length.
    """
    head = bytes(data[:_MAX_HEADER])
    end = head.find(b"\0")
    if end < 0:
        raise InvalidObject(oid, "no header terminator")
    header = head[: end + 1]
    fields = header[:-1].split()
    kind = fields[0].decode("ascii", "replace") if fields else ""
    body = len(data) - len(header)
    if kind == "tensor" and len(fields) == 3:
        dtype = fields[1].decode("ascii", "replace")
        if dtype not in DTYPES:
            raise InvalidObject(oid, f"unknown dtype {dtype!r}")
        dims = fields[2]
        if not (dims.startswith(b"[") and dims.endswith(b"]")):
            raise InvalidObject(oid, "malformed shape")
        try:
            shape = tuple(int(d) for d in dims[1:-1].split(b",")) if dims != b"[]" else ()
        except ValueError:
            raise InvalidObject(oid, "malformed shape") from None
        if any(d < 0 for d in shape) or encode_tensor_header(dtype, shape) != header:
            raise InvalidObject(oid, "non-canonical tensor header")
        if math.prod(shape) * ITEMSIZE[dtype] != body:
            raise InvalidObject(oid, f"body is {body} bytes, header says {dtype} {list(shape)}")
        return kind, {"dtype": dtype, "shape": shape}, len(header)
    if kind in ("file", "version") and len(fields) == 2:
        try:
            size = int(fields[1])
        except ValueError:
            raise InvalidObject(oid, "malformed length") from None
        if b"%s %d\0" % (kind.encode(), size) != header:
            raise InvalidObject(oid, f"non-canonical {kind} header")
        if size != body:
            raise InvalidObject(oid, f"body is {body} bytes, header says {size}")
        return kind, {"size": size}, len(header)
    raise InvalidObject(oid, f"unknown header {header[:40]!r}")


def decode_tensor(data: bytearray | bytes, oid: str | None = None) -> torch.Tensor:
    """The tensor held by canonical blob bytes (hash NOT checked here; see `check_object`).

    A writable `bytearray` is viewed in place (no copy); `bytes` are copied once.
    """
    kind, info, offset = parse_header(data, oid)
    if kind != "tensor":
        raise InvalidObject(oid, f"expected a tensor, found a {kind}")
    dtype = DTYPES[info["dtype"]]
    shape = info["shape"]
    if math.prod(shape) == 0:
        return torch.empty(shape, dtype=dtype)
    buf = data if isinstance(data, bytearray) else bytearray(data)
    t = torch.frombuffer(buf, dtype=torch.uint8, offset=offset)
    if sys.byteorder == "big" and t.numel() and dtype.itemsize > 1:
        t = t.reshape(-1, dtype.itemsize).flip(1).contiguous()
    return t.view(dtype).reshape(shape)


def check_object(oid: str, data: bytes | bytearray | memoryview) -> str:
    """Re-derive the id of canonical object bytes and validate them; returns the type.

    Raises InvalidObject when the hash differs or the bytes do not decode.
    """
    got = hashlib.sha256(data).hexdigest()
    if got != oid:
        raise InvalidObject(oid, f"content hashes to {got}")
    kind, info, offset = parse_header(data, oid)
    if kind == "version":
        Version.from_bytes(bytes(data))
    elif kind == "tensor" and info["dtype"] == "BOOL":
        if np.frombuffer(data, dtype=np.uint8, offset=offset).max(initial=0) > 1:
            raise InvalidObject(oid, "BOOL tensor holds bytes other than 0 and 1")
    return kind


class _FrozenDict(dict):
    """A dict that refuses mutation, so that a frozen Version's id cannot drift.

    A dict subclass (not a MappingProxyType) so that json and msgpack still accept it.
    """

    def _refuse(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("Version fields are immutable")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = __ior__ = _refuse  # type: ignore

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items(), key=lambda kv: kv[0])))

    def __reduce__(self) -> tuple:  # copy/deepcopy must not go through __setitem__
        return (_FrozenDict, (dict(self),))


def _freeze(value: Any, where: str) -> Any:
    """A deep, immutable, canonicalisable copy of a msgpack-able value (dict keys must be str)."""
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"{where}: mapping keys must be str")
        return _FrozenDict((k, _freeze(value[k], f"{where}.{k}")) for k in sorted(value))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v, where) for v in value)
    if isinstance(value, bool) or value is None or isinstance(value, (int, str, bytes)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TypeError(f"{where}: non-finite float {value}")
        return value
    raise TypeError(f"{where}: {type(value).__name__} is not storable in a version record")


def _plain(value: Any) -> Any:
    """msgpack-ready plain structure with sorted keys (the canonical order)."""
    if isinstance(value, Mapping):
        return {k: _plain(value[k]) for k in sorted(value)}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class TensorEntry:
    """One line of a tensor manifest: where the tensor's bytes are and what they hold."""

    oid: str  # sha256 hex of the tensor's blob bytes
    dtype: str  # safetensors dtype name ("F32", "BF16", ...)
    shape: tuple[int, ...]  # () for a scalar

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]

    def _pack(self) -> list:
        return [self.oid, self.dtype, list(self.shape)]


@dataclass(frozen=True)
class Annotations:
    """What is stored with a version but not hashed into its id (see the module docstring)."""

    metrics: Mapping[str, float] = field(default_factory=dict)  # CI metrics, e.g. {"eval_loss": 2.1}
    certificate: Mapping[str, Any] | None = None  # quorum certificate (signed votes), msgpack-able


_VERSION_KEYS = {
    "format", "parents", "tensors", "files", "message", "time", "author", "round", "merge",
    "contributors", "optimizer_state",
}


@dataclass(frozen=True, eq=False)
class Version:
    """An immutable version record. Its id is sha256 of `to_bytes()` (header + canonical msgpack).

    Mappings are stored frozen and sorted; `merge` may hold any msgpack-able value with
    string keys (floats must be finite).
    """

    parents: tuple[str, ...]  # version ids; 0 for a root, 1 for a round, 2+ for a merge
    tensors: Mapping[str, TensorEntry]  # parameter name -> entry
    message: str
    time: float  # unix seconds
    author: str = ""  # peer id or user name
    round: int | None = None  # swarm round that produced it
    merge: Mapping[str, Any] | None = None  # merge spec: method, parameters, deltas and weights
    contributors: tuple[str, ...] = ()  # peer ids whose work is in this version
    files: Mapping[str, str] = field(default_factory=dict)  # extra file name -> file blob oid
    optimizer_state: Mapping[str, TensorEntry] = field(default_factory=dict)  # outer optimizer tensors

    def __post_init__(self) -> None:
        if isinstance(self.parents, str):
            raise TypeError("parents must be a sequence of version ids, not a str")
        s = object.__setattr__
        s(self, "parents", tuple(self.parents))
        s(self, "contributors", tuple(self.contributors))
        s(self, "tensors", _FrozenDict((k, self.tensors[k]) for k in sorted(self.tensors)))
        s(self, "optimizer_state", _FrozenDict((k, self.optimizer_state[k]) for k in sorted(self.optimizer_state)))
        s(self, "files", _FrozenDict((k, self.files[k]) for k in sorted(self.files)))
        s(self, "time", float(self.time))
        if self.merge is not None:
            s(self, "merge", _freeze(self.merge, "merge"))
        self._validate()
        body = msgpack.packb(self._core(), use_bin_type=True)
        data = b"version %d\0" % len(body) + body
        s(self, "_bytes", data)
        s(self, "_id", hashlib.sha256(data).hexdigest())

    def _validate(self) -> None:
        def ids(xs: Iterable[Any], what: str) -> None:
            for x in xs:
                if not (isinstance(x, str) and _HEX64.fullmatch(x)):
                    raise TypeError(f"{what}: {x!r} is not a 64-hex-digit id")

        ids(self.parents, "parents")
        if len(set(self.parents)) != len(self.parents):
            raise TypeError("parents: duplicate parent")
        for what, manifest in (("tensors", self.tensors), ("optimizer_state", self.optimizer_state)):
            for k, e in manifest.items():
                if not isinstance(k, str) or not isinstance(e, TensorEntry):
                    raise TypeError(f"{what}: entries must map str -> TensorEntry")
                if e.dtype not in DTYPES or any(d < 0 for d in e.shape):
                    raise TypeError(f"{what}[{k!r}]: bad dtype or shape")
                ids([e.oid], f"{what}[{k!r}]")
        for k in self.files:
            if not isinstance(k, str):
                raise TypeError("files: names must be str")
        ids(self.files.values(), "files")
        if not isinstance(self.message, str) or not isinstance(self.author, str):
            raise TypeError("message and author must be str")
        if self.round is not None and (isinstance(self.round, bool) or not isinstance(self.round, int)):
            raise TypeError("round must be an int or None")
        if not all(isinstance(c, str) for c in self.contributors):
            raise TypeError("contributors must be str")
        if not math.isfinite(self.time):
            raise TypeError("time must be finite")

    def _core(self) -> dict:
        return _plain(
            {
                "format": VERSION_FORMAT,
                "parents": list(self.parents),
                "tensors": {k: e._pack() for k, e in self.tensors.items()},
                "files": dict(self.files),
                "message": self.message,
                "time": self.time,
                "author": self.author,
                "round": self.round,
                "merge": self.merge,
                "contributors": list(self.contributors),
                "optimizer_state": {k: e._pack() for k, e in self.optimizer_state.items()},
            }
        )

    @property
    def id(self) -> str:
        """sha256 hex of `to_bytes()`."""
        return self._id  # type: ignore[attr-defined]

    def to_bytes(self) -> bytes:
        """Canonical object bytes (header + msgpack); `sha256(v.to_bytes()).hexdigest() == v.id`."""
        return self._bytes  # type: ignore[attr-defined]

    def referenced_objects(self) -> dict[str, str]:
        """Every object this record needs, oid -> kind ('tensor' or 'file')."""
        refs = {e.oid: "tensor" for e in self.tensors.values()}
        refs.update((e.oid, "tensor") for e in self.optimizer_state.values())
        refs.update((oid, "file") for oid in self.files.values())
        return refs

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Version) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"Version({self.id[:12]}, parents={[p[:12] for p in self.parents]}, tensors={len(self.tensors)}, message={self.message!r})"

    @classmethod
    def from_bytes(cls, data: bytes) -> "Version":
        """Decode canonical version bytes, validating the schema. Raises InvalidObject."""
        oid = hashlib.sha256(data).hexdigest()
        kind, _, offset = parse_header(data, oid)
        if kind != "version":
            raise InvalidObject(oid, f"expected a version, found a {kind}")
        try:
            core = msgpack.unpackb(data[offset:], raw=False, strict_map_key=True)
        except Exception as e:  # msgpack raises several unrelated types on garbage
            raise InvalidObject(oid, f"undecodable record ({type(e).__name__})") from None
        if not isinstance(core, dict) or set(core) != _VERSION_KEYS:
            raise InvalidObject(oid, "record does not have the version fields")
        if core["format"] != VERSION_FORMAT:
            raise InvalidObject(oid, f"unsupported version format {core['format']!r}")
        try:
            v = cls(
                parents=tuple(core["parents"]),
                tensors=_entries(core["tensors"]),
                files=dict(core["files"]),
                message=core["message"],
                time=_float(core["time"]),
                author=core["author"],
                round=core["round"],
                merge=core["merge"],
                contributors=tuple(core["contributors"]),
                optimizer_state=_entries(core["optimizer_state"]),
            )
        except (TypeError, ValueError, AttributeError) as e:
            raise InvalidObject(oid, f"bad record field: {e}") from None
        if v.to_bytes() != bytes(data):
            raise InvalidObject(oid, "record is not canonically encoded")
        return v


def _float(x: Any) -> float:
    if not isinstance(x, float):
        raise TypeError("time must be a float")
    return x


def _entries(raw: Any) -> dict[str, TensorEntry]:
    if not isinstance(raw, dict):
        raise TypeError("manifest must be a map")
    out = {}
    for k, v in raw.items():
        if not (isinstance(v, list) and len(v) == 3 and isinstance(v[2], list)):
            raise TypeError(f"manifest entry {k!r} must be [oid, dtype, shape]")
        if not all(isinstance(d, int) and not isinstance(d, bool) for d in v[2]):
            raise TypeError(f"manifest entry {k!r} has a bad shape")
        out[k] = TensorEntry(v[0], v[1], tuple(v[2]))
    return out
