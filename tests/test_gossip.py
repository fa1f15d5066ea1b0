"""Push delivery of signed records (daemon/gossip.py).

The framing is pure and checked without sockets: round trips (plain and deflated), batching
within bounds, and a typed `FrameError` for every way a frame can break, a zlib bomb included
(read from an in-memory StreamReader too, so a bound is enforced before the bytes it announces
are read).

The rest runs real p2pd daemons on 127.0.0.1, with the node's own record check:

- a pushed record arrives at another transport, and records queued together share a frame;
- garbage, an oversized record, a truncated frame, an unsigned, a forged and a wrong-signer
  envelope are refused and counted by reason, and the receiver keeps serving;
- a peer flooding records is cut off (its frames answered RATE_LIMITED), while another peer's
  record still gets through;
- a push to a peer that is gone fails, is counted, and stays queued for a retry.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import struct
import time
import zlib

import pytest
import pytest_asyncio

from p2pmodel.daemon.gossip import (
    COMPRESSED,
    GOSSIP_PROTOCOL,
    MAGIC,
    FrameError,
    Gossip,
    GossipLimits,
    PushStatus,
    decode_frame,
    encode_frame,
    read_frame,
    split_frames,
)
from p2pmodel.protocols.signing import signed_by
from p2pmodel.daemon.transport import Transport, TransportLimits
from p2pmodel.protocols.messages import Departure, encode
from p2pmodel.protocols.signing import SIGNING_DOMAIN, PeerIdentity, _pack_envelope, sign

BOUNDS = dict(max_records=4, max_record_bytes=100, max_frame_bytes=300)


def _departure(identity: PeerIdentity, round_: int) -> bytes:
    return sign(Departure(peer_id=identity.peer_id, round=round_, time=1.0), identity)


async def _eventually(predicate, timeout: float = 20.0, what: str = "condition"):
    """Wait until `predicate()` is truthy (checked every 50 ms); fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.05)


# ------------------------------------------------------------------------------ framing, no sockets


@pytest.mark.parametrize("compress", [False, True])
def test_frame_round_trip(compress):
    records = [b"a", b"", os.urandom(100), b"xyz" * 20]
    assert decode_frame(encode_frame(records, compress=compress), **BOUNDS) == records


def test_compression_is_used_only_when_it_shrinks_the_frame():
    me = PeerIdentity.generate()
    pair = [_departure(me, 1), _departure(me, 2)]  # nearly equal records, as announcements for r and r+1
    assert encode_frame(pair)[8] == COMPRESSED
    assert len(encode_frame(pair)) < 0.75 * len(encode_frame(pair, compress=False))
    noise = [os.urandom(90)]
    assert encode_frame(noise) == encode_frame(noise, compress=False)  # incompressible: sent as is


def test_split_frames_respects_the_record_and_byte_bounds():
    records = [bytes([i]) * 60 for i in range(10)]
    batches = split_frames(records, max_records=4, max_frame_bytes=300)
    assert [r for b in batches for r in b] == records  # order kept, nothing lost
    for batch in batches:
        assert len(batch) <= 4 and len(encode_frame(batch)) <= 300
    with pytest.raises(ValueError):
        split_frames([b"x" * 400], max_records=4, max_frame_bytes=300)


def _frame(count: int, lengths: list[int], magic: bytes = MAGIC, flags: int = 0) -> bytes:
    return struct.pack(">8sBH", magic, flags, count) + b"".join(struct.pack(">I", n) + b"r" * n for n in lengths)


def _packed(count: int, body: bytes, *, packed_len: int | None = None) -> bytes:
    """A compressed frame whose zlib stream inflates to `body` (which may break the bounds)."""
    packed = zlib.compress(body)
    n = len(packed) if packed_len is None else packed_len
    return struct.pack(">8sBHI", MAGIC, COMPRESSED, count, n) + packed


_BOMB = _packed(1, struct.pack(">I", 50) + b"\0" * 50 + b"\0" * 10_000)  # 100 bytes that inflate to 10 kB


