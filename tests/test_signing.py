"""What signed envelopes and identities guarantee (protocols/signing.py).

- A signed message opens to the same message and the signer's peer id.
- No byte of a signed envelope can be changed, dropped or added without `open_signed`
  failing with a ProtocolError; a valid signature over a message that names another sender
  is an `ImpersonationError`; we refuse to sign a message naming someone else.
- Identities are derived from their keys (key files: tests/test_identity.py).
"""

from __future__ import annotations

import hashlib

import msgpack
import pytest

from p2pmodel.protocols import messages as m
from p2pmodel.protocols.errors import (
    BadSignature,
    ImpersonationError,
    MalformedMessage,
    MessageTooLarge,
    ProtocolError,
    UnexpectedMessage,
    WrongSigner,
)
from p2pmodel.protocols.signing import SIGNING_DOMAIN, PeerIdentity, open_signed, sign, signer_of

ALICE = PeerIdentity.from_seed(b"\x01" * 32)
BOB = PeerIdentity.from_seed(b"\x02" * 32)
H = hashlib.sha256(b"x").hexdigest()


def vote(voter: str = ALICE.peer_id) -> m.Vote:
    return m.Vote(4, H, H, H, voter, {"eval_loss": 3.5})


def forge(msg: m.Message, key: PeerIdentity, *, domain: bytes = SIGNING_DOMAIN) -> bytes:
    """A correctly signed envelope that bypasses sign()'s sender check."""
    payload = m.encode(msg)
    return msgpack.packb(
        {"k": key.public_key, "p": payload, "s": key.private_key.sign(domain + payload)}, use_bin_type=True
    )


def test_a_signed_message_opens_to_the_message_and_its_signer():
    assert open_signed(sign(vote(), ALICE)) == (vote(), ALICE.peer_id)


def test_messages_without_a_sender_field_may_be_signed_by_anyone():
    commit = m.Commit(4, "ab" * 32, "cd" * 32, 1)
    assert open_signed(sign(commit, BOB)) == (commit, BOB.peer_id)


def test_peer_id_is_hex_of_sha256_of_the_public_key_truncated_to_20_bytes():
    assert ALICE.peer_id == hashlib.sha256(ALICE.public_key).digest()[:20].hex()


def test_signatures_are_deterministic():
    assert sign(vote(), ALICE) == sign(vote(), ALICE)


def test_every_single_byte_change_is_rejected():
    data = sign(vote(), ALICE)
    accepted = []
    for i in range(len(data)):
        for mask in (0x01, 0x80, 0xFF):
            tampered = bytearray(data)
            tampered[i] ^= mask
            try:
                open_signed(bytes(tampered))
                accepted.append((i, mask))
            except ProtocolError:
                pass
    assert accepted == []


def test_every_truncation_and_extension_is_rejected():
    data = sign(vote(), ALICE)
    for cut in range(len(data)):
        with pytest.raises(ProtocolError):
            open_signed(data[:cut])
    with pytest.raises(ProtocolError):
        open_signed(data + b"\x00")


def test_a_tampered_payload_fails_signature_verification():
    msg = vote()
    payload = m.encode(m.Vote(5, H, H, H, ALICE.peer_id, {"eval_loss": 3.5}))
    good = msgpack.unpackb(sign(msg, ALICE))
    swapped = msgpack.packb({"k": good["k"], "p": payload, "s": good["s"]}, use_bin_type=True)
    with pytest.raises(BadSignature):
        open_signed(swapped)


def test_a_signature_checked_against_another_key_fails():
    good = msgpack.unpackb(sign(vote(), ALICE))
    rekeyed = msgpack.packb({"k": BOB.public_key, "p": good["p"], "s": good["s"]}, use_bin_type=True)
    with pytest.raises(BadSignature):
        open_signed(rekeyed)


def test_a_signature_without_the_domain_prefix_fails():
    with pytest.raises(BadSignature):
        open_signed(forge(vote(), ALICE, domain=b""))


def test_a_valid_signature_over_a_message_naming_another_sender_is_impersonation():
    with pytest.raises(ImpersonationError) as e:
        open_signed(forge(vote(voter=BOB.peer_id), ALICE))
    assert (e.value.claimed, e.value.signer, e.value.field) == (BOB.peer_id, ALICE.peer_id, "voter")


def test_an_announcement_carrying_someone_elses_key_is_impersonation():
    ann = m.PeerAnnouncement(BOB.peer_id, BOB.public_key, "QmBob", (), {}, H, 0, 0.0)
    with pytest.raises(ImpersonationError):
        open_signed(forge(ann, ALICE))


def test_signing_a_message_that_names_another_sender_is_refused():
    with pytest.raises(WrongSigner):
        sign(vote(voter=BOB.peer_id), ALICE)


@pytest.mark.parametrize(
    "env",
    [
        {"p": b"", "k": b"", "s": b""},  # wrong sizes
        {"k": "k" * 32, "p": b"p", "s": b"s" * 64},  # str instead of bin
        {"k": b"k" * 32, "p": b"p"},  # no signature
        {"k": b"k" * 32, "p": b"p", "s": b"s" * 64, "x": 1},  # extra key
    ],
    ids=["sizes", "str", "no_sig", "extra_key"],
)
def test_malformed_envelopes_are_refused(env):
    with pytest.raises(MalformedMessage):
        open_signed(msgpack.packb(env, use_bin_type=True))


def test_a_non_canonical_envelope_is_refused_even_with_a_valid_signature():
    good = msgpack.unpackb(sign(vote(), ALICE))
    reordered = msgpack.packb({"s": good["s"], "p": good["p"], "k": good["k"]}, use_bin_type=True)
    with pytest.raises(MalformedMessage):
        open_signed(reordered)


def test_open_signed_checks_the_expected_type():
    with pytest.raises(UnexpectedMessage):
        open_signed(sign(vote(), ALICE), expected=m.Proposal)


def test_open_signed_bounds_the_size_by_the_expected_type():
    with pytest.raises(MessageTooLarge):
        open_signed(b"\x00" * (m.LIMITS["vote"] + 1024), expected=m.Vote)


def test_signer_of_reads_the_claimed_signer_without_verifying():
    assert signer_of(forge(vote(voter=BOB.peer_id), ALICE)) == ALICE.peer_id


# --- identities ---------------------------------------------------------------------


def test_generated_identities_differ():
    assert PeerIdentity.generate().peer_id != PeerIdentity.generate().peer_id


def test_repr_shows_the_peer_id_but_not_the_seed():
    text = repr(ALICE)
    assert ALICE.peer_id in text and ALICE.seed.hex() not in text
