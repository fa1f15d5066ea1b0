"""A joiner accepts a head only through the commit rule, chained from the electorate it trusts.

Two real transports (hivemind DHT + p2pd on 127.0.0.1): a "veteran" holds a lineage of three
committed rounds, each certified by real Ed25519 votes, where the founder signed only the
first (it left after round 0). A fresh node holding only the seed fetches the head Commit's
certificate by the hash the Commit names, checks every link, using version records fetched by
hash and past certificates fetched over `/p2pmodel/certificate/1`, and accepts the head. A head
forged by a fresh key that names itself as the only member is refused, as is a chain whose
middle certificate is missing. A peer serving other bytes for a certificate is skipped for the
next one; when nobody serves the blob a Commit names (its publisher left), the veteran's own
certificate of that version, fetched by version id, is checked instead.
"""

from __future__ import annotations

import hashlib

import pytest
import pytest_asyncio
import torch

from p2pmodel.daemon.certificates import serve_certificates
from p2pmodel.daemon.sync import ServedCertificates, SyncError, fetch_commit_certificate, verify_by_chain, verify_commit
from p2pmodel.daemon.transport import Transport
from p2pmodel.lineage import Annotations, LineageStore, Version
from p2pmodel.protocols import signing
from p2pmodel.protocols.certificate import certificate_limit, make_commit
from p2pmodel.protocols.messages import Vote

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.multiprocess]

KEYS = [signing.PeerIdentity.from_seed(hashlib.sha256(f"chain-{i}".encode()).digest()) for i in range(6)]
IDS = [k.peer_id for k in KEYS]
FOUNDER = IDS[0]
PROPOSAL = "9f" * 32


def _round(store: LineageStore, parent: str, r: int, members: list[int], signers: list[int]) -> tuple[Version, list[bytes]]:
    t = {"w": torch.full((3,), float(r + 1))}
    v = Version(
        parents=(parent,), tensors={k: store.put_tensor(x) for k, x in t.items()}, message=f"round {r}", time=float(r),
        round=r, merge={"members": sorted(IDS[i] for i in members), "proposal": PROPOSAL},
    )  # fmt: skip
    votes = [
        signing.sign(Vote(round=r, base_version=parent, proposal_hash=PROPOSAL, version_id=v.id, voter=IDS[i], metrics={}), KEYS[i])
        for i in signers
    ]
    store.put_version(v, Annotations(metrics={}, certificate={"round": r, "votes": votes}), "main")
    return v, votes


@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    """seed -> r0 (members 0,1,2; founder signs) -> r1 (1,2,3) -> r2 (1,2,3): founder gone after r0."""
    path = tmp_path_factory.mktemp("veteran")
    store = LineageStore.init(path)
    seed = store.commit({"w": torch.zeros(3)}, parents=(), message="seed", time=0.0)
    v0, _ = _round(store, seed.id, 0, [0, 1, 2], [0, 1])
    v1, _ = _round(store, v0.id, 1, [1, 2, 3], [1, 2])
    v2, votes2 = _round(store, v1.id, 2, [1, 2, 3], [2, 3])
    yield store, seed, [v0, v1, v2], votes2
    store.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def veteran(lineage):
    store = lineage[0]
    t = await Transport.create()
    t.add_source(lambda oid: store.read_object(oid) if store.has_object(oid) else None)
    await serve_certificates(t, store)
    yield t
    await t.shutdown()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def joiner(veteran):
    t = await Transport.create(initial_peers=await veteran.visible_maddrs())
    yield t
    await t.shutdown()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def liar(veteran):
    """A peer that answers every object request with bytes of its own: `answer["bytes"]`."""
    t = await Transport.create(initial_peers=await veteran.visible_maddrs())
    answer = {"bytes": b"not the certificate you asked for"}
    t.add_source(lambda oid: answer["bytes"])
    yield t, answer
    await t.shutdown()