@pytest.mark.parametrize(
    "data, reason",
    [
        (_frame(1, [3], magic=b"NOTMAGIC"), "bad_magic"),
        (_frame(0, []), "empty"),
        (_frame(5, [1] * 5), "too_many_records"),
        (_frame(1, [101]), "record_too_large"),
        (_frame(3, [95, 95, 95]), "frame_too_large"),
        (_frame(2, [3]), "truncated"),
        (_frame(1, [3])[:-1], "truncated"),
        (b"P2P", "truncated"),
        (_frame(1, [3]) + b"extra", "trailing_bytes"),
        (_frame(1, [3], flags=0x02), "bad_flags"),
        (_BOMB, "frame_too_large"),
        (_packed(1, struct.pack(">I", 3) + b"abc", packed_len=400), "frame_too_large"),
        (_packed(1, struct.pack(">I", 3) + b"abc")[:-2], "truncated"),
        (struct.pack(">8sBHI", MAGIC, COMPRESSED, 1, 12) + b"not zlib at all", "trailing_bytes"),
        (struct.pack(">8sBHI", MAGIC, COMPRESSED, 1, 15) + b"not zlib at all", "bad_compression"),
        (_packed(1, struct.pack(">I", 3) + b"abc" + b"junk"), "trailing_bytes"),
        (_packed(2, struct.pack(">I", 3) + b"abc"), "truncated"),
    ],
)
def test_decode_frame_raises_a_typed_error_for_each_kind_of_bad_frame(data, reason):
    with pytest.raises(FrameError) as e:
        decode_frame(data, **BOUNDS)
    assert e.value.reason == reason


@pytest.mark.parametrize(
    "data, reason",
    [
        (_frame(1, [3], magic=b"NOTMAGIC"), "bad_magic"),
        (_frame(5, [1] * 5), "too_many_records"),
        (_frame(1, [101]), "record_too_large"),
        (_frame(3, [95, 95, 95]), "frame_too_large"),
        (_frame(2, [3]), "truncated"),
        (_frame(1, [3], flags=0x80), "bad_flags"),
        (_BOMB, "frame_too_large"),
        (_packed(1, struct.pack(">I", 3) + b"abc", packed_len=400), "frame_too_large"),
        (struct.pack(">8sBHI", MAGIC, COMPRESSED, 1, 15) + b"not zlib at all", "bad_compression"),
    ],
)
async def test_read_frame_checks_bounds_before_reading(data, reason):
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    with pytest.raises(FrameError) as e:
        await read_frame(reader, **BOUNDS)
    assert e.value.reason == reason


async def test_read_frame_refuses_a_huge_announced_length_without_waiting_for_it():
    reader = asyncio.StreamReader()
    reader.feed_data(struct.pack(">8sBHI", MAGIC, 0, 1, 2**32 - 1))  # no EOF: the bytes never come
    with pytest.raises(FrameError) as e:
        await asyncio.wait_for(read_frame(reader, **BOUNDS), 1.0)
    assert e.value.reason == "record_too_large"


@pytest.mark.parametrize("compress", [False, True])
async def test_read_frame_returns_records_and_size(compress):
    records = [b"one", b"two" * 10]
    frame = encode_frame(records, compress=compress)
    reader = asyncio.StreamReader()
    reader.feed_data(frame)
    reader.feed_eof()
    assert await read_frame(reader, **BOUNDS) == (records, len(frame))


# ------------------------------------------------------------------------------ real daemons


class Peer:
    """A transport with a Gossip whose delivered records are collected in `got`."""

    def __init__(self, transport: Transport, limits: GossipLimits):
        self.transport = transport
        self.got: list[tuple[str, bytes]] = []
        self.gossip = Gossip(transport, lambda signer, env: self.got.append((signer, env)), limits=limits)
        self.id = transport.peer_id.to_base58()


# the receiver's per-sender budget is small, so that a flood is cut off quickly
RECEIVER = GossipLimits(sender_burst_records=60, sender_records_per_s=2.0, max_records_per_frame=16, linger=0.02)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def peers():
    limits = TransportLimits(max_record_bytes=4096)
    first = await Transport.create(record_check=signed_by, limits=limits)
    boot = await first.visible_maddrs()
    others = [await Transport.create(initial_peers=boot, record_check=signed_by, limits=limits) for _ in range(2)]
    made = [Peer(t, RECEIVER) for t in (first, *others)]
    for p in made:
        await p.gossip.start()
    yield made
    for p in made:
        await p.gossip.close()
        await p.transport.shutdown()


def live(test):
    """A test on the module's real daemons (they live in the module's event loop)."""
    return pytest.mark.multiprocess(pytest.mark.asyncio(loop_scope="module")(test))


