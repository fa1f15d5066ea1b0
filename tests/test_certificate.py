"""The commit rule (protocols/certificate.py): one function that the state machine, sync and
joiners all call. A certificate commits a version only with a quorum of the proposal's members
AND of the electorate fixed by the previous commit; a chain is checked link by link."""

from __future__ import annotations

import hashlib

import pytest

from p2pmodel.protocols import signing
from p2pmodel.protocols.certificate import (
    CertificateError,
    Link,
    check_link,
    commits,
    open_certificate,
    quorum,
    verify_chain,
    vouches,
    weak_quorum,
)
from p2pmodel.protocols.messages import Vote

KEYS = [signing.PeerIdentity.from_seed(hashlib.sha256(f"cert-{i}".encode()).digest()) for i in range(8)]
IDS = [k.peer_id for k in KEYS]


def vote(i: int, link: Link, **over) -> bytes:
    fields = dict(round=link.round, base_version=link.base, proposal_hash=link.proposal_hash,
                  version_id=link.version_id, voter=IDS[i], metrics={"eval_loss": 2.0})  # fmt: skip
    fields.update(over)
    return signing.sign(Vote(**fields), KEYS[i])


def link(round_: int, vid: str, base: str, members) -> Link:
    return Link(round_, vid, base, "9f" * 32, frozenset(IDS[i] for i in members))


def test_quorum_sizes():
    assert [quorum(n) for n in (1, 2, 3, 4, 5, 6)] == [1, 2, 2, 3, 4, 4]
    assert [weak_quorum(n) for n in (1, 3, 4, 6)] == [1, 2, 2, 3]


def test_a_double_quorum_commits_and_a_member_only_quorum_does_not():
    e = {IDS[0], IDS[1], IDS[2]}
    assert commits({IDS[0], IDS[1]}, electorate=e, members={IDS[0], IDS[1], IDS[3]})
    # 2 of 3 members, but only 1 of the 3 electorate: refused
    assert not commits({IDS[0], IDS[3]}, electorate=e, members={IDS[0], IDS[3], IDS[4]})
    # members unknown yet: the electorate quorum alone
    assert commits({IDS[0], IDS[1]}, electorate=e, members=None)
    assert not commits({IDS[0]}, electorate=set(), members=None)


def test_vouching_needs_one_trusted_peer_beyond_the_liars_share():
    e = {IDS[i] for i in range(4)}
    assert not vouches({IDS[0]}, e)
    assert vouches({IDS[0], IDS[1]}, e)


def test_open_certificate_drops_tampered_votes_and_keeps_the_rest():
    lk = link(3, "aa" * 32, "bb" * 32, [0, 1, 2])
    tampered = bytearray(vote(1, lk))
    tampered[-1] ^= 1
    votes, bad = open_certificate([vote(0, lk), bytes(tampered), b"garbage"])
    assert set(votes) == {IDS[0]} and bad == 2


def test_check_link_counts_only_votes_for_exactly_this_version():
    lk = link(3, "aa" * 32, "bb" * 32, [0, 1, 2])
    electorate = {IDS[0], IDS[1], IDS[2]}
    votes, _ = open_certificate([vote(0, lk), vote(1, lk, version_id="cc" * 32), vote(2, lk, round=4)])
    with pytest.raises(CertificateError, match="1 of the 2 electorate votes"):
        check_link(lk, votes, electorate)
    votes, _ = open_certificate([vote(0, lk), vote(1, lk)])
    assert [v.voter for v in check_link(lk, votes, electorate)] == sorted([IDS[0], IDS[1]])


def test_a_forged_single_member_head_does_not_commit_under_the_real_electorate():
    # the attack: a fresh key names itself as the only member and signs its own version
    forged = link(10**6, "ff" * 32, "bb" * 32, [7])
    votes, _ = open_certificate([vote(7, forged)])
    check_link(forged, votes, forged.members)  # consistent with itself ...
    with pytest.raises(CertificateError):
        check_link(forged, votes, {IDS[0]})  # ... but not under the seeder's electorate
    assert not vouches(votes, {IDS[0]})


def test_a_chain_is_checked_link_by_link_from_the_seed_electorate():
    seed = "00" * 32
    a = link(0, "a1" * 32, seed, [0, 1, 2])  # seeder 0 alone is the genesis electorate
    b = link(1, "b2" * 32, a.version_id, [1, 2, 3])
    c = link(2, "c3" * 32, b.version_id, [1, 2, 3])
    chain = [(a, [vote(0, a), vote(1, a)]), (b, [vote(1, b), vote(2, b)]), (c, [vote(2, c), vote(3, c)])]
    assert verify_chain(chain, {IDS[0]}) == c.members
    # a link signed by peers the previous link did not elect is refused
    c_bad = link(2, "c3" * 32, b.version_id, [5, 6])
    with pytest.raises(CertificateError):
        verify_chain([*chain[:2], (c_bad, [vote(5, c_bad), vote(6, c_bad)])], {IDS[0]})
    # a link that does not build on the previous one is refused
    with pytest.raises(CertificateError, match="builds on"):
        verify_chain([chain[0], chain[2]], {IDS[0]})
