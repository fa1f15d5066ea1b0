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

A `Commit` record does not carry the certificate, only its hash and its signer count, so that
it stays a few hundred bytes at any number of signers (a DHT record is at most 64 KiB; signed
votes are ~0.4 kB each). The certificate is one content-addressed blob, `encode_certificate`:
the signed vote envelopes, each once, sorted by their bytes, as a msgpack array of bin. Whoever
needs to check the commit fetches the blob by hash and opens it with `certify`, which refuses
anything that is not exactly the blob the Commit names (size bounded by the signer count, hash,
shape, canonical form), and then applies the rule above to every vote, as before. The hash is
where to look, not what makes the commit safe: any votes that pass the rule prove it, so when
nobody serves that blob (its publisher left) a certificate of the same version from any peer
holding it will do (`votes_naming` keeps the votes that name the commit).

Why a blob fetched by hash and not an aggregate signature (BLS): votes carry each voter's own
metrics (the CI median, credits), so they are different messages and an aggregate would still
ship every message; the peer id is derived from the Ed25519 key, so BLS keys would need their
own announcement, proofs of possession and a persistent key registry for joiners; and the
well-kept pure-Python library (py_ecc) verifies an aggregate of 3 distinct messages in 0.67 s
on this machine, so ~4 min at 1,000 voters (Ed25519: 0.3 s for 1,000 votes), while the bound
ones (blspy, milagro-bls-binding) are thin wrappers tied to one ecosystem. A blob fetched by
hash keeps every signature checkable with the keys the votes already carry.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, ClassVar, Collection, Iterable, Sequence

import msgpack

from .errors import InvalidMessage, RemoteProtocolError
from .limits import MAX_CERTIFICATE, MAX_MEMBERS, MAX_SIGNED_VOTE
from .messages import Commit, Vote