@live
async def test_pushed_record_arrives_at_another_transport(peers):
    a, b, _ = peers
    me = PeerIdentity.generate()
    env = _departure(me, 1)
    assert a.gossip.push(env, [b.id]) == 1
    await _eventually(lambda: (me.peer_id, env) in b.got, what="the pushed record")
    assert b.transport.counters.snapshot()["gossip"]["received"] > len(env)


@live
async def test_records_queued_together_share_one_frame(peers):
    a, _, c = peers
    me = PeerIdentity.generate()
    envs = [_departure(me, r) for r in range(5)]
    frames_before = c.gossip.counts["frames_received"]
    for env in envs:
        a.gossip.push(env, [c.id])
    await _eventually(lambda: all((me.peer_id, e) in c.got for e in envs), what="five pushed records")
    assert c.gossip.counts["frames_received"] - frames_before == 1
    assert [e for s, e in c.got if s == me.peer_id] == envs  # in the order they were pushed


@live
async def test_pushes_to_one_peer_reuse_one_stream(peers):
    a, b, _ = peers
    me = PeerIdentity.generate()
    opened, frames = a.gossip.counts["push_streams"], b.gossip.counts["frames_received"]
    for r in range(4):  # one frame each: each waits until the previous one arrived
        env = _departure(me, r)
        a.gossip.push(env, [b.id])
        await _eventually(lambda env=env: (me.peer_id, env) in b.got, what=f"pushed record {r}")
    assert b.gossip.counts["frames_received"] - frames == 4
    assert a.gossip.counts["push_streams"] - opened <= 1  # opened once (or already open), then reused


@live
async def test_a_stream_the_receiver_closed_while_idle_is_reopened_and_nothing_is_lost(peers):
    a, b, _ = peers
    me = PeerIdentity.generate()
    first = _departure(me, 1)
    a.gossip.push(first, [b.id])
    await _eventually(lambda: (me.peer_id, first) in b.got, what="the first record")
    b.gossip.limits = dataclasses.replace(RECEIVER, stream_idle_timeout=0.2)
    try:
        # the open stream idles out at the receiver (one more frame resets its wait first)
        nudge = _departure(me, 2)
        a.gossip.push(nudge, [b.id])
        await _eventually(lambda: (me.peer_id, nudge) in b.got, what="the nudge")
        await _eventually(lambda: a.id not in b.gossip._serving_by, what="the receiver closing the idle stream")
    finally:
        b.gossip.limits = RECEIVER
    reopened = a.gossip.counts["push_stream_reopened"] + a.gossip.counts["push_streams"]
    second = _departure(me, 3)
    a.gossip.push(second, [b.id])
    await _eventually(lambda: (me.peer_id, second) in b.got, what="the record after the stream closed")
    assert a.gossip.counts["push_stream_reopened"] + a.gossip.counts["push_streams"] > reopened
    assert [e for s, e in b.got if s == me.peer_id] == [first, nudge, second]


async def _raw_push(sender: Peer, receiver: Peer, data: bytes, *, answer: bool = True) -> PushStatus | None:
    """Write `data` on a fresh stream; return the receiver's answer (None: hang up without one)."""
    reader, writer = await sender.transport.open_stream(receiver.id, GOSSIP_PROTOCOL)
    try:
        writer.write(data)
        await writer.drain()
        if not answer:
            return None
        try:
            return PushStatus((await asyncio.wait_for(reader.readexactly(1), 15))[0])
        except asyncio.IncompleteReadError:
            # a refusal written while our frame was still unread can be lost to the stream's reset
            return None
    finally:
        writer.close()


def _forged(signer: PeerIdentity, named: PeerIdentity) -> bytes:
    """A valid signature by `signer` over a message that names `named` as its sender."""
    payload = encode(Departure(peer_id=named.peer_id, round=3, time=1.0))
    return _pack_envelope(signer.public_key, payload, signer.private_key.sign(SIGNING_DOMAIN + payload))


