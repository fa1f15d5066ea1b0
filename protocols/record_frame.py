"""The record push stream's frames: signed records sent in batches, optionally deflated. Pure
framing; `daemon/gossip.py` moves the frames over libp2p (protocol id `RECORD_PROTOCOL`), queues,
rate-limits and checks the records.

Wire format (frames on a long-lived stream, integers big-endian)::

    request:  MAGIC "P2PMREC1" (8 bytes) | flags (u8) | count (u16) | records
    records:  count x [ length (u32) | envelope ]                       (flags = 0)
              packed length (u32) | zlib(count x [ length | envelope ])   (flags = 1, COMPRESSED)
    response: status (u8, `PushStatus`); after OK the stream stays open for the next frame,
              after any refusal the receiver closes it

Bounds apply to the uncompressed frame, so inflating never yields more than `max_frame_bytes`.
Every way a frame can break raises `FrameError` with a short `reason` (a counter name).

`encode_frame`, `split_frames` and `decode_frame` work on whole frames in memory; the other
public functions are the pieces a reader that takes a frame off a stream bit by bit uses, so that
it checks each bound before reading the bytes it announces (`daemon.gossip.read_frame`).
"""

from __future__ import annotations

import enum
import struct
import zlib
from collections.abc import Sequence

from .errors import RemoteProtocolError

__all__ = [
    "RECORD_PROTOCOL",
    "MAGIC",
    "COMPRESSED",
    "HEADER_SIZE",
    "LENGTH_SIZE",
    "PushStatus",
    "FrameError",
    "encode_frame",
    "split_frames",
    "decode_frame",
    "check_header",
    "check_length",
    "check_packed_length",
    "unpack_length",
    "inflate",
    "parse_records",
]

RECORD_PROTOCOL = "/p2pmodel/records/2"  # /1 took one frame per stream
MAGIC = b"P2PMREC1"
_HEADER = struct.Struct(">8sBH")  # magic, flags, record count
HEADER_SIZE = _HEADER.size
COMPRESSED = 0x01  # flag: the records follow as one zlib stream, after its length (u32)
_LENGTH = struct.Struct(">I")  # one record's length (or the compressed section's)
LENGTH_SIZE = _LENGTH.size


class PushStatus(enum.IntEnum):
    """The receiver's one-byte answer to a frame."""

    OK = 0  # read; its records will be checked and delivered
    BUSY = 1  # too many streams open (in all, or from you); try again later
    RATE_LIMITED = 2  # you sent more than your budget; try again later
    BAD_FRAME = 3  # the frame broke the format or its bounds; not retried


class FrameError(RemoteProtocolError):
    """A peer sent a frame that breaks the format or its bounds (the peer's fault, not ours).

    `reason` is a short code used as a counter name: bad_magic, bad_flags, empty,
    too_many_records, record_too_large, frame_too_large, truncated, trailing_bytes,
    bad_compression.
    """

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        super().__init__(f"bad record frame: {reason}" + (f" ({detail})" if detail else ""))


# ------------------------------------------------------------------------------ whole frames


def _records_section(envelopes: Sequence[bytes]) -> bytes:
    parts = []
    for env in envelopes:
        parts.append(_LENGTH.pack(len(env)))
        parts.append(bytes(env))
    return b"".join(parts)


def encode_frame(envelopes: Sequence[bytes], *, compress: bool = True) -> bytes:
    """One frame holding `envelopes` (no bounds applied: see `split_frames`).

    With `compress`, the records are deflated when that makes the frame smaller (signed records
    are mostly hex digests and repeated field names: about a third smaller, a pair of nearly
    equal announcements half).

    Raises:
        ValueError: no envelopes, or more than 65535.
    """
    if not envelopes or len(envelopes) > 0xFFFF:
        raise ValueError(f"a frame holds 1 to 65535 records, not {len(envelopes)}")
    section = _records_section(envelopes)
    if compress:
        packed = zlib.compress(section, 6)
        if _LENGTH.size + len(packed) < len(section):
            return _HEADER.pack(MAGIC, COMPRESSED, len(envelopes)) + _LENGTH.pack(len(packed)) + packed
    return _HEADER.pack(MAGIC, 0, len(envelopes)) + section


