"""The peer identity's key file (`HOME/identity.pem`): reading and writing it.

`protocols/signing.py` holds the identity itself and signs with it, with no I/O; the file
is the daemon's. A key file is an unencrypted PKCS#8 PEM Ed25519 key (what `save_identity`
writes, mode 0600), or a raw 32-byte seed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pmodel.atomic import atomic_write
from p2pmodel.daemon.logs import get_logger
from p2pmodel.errors import P2PModelError
from p2pmodel.protocols.signing import PeerIdentity

__all__ = ["KeyFileError", "load_identity", "save_identity", "load_or_create_identity"]

logger = get_logger(__name__)

_SEED_LEN = 32


class KeyFileError(P2PModelError):
    """A peer identity file could not be read or written (missing, unreadable, not a key)."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"identity key file {path}: {reason}")


def load_identity(path: str | os.PathLike) -> PeerIdentity:
    """Read an identity file: a raw 32-byte seed, or an unencrypted PKCS#8 PEM Ed25519 key.

    Raises:
        KeyFileError: the file is missing, unreadable or holds no Ed25519 key.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
        mode = path.stat().st_mode
    except OSError as e:
        raise KeyFileError(str(path), e.strerror or str(e)) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        # ssh refuses such keys; we only warn, since some filesystems cannot express 0600.
        logger.warning("identity key file %s is accessible by other users (mode %o)", path, mode & 0o777)
    if len(data) == _SEED_LEN:
        return PeerIdentity.from_seed(data)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise KeyFileError(str(path), f"not a 32-byte seed or an unencrypted PEM key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(str(path), f"holds a {type(key).__name__}, not an Ed25519 key")
    return PeerIdentity(key)


def save_identity(identity: PeerIdentity, path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Write the key as PKCS#8 PEM, mode 0600, atomically (temp file, fsync, rename).

    Raises:
        KeyFileError: the file exists and overwrite is False, or it cannot be written.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise KeyFileError(str(path), "already exists; refusing to replace an identity")
    pem = identity.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        atomic_write(path, pem, mode=0o600)
    except OSError as e:
        raise KeyFileError(str(path), e.strerror or str(e)) from None


def load_or_create_identity(path: str | os.PathLike) -> PeerIdentity:
    """The identity in `path`, or a new one saved there (a node's first start)."""
    if Path(path).exists():
        return load_identity(path)
    identity = PeerIdentity.generate()
    save_identity(identity, path)
    return identity
