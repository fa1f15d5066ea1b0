"""Errors of the delta codec (`codec.py`, `quant.py`, `sparse.py`).

`CodecError` is the codec's `ProtocolError`. Each subclass also says whose fault it is:
a payload that does not decode is the sending peer's (`RemoteProtocolError`), a delta or
config we cannot encode is ours (`LocalProtocolError`). `decode` raises nothing but these.
"""

from __future__ import annotations

from p2pmodel.protocols.errors import LocalProtocolError, ProtocolError, RemoteProtocolError

__all__ = [
    "CodecError",
    "MalformedDelta",
    "DeltaTooLarge",
    "ManifestMismatch",
    "UnsupportedDelta",
    "InvalidCodecConfig",
]


class CodecError(ProtocolError):
    """Base of every error raised by the delta codec."""


class MalformedDelta(CodecError, RemoteProtocolError):
    """An encoded delta breaks the payload format (bad msgpack, field, size, index, scale)."""

    def __init__(self, where: str, reason: str) -> None:
        self.where = where  # e.g. "tensors[3].sections[0]" or "format"
        self.reason = reason  # what is wrong, in a few words
        super().__init__(f"malformed delta at {where}: {reason}")


class DeltaTooLarge(CodecError, RemoteProtocolError):
    """An encoded delta would decode to more bytes than the caller allows."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size  # bytes the payload would decode to (so far)
        self.limit = limit  # max_bytes given to decode
        super().__init__(f"delta would decode to at least {size} bytes, over the limit of {limit}")


class ManifestMismatch(CodecError, RemoteProtocolError):
    """A tensor in the delta is not in the base version, or has another shape there."""

    def __init__(self, name: str, expected: tuple[int, ...] | None, got: tuple[int, ...]) -> None:
        self.name = name  # tensor name in the delta
        self.expected = expected  # shape in the base manifest, None if the name is absent
        self.got = got  # shape the delta declares
        what = "is not in the base version" if expected is None else f"has shape {expected} in the base version"
        super().__init__(f"delta tensor {name!r} of shape {got} {what}")


class UnsupportedDelta(CodecError, LocalProtocolError):
    """We were asked to encode a tensor the codec cannot carry (not floating point, NaN/Inf)."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"cannot encode delta tensor {name!r}: {reason}")


class InvalidCodecConfig(CodecError, LocalProtocolError):
    """A `CodecConfig` field is out of range."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"invalid codec config {field}: {reason}")
