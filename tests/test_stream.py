"""The object stream's framing (protocols/stream.py): what a fetcher and a server say, byte for byte.

A request names a blob by its raw sha256 and a byte offset; a response header gives a status and
the blob's size. Anything else a peer sends is its fault (`StreamFormatError`, a
RemoteProtocolError); only complete OK and NOT_FOUND answers keep a stream open for the next request.
"""

from __future__ import annotations

import hashlib

import pytest

from p2pmodel.protocols.errors import RemoteProtocolError
from p2pmodel.protocols.stream import (
    MAGIC,
    REQUEST_SIZE,
    RESPONSE_SIZE,
    ObjectStatus,
    StreamFormatError,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    keeps_stream_open,
)

OID = hashlib.sha256(b"a blob").digest()


def test_a_request_is_magic_oid_and_offset_big_endian():
    frame = encode_request(OID, 5)
    assert len(frame) == REQUEST_SIZE == 48
    assert frame == MAGIC + OID + (5).to_bytes(8, "big")
    assert decode_request(frame) == (OID, 5)


def test_a_response_header_is_status_and_total_size():
    frame = encode_response(ObjectStatus.OK, 1 << 40)
    assert len(frame) == RESPONSE_SIZE == 9
    assert frame == b"\x00" + (1 << 40).to_bytes(8, "big")
    assert decode_response(frame) == (ObjectStatus.OK, 1 << 40)
    assert decode_response(encode_response(ObjectStatus.NOT_FOUND)) == (ObjectStatus.NOT_FOUND, 0)


@pytest.mark.parametrize(
    "frame, reason",
    [
        (b"P2PMOBJ2" + OID + bytes(8), "bad magic"),
        (MAGIC + OID, "48 bytes"),
    ],
)
def test_a_malformed_request_is_the_peers_fault(frame, reason):
    with pytest.raises(StreamFormatError, match=reason) as e:
        decode_request(frame)
    assert isinstance(e.value, RemoteProtocolError)


def test_an_unknown_status_or_short_header_is_the_peers_fault():
    with pytest.raises(StreamFormatError, match="unknown status byte 9"):
        decode_response(b"\x09" + bytes(8))
    with pytest.raises(StreamFormatError, match="9 bytes"):
        decode_response(b"\x00")


def test_our_own_bad_request_is_a_bug_not_a_frame():
    with pytest.raises(ValueError):
        encode_request(OID[:31], 0)
    with pytest.raises(ValueError):
        encode_request(OID, -1)


def test_only_complete_ok_and_not_found_answers_keep_the_stream_open():
    assert {s for s in ObjectStatus if keeps_stream_open(s)} == {ObjectStatus.OK, ObjectStatus.NOT_FOUND}
