"""Ed25519 peer identities and signed envelopes.

hivemind ships RSA helpers only (`hivemind.utils.crypto.RSAPrivateKey`), so identities here
use Ed25519 from the `cryptography` package: 32-byte keys, 64-byte deterministic signatures
(RFC 8032), fast to verify by the hundred for a quorum certificate.

A peer id is derived from the key, so it cannot be claimed without the key:
``peer_id = sha256(raw 32-byte public key)[:20].hex()`` (40 lowercase hex digits).
It is unrelated to the libp2p peer id, which `PeerAnnouncement` carries separately.

A signed envelope is a msgpack map, written canonically (sorted keys, shortest forms)::

    {"k": public_key (bin 32), "p": payload (bin: messages.encode(msg)), "s": signature (bin 64)}

The signature covers ``SIGNING_DOMAIN + payload``; the domain prefix keeps these signatures
from being replayed as signatures over anything else made with the same key. A reader
accepts only the canonical form with exactly these keys, so no byte of an envelope can be
changed without `open_signed` failing.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import (
    BadSignature,
    ImpersonationError,
    LocalProtocolError,
    MalformedMessage,
    RemoteProtocolError,
    MessageTooLarge,
    WrongSigner,
)
from .messages import (
    MAX_MESSAGE,
    SIGNED_OVERHEAD,
    Message,
    _limit_for,
    decode,
    encode,
    peer_id_of,
    sender_of,
)

__all__ = [
    "SIGNING_DOMAIN",
    "PeerIdentity",
    "sign",
    "open_signed",
    "signed_by",
    "signer_of",
    "peer_id_of",
]

SIGNING_DOMAIN = b"p2pmodel/signed/v1\x00"  # prefixed to the payload before signing
_SEED_LEN = 32
_SIG_LEN = 64


@dataclass(frozen=True)
class PeerIdentity:
    """A peer's long-lived Ed25519 key pair. Build with generate() or from_seed(); key files: daemon/identity.py."""

    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> PeerIdentity:
        """A fresh random identity (from the OS's CSPRNG)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> PeerIdentity:
        """The identity whose private key is the 32-byte Ed25519 seed `seed` (RFC 8032)."""
        if not isinstance(seed, (bytes, bytearray)) or len(seed) != _SEED_LEN:
            raise LocalProtocolError("an Ed25519 seed is exactly 32 bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(bytes(seed)))

    @property
    def seed(self) -> bytes:
        """The raw 32-byte private seed. Secret."""
        return self.private_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte Ed25519 public key."""
        return self.private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def peer_id(self) -> str:
        """hex(sha256(public_key)[:20]): 40 lowercase hex digits."""
        return peer_id_of(self.public_key)

    def __repr__(self) -> str:  # never print the secret
        return f"PeerIdentity(peer_id={self.peer_id})"


def sign(msg: Message, identity: PeerIdentity) -> bytes:
    """Encode `msg` and wrap it in a signed envelope made with `identity`'s key.

    Raises:
        WrongSigner: the message's sender field (peer_id / proposer / voter) is not us.
        InvalidMessage, LocalProtocolError: as `messages.encode`.
    """
    claimed = sender_of(msg) if isinstance(msg, Message) else None
    if claimed is not None and claimed != identity.peer_id:
        raise WrongSigner(msg.TYPE, msg.SENDER, claimed, identity.peer_id)
    payload = encode(msg)
    signature = identity.private_key.sign(SIGNING_DOMAIN + payload)
    return _pack_envelope(identity.public_key, payload, signature)


def _pack_envelope(public_key: bytes, payload: bytes, signature: bytes) -> bytes:
    return msgpack.packb({"k": public_key, "p": payload, "s": signature}, use_bin_type=True)


def _open_envelope(data: bytes, limit: int) -> tuple[bytes, bytes, bytes]:
    """(public_key, payload, signature) of a canonical envelope, checked for shape only."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise LocalProtocolError(f"open_signed expects bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > limit + SIGNED_OVERHEAD:
        raise MessageTooLarge("signed", len(data), limit + SIGNED_OVERHEAD)
    try:
        env = msgpack.unpackb(
            data, raw=False, strict_map_key=True, max_bin_len=limit, max_str_len=8,
            max_array_len=0, max_map_len=3, max_ext_len=0,
        )  # fmt: skip
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as e:
        raise MalformedMessage(f"signed envelope: {type(e).__name__}: {str(e)[:120]}") from None
    if not isinstance(env, dict) or set(env) != {"k", "p", "s"}:
        raise MalformedMessage("signed envelope is not a map of exactly k, p, s")
    key, payload, sig = env["k"], env["p"], env["s"]
    if not all(isinstance(x, bytes) for x in (key, payload, sig)):
        raise MalformedMessage("signed envelope fields must be bin")
    if len(key) != 32 or len(sig) != _SIG_LEN:
        raise MalformedMessage("signed envelope needs a 32-byte key and a 64-byte signature")
    if _pack_envelope(key, payload, sig) != data:
        raise MalformedMessage("signed envelope is not in canonical form")
    return key, payload, sig


def signer_of(data: bytes) -> str:
    """The peer id that claims to have signed `data`, WITHOUT verifying anything (for logs)."""
    key, _, _ = _open_envelope(data, MAX_MESSAGE)
    return peer_id_of(key)


def open_signed(data: bytes, expected: type[Message] | None = None) -> tuple[Message, str]:
    """Verify a signed envelope and decode the message inside.

    Checks, in order: size, envelope shape, the Ed25519 signature, the message itself
    (`messages.decode`), and that the message's sender field equals the signer's peer id.

    Args:
        data: the envelope bytes, as received.
        expected: if given, the only message class acceptable here.

    Returns:
        (message, signer's peer id).

    Raises:
        MessageTooLarge, MalformedMessage: the envelope is not valid.
        BadSignature: the signature does not verify for the included key.
        ImpersonationError: the signature is valid but the message names another sender.
        any other RemoteProtocolError from `messages.decode`. Nothing else, for any input.
    """
    key, payload, sig = _open_envelope(data, _limit_for(expected))
    try:
        Ed25519PublicKey.from_public_bytes(key).verify(sig, SIGNING_DOMAIN + payload)
    except (InvalidSignature, ValueError):
        raise BadSignature("Ed25519 verification failed") from None
    signer = peer_id_of(key)
    msg = decode(payload, expected)
    claimed = sender_of(msg)
    if claimed is not None and claimed != signer:
        raise ImpersonationError(msg.TYPE, msg.SENDER, claimed, signer)
    return msg, signer


def signed_by(subkey: str, value: bytes) -> bool:
    """True when `value` is a valid signed envelope whose signer is `subkey` (the record check
    every DHT record and every pushed record must pass)."""
    try:
        _, signer = open_signed(value)
    except RemoteProtocolError:
        return False
    return signer == subkey
