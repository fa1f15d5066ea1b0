"""Hivemind DHT records and libp2p object streams: the node's only way to reach other peers.

Two channels, sized differently on purpose:

- **DHT records** (`publish` / `fetch`): small signed messages (membership, delta announcements,
  proposals, votes, commits), stored under `key` with `subkey` = the signer's peer id. Values are
  our own signed bytes; hivemind sees them as opaque `bytes`. A `RecordValidator` (hivemind's
  `RecordValidatorBase` hook) rejects oversized or unverifiable values when another peer asks us
  to store them *and* when a search returns them, so garbage never reaches the node.
- **Object streams** (`rpc_get_object` / `call_fetch`): content-addressed blobs (encoded deltas,
  version records, tensor objects) served by sha256 over a libp2p stream, from any byte offset.
  A cut stream is resumed from the last byte received; the whole blob is verified against its
  hash before it is returned. Nothing large ever goes into the DHT.

Departure from the brief: the DHT runs as a `DHTNode` *in this process's event loop* instead of
hivemind's `DHT` (a forked process reached through `MPFuture` pipes). The node process holds
torch and a training thread; forking it is fragile, and the pipe protocol adds a second event
loop and a pickle channel for no gain at our record rates. The `P2P` handle is the DHT node's own
(`node.p2p`), so streams and DHT share one go-libp2p daemon (`p2pd`), as `replicate_p2p` would.

The object stream's wire format is `protocols/stream.py` (pure framing); this module only moves
its bytes. The blob bytes are written in `chunk_size` pieces. A stream serves requests one after
another: a fetcher keeps up to `max_idle_streams_per_peer` open streams per peer for its next
fetch (a new libp2p stream costs about 1 kB on the wire), and a server closes a stream idle for
`stream_keepalive` seconds or past `max_open_streams`. A pooled stream the server already closed
is replaced by a new one for the same request.

Why one long file: the DHT records, the object stream and its resumable client share one p2pd and one
set of limits and counters; the object stream (server + client) is the seam to split next.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable, Sequence

from hivemind.dht.node import DHTNode
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import P2P, P2PDaemonError, P2PHandlerError, PeerID
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time

from p2pmodel.daemon.logs import get_logger
from p2pmodel.daemon.reachability import RelayPlan, relays_in
from p2pmodel.errors import P2PModelError
from p2pmodel.peers import reachability
from p2pmodel.protocols.stream import (
    OBJECT_PROTOCOL,
    REQUEST_SIZE,
    RESPONSE_SIZE,
    ObjectStatus,
    StreamFormatError,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    keeps_stream_open,
)

__all__ = [
    "Transport",
    "TransportLimits",
    "ByteCounters",
    "RecordValidator",
    "ObjectStatus",
    "TransportError",
    "RecordRejected",
    "DHTTimeout",
    "FetchError",
    "ObjectNotFound",
    "ObjectTooLarge",
    "HashMismatch",
    "BadResponse",
    "FetchTimeout",
    "PeerUnreachable",
    "StreamOpenError",
    "StreamHandler",
    "dialable_maddrs",
    "object_id",
    "dht_time",
    "expiration_in",
    "OBJECT_PROTOCOL",
]

logger = get_logger(__name__)



# ----------------------------------------------------------------------------------------- errors


class TransportError(P2PModelError):
    """Base of errors raised while talking to other peers."""


class RecordRejected(TransportError):
    """We refused to publish a record that our own validator (or the size limit) rejects."""

    def __init__(self, key: str, size: int, reason: str):
        self.key, self.size, self.reason = key, size, reason
        super().__init__(f"record for {key!r} ({size} bytes) rejected: {reason}")


class DHTTimeout(TransportError):
    """A DHT read or write did not finish within its time bound."""

    def __init__(self, operation: str, key: str, timeout: float):
        self.operation, self.key, self.timeout = operation, key, timeout
        super().__init__(f"DHT {operation} of {key!r} took longer than {timeout:.1f}s")


class FetchError(TransportError):
    """Fetching an object from a peer failed. `peer` is the libp2p peer id (base58)."""

    def __init__(self, peer: str, oid: str, reason: str):
        self.peer, self.oid, self.reason = peer, oid, reason
        super().__init__(f"fetching object {oid[:12]} from {peer[:16]}…: {reason}")


class ObjectNotFound(FetchError):
    """The peer does not hold (or no longer serves) the object."""

    def __init__(self, peer: str, oid: str):
        super().__init__(peer, oid, "the peer does not have it")


class ObjectTooLarge(FetchError):
    """The peer announced a size above our limit or different from the one we expected."""

    def __init__(self, peer: str, oid: str, size: int, limit: int, expected: int | None = None):
        self.size, self.limit, self.expected = size, limit, expected
        if expected is not None and size != expected:
            reason = f"size {size} differs from the announced {expected}"
        else:
            reason = f"size {size} exceeds the limit of {limit} bytes"
        super().__init__(peer, oid, reason)


class HashMismatch(FetchError):
    """The bytes received do not hash to the requested id: the peer sent corrupt or forged data."""

    def __init__(self, peer: str, oid: str, got: str):
        self.got = got
        super().__init__(peer, oid, f"data hashes to {got[:12]}, not to the requested id")


class BadResponse(FetchError):
    """The peer broke the stream protocol (bad status byte, size changing between attempts)."""


class PeerUnreachable(FetchError):
    """Several attempts in a row got no byte from the peer (it is gone, or p2pd cannot reach it)."""

    def __init__(self, peer: str, oid: str, attempts: int, last: str):
        self.attempts = attempts
        super().__init__(peer, oid, f"unreachable: {attempts} attempts without a byte ({last})")


class FetchTimeout(FetchError):
    """The deadline passed before the whole object arrived; `received` bytes had arrived."""

    def __init__(self, peer: str, oid: str, timeout: float, received: int, attempts: int, last: str):
        self.timeout, self.received, self.attempts = timeout, received, attempts
        super().__init__(
            peer, oid, f"gave up after {timeout:.1f}s and {attempts} attempts with {received} bytes ({last})"
        )


class StreamOpenError(TransportError):
    """p2pd could not open a stream to `peer` for `protocol` (unreachable, or no such handler)."""

    def __init__(self, peer: str, protocol: str, reason: str):
        self.peer, self.protocol, self.reason = peer, protocol, reason
        super().__init__(f"opening {protocol} to {peer[:16]}…: {reason}")


# ------------------------------------------------------------------------------------ pieces


@dataclass(frozen=True)
class TransportLimits:
    """Bounds on what the transport accepts and how long it waits."""

    max_record_bytes: int = 64 * 1024  # largest DHT value we store, accept or publish (bytes)
    dht_timeout: float = 15.0  # seconds one DHT get/store may take before DHTTimeout
    dht_wait_timeout: float = 3.0  # seconds hivemind waits for one Kademlia RPC reply
    store_linger: float = 0.02  # seconds a store waits for others to share its request (small swarms)
    chunk_size: int = 256 * 1024  # bytes per write on an object stream
    max_concurrent_serves: int = 16  # object requests served at once; more get BUSY
    request_timeout: float = 10.0  # seconds a server waits for the first request on a new stream
    stream_keepalive: float = 300.0  # seconds a server keeps an idle stream open (longer than a round: reused next round)
    max_open_streams: int = 256  # object streams a server keeps open; past it, each closes after its request
    max_idle_streams_per_peer: int = 2  # open streams a fetcher keeps per peer for its next fetches
    stream_idle_timeout: float = 20.0  # seconds without a byte before a fetch attempt is abandoned
    fetch_timeout: float = 120.0  # default overall deadline of one call_fetch (seconds)
    retry_backoff: float = 0.2  # first pause between fetch attempts (seconds), doubled each time
    max_retry_backoff: float = 3.0  # longest pause between fetch attempts (seconds)
    max_stalled_attempts: int = 3  # attempts in a row without a byte before the peer counts as gone
    relay_wait: float = 30.0  # seconds a private node waits for a relay slot before announcing itself
    reachability_refresh: float = 10.0  # seconds between reads of our addresses and connections (status)


class ByteCounters:
    """Bytes sent and received per message type, for the status API."""

    def __init__(self) -> None:
        self._sent: dict[str, int] = defaultdict(int)
        self._received: dict[str, int] = defaultdict(int)
        self._messages: dict[str, int] = defaultdict(int)

    def sent(self, kind: str, nbytes: int) -> None:
        self._sent[kind] += nbytes
        self._messages[kind] += 1

    def received(self, kind: str, nbytes: int) -> None:
        self._received[kind] += nbytes
        self._messages[kind] += 1

    def total_sent(self) -> int:
        return sum(self._sent.values())

    def total_received(self) -> int:
        return sum(self._received.values())

    def snapshot(self) -> dict[str, dict[str, int]]:
        """{kind: {"sent": bytes, "received": bytes, "messages": count}}, sorted by kind."""
        kinds = sorted(set(self._sent) | set(self._received))
        return {
            k: {"sent": self._sent.get(k, 0), "received": self._received.get(k, 0), "messages": self._messages.get(k, 0)}
            for k in kinds
        }


def object_id(data: bytes | bytearray | memoryview) -> str:
    """The content address of a blob: sha256 hex of its bytes."""
    return hashlib.sha256(data).hexdigest()


def dht_time() -> float:
    """hivemind's notion of now (unix seconds); DHT expirations are absolute in this clock."""
    return get_dht_time()


