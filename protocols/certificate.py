"""The commit rule, written once: when does a certificate (signed votes) commit a version?

The state machine (`round.py`), the daemon's sync and a joining node all call these
functions; there is no other place that counts votes.

A certificate commits version `V` of round `r`, built on `B` from proposal `P`, when

1. every vote in it that counts is signed by its voter and names exactly (r, B, P, V);
2. at least ``ceil(2/3 * |M|)`` of P's members M signed (when M is known), AND
3. at least ``ceil(2/3 * |E|)`` of the round's electorate E signed, where E is the member
   list of the proposal that committed B (for the seed: the seeder).

Rule 3 is what makes the rule safe: two quorums of one fixed E intersect in an honest peer
that votes once per round (Raft's joint consensus). Rule 2 alone is not: a liar naming
itself as the only member "commits" anything.

A peer that cannot check rule 3 for a commit (it is behind: B is not its head) accepts it
only when at least ``|E| - ceil(2/3 |E|) + 1`` of *its own* electorate signed (`vouches`),
so that one honest peer it already trusts vouches for the chain in between; a joiner that
holds the whole chain checks every link instead (`verify_chain`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Collection, Iterable, Sequence

from .errors import RemoteProtocolError
from .messages import Vote

__all__ = [
    "QUORUM",
    "quorum",
    "weak_quorum",
    "Link",
    "CertificateError",
    "open_certificate",
    "commits",
    "vouches",
    "check_link",
    "verify_chain",
]

QUORUM = Fraction(2, 3)

OpenVote = Callable[[bytes], tuple[Vote, str]]


def quorum(n: int, share: Fraction = QUORUM) -> int:
    """Signatures needed among `n` peers: ceil(share * n) (0 for n == 0)."""
    return math.ceil(share * n)


def weak_quorum(n: int, share: Fraction = QUORUM) -> int:
    """Smallest count of `n` peers sure to include an honest one when fewer than n - quorum + 1 lie."""
    return n - quorum(n, share) + 1


class CertificateError(RemoteProtocolError):
    """A certificate does not commit what it claims. Fields: `version_id`, `reason`."""

    def __init__(self, version_id: str, reason: str):
        self.version_id, self.reason = version_id, reason
        super().__init__(f"certificate of {version_id[:12]}: {reason}")


@dataclass(frozen=True)
class Link:
    """One committed version as its certificate must name it."""

    round: int
    version_id: str
    base: str  # the parent version
    proposal_hash: str
    members: frozenset[str]  # the proposal's members: the next round's electorate


def _default_open_vote(data: bytes) -> tuple[Vote, str]:
    from .signing import open_signed

    msg, signer = open_signed(data, Vote)
    return msg, signer  # type: ignore[return-value]


def open_certificate(envelopes: Iterable[bytes], open_vote: OpenVote | None = None) -> tuple[dict[str, Vote], int]:
    """The votes of a certificate whose signature verifies and whose signer is the voter.

    Returns `({voter: vote}, bad)`, where `bad` counts entries that did not verify (one bad
    entry does not void the others).
    """
    open_vote = open_vote or _default_open_vote
    votes: dict[str, Vote] = {}
    bad = 0
    for data in envelopes:
        try:
            vote, signer = open_vote(data)
        except RemoteProtocolError:
            bad += 1
            continue
        if vote.voter != signer:
            bad += 1
            continue
        votes[vote.voter] = vote
    return votes, bad


def commits(
    signers: Collection[str], *, electorate: Collection[str], members: Collection[str] | None, share: Fraction = QUORUM
) -> bool:
    """Rules 2 and 3: a quorum of the members (skipped while unknown) and of the electorate."""
    s = set(signers)
    if len(s & set(electorate)) < quorum(len(electorate), share) or not electorate:
        return False
    return members is None or len(s & set(members)) >= quorum(len(members), share)


def vouches(signers: Collection[str], electorate: Collection[str], share: Fraction = QUORUM) -> bool:
    """At least one honest peer of `electorate` signed (for commits we cannot check fully)."""
    return bool(electorate) and len(set(signers) & set(electorate)) >= weak_quorum(len(electorate), share)


def check_link(
    link: Link, votes: dict[str, Vote], electorate: Collection[str], share: Fraction = QUORUM
) -> tuple[Vote, ...]:
    """Rules 1-3 for one version: the votes that commit it, sorted by voter.

    Raises:
        CertificateError: the votes for exactly this link make no double quorum.
    """
    good = {
        voter: v
        for voter, v in votes.items()
        if (v.round, v.base_version, v.proposal_hash, v.version_id)
        == (link.round, link.base, link.proposal_hash, link.version_id)
    }
    if not commits(good, electorate=electorate, members=link.members, share=share):
        need_e = quorum(len(electorate), share)
        need_m = quorum(len(link.members), share)
        have_e = len(set(good) & set(electorate))
        have_m = len(set(good) & link.members)
        raise CertificateError(
            link.version_id,
            f"{have_e} of the {need_e} electorate votes and {have_m} of the {need_m} member votes needed",
        )
    return tuple(good[k] for k in sorted(good))


def verify_chain(
    chain: Sequence[tuple[Link, Sequence[bytes]]],
    electorate: Collection[str],
    share: Fraction = QUORUM,
    open_vote: OpenVote | None = None,
) -> frozenset[str]:
    """Check every link of a chain, oldest first, starting from a trusted `electorate`.

    Each link's certificate must commit it under the electorate its parent fixed; the
    link's members become the next electorate. Returns the electorate after the last link.

    Raises:
        CertificateError: a link is not committed, or does not build on the previous one.
    """
    current = frozenset(electorate)
    previous: str | None = None
    for link, envelopes in chain:
        if previous is not None and link.base != previous:
            raise CertificateError(link.version_id, f"builds on {link.base[:12]}, not on {previous[:12]}")
        votes, _ = open_certificate(envelopes, open_vote)
        check_link(link, votes, current, share)
        current, previous = link.members, link.version_id
    return current
