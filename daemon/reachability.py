"""Whether other peers can dial this node, and what its p2pd does about it: relays.

A peer behind a home router (NAT) can dial out but cannot be dialled. libp2p's answer is the
circuit relay: the home keeps a connection open to a public peer ("reserves a slot" there) and
announces `/ip4/<relay>/tcp/<port>/p2p/<relay id>/p2p-circuit/p2p/<home id>`; whoever dials that
address reaches the home through the relay. Every p2pd can relay; this module decides, once at
start, which role a node takes:

- **public** — others can dial it. p2pd is told so (`forceReachabilityPublic`), which starts its
  relay service with p2pd's own limits (4 GiB and 30 min per relayed connection). Without that,
  p2pd relays with go-libp2p's defaults, 128 KiB per connection: measured in tests/nat_lab.py,
  a relayed transfer stopped at 96 KiB.
- **private** — nobody can dial it. p2pd reserves a slot at the `relays` at once (static relays:
  `autoRelay` + `trustedRelays` and no relay discovery, which would wait for 4 candidates or
  3 minutes), and the node announces its relay address once the slot is held.
- **local** — neither: loopback-only swarms (tests, one machine), or a peer with only private
  addresses and no peer to relay through (a LAN). p2pd keeps hivemind's defaults (AutoNAT,
  relay client).

`--reachability auto` (the default) reads the node's own addresses: a public one means
public, only private ones mean private (when there is a peer to relay through), loopback means
local. Pass `public` or `private` when the addresses mislead: a public address behind a
firewall, or a port forwarded on the router.

Pure except `own_addresses`, which reads the machine's network interfaces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from p2pmodel.peers import reachability

__all__ = ["MODES", "RelayPlan", "plan_relays", "relay_candidates", "relays_in", "own_addresses"]

MODES: dict[str, str] = {
    "auto": "decide from this machine's addresses (public address: public; only private ones: private)",
    "public": "others can dial this node: it relays for peers behind NAT",
    "private": "behind NAT or a firewall: reserve a slot at a relay and announce the relay address",
    "local": "neither (hivemind's defaults): one machine, or a LAN where every peer dials every other",
}

_KIND_RANK = {"public": 0, "private": 1, "loopback": 2}  # which address of a relay to use


@dataclass(frozen=True)
class RelayPlan:
    """The role this node takes, and why (for the log and the status)."""

    mode: str  # "public", "private" or "local"
    why: str  # what decided it, one line
    relays: tuple[str, ...] = ()  # multiaddrs (with /p2p/<id>), one per relay peer, a private node reserves at

    def p2p_options(self) -> dict[str, Any]:
        """Keyword arguments for hivemind's `P2P.create`."""
        if self.mode == "public":
            return {"force_reachability": "public"}
        if self.mode == "private":
            return {"force_reachability": "private", "use_auto_relay": True, "trusted_relays": list(self.relays)}
        return {}

    def p2pd_flags(self) -> dict[str, Any]:
        """p2pd flags hivemind's `P2P.create` has no parameter for."""
        # relay discovery would also ask the DHT for candidates and then wait for 4 of them
        # (or 3 minutes) before reserving anywhere; the static relays are reserved at once
        return {"relayDiscovery": False} if self.mode == "private" else {}

    @property
    def waits_for_relay(self) -> bool:
        """A private node announces itself only once it holds a relay slot (or gave up waiting)."""
        return self.mode == "private"


def plan_relays(wanted: str, own_addrs: Sequence[str], relays: Sequence[str]) -> RelayPlan:
    """The role for `--reachability wanted`.

    Args:
        wanted: "auto", "public" or "private" (a key of `MODES`).
        own_addrs: the addresses this node will announce (`own_addresses`).
        relays: multiaddrs of peers to relay through (`--relays`, else `--peers`); their best
            address per peer is kept (`relay_candidates`).

    Raises:
        ValueError: `wanted` is not a mode, or "private" with no peer to relay through.
    """
    if wanted not in MODES:
        raise ValueError(f"reachability must be one of {', '.join(MODES)}, not {wanted!r}")
    candidates = tuple(relay_candidates(relays))
    if wanted in ("public", "local"):
        return RelayPlan(wanted, f"--reachability {wanted}")
    if wanted == "private":
        if not candidates:
            raise ValueError("--reachability private needs a public peer to relay through (--relays or --peers)")
        return RelayPlan("private", "--reachability private", candidates)
    kind = reachability(list(own_addrs))
    if kind == "public":
        return RelayPlan("public", "auto: this machine has a public address")
    if kind == "private":
        if candidates:
            return RelayPlan("private", "auto: only private addresses here", candidates)
        return RelayPlan("local", "auto: only private addresses and no peer to relay through")
    return RelayPlan("local", f"auto: {kind} addresses only")


def relay_candidates(peers: Iterable[str]) -> list[str]:
    """One multiaddr per peer id, its most public direct address, in first-seen order.

    p2pd counts every trusted relay address as one relay and waits until it has a candidate
    for each, so two addresses of one peer would stall it for minutes. Addresses without a
    `/p2p/<id>`, relayed ones and unreadable ones are left out.
    """
    best: dict[str, tuple[int, str]] = {}
    for text in peers:
        text = str(text).strip()
        base, sep, peer = text.rpartition("/p2p/")
        if not sep or not peer or "/" in peer or "/p2p/" in base or "p2p-circuit" in base:
            continue
        rank = _KIND_RANK.get(reachability([base]))
        if rank is not None and (peer not in best or rank < best[peer][0]):
            best[peer] = (rank, text)
    return [text for _, text in best.values()]


def relays_in(addrs: Iterable[str]) -> list[str]:
    """Peer ids of the relays named in circuit addresses (`.../p2p/<relay>/p2p-circuit/...`)."""
    out: list[str] = []
    for text in addrs:
        parts = str(text).split("/")
        if "p2p-circuit" not in parts:
            continue
        i = parts.index("p2p-circuit")
        if i >= 2 and parts[i - 2] in ("p2p", "ipfs") and parts[i - 1] not in out:
            out.append(parts[i - 1])
    return out


def own_addresses(host_maddrs: Sequence[str], announce_maddrs: Sequence[str]) -> list[str]:
    """The addresses this node will announce: `announce_maddrs` if given, else `host_maddrs`
    with 0.0.0.0 replaced by each IPv4 address of this machine's interfaces (as p2pd does)."""
    if announce_maddrs:
        return list(announce_maddrs)
    import psutil  # installed with hivemind

    out: list[str] = []
    for text in host_maddrs:
        if text.startswith("/ip4/0.0.0.0/"):
            rest = text[len("/ip4/0.0.0.0") :]
            for addrs in psutil.net_if_addrs().values():
                out += [f"/ip4/{a.address}{rest}" for a in addrs if a.family.name == "AF_INET"]
        else:
            out.append(text)
    return out
