"""Wire messages: one frozen dataclass per message, their schemas, limits and msgpack encoding.

Every message travels inside the same envelope, a msgpack map written with sorted keys::

    {"b": body, "t": type_name, "v": [major, minor]}

`body` is a map from field name to value. A reader ignores body fields it does not know (a
newer minor version may add fields, always with a default) and refuses a different major
version with `UnsupportedVersion`. The exact rules are in `protocols/SPEC.md`; the test
vectors in `protocols/vectors/` pin the bytes.

Each field's type and range is declared once, in its annotation (`Round`, `Sha256Hex`, ...),
and checked when a message is built. Building a bad message is our bug and raises
`InvalidMessage` (a `LocalProtocolError`); decoding a bad one is the peer's fault and raises a
`RemoteProtocolError` subclass. `decode` raises nothing else, for any input bytes.

The encoding is canonical (sorted map keys, floats as float64, shortest integer forms), so
`message_hash(msg)` — sha256 of `encode(msg)` — is the same on every peer running the same
major.minor version. It is the proposal hash that votes refer to.
"""

from __future__ import annotations

import hashlib
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Annotated, Any, ClassVar, NamedTuple

import msgpack

from .limits import (  # re-exported: the limits are part of the messages' public face
    KiB,
    LIMITS,
    MAX_ADDRS,
    MAX_ADDR_LEN,
    MAX_KEY_LEN,
    MAX_LIBP2P_ID,
    MAX_MAP_ITEMS,
    MAX_MEMBERS,
    MAX_MESSAGE,
    MAX_METRICS,
    MAX_NAME,
    MAX_PAYLOAD,
    MAX_RECORD,
    MAX_SIGNED_VOTE,
    MAX_TEXT,
    MAX_U63,
    MiB,
    SIGNED_OVERHEAD,
    UNPACK_LIMITS,
)
from .schema import Blob, Hex, Map, Real, Record, Scalar, Seq, Text, UInt, _Bad, _Check, is_int
from .errors import (  # the errors are re-exported: ARCHITECTURE lists them with the messages
    InvalidMessage,
    LocalProtocolError,
    MalformedMessage,
    MessageTooLarge,
    ProtocolError,
    RemoteProtocolError,
    SchemaError,
    UnexpectedMessage,
    UnknownMessageType,
    UnsupportedVersion,
)

__all__ = [
    "PROTOCOL_VERSION",
    "LIMITS",
    "MAX_MEMBERS",
    "MAX_KEY_LEN",
    "MAX_RECORD",
    "MAX_SIGNED_VOTE",
    "MAX_TEXT",
    "MAX_MAP_ITEMS",
    "MAX_U63",
    "SIGNED_OVERHEAD",
    "KiB",
    "MiB",
    "Message",
    "PeerAnnouncement",
    "Departure",
    "DeltaAnnouncement",
    "ProposalDelta",
    "Proposal",
    "Vote",
    "Commit",
    "MESSAGE_TYPES",
    "encode",
    "decode",
    "message_hash",
    "peer_id_of",
    "sender_of",
    "schema_of",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "InvalidMessage",
    "MalformedMessage",
    "MessageTooLarge",
    "SchemaError",
    "UnexpectedMessage",
    "UnknownMessageType",
    "UnsupportedVersion",
]

# (major, minor). A reader refuses another major; a newer minor only adds defaulted fields.
PROTOCOL_VERSION: tuple[int, int] = (1, 0)

# Field types used by the messages. The annotation carries the check.
Round = Annotated[int, UInt()]  # round number, counts up from 0
Count = Annotated[int, UInt()]
Size = Annotated[int, UInt(max=MAX_PAYLOAD)]  # bytes
Time = Annotated[float, Real(min=0.0)]  # unix seconds (float64)
Sha256Hex = Annotated[str, Hex(32, "sha256")]
PeerId = Annotated[str, Hex(20, "sha256(ed25519 public key)[:20]")]
PublicKey = Annotated[bytes, Blob(32, min_len=32)]  # raw Ed25519 public key
Libp2pId = Annotated[str, Text(MAX_LIBP2P_ID, min_len=1, pattern=r"[1-9A-HJ-NP-Za-km-z]+", what="base58")]
Multiaddrs = Annotated[
    tuple[str, ...], Seq(Text(MAX_ADDR_LEN, min_len=1, pattern=r"/[\x21-\x7e]*", what="multiaddr"), MAX_ADDRS)
]
Scalars = Annotated[dict, Map(Scalar())]
Metrics = Annotated[dict, Map(Real(), MAX_METRICS)]
MethodName = Annotated[str, Text(MAX_NAME, min_len=1, pattern=r"[a-z][a-z0-9_]*", what="merge method name")]
Members = Annotated[tuple[str, ...], Seq(PeerId.__metadata__[0], MAX_MEMBERS, min_items=1, unique=True)]
Signers = Annotated[int, UInt(min=1, max=MAX_MEMBERS)]  # votes in one certificate


