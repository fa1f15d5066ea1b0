"""Catching up with the swarm: verify a commit's quorum certificate, then copy the version it
names (and every ancestor this node lacks) from peers into the local lineage, verifying every
hash on the way.

The checks, in order, for a `Commit` read from the DHT, the certificate it names (fetched by
hash from its publisher or any peer holding it, else a certificate of the version by version
id: `fetch_commit_certificate`) and the record it names (fetched by id from a signer, since a
record grows with the model and the DHT is for small values):

0. the certificate is exactly the blob the commit names (`protocols.certificate.certify`), or
   the votes of another that name the commit (`votes_naming`);
1. the version record decodes (`Version.from_bytes` re-derives its id) and is the commit's;
2. its merge spec names the round's `members` and the `proposal` hash;
3. the certificate satisfies the commit rule of `protocols/certificate.py` (the same function
   the state machine calls) against the electorate this node already trusts.

Only then are objects fetched: version records and tensor objects by id over the object
stream, each verified twice (by the transport against the requested id, and by
`LineageStore.write_object`, which re-hashes and checks the object's format). Versions are
indexed oldest first, so the store never holds a version whose parents or tensors are missing.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

from p2pmodel.daemon.certificates import CertificateFetchError, fetch_certificate
from p2pmodel.daemon.logs import get_logger
from p2pmodel.daemon.transport import FetchError, Transport
from p2pmodel.errors import P2PModelError
from p2pmodel.lineage import Annotations, LineageError, LineageStore, Version
from p2pmodel.ci import median_metrics
from p2pmodel.protocols.certificate import (
    CertificateError,
    CertifiedCommit,
    Link,
    MalformedCertificate,
    certificate_limit,
    certify,
    check_link,
    make_commit,
    open_certificate,
    quorum,
    verify_chain,
    votes_naming,
    vouches,
)
from p2pmodel.protocols.messages import MAX_RECORD, Commit, Vote

__all__ = [
    "SyncError", "CertifiedVersion", "quorum", "commit_signers", "link_of", "verify_commit", "verify_by_chain", "sync_version",
    "fetch_seed", "fetch_commit_certificate", "ServedCertificates",
]  # fmt: skip

logger = get_logger(__name__)

MAX_TENSOR_OBJECT = 1 << 34  # bytes: the largest tensor object we accept from a peer (16 GiB)
_FETCH_CONCURRENCY = 4  # object streams open at once while syncing
CERTIFICATE_TIMEOUT = 30.0  # seconds one peer may take to serve a commit's certificate (<= 2.2 MB)


class SyncError(P2PModelError):
    """A commit or version from the swarm could not be verified or fetched. Fields: version_id, reason."""

    def __init__(self, version_id: str, reason: str):
        self.version_id, self.reason = version_id, reason
        super().__init__(f"cannot sync version {version_id[:12]}: {reason}")


@dataclass(frozen=True)
class CertifiedVersion:
    """A version with the votes that committed it (checked by `verify_commit`)."""

    version: Version
    round: int
    members: tuple[str, ...]
    votes: tuple[Vote, ...]
    certificate: tuple[bytes, ...]  # the signed vote envelopes, as received

    @property
    def id(self) -> str:
        return self.version.id

    def metrics(self) -> dict[str, float]:
        """Per-metric median over the voters (peers measure on their own hardware)."""
        return median_metrics([v.metrics for v in self.votes])

    def annotations(self) -> Annotations:
        cert = {"round": self.round, "votes": [bytes(e) for e in self.certificate]}
        return Annotations(metrics=self.metrics(), certificate=cert)


def commit_signers(commit: CertifiedCommit) -> list[str]:
    """Peer ids whose votes in `commit`'s certificate verify: where to fetch its record from."""
    return sorted(open_certificate(commit.certificate)[0])


def link_of(version: Version) -> Link:
    """What a certificate of `version` must name (from its record's merge spec).

    Raises:
        SyncError: the record is not a round's version (no members, proposal or single parent).
    """
    merge: Any = version.merge or {}
    members = merge.get("members") or ()
    proposal = merge.get("proposal")
    if not members or not isinstance(proposal, str) or version.round is None or len(version.parents) != 1:
        raise SyncError(version.id, "not a committed round's version (members, proposal, round or parent missing)")
    return Link(version.round, version.id, version.parents[0], proposal, frozenset(members))


