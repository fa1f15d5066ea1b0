"""What a node knows of its swarm's peers, from the records they signed (pure: no I/O, no clock).

- `display_name(raw)` — a peer's self-chosen name (`p2pmodel join --name`), made safe to show:
  control and format characters (terminal escapes, bidi overrides, zero-width marks) removed,
  whitespace collapsed, at most `MAX_NAME_CHARS` characters. `name_problem(name)` says what is
  wrong with one we were given on our own command line (it is refused there, not trimmed).
- `reachability(addrs)` — what a peer's announced multiaddrs say about who can dial it.
- `SwarmView` — per peer: name, device, addresses, whether we could dial them, the rounds it
  announced, delivered a delta in and had merged, and the rate its deltas delivered samples at.
  `daemon/rounds.py` feeds it what it receives; `snapshot(now)` is the status's `swarm` section.

Everything here comes from peers: a name, a device or an address is what the peer *says*, signed
by its own key (nobody can set another peer's name), never checked by anyone. Names are not
unique; whoever shows one shows the peer id beside it.
"""

from __future__ import annotations

import ipaddress
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MAX_NAME_CHARS",
    "REACHABILITY",
    "PeerSeen",
    "SwarmView",
    "display_name",
    "name_problem",
    "reachability",
]

MAX_NAME_CHARS = 32  # a leaderboard column, not a message
_MAX_DEVICE_CHARS = 24  # "cuda:0", "cpu", "mps"
_MAX_PEERS = 1024  # peers a view remembers; the least recently heard from is forgotten first
_MAX_ROWS = 256  # peers a snapshot lists
_MAX_ADDRS_SHOWN = 4

# what `reachability` answers, and what each answer means (status --swarm prints these)
REACHABILITY: dict[str, str] = {
    "public": "announces a public address: others can dial it (unless a firewall drops them)",
    "private": "announces only private-network addresses: dialable on its network; elsewhere it is reached "
               "only over connections it opens itself",
    "loopback": "announces only 127.0.0.1/::1: dialable from its own machine only",
    "relay": "announces no public address but a relay circuit: others reach it through that relay",
    "outbound-only": "announces no address: reached only over connections it opens itself",
    "unknown": "no announcement seen (or addresses we cannot read)",
}


def display_name(raw: Any, limit: int = MAX_NAME_CHARS) -> str | None:
    """`raw` as a name safe to print in a terminal, a table or a web page; None if nothing is left.

    Args:
        raw: anything a peer sent (a non-string is no name).
        limit: most characters kept; a longer name is cut and ends in "…".
    """
    if not isinstance(raw, str):
        return None
    # Unicode category C* (Cc control, Cf format, Cs, Co, Cn): escapes that repaint a terminal,
    # bidi overrides that reverse what follows, invisible marks that make two names look alike
    text = "".join(" " if unicodedata.category(ch)[0] == "C" else ch for ch in raw[: 8 * limit])
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text or None


def name_problem(name: str) -> str | None:
    """Why `name` cannot be our own display name (None: it can). Empty means no name."""
    if len(name) > MAX_NAME_CHARS:
        return f"at most {MAX_NAME_CHARS} characters, not {len(name)}"
    if name and display_name(name) != name:
        return "printable characters only, single spaces, no leading or trailing space"
    return None


def _addr_kind(addr: str) -> str | None:
    """One multiaddr: "relay", "public", "private", "loopback", or None (unreadable)."""
    parts = addr.split("/")
    if "p2p-circuit" in parts:
        return "relay"
    if len(parts) < 3 or parts[0] != "":
        return None
    proto, value = parts[1], parts[2]
    if proto in ("dns", "dns4", "dns6", "dnsaddr"):
        return "loopback" if value == "localhost" else "public"
    if proto not in ("ip4", "ip6"):
        return None
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return None
    if ip.is_unspecified:
        return None
    if ip.is_loopback:
        return "loopback"
    return "public" if ip.is_global else "private"


def reachability(addrs: Sequence[str] | None) -> str:
    """What announced multiaddrs say about dialing a peer: a key of `REACHABILITY`.

    `None` means we saw no announcement ("unknown"); an empty list means it announced none
    ("outbound-only"). A public address decides first; then a relay circuit (a home behind NAT
    announces its LAN address too, but others reach it through the relay); then private over
    loopback.
    """
    if addrs is None:
        return "unknown"
    if not addrs:
        return "outbound-only"
    kinds = {_addr_kind(a) for a in addrs}
    for kind in ("public", "relay", "private", "loopback"):
        if kind in kinds:
            return kind
    return "unknown"