class ProposalDelta(NamedTuple):
    """One delta a proposal merges, in merge order."""

    peer_id: str  # the peer that trained it
    delta_hash: str  # sha256 hex of the encoded delta
    weight: float  # merge weight (the proposer writes the announced sample count)


ProposalDeltas = Annotated[
    tuple[ProposalDelta, ...],
    Seq(Record(ProposalDelta, PeerId.__metadata__[0], Sha256Hex.__metadata__[0], Real(min=0.0)), MAX_MEMBERS),
]


# ---------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """Base of the wire messages. Subclasses set TYPE (the envelope's "t") and SENDER."""

    TYPE: ClassVar[str] = ""
    SENDER: ClassVar[str | None] = None  # field that must equal the signer's peer id, if any

    def __post_init__(self) -> None:
        try:
            for name, check in schema_of(type(self)).items():
                try:
                    object.__setattr__(self, name, check(getattr(self, name)))
                except _Bad as e:
                    raise _Bad(e.reason, name + e.path) from None
            self._check()
        except _Bad as e:
            raise InvalidMessage(self.TYPE, e.path or "?", e.reason) from None

    def _check(self) -> None:
        """Checks that span fields; raise _Bad(reason, field)."""


@dataclass(frozen=True)
class PeerAnnouncement(Message):
    """ "I am in round `round` of event `event_hash`; reach me at `addrs`." DHT: .../members."""

    TYPE: ClassVar[str] = "peer_announcement"
    SENDER: ClassVar[str | None] = "peer_id"

    peer_id: PeerId  # hex sha256(public_key)[:20]; must match public_key
    public_key: PublicKey  # raw 32-byte Ed25519 public key that signs this peer's messages
    libp2p_id: Libp2pId  # the libp2p (hivemind P2P) peer id, base58, to open streams to
    addrs: Multiaddrs  # multiaddrs the libp2p host listens on
    capabilities: Scalars  # e.g. {"device": "cuda", "version": "0.1.0"}; informative only
    event_hash: Sha256Hex  # sha256 hex of the event manifest this peer joined
    round: Round  # the round this peer enters
    time: Time  # unix seconds when the announcement was made

    def _check(self) -> None:
        if peer_id_of(self.public_key) != self.peer_id:
            raise _Bad("does not match sha256(public_key)[:20]", "peer_id")


@dataclass(frozen=True)
class Departure(Message):
    """ "I am leaving after round `round`; do not wait for me." DHT: .../members."""

    TYPE: ClassVar[str] = "departure"
    SENDER: ClassVar[str | None] = "peer_id"

    peer_id: PeerId  # the departing peer
    round: Round  # last round the peer took part in
    time: Time  # unix seconds when it left


@dataclass(frozen=True)
class DeltaAnnouncement(Message):
    """ "My delta for round `round` on `base_version` is ready; fetch it by hash." DHT: .../deltas."""

    TYPE: ClassVar[str] = "delta_announcement"
    SENDER: ClassVar[str | None] = "peer_id"

    round: Round  # the round the delta was trained for
    base_version: Sha256Hex  # version id the delta is relative to (the round's head)
    peer_id: PeerId  # the peer that trained it and serves it
    delta_hash: Sha256Hex  # sha256 hex of the encoded delta bytes
    encoded_size: Size  # bytes of the encoded delta (the object stream's total size for `delta_hash`)
    samples: Count  # training samples behind the delta (the FedAvg weight)
    # of `samples`, those trained for earlier rounds: a delta the merge left out, carried into
    # this one (so a round's samples trained count each sample once). Added in 1.0 with a
    # default: written only when not 0, so records without it keep their bytes and hashes.
    carried: Count = field(default=0, metadata={"omit_default": True})

    def _check(self) -> None:
        if self.carried > self.samples:
            raise _Bad("exceeds samples", "carried")