def verify_commit(commit: CertifiedCommit, record: bytes, *, electorate: frozenset[str], head: str) -> CertifiedVersion:
    """Check the version `record` a commit names, and the commit's certificate, by the commit rule.

    `head` and `electorate` are what this node already trusts: its head version and the
    electorate that head fixed. A commit on `head` must carry the full double quorum
    (`protocols.certificate.check_link`); a commit further ahead must also be vouched for by
    a weak quorum of `electorate` (one peer we trust signed it). A head forged by fresh keys
    that name only themselves as members passes neither.

    Raises:
        SyncError: anything does not check.
    """
    try:
        version = Version.from_bytes(record)
    except LineageError as e:
        raise SyncError(commit.version_id, f"bad version record ({e})") from None
    vid = version.id
    if vid != commit.version_id:
        raise SyncError(commit.version_id, f"the record served is version {vid[:12]}, not the one committed")
    link = link_of(version)
    if link.round != commit.round:
        raise SyncError(vid, f"round {link.round} does not match the commit's {commit.round}")
    votes, _ = open_certificate(commit.certificate)
    try:
        if link.base == head:
            good = check_link(link, votes, electorate)
        else:
            good = check_link(link, votes, link.members)
            if not vouches([v.voter for v in good], electorate):
                raise CertificateError(vid, "no peer of our electorate vouches for it (a chain we cannot check)")
    except CertificateError as e:
        raise SyncError(vid, e.reason) from None
    return CertifiedVersion(version, commit.round, tuple(sorted(link.members)), good, tuple(commit.certificate))


MAX_CHAIN = 100_000  # versions a joiner walks back to its own head before giving up


async def verify_by_chain(
    transport: Transport,
    commit: CertifiedCommit,
    record: bytes,
    *,
    head: str,
    electorate: frozenset[str],
    peers: Sequence[str],
) -> CertifiedVersion:
    """Accept a commit far ahead of `head` by checking every link from `head` to it.

    Walks the version records back from the commit to `head` (each fetched by id, so each is
    what its child names), fetches each intermediate version's certificate, and checks the
    chain with `protocols.certificate.verify_chain` starting from `electorate`: each link
    certified by the electorate its parent fixed, the last one by the commit's certificate.
    This is how a new node joins long after the founder left, and why a forged head (fresh
    keys naming only themselves) is refused: its first link has no votes of the real electorate.

    Raises:
        SyncError: a record or certificate is missing, or a link does not check.
    """
    try:
        target = Version.from_bytes(record)
    except LineageError as e:
        raise SyncError(commit.version_id, f"bad version record ({e})") from None
    if target.id != commit.version_id:
        raise SyncError(commit.version_id, f"the record served is version {target.id[:12]}, not the one committed")
    chain = [target]
    while chain[-1].parents and chain[-1].parents[0] != head:
        if len(chain) > MAX_CHAIN or chain[-1].round is None:
            raise SyncError(commit.version_id, f"does not descend from our head {head[:12]}")
        parent = chain[-1].parents[0]
        data = await _fetch(transport, peers, parent, MAX_RECORD, "version")
        try:
            chain.append(Version.from_bytes(data))
        except LineageError as e:
            raise SyncError(parent, f"bad version record ({e})") from None
    if not chain[-1].parents:
        raise SyncError(commit.version_id, f"does not descend from our head {head[:12]}")
    chain.reverse()
    links = [link_of(v) for v in chain]
    certificates: list[Sequence[bytes]] = []
    current = electorate
    for link in links[:-1]:

        def commits_link(votes: list[bytes], link: Link = link, current: frozenset[str] = current) -> bool:
            try:
                check_link(link, open_certificate(votes)[0], current)
                return True
            except CertificateError:
                return False

        try:
            certificates.append(await fetch_certificate(transport, list(peers)[:8], link.version_id, commits_link))
        except CertificateFetchError as e:
            raise SyncError(link.version_id, e.reason) from None
        current = link.members
    certificates.append(commit.certificate)
    try:
        verify_chain(list(zip(links, certificates)), electorate)
    except CertificateError as e:
        raise SyncError(e.version_id, e.reason) from None
    votes, _ = open_certificate(commit.certificate)
    good = check_link(links[-1], votes, links[-2].members if len(links) > 1 else electorate)
    return CertifiedVersion(target, commit.round, tuple(sorted(links[-1].members)), good, tuple(commit.certificate))


