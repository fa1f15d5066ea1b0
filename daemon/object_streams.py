"""Object streams: content-addressed blobs served by sha256 and fetched from any byte offset.

`ObjectStreams` is the half of `Transport` that serves and fetches blobs (encoded deltas,
version records, tensor objects, certificates, manifests) over `OBJECT_PROTOCOL` on the
transport's p2pd; `Transport` inherits it and calls `_init_object_streams()` from its
`__init__` and `_close_object_streams()` on shutdown. It uses the transport's `_p2p`, `limits`,
`counters` and `_closed`.

The wire format is `protocols/stream.py` (pure framing); this module only moves its bytes. The
blob bytes are written in `chunk_size` pieces. A stream serves requests one after another: a
fetcher keeps up to `max_idle_streams_per_peer` open streams per peer for its next fetch (a new
libp2p stream costs about 1 kB on the wire), and a server closes a stream idle for
`stream_keepalive` seconds or past `max_open_streams`. A pooled stream the server already closed
is replaced by a new one for the same request. A cut stream is resumed from the last byte
received; the whole blob is verified against its hash before it is returned.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from hivemind.p2p import P2PDaemonError, P2PHandlerError, PeerID

from p2pmodel.daemon.addresses import as_peer_id
from p2pmodel.daemon.logs import get_logger
from p2pmodel.daemon.transport_errors import (
    BadResponse,
    FetchError,
    FetchTimeout,
    HashMismatch,
    ObjectNotFound,
    ObjectTooLarge,
    PeerUnreachable,
)
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

__all__ = ["ObjectStreams", "BlobSource", "object_id"]

logger = get_logger(__name__)

BlobSource = Callable[[str], "bytes | None"]
"""source(oid) -> the blob's bytes, or None. Called in a worker thread: it may read disk and hash."""


def object_id(data: bytes | bytearray | memoryview) -> str:
    """The content address of a blob: sha256 hex of its bytes."""
    return hashlib.sha256(data).hexdigest()


class ObjectStreams:
    """Serving and fetching blobs by hash; mixed into `Transport` (see the module docstring)."""

    def _init_object_streams(self) -> None:
            self._blobs: dict[str, tuple[bytes, str]] = {}  # oid -> (data, kind), served from memory
            self._sources: list[tuple[BlobSource, str]] = []  # fallbacks, e.g. the lineage store
            self._serving = 0
            self._open_streams = 0  # object streams we serve, idle or not
            self.object_streams_opened = 0  # object streams we opened as a fetcher
            self._idle_streams: dict[str, list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]]] = {}
            # Private events: serve objects only to libp2p peers this says yes to (None: anyone).
            self.serve_only: Callable[[str], bool] | None = None
            self.refused_streams = 0

    def _close_object_streams(self) -> None:
        for idle in self._idle_streams.values():
            for _, writer, _ in idle:
                writer.close()
        self._idle_streams.clear()


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
        peer_id = as_peer_id(peer)
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


@dataclass
class _FetchState:
    hasher: "hashlib._Hash"
    buf: bytearray
    total: int | None


class _Busy(Exception):
    """The server answered BUSY: retry after the backoff."""


def _raw_oid(peer: str, oid: str) -> bytes:
    try:
        raw = bytes.fromhex(oid)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise FetchError(peer, oid, "object ids are 64 hex characters (sha256)")
    return raw