def split_frames(envelopes: Sequence[bytes], *, max_records: int, max_frame_bytes: int) -> list[list[bytes]]:
    """Group `envelopes`, in order, into batches whose uncompressed frames stay within the bounds.

    Raises:
        ValueError: one envelope alone does not fit in a frame (the caller's bug: records are
            bounded by the DHT's limit, which a frame always fits).
    """
    batches: list[list[bytes]] = []
    current: list[bytes] = []
    size = _HEADER.size
    for env in envelopes:
        need = _LENGTH.size + len(env)
        if _HEADER.size + need > max_frame_bytes:
            raise ValueError(f"a {len(env)}-byte record does not fit in a {max_frame_bytes}-byte frame")
        if current and (len(current) >= max_records or size + need > max_frame_bytes):
            batches.append(current)
            current, size = [], _HEADER.size
        current.append(env)
        size += need
    if current:
        batches.append(current)
    return batches


def decode_frame(data: bytes, *, max_records: int, max_record_bytes: int, max_frame_bytes: int) -> list[bytes]:
    """The envelopes of a complete frame held in memory. Raises FrameError for any bad input."""
    if len(data) > max_frame_bytes:
        raise FrameError("frame_too_large", f"{len(data)} > {max_frame_bytes}")
    if len(data) < _HEADER.size:
        raise FrameError("truncated", "no header")
    compressed, count = check_header(data[: _HEADER.size], max_records)
    section = data[_HEADER.size :]
    if compressed:
        if len(section) < _LENGTH.size:
            raise FrameError("truncated", "no compressed length")
        (packed_len,) = _LENGTH.unpack_from(section)
        check_packed_length(packed_len, max_frame_bytes)
        packed = section[_LENGTH.size :]
        if len(packed) < packed_len:
            raise FrameError("truncated", "the compressed records are cut short")
        if len(packed) > packed_len:
            raise FrameError("trailing_bytes", f"{len(packed) - packed_len} bytes after the compressed records")
        section = inflate(packed, max_frame_bytes - _HEADER.size)
    return parse_records(section, count, max_record_bytes, max_frame_bytes)


# ------------------------------------------------------------------------------ pieces of a frame


def check_header(header: bytes, max_records: int) -> tuple[bool, int]:
    """(compressed?, record count) of a `HEADER_SIZE`-byte frame header. Raises FrameError."""
    magic, flags, count = _HEADER.unpack(header)
    if magic != MAGIC:
        raise FrameError("bad_magic")
    if flags & ~COMPRESSED:
        raise FrameError("bad_flags", f"{flags:#04x}")
    if count == 0:
        raise FrameError("empty")
    if count > max_records:
        raise FrameError("too_many_records", f"{count} > {max_records}")
    return bool(flags & COMPRESSED), count


def unpack_length(data: bytes) -> int:
    """The u32 of a `LENGTH_SIZE`-byte length field (a record's, or the compressed section's)."""
    return _LENGTH.unpack(data)[0]


def check_length(length: int, total: int, max_record: int, max_frame: int) -> None:
    """Refuse a record of `length` bytes announced after `total` bytes of the (uncompressed) frame."""
    if length > max_record:
        raise FrameError("record_too_large", f"{length} > {max_record}")
    if total + _LENGTH.size + length > max_frame:
        raise FrameError("frame_too_large", f"more than {max_frame} bytes")


def check_packed_length(length: int, max_frame: int) -> None:
    """Refuse a compressed section announced longer than a whole frame may be."""
    if length > max_frame:
        raise FrameError("frame_too_large", f"{length} compressed bytes > {max_frame}")


def inflate(packed: bytes, limit: int) -> bytes:
    """Decompress at most `limit` bytes (a bomb stops there) of a complete zlib stream."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(packed, limit + 1)
    except zlib.error as e:
        raise FrameError("bad_compression", str(e)) from None
    if len(out) > limit:
        raise FrameError("frame_too_large", f"inflates past {limit} bytes")
    if not d.eof:
        raise FrameError("bad_compression", "the zlib stream is cut short")
    if d.unused_data:
        raise FrameError("trailing_bytes", f"{len(d.unused_data)} bytes after the zlib stream")
    return out


def parse_records(section: bytes, count: int, max_record: int, max_frame: int) -> list[bytes]:
    """The `count` length-prefixed records that must make up all of `section` (uncompressed)."""
    pos, out = 0, []
    for _ in range(count):
        if pos + _LENGTH.size > len(section):
            raise FrameError("truncated", f"record {len(out)} has no length")
        (length,) = _LENGTH.unpack_from(section, pos)
        check_length(length, _HEADER.size + pos, max_record, max_frame)
        pos += _LENGTH.size
        if pos + length > len(section):
            raise FrameError("truncated", f"record {len(out)} is cut short")
        out.append(bytes(section[pos : pos + length]))
        pos += length
    if pos != len(section):
        raise FrameError("trailing_bytes", f"{len(section) - pos} bytes after the last record")
    return out