@dataclass(frozen=True)
class Proposal(Message):
    """ "Round `round` merges these deltas, in this order, with this method." DHT: .../proposal."""

    TYPE: ClassVar[str] = "proposal"
    SENDER: ClassVar[str | None] = "proposer"

    round: Round  # the round being decided
    base_version: Sha256Hex  # version id every listed delta is relative to
    proposer: PeerId  # the proposing peer (its rank decides precedence)
    members: Members  # peer ids the proposer saw in the round, sorted; 2/3 of them commit
    deltas: ProposalDeltas  # (peer_id, delta_hash, weight), in merge order; unique hashes
    time: Time  # unix seconds; becomes the merged version's time, so all peers agree on it
    method: MethodName  # merge method name (p2pmodel.merge.METHODS)
    params: Scalars  # the merge method's parameters, e.g. {"density": 0.2}

    def _check(self) -> None:
        hashes = [d.delta_hash for d in self.deltas]
        if len(set(hashes)) != len(hashes):
            raise _Bad("delta hashes are not unique", "deltas")


@dataclass(frozen=True)
class Vote(Message):
    """ "Merging proposal `proposal_hash` gave me version `version_id`." DHT: .../votes."""

    TYPE: ClassVar[str] = "vote"
    SENDER: ClassVar[str | None] = "voter"

    round: Round  # the round voted on
    base_version: Sha256Hex  # the head the round built on
    proposal_hash: Sha256Hex  # message_hash() of the proposal that was merged
    version_id: Sha256Hex  # id of the resulting version (its core, without annotations)
    voter: PeerId  # the voting peer
    metrics: Metrics  # CI metrics measured by the voter, e.g. {"eval_loss": 2.31}


@dataclass(frozen=True)
class Commit(Message):
    """ "This version is committed; the certificate with this hash proves it." DHT: p2pmodel/<event>/head.

    Neither the record nor the certificate is inside: both grow (with the model's tensor count,
    with the signers), and a DHT record must stay small at any swarm size. The certificate is a
    content-addressed blob (`protocols.certificate.encode_certificate`: the signed votes, each
    once, sorted) that readers fetch by `certificate_id` over the object stream from the
    publisher or any peer holding it, bounded by `signers`; the record is fetched by id from a
    signer. Live peers fetch neither: they commit from the votes they were pushed.
    """

    TYPE: ClassVar[str] = "commit"

    round: Round  # the round committed
    version_id: Sha256Hex  # id of the committed version; every vote in the certificate names it
    certificate_id: Sha256Hex  # sha256 of the certificate blob: the signed Vote envelopes that commit it
    signers: Signers  # vote envelopes in that blob (a reader fetches at most this many votes' bytes)


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        PeerAnnouncement,
        Departure,
        DeltaAnnouncement,
        Proposal,
        Vote,
        Commit,
    )
}
assert set(MESSAGE_TYPES) == set(LIMITS), "every message type needs a size limit"


# ---------------------------------------------------------------------------------------
# Schema, identity helpers
# ---------------------------------------------------------------------------------------

_SCHEMAS: dict[type, dict[str, _Check]] = {}


def schema_of(cls: type[Message]) -> dict[str, _Check]:
    """The field checks of a message class, in field order (read from the annotations)."""
    schema = _SCHEMAS.get(cls)
    if schema is None:
        hints = typing.get_type_hints(cls, include_extras=True)
        schema = {}
        for f in fields(cls):
            checks = [m for m in getattr(hints[f.name], "__metadata__", ()) if isinstance(m, _Check)]
            if len(checks) != 1:
                raise TypeError(f"{cls.__name__}.{f.name} needs exactly one check in its annotation")
            schema[f.name] = checks[0]
        _SCHEMAS[cls] = schema
    return schema


def peer_id_of(public_key: bytes) -> str:
    """The peer id of an Ed25519 public key: hex of sha256(raw 32-byte key)[:20] (40 chars)."""
    return hashlib.sha256(bytes(public_key)).digest()[:20].hex()


def sender_of(msg: Message) -> str | None:
    """The peer id the message says it comes from, or None for types without a sender field."""
    return getattr(msg, msg.SENDER) if msg.SENDER else None


# ---------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------


def _to_wire(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _to_wire(v[k]) for k in sorted(v)}
    if isinstance(v, tuple):
        return [_to_wire(x) for x in v]
    return v