async def fetch_commit_certificate(
    transport: Transport, commit: Commit, peers: Sequence[str], *, min_votes: int = 1
) -> CertifiedCommit:
    """The certificate `commit` names, by hash from the first of `peers` that serves it; failing
    that, a certificate of the same version by version id (`/p2pmodel/certificate/1`: every peer
    holding the version serves one) with at least `min_votes` votes naming the commit.

    By hash, a peer serving more than `commit.signers` votes' worth of bytes, or bytes of another
    hash, is refused by the transport (that peer's fault) and the next is asked; bytes of the
    right hash that are no certificate are the publisher's fault (every holder serves the same
    bytes), so the version's other certificates are asked for at once. Only the publisher and
    the peers that fetched its blob serve it, so the fallback is what keeps a commit usable after
    its publisher left. Either way the caller checks every vote by the commit rule.

    Raises:
        SyncError: no peer served a usable certificate.
    """
    peers = list(dict.fromkeys(peers))
    last = "no peer to ask"
    for peer in peers:
        try:
            data = await transport.call_fetch(
                peer, commit.certificate_id, max_size=certificate_limit(commit.signers),
                timeout=CERTIFICATE_TIMEOUT, kind="certificate",
            )  # fmt: skip
        except FetchError as e:
            logger.debug("certificate fetch failed, trying next peer", version=commit.version_id[:12], error=str(e))
            last = str(e)
            continue
        try:
            return certify(commit, data)
        except MalformedCertificate as e:
            logger.warning("a commit names a malformed certificate", version=commit.version_id[:12], error=e.reason)
            last = e.reason
            break
    found: list[tuple[bytes, ...]] = []

    def enough(envelopes: list[bytes]) -> bool:
        found.append(votes_naming(commit, envelopes))
        return len(found[-1]) >= max(min_votes, 1)

    try:
        await fetch_certificate(transport, peers, commit.version_id, enough)
    except CertificateFetchError as e:
        raise SyncError(commit.version_id, f"no peer served a certificate (by hash: {last}; by version: {e.reason})") from None
    return make_commit(commit.round, commit.version_id, found[-1])


class ServedCertificates:
    """The commit certificates this node serves by hash: the newest `keep` it published or fetched.

    A reader asks a Commit's publisher first, then any peer, and each fetched copy is served on.
    A peer's newer Commit replaces its older one in the DHT, so older certificates are dropped.
    """

    def __init__(self, transport: Transport, keep: int = 8):
        self._transport, self._keep = transport, keep
        self._held: deque[str] = deque()  # certificate ids, oldest first

    def serve(self, commit: CertifiedCommit) -> None:
        oid = self._transport.put_blob(commit.blob(), kind="certificate")
        if oid in self._held:
            self._held.remove(oid)
        self._held.append(oid)
        while len(self._held) > self._keep:
            self._transport.drop_blob(self._held.popleft())


async def _fetch(transport: Transport, peers: Sequence[str], oid: str, max_size: int, kind: str) -> bytes:
    try:
        return await transport.fetch_from_any(list(peers), oid, max_size=max_size, kind=kind)
    except FetchError as e:
        raise SyncError(oid, f"no peer served object {oid[:12]}: {e.reason}") from None


