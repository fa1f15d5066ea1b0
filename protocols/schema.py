"""Field checks of the wire messages: each returns the normalised value or raises `_Bad`.

A message field's annotation carries its check (`Annotated[int, UInt()]`, see the field
types at the top of `messages.py`); `messages.schema_of` collects them. Building a message
with a bad field is our bug (`InvalidMessage`); decoding one is the peer's (`SchemaError`).
"""

from __future__ import annotations

import math
import re
from typing import Any

from .limits import MAX_KEY_LEN, MAX_MAP_ITEMS, MAX_TEXT, MAX_U63



class _Bad(Exception):
    """Internal: a field value broke its check. Turned into InvalidMessage or SchemaError."""

    def __init__(self, reason: str, path: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.path = path  # "[3][1]" for nested values


def is_int(v: Any) -> bool:
    """An integer and not a bool (Python's bool is an int; the wire and config files keep them apart)."""
    return isinstance(v, int) and not isinstance(v, bool)


class _Check:
    def __call__(self, v: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


class UInt(_Check):
    """A non-negative integer no larger than `max`."""

    def __init__(self, max: int = MAX_U63, min: int = 0) -> None:
        self.min, self.max = min, max

    def __call__(self, v: Any) -> int:
        if not is_int(v):
            raise _Bad(f"expected an integer, got {type(v).__name__}")
        if not self.min <= v <= self.max:
            raise _Bad(f"{v} is outside [{self.min}, {self.max}]")
        return int(v)

    def describe(self) -> str:
        return f"uint in [{self.min}, {self.max if self.max != MAX_U63 else '2^63-1'}]"


class Real(_Check):
    """A finite float (integers are accepted and converted), optionally >= min."""

    def __init__(self, min: float | None = None) -> None:
        self.min = min

    def __call__(self, v: Any) -> float:
        if not (isinstance(v, float) or is_int(v)):
            raise _Bad(f"expected a number, got {type(v).__name__}")
        try:
            f = float(v)
        except OverflowError:
            raise _Bad("number too large for a float64") from None
        if not math.isfinite(f):
            raise _Bad(f"{f} is not finite")
        if self.min is not None and f < self.min:
            raise _Bad(f"{f} is below {self.min}")
        return f

    def describe(self) -> str:
        return "finite float64" + (f" >= {self.min:g}" if self.min is not None else "")


class Hex(_Check):
    """A lowercase hex string encoding exactly `nbytes` bytes."""

    def __init__(self, nbytes: int, what: str) -> None:
        self.nbytes, self.what = nbytes, what
        self._re = re.compile(f"[0-9a-f]{{{2 * nbytes}}}")

    def __call__(self, v: Any) -> str:
        if not isinstance(v, str):
            raise _Bad(f"expected a hex string, got {type(v).__name__}")
        if not self._re.fullmatch(v):
            raise _Bad(f"expected {2 * self.nbytes} lowercase hex digits ({self.what})")
        return v

    def describe(self) -> str:
        return f"str, {2 * self.nbytes} lowercase hex digits ({self.what})"


class Text(_Check):
    """A string of [min_len, max_len] UTF-8 bytes, optionally matching `pattern`.

    Lengths count UTF-8 bytes, not characters, so that a size bound on the wire holds for
    any script; lone surrogates (not encodable) are refused.
    """

    def __init__(self, max_len: int, *, min_len: int = 0, pattern: str | None = None, what: str = "") -> None:
        self.max_len, self.min_len, self.what = max_len, min_len, what
        self._re = re.compile(pattern) if pattern else None

    def __call__(self, v: Any) -> str:
        if not isinstance(v, str):
            raise _Bad(f"expected a string, got {type(v).__name__}")
        try:
            n = len(v.encode("utf-8"))
        except UnicodeEncodeError:
            raise _Bad("not encodable as UTF-8") from None
        if not self.min_len <= n <= self.max_len:
            raise _Bad(f"{n} UTF-8 bytes is outside [{self.min_len}, {self.max_len}]")
        if self._re is not None and not self._re.fullmatch(v):
            raise _Bad(f"{v[:40]!r} is not a valid {self.what or 'value'}")
        return v

    def describe(self) -> str:
        extra = f", {self.what}" if self.what else ""
        return f"str, {self.min_len}..{self.max_len} UTF-8 bytes{extra}"


class Blob(_Check):
    """Raw bytes (msgpack bin) of length in [min_len, max_len]."""

    def __init__(self, max_len: int, *, min_len: int = 0) -> None:
        self.min_len, self.max_len = min_len, max_len

    def __call__(self, v: Any) -> bytes:
        if isinstance(v, (bytearray, memoryview)):
            v = bytes(v)
        if not isinstance(v, bytes):
            raise _Bad(f"expected bytes, got {type(v).__name__}")
        if not self.min_len <= len(v) <= self.max_len:
            raise _Bad(f"length {len(v)} is outside [{self.min_len}, {self.max_len}]")
        return v

    def describe(self) -> str:
        if self.min_len == self.max_len:
            return f"bin, exactly {self.max_len} bytes"
        return f"bin, {self.min_len}..{self.max_len} bytes"


class Scalar(_Check):
    """A str (<= MAX_TEXT UTF-8 bytes), bool, uint or finite float: capability and parameter values."""

    _text = Text(MAX_TEXT)
    _int = UInt()
    _real = Real()

    def __call__(self, v: Any) -> str | bool | int | float:
        if isinstance(v, bool):
            return v
        if isinstance(v, str):
            return self._text(v)
        if is_int(v):
            return self._int(v)
        if isinstance(v, float):
            return self._real(v)
        raise _Bad(f"expected str, bool, int or float, got {type(v).__name__}")

    def describe(self) -> str:
        return f"str (<= {MAX_TEXT} bytes), bool, uint or finite float64"


class Seq(_Check):
    """An array of at most `max_items` items, each checked by `item`; optionally unique."""

    def __init__(self, item: _Check, max_items: int, *, min_items: int = 0, unique: bool = False) -> None:
        self.item, self.max_items, self.min_items, self.unique = item, max_items, min_items, unique

    def __call__(self, v: Any) -> tuple:
        if not isinstance(v, (tuple, list)):
            raise _Bad(f"expected an array, got {type(v).__name__}")
        if not self.min_items <= len(v) <= self.max_items:
            raise _Bad(f"{len(v)} items is outside [{self.min_items}, {self.max_items}]")
        out = []
        for i, x in enumerate(v):
            try:
                out.append(self.item(x))
            except _Bad as e:
                raise _Bad(e.reason, f"[{i}]{e.path}") from None
        if self.unique and len(set(out)) != len(out):
            raise _Bad("items are not unique")
        return tuple(out)

    def describe(self) -> str:
        u = ", unique" if self.unique else ""
        return f"array of {self.min_items}..{self.max_items} ({self.item.describe()}){u}"


class Record(_Check):
    """A fixed-length array whose positions have their own checks, returned as `factory`."""

    def __init__(self, factory: type, *items: _Check) -> None:
        self.factory, self.items = factory, items

    def __call__(self, v: Any) -> tuple:
        if not isinstance(v, (tuple, list)) or len(v) != len(self.items):
            raise _Bad(f"expected an array of {len(self.items)} items")
        out = []
        for i, (check, x) in enumerate(zip(self.items, v)):
            try:
                out.append(check(x))
            except _Bad as e:
                raise _Bad(e.reason, f"[{i}]{e.path}") from None
        return self.factory(*out)

    def describe(self) -> str:
        names = getattr(self.factory, "_fields", None) or [str(i) for i in range(len(self.items))]
        return "[" + ", ".join(f"{n}: {c.describe()}" for n, c in zip(names, self.items)) + "]"


class Map(_Check):
    """A map from short strings to values checked by `value`, returned with sorted keys."""

    def __init__(self, value: _Check, max_items: int = MAX_MAP_ITEMS) -> None:
        self.key = Text(MAX_KEY_LEN, min_len=1)
        self.value, self.max_items = value, max_items

    def __call__(self, v: Any) -> dict:
        if not isinstance(v, dict):
            raise _Bad(f"expected a map, got {type(v).__name__}")
        if len(v) > self.max_items:
            raise _Bad(f"{len(v)} entries exceed the limit of {self.max_items}")
        out = {}
        for k in sorted(v, key=lambda k: (not isinstance(k, str), str(k))):
            try:
                key = self.key(k)
            except _Bad as e:
                raise _Bad(f"key: {e.reason}") from None
            try:
                out[key] = self.value(v[k])
            except _Bad as e:
                raise _Bad(e.reason, f"[{key!r}]{e.path}") from None
        return out

    def describe(self) -> str:
        return f"map of <= {self.max_items}: str (1..{MAX_KEY_LEN} bytes) -> {self.value.describe()}"