def encode(msg: Message) -> bytes:
    """Encode a message into its canonical envelope bytes.

    Raises:
        LocalProtocolError: `msg` is not a message.
        InvalidMessage: the encoding exceeds `LIMITS[msg.TYPE]`.
    """
    if not isinstance(msg, Message) or type(msg).TYPE not in MESSAGE_TYPES:
        raise LocalProtocolError(f"cannot encode {type(msg).__name__}: not a wire message")
    body = {
        f.name: _to_wire(getattr(msg, f.name))
        for f in sorted(fields(msg), key=lambda f: f.name)
        if not (f.metadata.get("omit_default") and getattr(msg, f.name) == f.default)
    }
    data = msgpack.packb({"b": body, "t": msg.TYPE, "v": list(PROTOCOL_VERSION)}, use_bin_type=True)
    if len(data) > LIMITS[msg.TYPE]:
        raise InvalidMessage(msg.TYPE, "<encoded>", f"{len(data)} bytes exceed the limit of {LIMITS[msg.TYPE]}")
    return data


def message_hash(msg: Message) -> str:
    """sha256 hex of the canonical encoding of `msg`: the id votes use for a proposal."""
    return hashlib.sha256(encode(msg)).hexdigest()


def _unpack(data: bytes, limit: int) -> Any:
    """msgpack-decode untrusted bytes with every length bounded; MalformedMessage on any failure."""

    def no_ext(code: int, payload: bytes) -> Any:
        raise ValueError(f"msgpack ext type {code} is not allowed")

    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=False,
            strict_map_key=True,
            max_bin_len=limit,
            ext_hook=no_ext,
            **UNPACK_LIMITS,
        )
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as e:
        # ExtraData, FormatError, StackError, OutOfData, UnicodeDecodeError and limit
        # violations all derive from these; none of them is the caller's bug.
        raise MalformedMessage(f"{type(e).__name__}: {str(e)[:120]}") from None


def _as_bytes(data: Any) -> bytes:
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    if not isinstance(data, bytes):
        raise LocalProtocolError(f"decode expects bytes, got {type(data).__name__}")
    return data


def _limit_for(expected: type[Message] | None) -> int:
    """The size limit for `expected` (the largest of all when None)."""
    if expected is None:
        return MAX_MESSAGE
    if not isinstance(expected, type) or MESSAGE_TYPES.get(getattr(expected, "TYPE", None)) is not expected:
        raise LocalProtocolError(f"expected must be a wire message class, got {expected!r}")
    return LIMITS[expected.TYPE]


def decode(data: bytes, expected: type[Message] | None = None) -> Message:
    """Decode and validate one message.

    Args:
        data: the envelope bytes, as received.
        expected: if given, the only message class acceptable here.

    Returns:
        The message; it is fully validated (its constructor ran).

    Raises:
        MessageTooLarge, MalformedMessage, UnsupportedVersion, UnknownMessageType,
        UnexpectedMessage, SchemaError: the bytes are not a valid message (peer's fault).
        LocalProtocolError: `data` is not bytes. Nothing else, for any input.
    """
    data = _as_bytes(data)
    limit = _limit_for(expected)
    if len(data) > limit:
        raise MessageTooLarge(expected.TYPE if expected is not None else "*", len(data), limit)
    env = _unpack(data, limit)
    if not isinstance(env, dict):
        raise MalformedMessage(f"envelope is a {type(env).__name__}, not a map")
    version, type_name, body = env.get("v"), env.get("t"), env.get("b")
    if not (isinstance(version, tuple) and len(version) == 2 and all(is_int(x) for x in version)):
        raise MalformedMessage("envelope field 'v' is not [major, minor]")
    if version[0] != PROTOCOL_VERSION[0]:
        raise UnsupportedVersion((version[0], version[1]), PROTOCOL_VERSION)
    if not isinstance(type_name, str):
        raise MalformedMessage("envelope field 't' is not a string")
    cls = MESSAGE_TYPES.get(type_name)
    if cls is None:
        raise UnknownMessageType(type_name[:64])
    if expected is not None and cls is not expected:
        raise UnexpectedMessage(expected.TYPE, type_name)
    if len(data) > LIMITS[type_name]:
        raise MessageTooLarge(type_name, len(data), LIMITS[type_name])
    if not isinstance(body, dict):
        raise MalformedMessage("envelope field 'b' is not a map")
    return _build(cls, body)


def _build(cls: type[Message], body: dict) -> Message:
    kwargs = {}
    for f in fields(cls):
        if f.name in body:
            kwargs[f.name] = body[f.name]
        elif f.default is MISSING and f.default_factory is MISSING:
            raise SchemaError(cls.TYPE, f.name, "missing")
    try:
        return cls(**kwargs)  # unknown body keys are ignored: a newer minor may add fields
    except InvalidMessage as e:
        raise SchemaError(e.kind, e.field, e.reason) from None