@live
async def test_bad_frames_and_bad_records_are_refused_counted_and_the_node_keeps_serving(peers):
    a, b, _ = peers
    rejected = b.gossip.rejected
    before = dict(rejected)
    assert await _raw_push(a, b, os.urandom(64)) is PushStatus.BAD_FRAME  # garbage
    too_big = b.gossip.max_record_bytes + 1
    assert await _raw_push(a, b, struct.pack(">8sBHI", MAGIC, 0, 1, too_big)) is PushStatus.BAD_FRAME
    await _raw_push(a, b, _frame(2, [5]), answer=False)  # cut short: the sender hangs up mid-frame
    await _eventually(lambda: rejected.get("truncated", 0) > before.get("truncated", 0), what="the truncated frame")

    mallory, alice = PeerIdentity.generate(), PeerIdentity.generate()
    good = _departure(alice, 7)
    forged_sig = bytearray(_departure(alice, 8))
    forged_sig[-1] ^= 0x01  # last byte of the signature
    records = [b"not an envelope", _forged(mallory, alice), bytes(forged_sig), good]
    assert await _raw_push(a, b, encode_frame(records)) is PushStatus.OK  # the frame itself is fine
    await _eventually(lambda: (alice.peer_id, good) in b.got, what="the good record after the bad ones")

    def grew(reason: str) -> int:
        return rejected.get(reason, 0) - before.get(reason, 0)

    assert grew("bad_magic") == 1 and grew("record_too_large") == 1 and grew("truncated") == 1
    assert grew("malformed_record") == 1  # not an envelope
    assert grew("bad_record") == 2  # wrong signer, broken signature
    assert [e for _, e in b.got if e in records] == [good]
    # and it keeps serving: a normal push still arrives
    env = _departure(alice, 9)
    a.gossip.push(env, [b.id])
    await _eventually(lambda: (alice.peer_id, env) in b.got, what="a push after the bad frames")


@live
async def test_a_flooding_sender_is_cut_off_while_another_gets_through(peers):
    flooder, victim, honest = peers
    spam = PeerIdentity.generate()
    envs = [_departure(spam, r) for r in range(400)]
    frames = [encode_frame(envs[i : i + 16]) for i in range(0, len(envs), 16)]
    limited_before = victim.gossip.rejected.get("rate_limited", 0) + victim.gossip.rejected.get("busy", 0)
    started = time.monotonic()

    async def flood():
        answers = []
        for frame in frames:  # back to back, as fast as the victim answers
            answers.append(await _raw_push(flooder, victim, frame))
        return answers

    flooding = asyncio.create_task(flood())
    await asyncio.sleep(0.2)
    alice = PeerIdentity.generate()
    env = _departure(alice, 1)
    honest.gossip.push(env, [victim.id])
    await _eventually(lambda: (alice.peer_id, env) in victim.got, timeout=10, what="the honest record during the flood")
    answers = await flooding
    elapsed = time.monotonic() - started
    accepted = sum(1 for s, _ in victim.got if s == spam.peer_id)
    budget = RECEIVER.sender_burst_records + RECEIVER.sender_records_per_s * elapsed + RECEIVER.max_records_per_frame
    assert accepted <= budget, f"{accepted} flooded records accepted, budget {budget:.0f}"
    refused = [a for a in answers if a is not PushStatus.OK]
    assert PushStatus.RATE_LIMITED in refused and set(refused) <= {PushStatus.RATE_LIMITED, PushStatus.BUSY, None}
    limited = victim.gossip.rejected.get("rate_limited", 0) + victim.gossip.rejected.get("busy", 0)
    assert limited - limited_before == len(refused)  # each refusal counted


@live
async def test_a_failed_push_is_counted_and_kept_for_a_retry(peers):
    a, *_ = peers
    gone = await Transport.create(initial_peers=await a.transport.visible_maddrs())
    gone_id = gone.peer_id.to_base58()
    await gone.shutdown()
    failures = a.gossip.counts["push_failures"]
    a.gossip.push(_departure(PeerIdentity.generate(), 1), [gone_id])
    await _eventually(lambda: a.gossip.counts["push_failures"] > failures, what="the failed push")
    assert a.gossip.stats()["queued"] >= 1  # retried later (and dropped after max_record_age)


@live
async def test_a_failing_deliver_callback_is_counted_not_fatal(peers):
    a, _, c = peers
    original = c.gossip._deliver

    def broken(signer, env):
        raise RuntimeError("node bug")

    c.gossip._deliver = broken
    try:
        errors = c.gossip.counts["deliver_errors"]
        a.gossip.push(_departure(PeerIdentity.generate(), 2), [c.id])
        await _eventually(lambda: c.gossip.counts["deliver_errors"] > errors, what="the failed delivery")
    finally:
        c.gossip._deliver = original
    me = PeerIdentity.generate()
    env = _departure(me, 3)
    a.gossip.push(env, [c.id])
    await _eventually(lambda: (me.peer_id, env) in c.got, what="a push after the failed delivery")