async def test_a_fresh_joiner_checks_every_link_and_accepts_the_head(lineage, veteran, joiner, tmp_path):
    store, seed, versions, votes2 = lineage
    head = versions[-1]
    published = make_commit(2, head.id, votes2)
    ServedCertificates(veteran).serve(published)  # the publisher serves what its Commit names
    commit = await fetch_commit_certificate(joiner, published.commit, [veteran.peer_id.to_base58()])
    assert commit == published
    record = store.read_object(head.id)
    # the founder did not sign the head: vouching alone cannot accept it
    with pytest.raises(SyncError, match="vouches"):
        verify_commit(commit, record, electorate=frozenset({FOUNDER}), head=seed.id)
    got = await verify_by_chain(joiner, commit, record, head=seed.id,
                                electorate=frozenset({FOUNDER}), peers=[veteran.peer_id.to_base58()])  # fmt: skip
    assert got.id == head.id and set(got.members) == {IDS[1], IDS[2], IDS[3]}
    assert joiner.counters.snapshot()["certificate"]["received"] > 0


async def test_a_forged_single_member_head_is_refused(lineage, veteran, joiner, tmp_path):
    store, seed, _, _ = lineage
    liar = signing.PeerIdentity.from_seed(b"\x07" * 32)
    forged = Version(parents=(seed.id,), tensors={"w": store.put_tensor(torch.ones(3))}, message="mine now",
                     time=1.0, round=10**6, merge={"members": [liar.peer_id], "proposal": PROPOSAL})  # fmt: skip
    store.write_object(forged.id, forged.to_bytes())  # served like any record
    vote = signing.sign(Vote(round=10**6, base_version=seed.id, proposal_hash=PROPOSAL, version_id=forged.id,
                             voter=liar.peer_id, metrics={}), liar)  # fmt: skip
    commit = make_commit(10**6, forged.id, [vote])
    with pytest.raises(SyncError):
        verify_commit(commit, forged.to_bytes(), electorate=frozenset({FOUNDER}), head=seed.id)
    with pytest.raises(SyncError):
        await verify_by_chain(joiner, commit, forged.to_bytes(), head=seed.id,
                              electorate=frozenset({FOUNDER}), peers=[veteran.peer_id.to_base58()])  # fmt: skip


async def test_a_chain_with_a_link_nobody_can_certify_is_refused(lineage, veteran, joiner, tmp_path):
    store, seed, versions, votes2 = lineage
    store.annotate(versions[1].id, certificate={"round": 1, "votes": []})  # the veteran lost r1's certificate
    commit = make_commit(2, versions[2].id, votes2)
    with pytest.raises(SyncError, match="certificate"):
        await verify_by_chain(joiner, commit, store.read_object(versions[2].id), head=seed.id,
                              electorate=frozenset({FOUNDER}), peers=[veteran.peer_id.to_base58()])  # fmt: skip


async def test_a_peer_serving_other_bytes_for_a_certificate_is_skipped_for_the_next(lineage, veteran, joiner, liar):
    _, _, versions, votes2 = lineage
    published = make_commit(2, versions[2].id, votes2)
    ServedCertificates(veteran).serve(published)
    peers = [liar[0].peer_id.to_base58(), veteran.peer_id.to_base58()]
    assert await fetch_commit_certificate(joiner, published.commit, peers) == published
    with pytest.raises(SyncError, match="not to the requested id"):
        await fetch_commit_certificate(joiner, published.commit, peers[:1])


async def test_a_peer_offering_more_than_the_signers_can_take_is_refused(lineage, joiner, liar):
    _, _, versions, votes2 = lineage
    published = make_commit(2, versions[2].id, votes2)
    t, answer = liar
    answer["bytes"] = b"x" * (certificate_limit(published.commit.signers) + 1)
    try:
        with pytest.raises(SyncError, match="exceeds the limit"):
            await fetch_commit_certificate(joiner, published.commit, [t.peer_id.to_base58()])
    finally:
        answer["bytes"] = b"not the certificate you asked for"


async def test_when_nobody_serves_the_named_blob_a_holder_of_the_version_serves_its_certificate(lineage, veteran, joiner):
    store, _, versions, votes2 = lineage
    gone = make_commit(2, versions[2].id, votes2[:1])  # its publisher left: nobody serves this blob
    got = await fetch_commit_certificate(joiner, gone.commit, [veteran.peer_id.to_base58()])
    assert got.certificate == make_commit(2, versions[2].id, votes2).certificate  # the veteran's copy
    # checked like any certificate: by the electorate the head before it fixed (r1's members)
    certified = verify_commit(got, store.read_object(versions[2].id), electorate=frozenset(IDS[1:4]), head=versions[1].id)
    assert certified.id == versions[2].id