RecordCheck = Callable[[str, bytes], bool]
"""check(subkey, value) -> True if `value` is a well-formed record signed by `subkey`."""


class RecordValidator(RecordValidatorBase):
    """hivemind's record hook, used to drop bad records before they are stored or returned.

    hivemind calls `validate` when a peer asks us to store a record and on every record a search
    returns. Our records are dictionary entries (`subkey` = signer's peer id) whose value is a
    msgpack `bin` holding signed bytes. We reject: plain (non-subkey) values, values that are not
    bytes, values above `max_bytes`, and values `check` refuses (the node passes a check that
    opens the signed envelope and compares its signer with the subkey). Signing is *not* done
    here (`sign_value` stays the identity): our values arrive already signed by
    `protocols.signing`, which also lets peers verify records they got from a stock DHT node
    that runs no validator at all.
    """

    def __init__(self, max_bytes: int, check: RecordCheck | None = None):
        self.max_bytes = max_bytes
        self.check = check
        self.rejected = 0  # how many records were dropped, shown in status

    def validate(self, record: DHTRecord) -> bool:
        ok = self._validate(record)
        if not ok:
            self.rejected += 1
        return ok

    def _validate(self, record: DHTRecord) -> bool:
        if len(record.value) > self.max_bytes + 16:  # 16: room for the msgpack bin header
            return False
        try:
            subkey = MSGPackSerializer.loads(record.subkey)
            value = MSGPackSerializer.loads(record.value)
        except Exception:  # any decoding failure means garbage from the network
            return False
        if not isinstance(subkey, str) or not isinstance(value, bytes) or len(value) > self.max_bytes:
            return False
        if self.check is None:
            return True
        try:
            return bool(self.check(subkey, value))
        except P2PModelError:
            return False


