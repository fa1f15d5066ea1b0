"""Push delivery of signed records: ours go straight to the peers we know; theirs are accepted here.

One job: move signed envelopes (the same bytes the node stores in the DHT) between peers over a
libp2p stream protocol, so that a record reaches the others in one hop instead of waiting for
them to poll the DHT. What a record means, and which records to push to whom, is decided by the
caller (`RoundRunner`); this module only frames, sends, bounds, checks signatures and hands over.
The DHT stays the source of truth (discovery, late joiners, peers that missed a push).

The frames (`P2PMREC1`, flags, count, length-prefixed envelopes, optionally deflated; a one-byte
`PushStatus` answer) are `protocols/record_frame.py`, pure; protocols/SPEC.md describes them.
This module reads them off streams (`read_frame`) and re-exports the framing names.

The receiver answers as soon as the frame is read (before checking the envelopes); a sender that
gets no OK keeps the records queued and retries later with backoff.

Why long-lived streams: opening a libp2p stream (multistream-select, yamux, p2pd's socket) costs
about 1 kB on the wire, more than the records it carries; a round pushes a few records to each
peer, so one stream per peer, reused, is most of the control-traffic budget saved
(scripts/bench_control). The receiver closes a stream idle for `stream_idle_timeout`; a sender
whose reused stream turns out closed sends the frame once more on a new one (the receiver drops
the duplicate if the first copy did arrive).

Sending: `push(envelope)` queues the envelope for every current target (`targets()`, libp2p ids)
and returns at once. Each peer has its own ordered queue drained by a short-lived task, so a slow
or dead peer never delays the others; records queued while a push is in flight (or within
`linger` seconds) travel together in one frame. At most `max_concurrent_pushes` frames are in
flight at once, one per peer's stream; each has `push_timeout` seconds. At most `max_links`
streams are kept open (the least recently used is closed). A record that could not be delivered
within `max_record_age` seconds is dropped (the DHT still has it). Failures are logged at debug
level and counted (`stats()`).

Receiving, for untrusted input: a frame is bounded in bytes (`max_frame_bytes`), in records
(`max_records_per_frame`) and per record (`max_record_bytes`), and once its header arrived the
rest must arrive within `read_timeout`. Each sender (its libp2p id, authenticated by the
connection) has a token bucket of bytes and records per second and at most
`max_streams_per_sender` streams open at once (`max_concurrent_serves` in all): a flooding peer is
answered RATE_LIMITED or BUSY without its frame being read, and the others are served as before.
A stream's records are delivered in order by one task per stream, so a slow delivery never stops
the stream from being read (the sender's budget bounds the backlog). Every envelope goes through the record check the DHT applies (`check(signer, envelope)`,
by default `Transport.validator.check`, else `open_signed`) before `deliver(signer, envelope)`.
Malformed frames raise `FrameError` internally, are counted by reason, and never reach the node.

Why one long file: the sender queue and the receiver budgets are one protocol; the pure framing
already moved out along that seam.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
import time
from collections import OrderedDict, defaultdict, deque
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable, Sequence

from hivemind.p2p import P2PDaemonError

from p2pmodel.daemon.logs import get_logger
from p2pmodel.daemon.transport import RecordCheck, Transport, TransportError
from p2pmodel.protocols.errors import RemoteProtocolError
from p2pmodel.protocols.record_frame import (  # re-exported: gossip's framing names, as before the move
    COMPRESSED,
    HEADER_SIZE,
    LENGTH_SIZE,
    MAGIC,
    RECORD_PROTOCOL,
    FrameError,
    PushStatus,
    check_header,
    check_length,
    check_packed_length,
    decode_frame,
    encode_frame,
    inflate,
    parse_records,
    split_frames,
    unpack_length,
)
from p2pmodel.protocols.signing import signed_by, signer_of

__all__ = [
    "GOSSIP_PROTOCOL",
    "Gossip",
    "GossipLimits",
    "PushStatus",
    "FrameError",
    "MAGIC",
    "COMPRESSED",
    "encode_frame",
    "decode_frame",
    "read_frame",
    "split_frames",
    "HEADER_SIZE",
]

logger = get_logger(__name__)

GOSSIP_PROTOCOL = RECORD_PROTOCOL
_STATUS = struct.Struct(">B")  # the receiver's answer: one PushStatus byte

Deliver = Callable[[str, bytes], "Awaitable[None] | None"]
"""deliver(signer's peer id, envelope): hands a checked record to the node."""


@dataclass(frozen=True)
class GossipLimits:
    """Bounds of the push protocol, both directions. Sizes in bytes, times in seconds."""

    max_records_per_frame: int = 64
    max_record_bytes: int | None = None  # None: the transport's max_record_bytes (what the DHT accepts)
    max_frame_bytes: int | None = None  # None: max_record_bytes + 64 KiB (one big record and small ones)
    read_timeout: float = 10.0  # a receiver waits this long for the rest of a frame once its header came
    push_timeout: float = 5.0  # a sender gives one frame (stream open if needed, write, answer) this long
    linger: float = 0.05  # a queued record waits this long for others to share its frame
    max_concurrent_pushes: int = 8  # frames in flight as a sender, in all
    max_links: int = 256  # streams a sender keeps open for reuse (one per peer; least recently used closed)
    stream_idle_timeout: float = 300.0  # a receiver closes a stream that brought no frame for this long (> a round)
    max_concurrent_serves: int = 1024  # streams we hold open as a receiver, in all (one per pushing peer)
    max_streams_per_sender: int = 2  # streams we hold open for one sender
    sender_bytes_per_s: float = 64 * 1024  # each sender's byte budget refills at this rate ...
    sender_burst_bytes: float = 2 * 1024 * 1024  # ... up to this many bytes
    sender_records_per_s: float = 20.0  # each sender's record budget refills at this rate ...
    sender_burst_records: float = 200.0  # ... up to this many records
    max_senders: int = 1024  # senders whose budgets we remember (least recently seen forgotten)
    max_queue: int = 256  # records queued for one peer; the oldest are dropped past it
    max_record_age: float = 60.0  # seconds a record is retried before it is dropped (the DHT has it)
    retry_backoff: float = 1.0  # first pause after a failed push to a peer, doubled each time ...
    max_retry_backoff: float = 30.0  # ... up to this
    seen_cache: int = 8192  # digests of accepted envelopes remembered (duplicates skip the check)


# ------------------------------------------------------------------------------------ framing


async def read_frame(
    reader: asyncio.StreamReader,
    *,
    max_records: int,
    max_record_bytes: int,
    max_frame_bytes: int,
    header: bytes | None = None,
) -> tuple[list[bytes], int]:
    """Read one frame from a stream, checking every bound before reading what it announces.

    `header`: the frame's first `HEADER_SIZE` bytes when the caller already read them (to wait
    for a frame on an idle stream under another timeout than the frame's own).
    Returns (envelopes, bytes read). Raises FrameError (also for a stream that ends early).
    """
    try:
        if header is None:
            header = await reader.readexactly(HEADER_SIZE)
        compressed, count = check_header(header, max_records)
        if compressed:
            packed_len = unpack_length(await reader.readexactly(LENGTH_SIZE))
            check_packed_length(packed_len, max_frame_bytes)
            packed = await reader.readexactly(packed_len)
            section = inflate(packed, max_frame_bytes - HEADER_SIZE)
            return parse_records(section, count, max_record_bytes, max_frame_bytes), HEADER_SIZE + LENGTH_SIZE + packed_len
        total, out = HEADER_SIZE, []
        for _ in range(count):
            length = unpack_length(await reader.readexactly(LENGTH_SIZE))
            check_length(length, total, max_record_bytes, max_frame_bytes)
            out.append(await reader.readexactly(length))
            total += LENGTH_SIZE + length
    except asyncio.IncompleteReadError as e:
        raise FrameError("truncated", f"stream ended after {len(e.partial)} of {e.expected} bytes") from None
    return out, total


# ------------------------------------------------------------------------------------ pieces


class _Bucket:
    """A token bucket of bytes and records for one sender."""

    __slots__ = ("bytes", "records", "stamp")

    def __init__(self, limits: GossipLimits, now: float):
        self.bytes, self.records, self.stamp = limits.sender_burst_bytes, limits.sender_burst_records, now

    def refill(self, limits: GossipLimits, now: float) -> None:
        dt = max(0.0, now - self.stamp)
        self.stamp = now
        self.bytes = min(limits.sender_burst_bytes, self.bytes + dt * limits.sender_bytes_per_s)
        self.records = min(limits.sender_burst_records, self.records + dt * limits.sender_records_per_s)

    @property
    def exhausted(self) -> bool:
        return self.bytes <= 0 or self.records <= 0


class _PeerQueue:
    """Records waiting for one peer, oldest first, and that peer's retry state."""

    __slots__ = ("items", "task", "failures", "retry_at")

    def __init__(self) -> None:
        self.items: deque[tuple[float, bytes]] = deque()  # (queued at, envelope)
        self.task: asyncio.Task | None = None
        self.failures = 0
        self.retry_at = 0.0


class _Link:
    """Our long-lived push stream to one peer; one frame at a time goes over it."""

    __slots__ = ("reader", "writer", "lock")

    def __init__(self) -> None:
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.lock = asyncio.Lock()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


# ------------------------------------------------------------------------------------ gossip


class Gossip:
    """Push delivery of signed records over `GOSSIP_PROTOCOL` on `transport`'s p2pd.

    Args:
        transport: the node's transport (streams, byte counters).
        deliver: called with (signer, envelope) for every new envelope that passed `check`.
        targets: returns the libp2p ids (base58) that `push` sends to; ours is skipped.
        check: the record check (default: the transport's DHT record check, else `open_signed`).
        limits: bounds and timings.
    """

    def __init__(
        self,
        transport: Transport,
        deliver: Deliver,
        *,
        targets: Callable[[], Iterable[str]] = lambda: (),
        check: RecordCheck | None = None,
        limits: GossipLimits = GossipLimits(),
    ):
        self.transport = transport
        self._deliver = deliver
        self._targets = targets
        self._check = check or transport.validator.check or signed_by
        max_record = limits.max_record_bytes or transport.limits.max_record_bytes
        self.max_record_bytes = max_record
        self.max_frame_bytes = limits.max_frame_bytes or min(max_record + 64 * 1024, 8 * 1024 * 1024)
        self.limits = limits
        self.counts: dict[str, int] = defaultdict(int)
        self.rejected: dict[str, int] = defaultdict(int)  # reason -> frames or records refused
        self._me = transport.peer_id.to_base58()
        self._queues: dict[str, _PeerQueue] = {}
        self._links: OrderedDict[str, _Link] = OrderedDict()  # libp2p id -> our open push stream
        self._deliveries: set[asyncio.Task] = set()  # per-stream delivery chains (see _serve)
        self._push_slots = asyncio.Semaphore(limits.max_concurrent_pushes)
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._serving = 0
        self._serving_by: dict[str, int] = defaultdict(int)
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._started = False
        self._closed = False

    # ---------------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Register the stream handler: from now on, peers' pushes are accepted."""
        if not self._started:
            await self.transport.add_stream_handler(GOSSIP_PROTOCOL, self._handle)
            self._started = True

    async def close(self, timeout: float = 0.0) -> None:
        """Stop sending and accepting. Idempotent.

        Records still queued get up to `timeout` seconds to go out (a Departure, say); the rest
        are dropped.
        """
        if self._closed:
            return
        tasks = [q.task for q in self._queues.values() if q.task is not None]
        if tasks and timeout > 0:
            await asyncio.wait(tasks, timeout=timeout)
        self._closed = True
        tasks = [q.task for q in self._queues.values() if q.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._queues.clear()
        for link in self._links.values():
            link.close()
        self._links.clear()
        for t in list(self._deliveries):
            t.cancel()
        if self._started:
            await self.transport.remove_stream_handler(GOSSIP_PROTOCOL)

    def stats(self) -> dict[str, object]:
        """Counters for the status API: pushes, deliveries, refusals by reason, queue lengths."""
        return {
            **dict(sorted(self.counts.items())),
            "rejected": dict(sorted(self.rejected.items())),
            "queued": sum(len(q.items) for q in self._queues.values()),
        }

    # ---------------------------------------------------------------------------------- sending

    def push(self, envelope: bytes, targets: Iterable[str] | None = None) -> int:
        """Queue `envelope` for each target (default `targets()`); returns how many. Never blocks."""
        if self._closed:
            return 0
        now = time.monotonic()
        peers = {p for p in (self._targets() if targets is None else targets) if p and p != self._me}
        for peer in peers:
            q = self._queues.get(peer)
            if q is None:
                q = self._queues[peer] = _PeerQueue()
            q.items.append((now, envelope))
            while len(q.items) > self.limits.max_queue:
                q.items.popleft()
                self.counts["push_dropped"] += 1
            if q.task is None:
                q.task = asyncio.create_task(self._drain(peer, q), name=f"gossip {peer[-8:]}")
        return len(peers)

    async def push_now(self, envelopes: Sequence[bytes], targets: Iterable[str]) -> list[str]:
        """Send `envelopes` to `targets` at once, bypassing the queues; returns the peers that did not take them."""
        if self._closed:
            return [p for p in targets if p and p != self._me]
        peers = [p for p in dict.fromkeys(targets) if p and p != self._me]
        results = await asyncio.gather(*(self._send(p, list(envelopes)) for p in peers))
        return [p for p, ok in zip(peers, results) if not ok]

    async def _drain(self, peer: str, q: _PeerQueue) -> None:
        """Send `q`'s records to `peer` in frames until the queue is empty (or every record expired)."""
        loop = asyncio.get_running_loop()
        try:
            await asyncio.sleep(max(self.limits.linger, q.retry_at - loop.time()))
            while q.items and not self._closed:
                now = time.monotonic()
                while q.items and now - q.items[0][0] > self.limits.max_record_age:
                    q.items.popleft()
                    self.counts["push_expired"] += 1
                if not q.items:
                    break
                batch = [env for _, env in q.items]
                sent = len(batch)
                if await self._send(peer, batch):
                    for _ in range(sent):
                        q.items.popleft()
                    q.failures = 0
                    continue
                q.failures += 1
                pause = min(self.limits.retry_backoff * 2 ** (q.failures - 1), self.limits.max_retry_backoff)
                q.retry_at = loop.time() + pause
                await asyncio.sleep(pause)
        finally:
            q.task = None
            if not q.items and self._queues.get(peer) is q and q.failures == 0:
                del self._queues[peer]

    async def _send(self, peer: str, envelopes: list[bytes]) -> bool:
        """One attempt to deliver `envelopes` to `peer` (in as many frames as the bounds need)."""
        try:
            batches = split_frames(envelopes, max_records=self.limits.max_records_per_frame, max_frame_bytes=self.max_frame_bytes)
        except ValueError as e:  # our own record too large: a bug upstream; drop rather than loop
            logger.warning("record too large to push", error=str(e))
            self.counts["push_too_large"] += 1
            return True
        for batch in batches:
            frame = encode_frame(batch)
            async with self._push_slots:
                try:
                    status = await asyncio.wait_for(self._send_frame(peer, frame), self.limits.push_timeout)
                except asyncio.TimeoutError:
                    status, why = None, "timeout"
                except (TransportError, P2PDaemonError, ConnectionError, OSError, asyncio.IncompleteReadError) as e:
                    status, why = None, f"{type(e).__name__}: {e}"
            if status is PushStatus.OK:
                self.counts["push_frames"] += 1
                self.counts["push_records"] += len(batch)
                self.transport.counters.sent("gossip", len(frame))
                continue
            if status is PushStatus.BAD_FRAME:  # never retried: resending the same bytes cannot help
                self.counts["push_refused"] += 1
                logger.warning("peer refused our record frame", peer=peer[-12:], records=len(batch))
                continue
            reason = why if status is None else status.name.lower()
            self.counts["push_failures"] += 1
            logger.debug("push failed", peer=peer[-12:], records=len(batch), why=reason)
            return False
        return True

    async def _send_frame(self, peer: str, frame: bytes) -> PushStatus:
        """Send one frame on our stream to `peer` (opened if needed) and read the answer."""
        link = self._links.get(peer)
        if link is None:
            link = self._links[peer] = _Link()
            self._close_idle_links()
        self._links.move_to_end(peer)
        async with link.lock:
            for _ in range(2):
                reused = link.writer is not None
                if not reused:
                    link.reader, link.writer = await self.transport.open_stream(peer, GOSSIP_PROTOCOL)
                    self.counts["push_streams"] += 1
                assert link.reader is not None and link.writer is not None
                try:
                    link.writer.write(frame)
                    await link.writer.drain()
                    (raw,) = _STATUS.unpack(await link.reader.readexactly(_STATUS.size))
                except (ConnectionError, OSError, asyncio.IncompleteReadError):
                    link.close()
                    if reused:  # the receiver closed it while idle: once more, on a new stream
                        self.counts["push_stream_reopened"] += 1
                        continue
                    raise
                except BaseException:  # cancelled mid-frame (push timeout): the stream's state is unknown
                    link.close()
                    raise
                try:
                    status = PushStatus(raw)
                except ValueError:
                    link.close()
                    raise TransportError(f"unknown push status {raw}") from None
                if status is not PushStatus.OK:
                    link.close()  # the receiver closes the stream after a refusal
                return status
        raise TransportError("push stream closed twice")  # pragma: no cover - the loop returns or raises

    def _close_idle_links(self) -> None:
        """Keep at most `max_links` streams open: close the least recently used idle ones."""
        for peer in list(self._links):
            if len(self._links) <= self.limits.max_links:
                return
            link = self._links[peer]
            if not link.lock.locked():
                link.close()
                del self._links[peer]

    # ---------------------------------------------------------------------------------- receiving

    def _bucket(self, sender: str, now: float) -> _Bucket:
        b = self._buckets.get(sender)
        if b is None:
            b = self._buckets[sender] = _Bucket(self.limits, now)
            while len(self._buckets) > self.limits.max_senders:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(sender)
            b.refill(self.limits, now)
        return b

    async def _handle(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one pushed frame: bound it, answer, then check and deliver its records."""
        try:
            await self._serve(info.peer_id.to_base58(), reader, writer)
        except Exception as e:  # our bug; a peer's bytes cannot get here (FrameError is handled)
            self.counts["handler_errors"] += 1
            logger.warning("serving a record push failed", error=repr(e))
            writer.close()

    async def _serve(self, sender: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read frames from one stream until the sender closes it, it idles, or it breaks a bound."""
        if self._serving >= self.limits.max_concurrent_serves or self._serving_by.get(sender, 0) >= self.limits.max_streams_per_sender:
            self.rejected["busy"] += 1
            await self._answer(writer, PushStatus.BUSY)
            return
        self._serving += 1
        self._serving_by[sender] += 1
        delivering: asyncio.Task | None = None  # the previous frame's delivery: records stay in order
        try:
            while not self._closed:
                try:
                    header = await asyncio.wait_for(reader.readexactly(HEADER_SIZE), self.limits.stream_idle_timeout)
                except asyncio.IncompleteReadError as e:
                    if e.partial:
                        self.rejected["truncated"] += 1
                    writer.close()  # closed between frames: the sender is done with it
                    return
                except (asyncio.TimeoutError, ConnectionError, OSError):
                    writer.close()  # idle: the sender opens a new stream when it has records
                    return
                bucket = self._bucket(sender, time.monotonic())
                if bucket.exhausted:
                    self.rejected["rate_limited"] += 1
                    await self._answer(writer, PushStatus.RATE_LIMITED)
                    return
                try:
                    envelopes, nbytes = await asyncio.wait_for(
                        read_frame(
                            reader,
                            max_records=self.limits.max_records_per_frame,
                            max_record_bytes=self.max_record_bytes,
                            max_frame_bytes=self.max_frame_bytes,
                            header=header,
                        ),
                        self.limits.read_timeout,
                    )
                except FrameError as e:
                    self.rejected[e.reason] += 1
                    logger.debug("bad record frame", sender=sender[-12:], error=str(e))
                    await self._answer(writer, PushStatus.BAD_FRAME)
                    return
                except asyncio.TimeoutError:
                    self.rejected["timeout"] += 1
                    await self._answer(writer, PushStatus.BAD_FRAME)
                    return
                except (ConnectionError, OSError):
                    self.rejected["connection"] += 1
                    writer.close()
                    return
                bucket.bytes -= nbytes
                bucket.records -= len(envelopes)
                self.transport.counters.received("gossip", nbytes)
                self.counts["frames_received"] += 1
                if not await self._answer(writer, PushStatus.OK, close=False):
                    return
                delivering = asyncio.create_task(self._accept_all(sender, envelopes, delivering))
                self._deliveries.add(delivering)
                delivering.add_done_callback(self._deliveries.discard)
        finally:
            self._serving -= 1
            self._serving_by[sender] -= 1
            if not self._serving_by[sender]:
                del self._serving_by[sender]

    async def _accept_all(self, sender: str, envelopes: list[bytes], after: asyncio.Task | None) -> None:
        if after is not None:
            await asyncio.wait([after])
        for env in envelopes:
            await self._accept(sender, env)

    async def _answer(self, writer: asyncio.StreamWriter, status: PushStatus, *, close: bool = True) -> bool:
        """Write `status`; close the stream if asked or if it broke. True if the stream is still open."""
        try:
            writer.write(_STATUS.pack(status))
            await writer.drain()
        except (ConnectionError, OSError):
            close = True  # the sender went away; nothing to tell it
        if close:
            writer.close()
        return not close

    async def _accept(self, sender: str, envelope: bytes) -> None:
        digest = hashlib.sha256(envelope).digest()
        if digest in self._seen:
            self._seen.move_to_end(digest)
            self.counts["duplicates"] += 1
            return
        try:
            signer = signer_of(envelope)
            ok = bool(self._check(signer, envelope))
        except RemoteProtocolError as e:
            self.rejected["malformed_record"] += 1
            logger.debug("dropped pushed record", sender=sender[-12:], error=str(e))
            return
        if not ok:
            self.rejected["bad_record"] += 1
            logger.debug("dropped pushed record: fails the record check", sender=sender[-12:], signer=signer[:12])
            return
        self._seen[digest] = None
        while len(self._seen) > self.limits.seen_cache:
            self._seen.popitem(last=False)
        self.counts["records_accepted"] += 1
        try:
            result = self._deliver(signer, envelope)
            if asyncio.iscoroutine(result):
                await result
        except Exception as e:  # the node's bug, not the peer's: report it, keep serving
            self.counts["deliver_errors"] += 1
            logger.warning("delivering a pushed record failed", signer=signer[:12], error=repr(e))
