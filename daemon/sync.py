"""Catching up with the swarm: verify a commit's quorum certificate, then copy the version it
names (and every ancestor this node lacks) from peers into the local lineage, verifying every
hash on the way.

The checks, in order, for a `Commit` read from the DHT and the record it names (fetched by id
from a signer, since a record grows with the model and the DHT is for small values):

1. the version record decodes (`Version.from_bytes` re-derives its id) and is the commit's;
2. its merge spec names the round's `members` and the `proposal` hash;
3. at least `quorum(len(members))` distinct members signed a `Vote` for exactly this id, round,
   base (the version's parent) and proposal; each vote's Ed25519 signature verifies.

Only then are objects fetched: version records and tensor objects by id over the object
stream, each verified twice (by the transport against the requested id, and by
`LineageStore.write_object`, which re-hashes and checks the object's format). Versions are
indexed oldest first, so the store never holds a version whose parents or tensors are missing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Sequence

from p2pmodel.daemon.logs import get_logger
from p2pmodel.daemon.transport import FetchError, Transport
from p2pmodel.errors import P2PModelError
from p2pmodel.lineage import Annotations, LineageError, LineageStore, Version
from p2pmodel.protocols.errors import RemoteProtocolError as WireError
from p2pmodel.protocols.messages import MAX_RECORD, Commit, Vote
from p2pmodel.protocols.round import quorum
from p2pmodel.protocols.signing import open_signed

__all__ = ["SyncError", "CertifiedVersion", "quorum", "commit_signers", "verify_commit", "sync_version"]

logger = get_logger(__name__)

MAX_TENSOR_OBJECT = 1 << 34  # bytes: the largest tensor object we accept from a peer (16 GiB)
_FETCH_CONCURRENCY = 4  # object streams open at once while syncing


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
        names = sorted({k for v in self.votes for k in v.metrics})
        out = {}
        for k in names:
            xs = sorted(v.metrics[k] for v in self.votes if k in v.metrics)
            out[k] = xs[len(xs) // 2]
        return out

    def annotations(self) -> Annotations:
        cert = {"round": self.round, "votes": [bytes(e) for e in self.certificate]}
        return Annotations(metrics=self.metrics(), certificate=cert)


def commit_signers(commit: Commit) -> list[str]:
    """Peer ids whose votes in `commit`'s certificate verify: where to fetch its record from."""
    signers = []
    for envelope in commit.certificate:
        try:
            _, signer = open_signed(envelope, Vote)
        except WireError:
            continue
        signers.append(signer)
    return signers


def verify_commit(commit: Commit, record: bytes) -> CertifiedVersion:
    """Check the version `record` a commit names, and the commit's quorum certificate.

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
    merge: Any = version.merge or {}
    members = tuple(merge.get("members") or ())
    proposal = merge.get("proposal")
    if not members or not isinstance(proposal, str):
        raise SyncError(vid, "its merge spec names no members or proposal")
    if version.round != commit.round or len(version.parents) != 1:
        raise SyncError(vid, f"round {version.round} / {len(version.parents)} parents do not match the commit")
    votes: dict[str, Vote] = {}
    for envelope in commit.certificate:
        try:
            vote, signer = open_signed(envelope, Vote)
        except WireError:
            continue  # one bad signature does not void the others
        if (
            signer in members
            and vote.version_id == vid
            and vote.round == commit.round
            and vote.base_version == version.parents[0]
            and vote.proposal_hash == proposal
        ):
            votes[signer] = vote
    need = quorum(len(members))
    if len(votes) < need:
        raise SyncError(vid, f"certificate holds {len(votes)} valid votes of the {need} needed")
    return CertifiedVersion(version, commit.round, members, tuple(votes.values()), tuple(commit.certificate))


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
    """Make `target` (and its missing ancestors) local and point `branch` at it.

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
        if v.id in seen or store.index.has_version(v.id):
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
    sem = asyncio.Semaphore(_FETCH_CONCURRENCY)

    async def need(oid: str) -> None:
        if await asyncio.to_thread(store.has_object, oid):
            return
        async with sem:
            data = await _fetch(transport, peers, oid, MAX_TENSOR_OBJECT, "tensor")
        try:
            await asyncio.to_thread(store.write_object, oid, data)
        except LineageError as e:
            raise SyncError(oid, f"object failed verification ({e})") from None

    for v in reversed(chain):  # oldest first: parents are indexed before children
        await asyncio.gather(*(need(oid) for oid in v.referenced_objects()))
        ann = target.annotations() if v.id == target.id and target.votes else None
        try:
            await asyncio.to_thread(store.put_version, v, ann)
        except LineageError as e:
            raise SyncError(v.id, str(e)) from None
    if target.votes and target.id not in seen:  # already held: add what the certificate proves
        await asyncio.to_thread(store.annotate, target.id, metrics=target.metrics(), certificate=target.annotations().certificate)
    if branch is not None:
        await asyncio.to_thread(store.set_ref, branch, target.id)
    if chain:
        logger.info("synced", version=target.id[:12], round=target.round, added=len(chain))
    return len(chain)