async def sync_version(
    transport: Transport,
    store: LineageStore,
    target: CertifiedVersion,
    peers: Sequence[str],
    *,
    branch: str | None = "main",
) -> int:
    """Make `target` local and point `branch` at it; its missing ancestors are indexed as records
    only (pruned versions: the commit chain, `log` and credits need no old tensors; any of them
    can be made whole later by fetching its objects and `put_version`). A shallow sync: a joiner
    fetches one model copy, not one per round it missed.

    Args:
        peers: libp2p ids of peers that may serve the objects, best first.
        branch: the branch to point at `target`; None indexes it without moving any ref.

    Returns:
        How many versions were added to the store.

    Raises:
        SyncError: an object could not be fetched from any peer, or did not verify.
    """
    chain: list[Version] = []
    frontier = [target.version]
    seen: set[str] = set()
    while frontier:  # newest first; stop at versions we already have
        v = frontier.pop()
        held = store.index.has_version(v.id) and not (v.id == target.id and store.index.is_pruned(v.id))
        if v.id in seen or held:
            continue
        seen.add(v.id)
        chain.append(v)
        for parent in v.parents:
            if not store.index.has_version(parent) and parent not in seen:
                record = await _fetch(transport, peers, parent, MAX_RECORD, "version")
                try:
                    frontier.append(Version.from_bytes(record))
                except LineageError as e:
                    raise SyncError(parent, f"bad version record ({e})") from None
    for v in reversed(chain):  # oldest first: parents are indexed before children
        whole = v.id == target.id
        if whole:
            await _fetch_objects(transport, store, v, peers)
        ann = target.annotations() if whole and target.votes else None
        try:
            await asyncio.to_thread(store.put_version, v, ann, pruned=not whole)
        except LineageError as e:
            raise SyncError(v.id, str(e)) from None
    if target.votes and target.id not in seen:  # already held: add what the certificate proves
        await asyncio.to_thread(store.annotate, target.id, metrics=target.metrics(), certificate=target.annotations().certificate)
    if branch is not None:
        await asyncio.to_thread(store.set_ref, branch, target.id)
    if chain:
        logger.info("synced", version=target.id[:12], round=target.round, added=len(chain))
    return len(chain)


async def _fetch_objects(transport: Transport, store: LineageStore, version: Version, peers: Sequence[str]) -> None:
    """Make every object `version` references local (tensors, files, optimizer state), each
    verified by the transport against its id and again by `LineageStore.write_object`."""
    sem = asyncio.Semaphore(_FETCH_CONCURRENCY)

    async def need(oid: str) -> None:
        if await asyncio.to_thread(store.has_intact_object, oid):
            return
        async with sem:
            data = await _fetch(transport, peers, oid, MAX_TENSOR_OBJECT, "tensor")
        try:
            await asyncio.to_thread(store.write_object, oid, data)
        except LineageError as e:
            raise SyncError(oid, f"object failed verification ({e})") from None

    await asyncio.gather(*(need(oid) for oid in version.referenced_objects()))


async def fetch_seed(transport: Transport, store: LineageStore, version_id: str, peers: Sequence[str]) -> Version:
    """Make an event's seed version local and point `main` at it (if `main` does not exist yet).

    The id comes from the event manifest, which its hash (the event id) vouches for, so the id
    is all the trust needed: the record and every object are fetched by id and verified. No
    certificate: a seed is no round's version.

    Raises:
        SyncError: no peer served an object, an object did not verify, or the record is not a
            root version (a seed has no parents).
    """
    if not store.index.has_version(version_id):
        record = await _fetch(transport, peers, version_id, MAX_RECORD, "version")
        try:
            version = Version.from_bytes(record)
        except LineageError as e:
            raise SyncError(version_id, f"bad version record ({e})") from None
        if version.id != version_id:
            raise SyncError(version_id, f"the record served is version {version.id[:12]}")
        if version.parents:
            raise SyncError(version_id, "not a seed version (it has parents)")
        await _fetch_objects(transport, store, version, peers)
        try:
            await asyncio.to_thread(store.put_version, version)
        except LineageError as e:
            raise SyncError(version_id, str(e)) from None
        logger.info("fetched the seed version", version=version_id[:12], tensors=len(version.tensors), files=len(version.files))
    if "main" not in store.branches():
        await asyncio.to_thread(store.set_ref, "main", version_id, None)
    return await asyncio.to_thread(store.get_version, version_id)
