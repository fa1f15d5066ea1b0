"""Errors of the wire layer (`p2pmodel.protocols`).

Every error here derives from `ProtocolError`, and each one says *whose fault* it is:

- `LocalProtocolError`: our own code asked for something the protocol forbids (built a
  message with an out-of-range field, fed the round machine an illegal event). It is a bug
  on this side; the peer did nothing wrong.
- `RemoteProtocolError`: a peer sent bytes that do not follow the protocol (garbage,
  oversized, wrong version, bad signature, someone else's name). Count it against the peer,
  drop the stream or record, and keep running.

Decoders (`messages.decode`, `signing.open_signed`, the delta codec) promise to raise only
`ProtocolError` subclasses for *any* input bytes, so a caller can write one
`except RemoteProtocolError` around the network boundary.
"""

from __future__ import annotations

from p2pmodel.errors import P2PModelError

__all__ = [
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "InvalidMessage",
    "WrongSigner",
    "MalformedMessage",
    "MessageTooLarge",
    "UnsupportedVersion",
    "UnknownMessageType",
    "UnexpectedMessage",
    "SchemaError",
    "BadSignature",
    "ImpersonationError",
]


class ProtocolError(P2PModelError):
    """Base of every error raised by `p2pmodel.protocols`."""


class LocalProtocolError(ProtocolError):
    """Our side broke the protocol: a bug in the caller, never the peer's fault."""


class RemoteProtocolError(ProtocolError):
    """A peer broke the protocol: penalise it, drop the stream or record, keep running."""


# --- our fault -------------------------------------------------------------------------


class InvalidMessage(LocalProtocolError):
    """A message was built (or was about to be encoded) with a field that breaks its schema.

    Raised by the message constructors; `decode` turns it into `SchemaError`, because there
    the bad value came from a peer.
    """

    def __init__(self, kind: str, field: str, reason: str) -> None:
        self.kind = kind  # message type name, e.g. "vote"
        self.field = field  # field name, or "<encoded>" for the whole message
        self.reason = reason  # what is wrong, in a few words
        super().__init__(f"invalid {kind}.{field}: {reason}")


class WrongSigner(LocalProtocolError):
    """We were asked to sign a message whose sender field names someone other than us."""

    def __init__(self, kind: str, field: str, claimed: str, signer: str) -> None:
        self.kind = kind
        self.field = field  # the sender field: peer_id, proposer or voter
        self.claimed = claimed  # peer id written in the message
        self.signer = signer  # peer id of the key we sign with
        super().__init__(f"refusing to sign {kind}: {field}={claimed} but our peer id is {signer}")


# --- the peer's fault ------------------------------------------------------------------


class MalformedMessage(RemoteProtocolError):
    """The bytes are not a well-formed envelope (not msgpack, trailing data, wrong shape)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"malformed message: {reason}")


class MessageTooLarge(RemoteProtocolError):
    """A message is bigger than the limit for its type (`messages.LIMITS`)."""

    def __init__(self, kind: str, size: int, limit: int) -> None:
        self.kind = kind  # message type name, or "*" when the type is not known yet
        self.size = size  # bytes received
        self.limit = limit  # bytes allowed
        super().__init__(f"{kind} message of {size} bytes exceeds the limit of {limit} bytes")


class UnsupportedVersion(RemoteProtocolError):
    """The peer speaks a protocol major version we do not."""

    def __init__(self, theirs: tuple[int, int], ours: tuple[int, int]) -> None:
        self.theirs = theirs  # (major, minor) written in the message
        self.ours = ours  # (major, minor) this build speaks
        super().__init__(
            f"unsupported protocol version {theirs[0]}.{theirs[1]}; this node speaks {ours[0]}.{ours[1]}"
        )


class UnknownMessageType(RemoteProtocolError):
    """The envelope names a message type this version does not define."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name
        super().__init__(f"unknown message type {type_name!r}")


class UnexpectedMessage(RemoteProtocolError):
    """A valid message of another type arrived where a specific type was expected."""

    def __init__(self, expected: str, got: str) -> None:
        self.expected = expected
        self.got = got
        super().__init__(f"expected a {expected} message, got {got}")


class SchemaError(RemoteProtocolError):
    """A field of a received message is missing, of the wrong type or out of range."""

    def __init__(self, kind: str, field: str, reason: str) -> None:
        self.kind = kind
        self.field = field
        self.reason = reason
        super().__init__(f"bad {kind}.{field}: {reason}")


class BadSignature(RemoteProtocolError):
    """A signed envelope does not verify (tampered payload, key or signature)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"bad signature: {reason}")


class ImpersonationError(BadSignature):
    """The signature is valid, but the message claims to come from another peer."""

    def __init__(self, kind: str, field: str, claimed: str, signer: str) -> None:
        self.kind = kind
        self.field = field  # the sender field: peer_id, proposer or voter
        self.claimed = claimed  # peer id written in the message
        self.signer = signer  # peer id derived from the signing key
        RemoteProtocolError.__init__(self, f"{kind} claims {field}={claimed} but was signed by {signer}")
        self.reason = f"signed by {signer}, claims {claimed}"