__all__ = [
    "QUORUM",
    "quorum",
    "weak_quorum",
    "Link",
    "CertificateError",
    "open_certificate",
    "commits",
    "vouches",
    "may_commit",
    "check_link",
    "verify_chain",
    "MalformedCertificate",
    "CertifiedCommit",
    "certificate_limit",
    "encode_certificate",
    "make_commit",
    "certify",
    "votes_naming",
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


def may_commit(signers: int, electorate: Collection[str], share: Fraction = QUORUM) -> bool:
    """Whether `signers` votes could pass `commits` or `vouches` under `electorate` (a quorum is at
    least a weak quorum): a Commit claiming fewer is not worth fetching the certificate of."""
    return bool(electorate) and signers >= weak_quorum(len(electorate), share)


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


# --------------------------------------------------------------------------------------
# The certificate blob: what a Commit names by hash
# --------------------------------------------------------------------------------------


class MalformedCertificate(CertificateError):
    """Bytes served as a Commit's certificate are not the blob it names (too large, another
    hash, not an array of envelopes, not canonical, another count). Fields: `version_id`,
    `certificate_id`, `reason`. Whose fault: a peer that served other bytes than the hash
    names (try another); when the hash matches, the Commit's publisher (refuse the commit)."""

    def __init__(self, version_id: str, certificate_id: str, reason: str):
        self.certificate_id = certificate_id
        super().__init__(version_id, reason)


@dataclass(frozen=True)
class CertifiedCommit:
    """A Commit together with the certificate its `certificate_id` names, as signed vote envelopes.

    Built by `make_commit` (from our own votes) or `certify` (from fetched bytes), never by hand,
    so `certificate` is always the blob the Commit names. It is not a wire message: the state
    machine and sync take it where they took a Commit that carried its votes.
    """

    TYPE: ClassVar[str] = Commit.TYPE

    commit: Commit
    certificate: tuple[bytes, ...]  # signed Vote envelopes, each once, sorted by their bytes

    @property
    def round(self) -> int:
        return self.commit.round

    @property
    def version_id(self) -> str:
        return self.commit.version_id

    def blob(self) -> bytes:
        """The certificate's bytes, as served by hash (`commit.certificate_id`)."""
        return encode_certificate(self.certificate)


def certificate_limit(signers: int) -> int:
    """Largest certificate blob of `signers` votes, in bytes: the most a reader fetches."""
    return min(MAX_CERTIFICATE, 5 + signers * (3 + MAX_SIGNED_VOTE))


def encode_certificate(envelopes: Iterable[bytes]) -> bytes:
    """The canonical certificate blob: each envelope once, sorted by its bytes, as a msgpack array
    of bin. One set of votes has one blob, so one hash, whoever builds it.

    Raises:
        InvalidMessage: an envelope is empty or larger than a signed vote, or there are more
            than MAX_MEMBERS of them (our bug: a certificate is built from checked votes).
    """
    entries = sorted({bytes(e) for e in envelopes})
    if len(entries) > MAX_MEMBERS:
        raise InvalidMessage("certificate", "votes", f"{len(entries)} votes, more than {MAX_MEMBERS}")
    if any(not 1 <= len(e) <= MAX_SIGNED_VOTE for e in entries):
        raise InvalidMessage("certificate", "votes", f"an envelope outside 1..{MAX_SIGNED_VOTE} bytes")
    return msgpack.packb(entries, use_bin_type=True)


def make_commit(round_: int, version_id: str, envelopes: Iterable[bytes]) -> CertifiedCommit:
    """The Commit record naming the certificate made of `envelopes`, with that certificate.

    Raises:
        InvalidMessage: no envelope, or one that `encode_certificate` refuses.
    """
    blob = encode_certificate(envelopes)
    certificate = tuple(msgpack.unpackb(blob, raw=False, use_list=False))
    commit = Commit(round=round_, version_id=version_id, certificate_id=hashlib.sha256(blob).hexdigest(),
                    signers=len(certificate))  # fmt: skip
    return CertifiedCommit(commit, certificate)


def certify(commit: Commit, data: bytes) -> CertifiedCommit:
    """Open the certificate blob `data` that `commit` names. Checks its form, not its votes:
    the commit rule (`check_link`, `commits`) is applied to the result by the caller.

    Raises:
        MalformedCertificate: more bytes than `commit.signers` votes can take, another hash,
            not a msgpack array of 1..MAX_SIGNED_VOTE-byte bins, not canonical (unsorted,
            repeated, long-form headers, trailing bytes), or not `commit.signers` entries.
    """

    def bad(reason: str) -> MalformedCertificate:
        return MalformedCertificate(commit.version_id, commit.certificate_id, reason)

    data = bytes(data)
    limit = certificate_limit(commit.signers)
    if len(data) > limit:
        raise bad(f"{len(data)} bytes, more than {commit.signers} votes take ({limit})")
    got = hashlib.sha256(data).hexdigest()
    if got != commit.certificate_id:
        raise bad(f"the bytes hash to {got[:12]}, not to the certificate the commit names")
    try:
        entries = msgpack.unpackb(
            data, raw=False, use_list=False, max_bin_len=MAX_SIGNED_VOTE, max_array_len=MAX_MEMBERS,
            max_str_len=0, max_map_len=0, max_ext_len=0,
        )  # fmt: skip
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as e:
        raise bad(f"not msgpack ({type(e).__name__})") from None
    if not isinstance(entries, tuple) or not all(isinstance(e, bytes) for e in entries):
        raise bad("not an array of signed vote envelopes")
    if len(entries) != commit.signers:
        raise bad(f"{len(entries)} votes, the commit says {commit.signers}")
    try:
        canonical = encode_certificate(entries) == data
    except InvalidMessage as e:
        raise bad(e.reason) from None
    if not canonical:
        raise bad("not in canonical form (each envelope once, sorted, shortest headers)")
    return CertifiedCommit(commit, entries)


def votes_naming(commit: Commit, envelopes: Iterable[bytes], open_vote: OpenVote | None = None) -> tuple[bytes, ...]:
    """The envelopes whose vote verifies and names `commit`'s round and version, when those votes
    agree on one base and proposal (else none: votes for one version never differ there).

    For a certificate of the version that did not come by the commit's hash (another peer's
    copy, by version id): what is left is checked by the commit rule like any other.
    """
    open_vote = open_vote or _default_open_vote
    kept: list[bytes] = []
    links: set[tuple[str, str]] = set()
    for data in envelopes:
        try:
            vote, signer = open_vote(data)
        except RemoteProtocolError:
            continue
        if vote.voter == signer and (vote.round, vote.version_id) == (commit.round, commit.version_id):
            kept.append(bytes(data))
            links.add((vote.base_version, vote.proposal_hash))
    return tuple(kept) if len(links) == 1 else ()
