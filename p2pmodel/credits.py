"""Credits: what each peer's work did for the lineage, computed from version records (pure).

A committed round's version records its merge spec (see `p2pmodel.versioning`):

    merge["deltas"]    [[peer, delta_hash, weight], ...]  merged; weight = samples (capped by the proposer)
    merge["screened"]  [[peer, why], ...]                 listed by the proposer, left out by the merge's screen
    merge["excluded"]  [[peer, why], ...]                 left out by the proposer itself

`leaderboard(versions)` sums these per peer. It reads nothing but the records it is given, so
every peer that holds the same versions computes the same board, and it is a pure function the
dashboard, a `credits` command and the tests share.

Two things a version record cannot hold are what each peer *announced*: its display name
(`join --name`) and the samples behind a delta that was screened out or came too late. A node
keeps them beside each version it committed, in the certificate annotation (not hashed, not part
of the quorum certificate: every peer saw its own), signed by each peer itself when received:

    certificate["observed"]["names"]    {peer: name}     display names the round's peers announced
    certificate["observed"]["samples"]  {peer: samples}  samples behind each peer's delta of the round

`leaderboard(versions, observed)` takes these per version id. Samples trained are the announced
samples where this node saw the announcement, else the merged weight (a lower bound: the
proposer caps weights); a name is the one of the newest round that recorded one, made safe to
show (`p2pmodel.peers.display_name`). Names are self-chosen and not unique: show the peer id too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from p2pmodel.peers import display_name

__all__ = ["CreditedVersion", "PeerCredit", "AnnouncedDelta", "leaderboard", "observed_of", "samples_trained_since"]


class CreditedVersion(Protocol):
    """The parts of a version record that credits read (`p2pmodel.lineage.Version` has them)."""

    @property
    def id(self) -> str: ...
    @property
    def round(self) -> int | None: ...
    @property
    def author(self) -> str: ...
    @property
    def merge(self) -> Mapping[str, Any] | None: ...


class AnnouncedDelta(Protocol):
    """The parts of a delta announcement that count samples trained (protocols' DeltaAnnouncement)."""

    @property
    def peer_id(self) -> str: ...
    @property
    def round(self) -> int: ...
    @property
    def base_version(self) -> str: ...
    @property
    def samples(self) -> int: ...
    @property
    def carried(self) -> int: ...


def samples_trained_since(announced: Iterable[AnnouncedDelta], round_: int, base: str) -> dict[str, int]:
    """Per peer, the samples it trained for the rounds on `base` up to `round_` (the rounds since
    `base` committed: a failed round's work counts with the next commit), each sample once: the
    samples a delta carried in from an earlier one of its announcements were counted with that one.
    """
    out: dict[str, int] = {}
    for m in announced:
        if m.base_version == base and m.round <= round_:
            out[m.peer_id] = out.get(m.peer_id, 0) + m.samples - m.carried
    return out


@dataclass(frozen=True)
class PeerCredit:
    """One peer's line on the board."""

    peer: str  # peer id
    samples_merged: float  # sum of the peer's merge weights (samples, as capped by the proposer)
    deltas_accepted: int  # deltas of this peer that a committed merge included
    deltas_screened: int  # deltas the merge's screen left out (NaN, norm or cosine outliers)
    deltas_excluded: int  # deltas the proposer left out (rejected at fetch, cooling-off offenders)
    versions_proposed: int  # committed versions this peer proposed (their author)
    last_round: int | None  # latest round in which a delta of this peer was merged
    samples_trained: float = 0.0  # samples it announced for committed rounds (merged weight where unseen)
    name: str | None = None  # display name it announced for itself (sanitised), if any

    @property
    def deltas_rejected(self) -> int:
        return self.deltas_screened + self.deltas_excluded

    def to_json(self) -> dict[str, Any]:
        return {
            "peer": self.peer,
            "name": self.name,
            "samples_trained": self.samples_trained,
            "samples_merged": self.samples_merged,
            "deltas_accepted": self.deltas_accepted,
            "deltas_screened": self.deltas_screened,
            "deltas_excluded": self.deltas_excluded,
            "deltas_rejected": self.deltas_rejected,
            "versions_proposed": self.versions_proposed,
            "last_round": self.last_round,
        }


def _peers(entries: Any) -> list[str]:
    """First field of each [peer, ...] entry; malformed entries count for nobody."""
    if not isinstance(entries, (list, tuple)):
        return []
    return [e[0] for e in entries if isinstance(e, (list, tuple)) and e and isinstance(e[0], str)]


def observed_of(certificate: Any) -> Any:
    """The `observed` part of a version's certificate annotation (None when it has none)."""
    return certificate.get("observed") if isinstance(certificate, Mapping) else None


def _count(x: Any) -> float | None:
    # a weight or sample count that is not a finite count (a forged record) credits nothing
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0 else None


def _observed(notes: Any) -> tuple[dict[str, Any], dict[str, float]]:
    """(names, samples) of a version's `certificate["observed"]`; malformed entries are left out."""
    if not isinstance(notes, Mapping):
        return {}, {}
    names, samples = notes.get("names"), notes.get("samples")
    names = {p: n for p, n in names.items() if isinstance(p, str)} if isinstance(names, Mapping) else {}
    samples = {p: _count(n) for p, n in samples.items() if isinstance(p, str) and _count(n) is not None} if isinstance(samples, Mapping) else {}
    return names, samples


def leaderboard(versions: Iterable[CreditedVersion], observed: Mapping[str, Any] | None = None) -> list[PeerCredit]:
    """Per-peer credits over `versions`, best first.

    Args:
        versions: version records in any order; one seen twice (same id) counts once. Versions
            without a merge spec (local commits, the seed) credit only their author's proposals
            if they have a round.
        observed: version id -> that version's `certificate["observed"]` (see the module
            docstring), where this node recorded one; gives names and samples trained.

    Returns:
        One `PeerCredit` per peer named anywhere, sorted by samples merged, then deltas
        accepted (both descending), then peer id.
    """
    seen: set[str] = set()
    acc: dict[str, dict[str, Any]] = {}
    names: dict[str, tuple[int, str]] = {}  # peer -> (round it was recorded in, name)
    observed = observed or {}

    def row(peer: str) -> dict[str, Any]:
        return acc.setdefault(peer, {"samples": 0.0, "trained": 0.0, "accepted": 0, "screened": 0, "excluded": 0, "proposed": 0, "last": None})

    for v in versions:
        if v.id in seen:
            continue
        seen.add(v.id)
        merge = v.merge or {}
        seen_names, seen_samples = _observed(observed.get(v.id))
        if v.round is not None and merge and v.author:
            row(v.author)["proposed"] += 1
        for entry in merge.get("deltas", ()) or ():
            if not (isinstance(entry, (list, tuple)) and len(entry) >= 3 and isinstance(entry[0], str)):
                continue
            r = row(entry[0])
            r["accepted"] += 1
            weight = _count(entry[2]) or 0.0
            r["samples"] += weight
            if entry[0] not in seen_samples:
                r["trained"] += weight  # we did not see its announcement: the merged weight is a lower bound
            if v.round is not None and (r["last"] is None or v.round > r["last"]):
                r["last"] = v.round
        for peer, n in seen_samples.items():
            row(peer)["trained"] += n
        for peer, raw in seen_names.items():
            name, at = display_name(raw), v.round if v.round is not None else -1
            if name and (peer not in names or at >= names[peer][0]):
                names[peer] = (at, name)
        for peer in _peers(merge.get("screened")):
            row(peer)["screened"] += 1
        for peer in _peers(merge.get("excluded")):
            row(peer)["excluded"] += 1
    board = [
        PeerCredit(peer, r["samples"], r["accepted"], r["screened"], r["excluded"], r["proposed"], r["last"],
                   samples_trained=r["trained"], name=names[peer][1] if peer in names else None)
        for peer, r in acc.items()
    ]
    board.sort(key=lambda c: (-c.samples_merged, -c.deltas_accepted, c.peer))
    return board