@dataclass
class PeerSeen:
    """One peer as this node has heard of it. Rounds are swarm rounds; times are this node's clock."""

    peer_id: str
    name: str | None = None  # display name it announced (sanitised)
    device: str | None = None  # training device it announced (sanitised)
    libp2p_id: str | None = None
    addrs: tuple[str, ...] | None = None  # announced multiaddrs; None until an announcement arrives
    dial: str = "not tried"  # our connection to its announced addresses: "ok", "failed", "not tried"
    round: int | None = None  # latest round it announced it entered
    delta_round: int | None = None  # latest round it announced a delta for
    delta_samples: int | None = None  # samples behind that delta
    merged_round: int | None = None  # latest round whose version, committed here, merged its delta
    samples_per_s: float | None = None  # samples its last delta delivered / seconds since the one before
    last_seen: float = 0.0  # unix seconds (ours) of its latest record
    departed: bool = False  # it said goodbye after its latest announcement
    _prev_delta: tuple[int, float] | None = field(default=None, repr=False)  # (round, when) of the delta before

    def to_json(self, now: float, me: str | None = None) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id,
            "name": self.name,
            "self": self.peer_id == me,
            "device": self.device,
            "libp2p_id": self.libp2p_id,
            "addrs": list(self.addrs[:_MAX_ADDRS_SHOWN]) if self.addrs is not None else None,
            "reachability": reachability(self.addrs),
            "dial": "self" if self.peer_id == me else self.dial,
            "round": self.round,
            "delta_round": self.delta_round,
            "delta_samples": self.delta_samples,
            "merged_round": self.merged_round,
            "samples_per_s": None if self.samples_per_s is None else round(self.samples_per_s, 2),
            "last_seen_s": round(max(0.0, now - self.last_seen), 1),
            "departed": self.departed,
        }


class SwarmView:
    """Every peer this node heard of, as of the records it received (and its own).

    Each method takes what one record said; none raises for odd values (they come from peers
    and are shown, never trusted). At most `max_peers` are remembered.
    """

    def __init__(self, max_peers: int = _MAX_PEERS):
        self.max_peers = max_peers
        self._peers: dict[str, PeerSeen] = {}

    def __len__(self) -> int:
        return len(self._peers)

    def get(self, peer_id: str) -> PeerSeen | None:
        return self._peers.get(peer_id)

    def _peer(self, peer_id: str, now: float) -> PeerSeen:
        p = self._peers.get(peer_id)
        if p is None:
            if len(self._peers) >= self.max_peers:
                oldest = min(self._peers.values(), key=lambda q: q.last_seen)
                del self._peers[oldest.peer_id]
            p = self._peers[peer_id] = PeerSeen(peer_id)
        p.last_seen = max(p.last_seen, now)
        return p

    def announced(self, peer_id: str, *, libp2p_id: str, addrs: Iterable[str], capabilities: Mapping[str, Any],
                  round: int, now: float) -> None:  # fmt: skip
        """Its PeerAnnouncement for `round` arrived (name and device from its capabilities)."""
        p = self._peer(peer_id, now)
        if p.round is not None and round < p.round:
            return  # an old announcement read back from the DHT says nothing new
        if libp2p_id != p.libp2p_id:
            p.dial = "not tried"  # a restarted peer: its new addresses are not dialed yet
        p.round, p.libp2p_id, p.addrs = round, libp2p_id, tuple(addrs)
        p.name = display_name(capabilities.get("name"))
        p.device = display_name(capabilities.get("device"), _MAX_DEVICE_CHARS)
        p.departed = False

    def dialed(self, peer_id: str, ok: bool) -> None:
        """Whether our connection to its announced addresses succeeded."""
        p = self._peers.get(peer_id)
        if p is not None:
            p.dial = "ok" if ok else "failed"

    def delta(self, peer_id: str, round: int, samples: int, now: float) -> None:
        """Its DeltaAnnouncement for `round` arrived, `now`. The rate is that delta's samples over
        the time since its delta of the round before (deltas of rounds further apart: unknown)."""
        p = self._peer(peer_id, now)
        if p.delta_round is not None and round <= p.delta_round:
            return
        if p._prev_delta is not None and p._prev_delta[0] == round - 1 and now > p._prev_delta[1]:
            p.samples_per_s = samples / (now - p._prev_delta[1])
        elif p._prev_delta is not None:
            p.samples_per_s = None  # it missed a round: the interval says nothing about its speed
        p.delta_round, p.delta_samples, p._prev_delta = round, samples, (round, now)

    def merged(self, round: int, peer_ids: Iterable[str]) -> None:
        """A version of `round` committed here, merging these peers' deltas."""
        for peer_id in peer_ids:
            p = self._peers.get(peer_id)
            if p is not None and (p.merged_round is None or round > p.merged_round):
                p.merged_round = round

    def departed(self, peer_id: str, round: int, now: float) -> None:
        """Its Departure after `round` arrived (an old one, from before its latest announcement, is ignored)."""
        p = self._peers.get(peer_id)
        if p is not None and (p.round is None or round >= p.round - 1):
            p.departed = True
            p.last_seen = max(p.last_seen, now)

    def names(self, peer_ids: Iterable[str]) -> dict[str, str]:
        """The display names these peers announced (peers without one are left out)."""
        out = {}
        for peer_id in peer_ids:
            p = self._peers.get(peer_id)
            if p is not None and p.name:
                out[peer_id] = p.name
        return out

    def snapshot(self, now: float, me: str | None = None, limit: int = _MAX_ROWS) -> dict[str, Any]:
        """The `swarm` section of the status: peers still here first, latest round first, then by id."""
        rows = sorted(self._peers.values(), key=lambda p: (p.departed, -(p.round if p.round is not None else -1), p.peer_id))
        return {
            "peers": [p.to_json(now, me) for p in rows[:limit]],
            "known": len(rows),
            "truncated": len(rows) > limit,
        }