StreamHandler = Callable[[object, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
"""handler(stream info (has .peer_id: the remote's authenticated libp2p id), reader, writer)."""

BlobSource = Callable[[str], "bytes | None"]
"""source(oid) -> the blob's bytes, or None. Called in a worker thread: it may read disk and hash."""


# ------------------------------------------------------------------------------------ transport


class Transport:
    """One peer's connection to the swarm: a hivemind DHT node plus object streams on its p2pd.

    Build with `await Transport.create(...)`; close with `await transport.shutdown()`.
    """

    def __init__(self, *, _node: DHTNode, _validator: RecordValidator, _limits: TransportLimits):
        self._node = _node
        self._p2p: P2P = _node.p2p
        self.validator = _validator
        self.limits = _limits
        self.counters = ByteCounters()
        self.peer_id: PeerID = _node.peer_id
        self._blobs: dict[str, tuple[bytes, str]] = {}  # oid -> (data, kind), served from memory
        self._sources: list[tuple[BlobSource, str]] = []  # fallbacks, e.g. the lineage store
        self._serving = 0
        self._open_streams = 0  # object streams we serve, idle or not
        self.object_streams_opened = 0  # object streams we opened as a fetcher
        self._idle_streams: dict[str, list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]]] = {}
        self._handlers: set[str] = {OBJECT_PROTOCOL}  # stream protocols we registered with p2pd
        # Private events: serve objects only to libp2p peers this says yes to (None: anyone).
        self.serve_only: Callable[[str], bool] | None = None
        self.refused_streams = 0
        self._batch: list[_PendingStore] = []  # stores published together, sent as one request per node
        self.relay_plan = RelayPlan("local", "not set")  # the role p2pd was started in (daemon/reachability.py)
        self._visible: list[str] = []  # our multiaddrs as p2pd last reported them
        self._connections = {"direct": 0, "relayed": 0}  # open libp2p connections, as last counted
        self._watch: asyncio.Task | None = None
        self._closed = False

    @classmethod
    async def create(
        cls,
        *,
        initial_peers: Sequence[str] = (),
        host_maddrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
        announce_maddrs: Sequence[str] = (),
        identity_path: str | None = None,
        record_check: RecordCheck | None = None,
        limits: TransportLimits = TransportLimits(),
        relay_plan: RelayPlan = RelayPlan("local", "default"),
    ) -> "Transport":
        """Start a DHT node (and its p2pd), join `initial_peers`, and serve objects.

        Args:
            initial_peers: multiaddrs (with `/p2p/<id>`) of any live DHT peer, ours or a stock
                `hivemind-dht`; empty to start a new swarm.
            host_maddrs: where p2pd listens; loopback by default.
            announce_maddrs: addresses to advertise instead of the listening ones (explicit ports).
            identity_path: libp2p private key file; keeps the libp2p peer id across restarts
                (created if missing).
            record_check: extra check every DHT record must pass (see `RecordValidator`).
            limits: size and time bounds.
            relay_plan: public (relay for others), private (reserve a relay slot, and return only
                once it is held or `limits.relay_wait` passed) or local (hivemind's defaults).

        Raises:
            TransportError: p2pd did not start or no initial peer answered.
        """
        validator = RecordValidator(limits.max_record_bytes, record_check)
        kwargs = relay_plan.p2p_options()
        if announce_maddrs:
            kwargs["announce_maddrs"] = list(announce_maddrs)
        if identity_path is not None:
            kwargs["identity_path"] = identity_path
        p2p: P2P | None = None  # started here (not by DHTNode) when p2pd needs flags hivemind cannot pass
        try:
            if relay_plan.p2pd_flags():
                p2p = await _p2p_class(relay_plan.p2pd_flags()).create(
                    initial_peers=list(initial_peers) or None, host_maddrs=list(host_maddrs),
                    check_if_identity_free=False, **kwargs)  # fmt: skip
                kwargs = {"p2p": p2p}  # DHTNode then takes no P2P options
            else:
                kwargs.update(host_maddrs=list(host_maddrs), check_if_identity_free=False)
            node = await DHTNode.create(
                initial_peers=list(initial_peers) or None,
                record_validator=validator,
                wait_timeout=limits.dht_wait_timeout,
                # No DHT caching: every read we make asks for the latest records anyway, and
                # hivemind's caches cost traffic of their own (measured by scripts/bench_control):
                # a read re-stores what it found on the nearest node lacking it (cache_nearest),
                # a store into a cached key schedules a background read (cache_on_store), and
                # cached keys are re-read before they expire (cache_refresh_before_expiry).
                cache_locally=False,
                cache_nearest=0,
                cache_on_store=False,
                cache_refresh_before_expiry=0,
                # (check_if_identity_free=False above: a restarted node reuses its identity, and
                # the check would cost a throwaway p2pd)
                **kwargs,
            )
        except (P2PDaemonError, OSError, asyncio.TimeoutError) as e:
            await _shutdown_p2p(p2p)
            raise TransportError(f"could not start the DHT node: {e}") from e
        except ValueError as e:  # hivemind raises bare ValueError/TimeoutError when bootstrap fails
            await _shutdown_p2p(p2p)
            raise TransportError(f"could not join the swarm through {list(initial_peers)}: {e}") from e
        self = cls(_node=node, _validator=validator, _limits=limits)
        self.relay_plan = relay_plan
        await self._p2p.add_binary_stream_handler(OBJECT_PROTOCOL, self.rpc_get_object)
        if relay_plan.waits_for_relay:
            await self._wait_for_relay_slot()
        await self._refresh_reachability()
        self._watch = asyncio.create_task(self._watch_reachability(), name="transport reachability")
        return self

    async def _wait_for_relay_slot(self) -> None:
        """Return once p2pd announces a relay circuit address, or after `limits.relay_wait`.

        The node announces its addresses once, when it starts; a private node's only address
        others can dial is the circuit one, which exists once p2pd reserved a slot at a relay
        (measured in tests/nat_lab.py: 2-4 s after p2pd started).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.relay_wait
        while True:
            addrs = [str(a) for a in await self._p2p.get_visible_maddrs(latest=True)]
            if relays_in(addrs):
                logger.info("relay slot held", relays=[r[:16] for r in relays_in(addrs)])
                return
            if loop.time() >= deadline:
                logger.warning(
                    "no relay slot yet: peers outside this network cannot reach us until one is held",
                    waited_s=self.limits.relay_wait, relays=list(self.relay_plan.relays)[:4],
                )  # fmt: skip
                return
            await asyncio.sleep(0.5)

    # ---------------------------------------------------------------------------------- identity

    async def visible_maddrs(self) -> list[str]:
        """Multiaddrs (with `/p2p/<peer id>`) other peers can use as `--peers` to reach us;
        a private node's relay circuit addresses among them."""
        self._visible = [str(a) for a in await self._p2p.get_visible_maddrs(latest=True)]
        return list(self._visible)

    def reachability(self) -> dict:
        """Who can reach us, for the status: the role p2pd runs in (`mode`: public, private,
        local) and why, what our addresses say (`addresses`, as `p2pmodel.peers.reachability`
        reads a peer's announcement), the relays holding a slot for us, and our open libp2p
        connections, direct or through a relay. Refreshed every `limits.reachability_refresh`."""
        return {
            "mode": self.relay_plan.mode,
            "decided_by": self.relay_plan.why,
            "addresses": reachability(self._visible) if self._visible else "unknown",
            "relayed_by": relays_in(self._visible),
            "connections": dict(self._connections),
        }

    async def _refresh_reachability(self) -> None:
        try:
            await self.visible_maddrs()
            peers = await self._p2p.list_peers()
        except (P2PDaemonError, ConnectionError, OSError, EOFError, ValueError) as e:  # ValueError: no addresses
            logger.debug("could not read our addresses from p2pd", error=repr(e))
            return
        relayed = sum(any("/p2p-circuit" in str(a) for a in p.addrs) for p in peers)
        self._connections = {"direct": len(peers) - relayed, "relayed": relayed}

    async def _watch_reachability(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.limits.reachability_refresh)
            await self._refresh_reachability()

    async def connect(self, peer: PeerID | str, maddrs: Iterable[str]) -> None:
        """Tell p2pd how to reach `peer` (for peers we learned about from records, not the DHT).

        `maddrs` may be the announced form, ending in `/p2p/<peer>` (see `dialable_maddrs`).

        Raises:
            TransportError: none of the addresses is usable, or p2pd could not connect.
        """
        try:
            peer_id = _peer(peer)
        except ValueError as e:  # an id from a record is untrusted text
            raise TransportError(f"not a libp2p peer id: {str(peer)[:64]!r}") from e
        maddrs = [str(m) for m in maddrs]
        usable = dialable_maddrs(peer_id.to_base58(), maddrs)
        if not usable:
            raise TransportError(f"no dialable address for {peer_id.to_base58()[:16]}… in {maddrs[:4]}")
        try:
            # P2P has no public connect(); the bindings' client is the documented way underneath.
            await self._p2p._client.connect(peer_id, usable)
        except (P2PDaemonError, ConnectionError, OSError) as e:
            raise TransportError(f"p2pd could not connect to {peer_id.to_base58()[:16]}…: {e}") from e

    # ---------------------------------------------------------------------------------- streams

    async def add_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        """Serve `protocol` on our p2pd: each incoming stream runs `handler(info, reader, writer)`.

        The handler owns the stream (it must close the writer). Removed again on shutdown.
        """
        await self._p2p.add_binary_stream_handler(protocol, handler)
        self._handlers.add(protocol)

    async def remove_stream_handler(self, protocol: str) -> None:
        """Stop serving `protocol` (no-op if p2pd is already gone)."""
        self._handlers.discard(protocol)
        try:
            await self._p2p.remove_binary_stream_handler(protocol)
        except (P2PDaemonError, ConnectionError, OSError):
            pass

    async def open_stream(self, peer: PeerID | str, protocol: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open a stream to `peer` speaking `protocol`; the caller closes the writer.

        Raises:
            StreamOpenError: p2pd could not reach the peer or it does not serve `protocol`.
        """
        peer_id = _peer(peer)
        try:
            _, reader, writer = await self._p2p.call_binary_stream_handler(peer_id, protocol)
        except (P2PDaemonError, P2PHandlerError, ConnectionError, OSError) as e:
            raise StreamOpenError(peer_id.to_base58(), protocol, f"{type(e).__name__}: {e}") from e
        return reader, writer

    def routing_table_size(self) -> int:
        """How many other DHT nodes this node knows."""
        return len(self._node.protocol.routing_table.uid_to_peer_id)

    def known_peers(self) -> list[str]:
        """libp2p ids (base58) of the DHT nodes this node knows: whom a joiner can ask for objects
        when its bootstrap peer serves none (a stock `hivemind-dht`)."""
        return [p.to_base58() for p in self._node.protocol.routing_table.uid_to_peer_id.values()]

    # ---------------------------------------------------------------------------------- records

    async def publish(
        self, key: str, subkey: str, value: bytes, expiration: float, *, kind: str = "record"
    ) -> bool:
        """Store `value` under `key`/`subkey` until `expiration` (absolute, `dht_time()` clock).

        Returns True when at least one DHT node (possibly only this one) accepted it.

        Raises:
            RecordRejected: the value is larger than `max_record_bytes` or fails our own check.
            DHTTimeout: the store did not finish within `limits.dht_timeout`.
        """
        if len(value) > self.limits.max_record_bytes:
            raise RecordRejected(key, len(value), f"larger than {self.limits.max_record_bytes} bytes")
        if self.validator.check is not None and not self.validator.check(subkey, value):
            raise RecordRejected(key, len(value), "fails the record check (not signed by its subkey?)")
        known = dict(self._node.protocol.routing_table.uid_to_peer_id)
        if len(known) + 1 <= self._node.num_replicas:
            store = self._store_on_all(key, subkey, value, expiration, list(known.values()))
        else:
            store = self._node.store(key, value, expiration, subkey=subkey)
        try:
            ok = await asyncio.wait_for(store, self.limits.dht_timeout)
        except asyncio.TimeoutError as e:
            raise DHTTimeout("store", key, self.limits.dht_timeout) from e
        self.counters.sent(kind, len(value))
        return bool(ok)

    async def _store_on_all(self, key: str, subkey: str, value: bytes, expiration: float, peers: list[PeerID]) -> bool:
        """Store on this node and on every DHT node we know, without searching for the nearest.

        Used while we know fewer nodes than the replica count: then every node (us included) is
        among the key's nearest, which is what `DHTNode.store`'s search would conclude after one
        find request to each of them. Skipping that search saves 40% of a store's traffic
        (measured with 3 nodes: 5.8 kB -> 3.5 kB on the wire), and records published within
        `store_linger` of each other share one store request per node. A node we do not know yet
        misses the replica, as it might with the search; readers search, and find the others'.
        """
        from hivemind.dht.routing import DHTID

        protocol = self._node.protocol
        key_id = DHTID.generate(source=key)
        value_bytes = protocol.serializer.dumps(value)
        record = DHTRecord(key_id.to_bytes(), protocol.serializer.dumps(subkey), value_bytes, expiration)
        local = self.validator.validate(record) and protocol.storage.store(key_id, value_bytes, expiration, subkey=subkey)
        pending = _PendingStore(key_id, subkey, value_bytes, expiration, asyncio.get_running_loop().create_future())
        self._batch.append(pending)
        if len(self._batch) == 1:
            asyncio.get_running_loop().call_later(self.limits.store_linger, self._send_batch, peers)
        return bool(local) | await pending.done

    def _send_batch(self, peers: list[PeerID]) -> None:
        batch, self._batch = self._batch, []
        task = asyncio.create_task(self._store_batch(batch, peers))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # results travel in the futures

    async def _store_batch(self, batch: list["_PendingStore"], peers: list[PeerID]) -> None:
        protocol = self._node.protocol
        results: list = []
        try:
            results = await asyncio.gather(
                *(
                    protocol.call_store(
                        peer,
                        [p.key_id for p in batch],
                        [p.value for p in batch],
                        [p.expiration for p in batch],
                        subkeys=[p.subkey for p in batch],
                    )
                    for peer in peers
                )
            )
        finally:
            for i, p in enumerate(batch):
                if not p.done.done():
                    p.done.set_result(any(r is not None and i < len(r) and bool(r[i]) for r in results))

    async def fetch(self, key: str, *, kind: str = "record", latest: bool = True) -> dict[str, bytes]:
        """All live, valid records under `key`, as {subkey: value}. Empty if there are none.

        `latest=True` asks every reachable replica and merges their entries (slower, complete);
        False returns the first non-expired answer.

        Raises:
            DHTTimeout: the search did not finish within `limits.dht_timeout`.
        """
        try:
            found = await asyncio.wait_for(self._node.get(key, latest=latest), self.limits.dht_timeout)
        except asyncio.TimeoutError as e:
            raise DHTTimeout("get", key, self.limits.dht_timeout) from e
        if found is None or not isinstance(found.value, dict):
            return {}
        out: dict[str, bytes] = {}
        for subkey, entry in found.value.items():
            # validated already by hivemind's hook; the isinstance checks keep types honest
            if isinstance(subkey, str) and isinstance(entry.value, bytes):
                out[subkey] = entry.value
                self.counters.received(kind, len(entry.value))
        return out

    async def fetch_many(self, keys: Sequence[str], *, kind: str = "record", latest: bool = True) -> dict[str, dict[str, bytes]]:
        """`fetch` for several keys in one DHT search (one RPC per peer asked carries several keys).

        Returns {key: {subkey: value}} with every key present (empty dict when nothing is stored).

        Raises:
            DHTTimeout: the search did not finish within `limits.dht_timeout`.
        """
        keys = list(dict.fromkeys(keys))
        kwargs = {"sufficient_expiration_time": float("inf")} if latest else {}
        try:
            found = await asyncio.wait_for(self._node.get_many(keys, **kwargs), self.limits.dht_timeout)
        except asyncio.TimeoutError as e:
            raise DHTTimeout("get", ",".join(keys), self.limits.dht_timeout) from e
        out: dict[str, dict[str, bytes]] = {}
        for key in keys:
            entry = found.get(key)
            records: dict[str, bytes] = {}
            if entry is not None and isinstance(entry.value, dict):
                for subkey, item in entry.value.items():
                    if isinstance(subkey, str) and isinstance(item.value, bytes):
                        records[subkey] = item.value
                        self.counters.received(kind, len(item.value))
            out[key] = records
        return out

    # ---------------------------------------------------------------------------------- objects

    def put_blob(self, data: bytes, *, kind: str = "object") -> str:
        """Serve `data` from memory under its sha256; returns the object id."""
        oid = object_id(data)
        self._blobs[oid] = (bytes(data), kind)
        return oid

    def drop_blob(self, oid: str) -> None:
        """Stop serving an in-memory blob (no-op when absent)."""
        self._blobs.pop(oid, None)

    def add_source(self, source: BlobSource, *, kind: str = "object") -> None:
        """Also serve objects that `source(oid)` returns (consulted after the in-memory blobs)."""
        self._sources.append((source, kind))

    async def _lookup(self, oid: str) -> tuple[bytes, str] | None:
        held = self._blobs.get(oid)
        if held is not None:
            return held
        for source, kind in self._sources:
            # sources read disk and verify hashes: keep that off the event loop
            data = await asyncio.to_thread(source, oid)
            if data is not None:
                return data, kind
        return None

    async def rpc_get_object(self, info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve object requests on one stream, one at a time, until the fetcher closes it, it idles
        past `stream_keepalive`, or a response closes it (see `protocols.stream`)."""
        self._open_streams += 1
        try:
            wait = self.limits.request_timeout
            while not self._closed:
                try:
                    frame = await asyncio.wait_for(reader.readexactly(REQUEST_SIZE), wait)
                except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
                    return
                if not await self._serve_request(info, frame, writer) or writer.is_closing():
                    return
                if self._open_streams > self.limits.max_open_streams:
                    return
                wait = self.limits.stream_keepalive
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the reader went away; it will resume from what it got
        finally:
            self._open_streams -= 1
            writer.close()

    async def _serve_request(self, info, frame: bytes, writer: asyncio.StreamWriter) -> bool:
        """Answer one request: bytes [offset, end) of the blob it names. True: the stream stays open."""
        if self.serve_only is not None and not self.serve_only(str(getattr(info, "peer_id", ""))):
            self.refused_streams += 1
            writer.write(encode_response(ObjectStatus.NOT_FOUND))  # say nothing of what we hold
            return False
        try:
            raw_oid, offset = decode_request(frame)
        except StreamFormatError:
            writer.write(encode_response(ObjectStatus.BAD_REQUEST))
            return False
        if self._serving >= self.limits.max_concurrent_serves:
            writer.write(encode_response(ObjectStatus.BUSY))
            return False
        self._serving += 1
        try:
            found = await self._lookup(raw_oid.hex())
            if found is None:
                status, total = ObjectStatus.NOT_FOUND, 0
                writer.write(encode_response(status))
            else:
                data, kind = found
                if offset > len(data):
                    writer.write(encode_response(ObjectStatus.BAD_OFFSET, len(data)))
                    return False
                status, total = ObjectStatus.OK, len(data)
                writer.write(encode_response(status, total))
                sent = await self._send_range(writer, data, offset, kind)
                self.counters.sent(kind, sent)
        finally:
            self._serving -= 1
        if not writer.is_closing():
            await writer.drain()
        return keeps_stream_open(status)

    async def _send_range(self, writer: asyncio.StreamWriter, data: bytes, offset: int, kind: str) -> int:
        """Write data[offset:] in chunks; returns the bytes written. Fault-injection tests override it."""
        view = memoryview(data)
        step = self.limits.chunk_size
        for start in range(offset, len(data), step):
            writer.write(view[start : start + step])
            await writer.drain()
        return len(data) - offset

    async def call_fetch(
        self,
        peer: PeerID | str,
        oid: str,
        *,
        max_size: int,
        expected_size: int | None = None,
        timeout: float | None = None,
        kind: str = "object",
    ) -> bytes:
        """Fetch object `oid` from `peer`, resuming after cut streams, and verify its hash.

        Args:
            peer: the serving peer's libp2p id.
            oid: sha256 hex of the object.
            max_size: refuse objects larger than this many bytes.
            expected_size: refuse an object whose size differs (from its announcement).
            timeout: overall deadline in seconds (default `limits.fetch_timeout`).
            kind: the message type its bytes are counted under.

        Returns:
            The object's bytes, whose sha256 is `oid`.

        Raises:
            ObjectNotFound, ObjectTooLarge, HashMismatch, BadResponse: not retried.
            PeerUnreachable: `max_stalled_attempts` attempts in a row brought no byte.
            FetchTimeout: the deadline passed (after retries with backoff).
        """
        peer_id = _peer(peer)
        peer_name = peer_id.to_base58()
        raw_oid = _raw_oid(peer_name, oid)
        timeout = self.limits.fetch_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        state = _FetchState(hashlib.sha256(), bytearray(), None)
        attempts, stalled, backoff, last = 0, 0, self.limits.retry_backoff, "no attempt"
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise FetchTimeout(peer_name, oid, timeout, len(state.buf), attempts, last)
            attempts += 1
            before = len(state.buf)
            try:
                done = await asyncio.wait_for(
                    self._fetch_attempt(peer_id, peer_name, oid, raw_oid, state, max_size, expected_size, kind),
                    remaining,
                )
            except asyncio.TimeoutError:
                raise FetchTimeout(peer_name, oid, timeout, len(state.buf), attempts, "deadline") from None
            except (ConnectionError, OSError, P2PDaemonError, P2PHandlerError, asyncio.IncompleteReadError) as e:
                done, last = False, f"{type(e).__name__}: {e}"
            except _Busy:
                done, last = False, "peer busy"
            if done:
                break
            if len(state.buf) > before:
                stalled, backoff = 0, self.limits.retry_backoff  # progress: the link works, retry soon
            else:
                stalled += 1
                if stalled >= self.limits.max_stalled_attempts:
                    raise PeerUnreachable(peer_name, oid, attempts, last)
            logger.debug("fetch retry", oid=oid[:12], peer=peer_name[:16], offset=len(state.buf), why=last)
            await asyncio.sleep(min(backoff, max(0.0, deadline - loop.time())))
            backoff = min(backoff * 2, self.limits.max_retry_backoff)
        got = state.hasher.hexdigest()
        if got != oid:
            raise HashMismatch(peer_name, oid, got)
        return bytes(state.buf)

    async def _fetch_attempt(
        self,
        peer_id: PeerID,
        peer_name: str,
        oid: str,
        raw_oid: bytes,
        state: "_FetchState",
        max_size: int,
        expected_size: int | None,
        kind: str,
    ) -> bool:
        """One request from the current offset, on a pooled stream or a new one. True when complete."""
        while True:
            pooled = self._pooled_stream(peer_name)
            if pooled is None:
                _, reader, writer = await self._p2p.call_binary_stream_handler(peer_id, OBJECT_PROTOCOL)
                self.object_streams_opened += 1
            else:
                reader, writer = pooled
            keep = False
            try:
                writer.write(encode_request(raw_oid, len(state.buf)))
                await writer.drain()
                try:
                    header = await asyncio.wait_for(reader.readexactly(RESPONSE_SIZE), self.limits.stream_idle_timeout)
                except (asyncio.IncompleteReadError, ConnectionError):
                    if pooled is not None:
                        continue  # the server closed that stream while it idled: ask on a new one
                    raise
                try:
                    status, total = decode_response(header)
                except StreamFormatError as e:
                    raise BadResponse(peer_name, oid, str(e)) from None
                if status is ObjectStatus.NOT_FOUND:
                    keep = True
                    raise ObjectNotFound(peer_name, oid)
                if status is ObjectStatus.BUSY:
                    raise _Busy()
                if status is not ObjectStatus.OK:
                    raise BadResponse(peer_name, oid, f"peer answered {status.name} at offset {len(state.buf)}")
                if total > max_size or (expected_size is not None and total != expected_size):
                    raise ObjectTooLarge(peer_name, oid, total, max_size, expected_size)
                if state.total is not None and total != state.total:
                    raise BadResponse(peer_name, oid, f"size changed from {state.total} to {total} between attempts")
                state.total = total
                while len(state.buf) < total:
                    chunk = await asyncio.wait_for(
                        reader.read(min(self.limits.chunk_size, total - len(state.buf))), self.limits.stream_idle_timeout
                    )
                    if not chunk:
                        raise ConnectionError(f"stream cut at byte {len(state.buf)} of {total}")
                    state.buf += chunk
                    state.hasher.update(chunk)
                    self.counters.received(kind, len(chunk))
                keep = True
                return True
            finally:
                if keep:
                    self._pool_stream(peer_name, reader, writer)
                else:
                    writer.close()

    def _pooled_stream(self, peer: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """An idle object stream to `peer` the server should still hold open, or None."""
        idle = self._idle_streams.get(peer)
        fresh_after = time.monotonic() - 0.9 * self.limits.stream_keepalive  # else the server may be closing it
        while idle:
            reader, writer, since = idle.pop()
            if since >= fresh_after and not writer.is_closing() and not reader.at_eof():
                return reader, writer
            writer.close()
        self._idle_streams.pop(peer, None)
        return None

    def _pool_stream(self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        idle = self._idle_streams.setdefault(peer, [])
        if self._closed or writer.is_closing() or len(idle) >= self.limits.max_idle_streams_per_peer:
            writer.close()
            return
        idle.append((reader, writer, time.monotonic()))

    async def fetch_from_any(
        self,
        peers: Sequence[PeerID | str],
        oid: str,
        *,
        max_size: int,
        expected_size: int | None = None,
        timeout: float | None = None,
        kind: str = "object",
    ) -> bytes:
        """Try `peers` in order until one serves a verified copy of `oid`.

        Raises:
            FetchError: the last peer's error when none succeeded (ObjectNotFound when none had it).
        """
        if not peers:
            raise ObjectNotFound("<no peers>", oid)
        timeout = self.limits.fetch_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        error: FetchError | None = None
        for peer in peers:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                return await self.call_fetch(
                    peer, oid, max_size=max_size, expected_size=expected_size, timeout=remaining, kind=kind
                )
            except FetchError as e:
                logger.info("object fetch failed, trying next peer", oid=oid[:12], error=str(e))
                error = e
        raise error if error is not None else FetchTimeout("<all peers>", oid, timeout, 0, 0, "deadline")

    # ---------------------------------------------------------------------------------- lifecycle

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Stop serving and shut the DHT node and its p2pd down within about `timeout` seconds. Idempotent.

        Ctrl-C reaches p2pd too (it is our child, in the terminal's process group), so p2pd is
        often gone before we close. hivemind's `DHTNode.shutdown` would then ask the dead daemon
        to remove its handlers and wait forever: its control connection never fails the calls
        pending on it. So handlers are unregistered only while p2pd runs, under half the
        timeout, and p2pd is then terminated, and killed if it lingers.
        """
        if self._closed:
            return
        self._closed = True
        if self._watch is not None:
            self._watch.cancel()
        for idle in self._idle_streams.values():
            for _, writer, _ in idle:
                writer.close()
        self._idle_streams.clear()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._node.is_alive = False  # ends hivemind's routing-table refresh loop
        if self._p2pd_running():
            try:
                await asyncio.wait_for(self._unregister_handlers(), timeout / 2)
            except (asyncio.TimeoutError, P2PDaemonError, ConnectionError, OSError) as e:
                logger.debug("p2pd did not unregister our handlers; stopping it anyway", error=repr(e))
        await self._stop_p2pd(max(0.5, deadline - loop.time()))

    def _p2pd_running(self) -> bool:
        child = self._p2p._child  # hivemind keeps the p2pd process private; pinned version
        control = self._p2p._client.control if self._p2p._client is not None else None
        connection_up = control is None or control._read_task is None or not control._read_task.done()
        return child is not None and child.returncode is None and connection_up

    async def _unregister_handlers(self) -> None:
        for protocol in sorted(self._handlers):
            await self.remove_stream_handler(protocol)
        await self._node.protocol.shutdown()  # the DHT's own RPC handlers

    async def _stop_p2pd(self, timeout: float) -> None:
        """SIGTERM p2pd (hivemind's `P2P.shutdown`), SIGKILL it after `timeout` seconds."""
        try:
            await asyncio.wait_for(self._p2p.shutdown(), timeout)
        except asyncio.TimeoutError:
            child = self._p2p._child
            if child is not None and child.returncode is None:
                logger.warning("p2pd ignored SIGTERM; killing it", pid=child.pid)
                child.kill()
                await child.wait()
        # A persistent-connection task that failed when p2pd died would print "Task exception
        # was never retrieved" with a traceback at exit: its error is expected here, retrieve it.
        control = self._p2p._client.control if self._p2p._client is not None else None
        for task in (getattr(control, "_read_task", None), getattr(control, "_write_task", None)):
            if task is not None and task.done() and not task.cancelled():
                task.exception()


@dataclass
class _PendingStore:
    key_id: object  # hivemind DHTID
    subkey: str
    value: bytes  # msgpack-serialized, as hivemind stores it
    expiration: float
    done: asyncio.Future  # resolves to True when at least one other node accepted it


@dataclass
class _FetchState:
    hasher: "hashlib._Hash"
    buf: bytearray
    total: int | None


class _Busy(Exception):
    """The server answered BUSY: retry after the backoff."""


def dialable_maddrs(peer: str, maddrs: Iterable[str]) -> list:
    """The addresses of `peer` (base58 libp2p id) in the form p2pd's CONNECT accepts.

    Announced addresses end in `/p2p/<peer>` (what `visible_maddrs` returns and `--peers` takes).
    p2pd wants them without it: the peer id travels in its own field. A relay circuit address
    (`.../p2p/<relay>/p2p-circuit/p2p/<peer>`) keeps its relay's `/p2p/` part; hivemind's
    multiaddr codec encodes that part in a form go-multiaddr cannot parse ("length greater than
    remaining number of bytes in buffer" fails the whole request), so these addresses are
    encoded here (`_WireMaddr`). An address naming another peer, a circuit through the peer
    itself, or one that does not parse is left out.
    """
    from hivemind.utils.multiaddr import Multiaddr

    out = []
    for text in maddrs:
        text = str(text).strip()
        base, sep, tail = text.rpartition("/p2p/")
        if sep and "/" not in tail.rstrip("/"):  # the `/p2p/<id>` suffix (a relay's has more after it)
            if tail.strip("/") != peer:
                continue
            text = base
        if not text or text.endswith(f"/p2p/{peer}/p2p-circuit"):
            continue
        circuit = text.endswith("/p2p-circuit") and text.count("/p2p/") == 1
        if ("/p2p/" in text or "/p2p-circuit" in text) and not circuit:
            continue
        try:
            out.append(_WireMaddr(text) if circuit else Multiaddr(text))
        except Exception:  # hivemind's parser raises assorted errors for garbage; skip the address
            continue
    return out


class _WireMaddr:
    """A multiaddr holding a `/p2p/<id>` part, encoded as go-multiaddr does: the part is the
    protocol code 421, a length, and the id's multihash (hivemind writes a CIDv1 there)."""

    def __init__(self, text: str):
        from hivemind.utils.multiaddr import Multiaddr

        data = b""
        for proto, value in Multiaddr(text).items():  # parses (or raises) the whole text
            if proto.name == "p2p":
                raw = PeerID.from_base58(value).to_bytes()
                data += _uvarint(proto.code) + _uvarint(len(raw)) + raw
            else:
                data += Multiaddr(f"/{proto.name}" + (f"/{value}" if value is not None else "")).to_bytes()
        self.text, self.data = text, data

    def to_bytes(self) -> bytes:  # what hivemind's p2pd client calls
        return self.data

    def __str__(self) -> str:
        return self.text


def _uvarint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _p2p_class(flags: dict) -> type[P2P]:
    """hivemind's P2P starting p2pd with `flags` added (flags its `create` has no parameter for)."""

    class _P2P(P2P):
        @staticmethod
        def _make_process_args(*args, **kwargs) -> list[str]:
            return P2P._make_process_args(*args, **{**kwargs, **flags})

    return _P2P


async def _shutdown_p2p(p2p: P2P | None) -> None:
    if p2p is not None:
        await p2p.shutdown()


def _peer(peer: PeerID | str) -> PeerID:
    return peer if isinstance(peer, PeerID) else PeerID.from_base58(peer)


def _raw_oid(peer: str, oid: str) -> bytes:
    try:
        raw = bytes.fromhex(oid)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise FetchError(peer, oid, "object ids are 64 hex characters (sha256)")
    return raw


def expiration_in(seconds: float) -> float:
    """An absolute DHT expiration `seconds` from now."""
    return dht_time() + seconds

