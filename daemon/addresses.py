"""Multiaddrs and peer ids as p2pd takes them (pure, except hivemind's parsers).

- `dialable_maddrs(peer, maddrs)` — announced addresses in the form p2pd's CONNECT accepts;
  relay circuit addresses re-encoded as go-multiaddr does (`_WireMaddr`).
- `as_peer_id(peer)` — a `PeerID` from one or its base58 text.
"""

from __future__ import annotations

from typing import Iterable

from hivemind.p2p import PeerID

__all__ = ["dialable_maddrs", "as_peer_id"]


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


def as_peer_id(peer: PeerID | str) -> PeerID:
    return peer if isinstance(peer, PeerID) else PeerID.from_base58(peer)
