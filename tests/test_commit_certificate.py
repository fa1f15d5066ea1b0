"""A Commit names its certificate by hash, so it stays a small DHT record at any number of
signers, and whoever fetches the certificate still checks every vote (protocols/certificate.py).

With 1,000 real Ed25519 votes: the signed Commit record fits the DHT record limit; the fetched
blob opens to exactly those votes and commits by the rule; bytes that are tampered, cut short,
oversized, missing votes or not canonical are refused (`MalformedCertificate`), and a blob of
the right form whose votes do not reach the quorum does not commit. Another peer's certificate
of the version (fetched by version id when nobody serves the named blob) keeps only the votes
that name the commit.
"""

from __future__ import annotations

import hashlib

import msgpack
import pytest

from p2pmodel.daemon.transport import TransportLimits
from p2pmodel.protocols import signing
from p2pmodel.protocols.certificate import (
    CertificateError,
    Link,
    MalformedCertificate,
    certificate_limit,
    certify,
    check_link,
    encode_certificate,
    make_commit,
    may_commit,
    open_certificate,
    quorum,
    votes_naming,
)
from p2pmodel.protocols.messages import LIMITS, SIGNED_OVERHEAD, Commit, Vote

N = 1000
KEYS = [signing.PeerIdentity.from_seed(hashlib.sha256(f"signer-{i}".encode()).digest()) for i in range(N)]
LINK = Link(12, "c3" * 32, "b2" * 32, "9f" * 32, frozenset(k.peer_id for k in KEYS))


def _vote(key: signing.PeerIdentity) -> bytes:
    vote = Vote(round=LINK.round, base_version=LINK.base, proposal_hash=LINK.proposal_hash, version_id=LINK.version_id,
                voter=key.peer_id, metrics={"eval_loss": 2.3125, "accuracy": 0.41})  # fmt: skip
    return signing.sign(vote, key)


@pytest.fixture(scope="module")
def votes() -> list[bytes]:
    return [_vote(k) for k in KEYS]


@pytest.fixture(scope="module")
def committed(votes):
    return make_commit(LINK.round, LINK.version_id, votes)


def _forged(data: bytes, signers: int) -> Commit:
    """A Commit whose publisher named exactly `data` (the hash matches: only the form can be wrong)."""
    return Commit(LINK.round, LINK.version_id, hashlib.sha256(data).hexdigest(), signers)


def test_a_commit_of_a_thousand_signers_fits_a_dht_record(committed):
    record = signing.sign(committed.commit, KEYS[0])
    assert len(record) <= LIMITS["commit"] + SIGNED_OVERHEAD < TransportLimits().max_record_bytes
    assert committed.commit.signers == N and len(committed.blob()) <= certificate_limit(N)


def test_the_fetched_certificate_of_a_thousand_signers_commits_by_the_rule(committed):
    fetched = certify(committed.commit, committed.blob())
    votes, bad = open_certificate(fetched.certificate)
    assert bad == 0 and len(check_link(LINK, votes, LINK.members)) == N


def test_the_same_votes_in_any_order_give_the_same_certificate_id(votes):
    shuffled = votes[1::2] + votes[::2] + votes[:10]  # another order, some twice
    assert make_commit(LINK.round, LINK.version_id, shuffled).commit == make_commit(LINK.round, LINK.version_id, votes).commit


def test_a_tampered_certificate_is_refused(committed):
    data = bytearray(committed.blob())
    data[len(data) // 2] ^= 1
    with pytest.raises(MalformedCertificate, match="hash"):
        certify(committed.commit, bytes(data))


def test_a_certificate_cut_short_is_refused(committed):
    with pytest.raises(MalformedCertificate, match="hash"):
        certify(committed.commit, committed.blob()[:-1])
    cut = committed.blob()[:-1]  # even when the publisher named the cut bytes themselves
    with pytest.raises(MalformedCertificate, match="not msgpack"):
        certify(_forged(cut, N), cut)


def test_a_certificate_missing_votes_is_refused(votes):
    fewer = encode_certificate(votes[:-1])
    with pytest.raises(MalformedCertificate, match=f"{N - 1} votes, the commit says {N}"):
        certify(_forged(fewer, N), fewer)


def test_more_bytes_than_the_signers_can_take_are_refused_before_hashing(committed):
    padded = committed.blob() + b"\x00" * certificate_limit(N)
    with pytest.raises(MalformedCertificate, match="more than"):
        certify(committed.commit, padded)


def test_a_certificate_not_in_canonical_form_is_refused(votes):
    unsorted = msgpack.packb(sorted(votes[:3], reverse=True), use_bin_type=True)
    repeated = msgpack.packb(sorted([votes[0], votes[0], votes[1]]), use_bin_type=True)
    for data in (unsorted, repeated):
        with pytest.raises(MalformedCertificate, match="canonical"):
            certify(_forged(data, 3), data)


def test_something_other_than_an_array_of_envelopes_is_refused():
    for data in (msgpack.packb({"votes": []}), msgpack.packb(["text", b"x"], use_bin_type=True)):
        with pytest.raises(MalformedCertificate):
            certify(_forged(data, 2), data)


def test_a_well_formed_certificate_short_of_the_quorum_does_not_commit(votes):
    need = quorum(N)
    tampered = [bytearray(v) for v in votes[need - 1 :]]
    for t in tampered:
        t[-1] ^= 1  # a broken signature
    short = make_commit(LINK.round, LINK.version_id, votes[: need - 1] + [bytes(t) for t in tampered])
    fetched = certify(short.commit, short.blob())  # the form is right ...
    opened, bad = open_certificate(fetched.certificate)
    assert bad == N - need + 1
    with pytest.raises(CertificateError, match=f"{need - 1} of the {need} electorate votes"):
        check_link(LINK, opened, LINK.members)  # ... the votes are not enough


def test_a_commit_claiming_too_few_signers_is_not_worth_fetching():
    electorate = {k.peer_id for k in KEYS[:9]}  # vouching needs 9 - 6 + 1 = 4 of them
    assert not may_commit(3, electorate) and may_commit(4, electorate)
    assert not may_commit(N, set())


def test_another_peers_certificate_keeps_only_the_votes_that_name_the_commit(committed, votes):
    other = Vote(round=LINK.round, base_version=LINK.base, proposal_hash=LINK.proposal_hash, version_id="dd" * 32,
                 voter=KEYS[0].peer_id, metrics={})  # fmt: skip
    broken = bytearray(votes[2])
    broken[-1] ^= 1
    kept = votes_naming(committed.commit, [votes[1], signing.sign(other, KEYS[0]), bytes(broken), b"junk", votes[3]])
    assert kept == (votes[1], votes[3])


def test_votes_for_one_version_on_two_bases_are_not_a_certificate_of_it(committed, votes):
    moved = Vote(round=LINK.round, base_version="ee" * 32, proposal_hash=LINK.proposal_hash, version_id=LINK.version_id,
                 voter=KEYS[0].peer_id, metrics={})  # fmt: skip
    assert votes_naming(committed.commit, [signing.sign(moved, KEYS[0]), votes[1]]) == ()
