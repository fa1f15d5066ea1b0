"""The transport's errors: one base (`TransportError`), record errors, and the object fetch's.

A `FetchError` names the peer and the object; its subclasses say which failure it was, so a
caller tries another peer (unreachable, not found, timeout) or gives up on the object (too
large, hash mismatch, a response that breaks the stream protocol).
"""

from __future__ import annotations

from p2pmodel.errors import P2PModelError

__all__ = [
    "TransportError",
    "RecordRejected",
    "DHTTimeout",
    "FetchError",
    "ObjectNotFound",
    "ObjectTooLarge",
    "HashMismatch",
    "BadResponse",
    "PeerUnreachable",
    "FetchTimeout",
    "StreamOpenError",
]


class TransportError(P2PModelError):
    """Base of errors raised while talking to other peers."""


class RecordRejected(TransportError):
    """We refused to publish a record that our own validator (or the size limit) rejects."""

    def __init__(self, key: str, size: int, reason: str):
        self.key, self.size, self.reason = key, size, reason
        super().__init__(f"record for {key!r} ({size} bytes) rejected: {reason}")


class DHTTimeout(TransportError):
    """A DHT read or write did not finish within its time bound."""

    def __init__(self, operation: str, key: str, timeout: float):
        self.operation, self.key, self.timeout = operation, key, timeout
        super().__init__(f"DHT {operation} of {key!r} took longer than {timeout:.1f}s")


class FetchError(TransportError):
    """Fetching an object from a peer failed. `peer` is the libp2p peer id (base58)."""

    def __init__(self, peer: str, oid: str, reason: str):
        self.peer, self.oid, self.reason = peer, oid, reason
        super().__init__(f"fetching object {oid[:12]} from {peer[:16]}…: {reason}")


class ObjectNotFound(FetchError):
    """The peer does not hold (or no longer serves) the object."""

    def __init__(self, peer: str, oid: str):
        super().__init__(peer, oid, "the peer does not have it")


class ObjectTooLarge(FetchError):
    """The peer announced a size above our limit or different from the one we expected."""

    def __init__(self, peer: str, oid: str, size: int, limit: int, expected: int | None = None):
        self.size, self.limit, self.expected = size, limit, expected
        if expected is not None and size != expected:
            reason = f"size {size} differs from the announced {expected}"
        else:
            reason = f"size {size} exceeds the limit of {limit} bytes"
        super().__init__(peer, oid, reason)


class HashMismatch(FetchError):
    """The bytes received do not hash to the requested id: the peer sent corrupt or forged data."""

    def __init__(self, peer: str, oid: str, got: str):
        self.got = got
        super().__init__(peer, oid, f"data hashes to {got[:12]}, not to the requested id")


class BadResponse(FetchError):
    """The peer broke the stream protocol (bad status byte, size changing between attempts)."""


class PeerUnreachable(FetchError):
    """Several attempts in a row got no byte from the peer (it is gone, or p2pd cannot reach it)."""

    def __init__(self, peer: str, oid: str, attempts: int, last: str):
        self.attempts = attempts
        super().__init__(peer, oid, f"unreachable: {attempts} attempts without a byte ({last})")


class FetchTimeout(FetchError):
    """The deadline passed before the whole object arrived; `received` bytes had arrived."""

    def __init__(self, peer: str, oid: str, timeout: float, received: int, attempts: int, last: str):
        self.timeout, self.received, self.attempts = timeout, received, attempts
        super().__init__(
            peer, oid, f"gave up after {timeout:.1f}s and {attempts} attempts with {received} bytes ({last})"
        )


class StreamOpenError(TransportError):
    """p2pd could not open a stream to `peer` for `protocol` (unreachable, or no such handler)."""

    def __init__(self, peer: str, protocol: str, reason: str):
        self.peer, self.protocol, self.reason = peer, protocol, reason
        super().__init__(f"opening {protocol} to {peer[:16]}…: {reason}")
