"""What the daemon's identity key files guarantee (daemon/identity.py).

- An identity survives save and load (PKCS#8 PEM, mode 0600); a raw 32-byte seed file loads.
- An existing identity is never replaced; a missing file, or one without an Ed25519 key,
  raises `KeyFileError`.
"""

from __future__ import annotations

import os
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from p2pmodel.daemon.identity import KeyFileError, load_identity, save_identity
from p2pmodel.protocols.signing import PeerIdentity

ALICE = PeerIdentity.from_seed(b"\x01" * 32)
BOB = PeerIdentity.from_seed(b"\x02" * 32)


def test_identity_survives_save_and_load_with_owner_only_permissions(tmp_path):
    path = tmp_path / "identity.pem"
    save_identity(ALICE, path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_identity(path).peer_id == ALICE.peer_id


def test_a_raw_32_byte_seed_file_loads(tmp_path):
    path = tmp_path / "seed"
    path.write_bytes(b"\x02" * 32)
    path.chmod(0o600)
    assert load_identity(path).peer_id == BOB.peer_id


def test_save_refuses_to_replace_an_existing_identity(tmp_path):
    path = tmp_path / "identity.pem"
    save_identity(ALICE, path)
    with pytest.raises(KeyFileError):
        save_identity(BOB, path)
    assert load_identity(path).peer_id == ALICE.peer_id


@pytest.mark.parametrize("content", [b"", b"not a key", b"\x00" * 31], ids=["empty", "text", "31_bytes"])
def test_a_file_without_a_key_raises_key_file_error(tmp_path, content):
    path = tmp_path / "bad"
    path.write_bytes(content)
    with pytest.raises(KeyFileError):
        load_identity(path)


def test_a_missing_key_file_raises_key_file_error(tmp_path):
    with pytest.raises(KeyFileError):
        load_identity(tmp_path / "absent")


def test_a_non_ed25519_key_file_raises_key_file_error(tmp_path):
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path = tmp_path / "ec.pem"
    path.write_bytes(pem)
    with pytest.raises(KeyFileError):
        load_identity(path)
