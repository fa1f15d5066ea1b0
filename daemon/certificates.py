"""Certificates of past versions, served and fetched over a libp2p stream.

A joiner whose head is far behind the swarm must not take the newest commit on the word of
its own signers (fresh keys can name themselves as the only members). It checks the chain
instead: every version from its head to the commit, each certified by the electorate its
parent fixed (`protocols.certificate.verify_chain`). Version records already travel by hash
over the object stream; their certificates are annotations (not part of the id), so they
travel here, by version id, and are checked by their signatures, not by a hash.

Wire (one request per stream): the client writes the 32-byte version id; the server answers
a 4-byte big-endian length and that many bytes of msgpack: the list of signed vote envelopes
(empty when it holds no certificate for that version). Both sides bound every size.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Callable

import msgpack

from p2pmodel.daemon.logs import get_logger
from p2pmodel.daemon.transport import StreamOpenError, Transport
from p2pmodel.lineage import LineageError, LineageStore
from p2pmodel.protocols.limits import MAX_CERTIFICATE, MAX_MEMBERS

__all__ = ["CERTIFICATE_PROTOCOL", "MAX_CERTIFICATE_BYTES", "CertificateFetchError", "serve_certificates", "fetch_certificate"]

logger = get_logger(__name__)

CERTIFICATE_PROTOCOL = "/p2pmodel/certificate/1"
# The bound SPEC.md gives a certificate of MAX_MEMBERS votes (5 + n x 2179 bytes), the same one the
# by-hash path uses (protocols.certificate.certificate_limit): 1 MiB would refuse a full one.
MAX_CERTIFICATE_BYTES = MAX_CERTIFICATE
_LEN = struct.Struct(">I")
_TIMEOUT = 10.0  # seconds for one request (a certificate is a few kB)


class CertificateFetchError(Exception):
    """No peer served a usable certificate for a version. Field: `version_id`."""

    def __init__(self, version_id: str, reason: str):
        self.version_id, self.reason = version_id, reason
        super().__init__(f"certificate of {version_id[:12]}: {reason}")


def _certificate_bytes(store: LineageStore, vid: str) -> bytes:
    try:
        cert = store.annotations(vid).certificate or {}
    except LineageError:
        cert = {}
    votes = [bytes(v) for v in cert.get("votes", ())][:MAX_MEMBERS]
    return msgpack.packb(votes, use_bin_type=True)


async def serve_certificates(transport: Transport, store: LineageStore) -> None:
    """Answer certificate requests for the versions `store` holds."""

    async def handler(info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            raw = await asyncio.wait_for(reader.readexactly(32), _TIMEOUT)
            data = await asyncio.to_thread(_certificate_bytes, store, raw.hex())
            writer.write(_LEN.pack(len(data)) + data)
            transport.counters.sent("certificate", len(data))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
            pass  # the asker went away or sent garbage: nothing to answer
        finally:
            writer.close()

    await transport.add_stream_handler(CERTIFICATE_PROTOCOL, handler)


async def _ask(transport: Transport, peer: str, vid: str) -> list[bytes]:
    reader, writer = await transport.open_stream(peer, CERTIFICATE_PROTOCOL)
    try:
        writer.write(bytes.fromhex(vid))
        await writer.drain()
        (size,) = _LEN.unpack(await asyncio.wait_for(reader.readexactly(_LEN.size), _TIMEOUT))
        if size > MAX_CERTIFICATE_BYTES:
            raise CertificateFetchError(vid, f"{peer[:16]} offered {size} bytes")
        data = await asyncio.wait_for(reader.readexactly(size), _TIMEOUT)
    finally:
        writer.close()
    transport.counters.received("certificate", len(data))
    try:
        votes = msgpack.unpackb(data, raw=False, max_array_len=MAX_MEMBERS, max_bin_len=MAX_CERTIFICATE_BYTES)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise CertificateFetchError(vid, f"{peer[:16]} sent malformed data ({e})") from None
    if not isinstance(votes, list) or not all(isinstance(v, bytes) for v in votes):
        raise CertificateFetchError(vid, f"{peer[:16]} sent something other than a list of envelopes")
    return votes


async def fetch_certificate(transport: Transport, peers: list[str], vid: str, check: Callable[[list[bytes]], bool]) -> list[bytes]:
    """The first certificate for `vid` from `peers` that passes `check` (the commit rule).

    Raises:
        CertificateFetchError: no peer served one that checks.
    """
    last = "no peers"
    for peer in peers:
        try:
            votes = await _ask(transport, peer, vid)
        except (CertificateFetchError, StreamOpenError, asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError) as e:
            last = str(e)
            continue
        if votes and check(votes):
            return votes
        last = f"{peer[:16]}'s certificate does not commit it"
    raise CertificateFetchError(vid, last)
