"""The object stream: content-addressed blobs (encoded deltas, version records, tensor objects,
certificates, manifests) fetched by sha256 from any byte offset. Pure framing; `daemon/transport.py`
moves the bytes over libp2p (protocol id `OBJECT_PROTOCOL`).

Wire format (integers big-endian)::

    request:  MAGIC "P2PMOBJ1" (8 bytes) | oid (32 bytes, raw sha256) | offset (u64)
    response: status (u8, `ObjectStatus`) | total size (u64) | for OK: bytes [offset, total)

A stream carries one request at a time and any number in turn: after a complete OK or NOT_FOUND
response it stays open for the next request; the server closes it after any other status, when
it idles past its timeout, or when it holds too many open. A reader that sees EOF inside the
bytes knows exactly where to resume (a new request from that offset), and verifies the whole blob
against its oid. Why reuse: opening a libp2p stream costs about 1 kB on the wire, and a round
fetches a delta from each peer (scripts/bench_control).

The push of signed records (`/p2pmodel/records/2`: frames in `record_frame.py`, moved by
`daemon/gossip.py`) is the other stream protocol. protocols/SPEC.md section 6 describes both, and
protocols/vectors/ pins their bytes (`object_stream.json`, `record_frame.json`).
"""

from __future__ import annotations

import enum
import struct

from .errors import RemoteProtocolError

__all__ = [
    "OBJECT_PROTOCOL",
    "MAGIC",
    "REQUEST_SIZE",
    "RESPONSE_SIZE",
    "ObjectStatus",
    "StreamFormatError",
    "encode_request",
    "decode_request",
    "encode_response",
    "decode_response",
    "keeps_stream_open",
]

OBJECT_PROTOCOL = "/p2pmodel/object/1"
MAGIC = b"P2PMOBJ1"
_REQUEST = struct.Struct(">8s32sQ")  # magic, oid (raw sha256), offset
_RESPONSE = struct.Struct(">BQ")  # status, total size
REQUEST_SIZE = _REQUEST.size
RESPONSE_SIZE = _RESPONSE.size


class ObjectStatus(enum.IntEnum):
    """First byte of a response, in the server's voice."""

    OK = 0  # "Here are the bytes from your offset to the end."
    NOT_FOUND = 1  # "I don't have that object (any more)."
    BAD_OFFSET = 2  # "Your offset is past the end of the object."
    BAD_REQUEST = 3  # "I could not parse your request."
    BUSY = 4  # "I'm serving too many streams; try again shortly."


class StreamFormatError(RemoteProtocolError):
    """A request or response that breaks the object stream's format (the peer's fault)."""


def encode_request(oid: bytes, offset: int) -> bytes:
    """The request for bytes [offset, end) of the blob whose raw sha256 is `oid`."""
    if len(oid) != 32 or offset < 0:
        raise ValueError("oid is 32 raw bytes and offset is >= 0")
    return _REQUEST.pack(MAGIC, oid, offset)


def decode_request(frame: bytes) -> tuple[bytes, int]:
    """(raw oid, offset) of a `REQUEST_SIZE`-byte request. Raises StreamFormatError."""
    if len(frame) != REQUEST_SIZE:
        raise StreamFormatError(f"a request is {REQUEST_SIZE} bytes, not {len(frame)}")
    magic, oid, offset = _REQUEST.unpack(frame)
    if magic != MAGIC:
        raise StreamFormatError(f"bad magic {magic!r}")
    return oid, offset


def encode_response(status: ObjectStatus, total: int = 0) -> bytes:
    """A response header: `status` and the blob's total size (0 when there is no blob)."""
    return _RESPONSE.pack(status, total)


def decode_response(frame: bytes) -> tuple[ObjectStatus, int]:
    """(status, total size) of a `RESPONSE_SIZE`-byte response header. Raises StreamFormatError."""
    if len(frame) != RESPONSE_SIZE:
        raise StreamFormatError(f"a response header is {RESPONSE_SIZE} bytes, not {len(frame)}")
    raw, total = _RESPONSE.unpack(frame)
    try:
        return ObjectStatus(raw), total
    except ValueError:
        raise StreamFormatError(f"unknown status byte {raw}") from None


def keeps_stream_open(status: ObjectStatus) -> bool:
    """Whether a stream stays open for another request after a complete response with `status`."""
    return status in (ObjectStatus.OK, ObjectStatus.NOT_FOUND)
