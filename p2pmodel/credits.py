"""Credits: what each peer's work did for the lineage, computed from version records alone.

A committed round's version records its merge spec (see `p2pmodel.versioning`):

    merge["deltas"]    [[peer, delta_hash, weight], ...]  merged; weight = samples (capped by the proposer)
    merge["screened"]  [[peer, why], ...]                 listed by the proposer, left out by the merge's screen
    merge["excluded"]  [[peer, why], ...]                 left out by the proposer itself

`leaderboard(versions)` sums these per peer. It reads nothing but the records it is given, so
every peer that holds the same versions computes the same board, and it is a pure function the
dashboard, a `credits` command and the tests share.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["CreditedVersion", "PeerCredit", "leaderboard"]


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

    @property
    def deltas_rejected(self) -> int:
        return self.deltas_screened + self.deltas_excluded

    def to_json(self) -> dict[str, Any]:
        return {
            "peer": self.peer,
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


def leaderboard(versions: Iterable[CreditedVersion]) -> list[PeerCredit]:
    """Per-peer credits over `versions`, best first.

    Args:
        versions: version records in any order; one seen twice (same id) counts once. Versions
            without a merge spec (local commits, the seed) credit only their author's proposals
            if they have a round.

    Returns:
        One `PeerCredit` per peer named anywhere, sorted by samples merged, then deltas
        accepted (both descending), then peer id.
    """
    seen: set[str] = set()
    acc: dict[str, dict[str, Any]] = {}

    def row(peer: str) -> dict[str, Any]:
        return acc.setdefault(peer, {"samples": 0.0, "accepted": 0, "screened": 0, "excluded": 0, "proposed": 0, "last": None})

    for v in versions:
        if v.id in seen:
            continue
        seen.add(v.id)
        merge = v.merge or {}
        if v.round is not None and merge and v.author:
            row(v.author)["proposed"] += 1
        for entry in merge.get("deltas", ()) or ():
            if not (isinstance(entry, (list, tuple)) and len(entry) >= 3 and isinstance(entry[0], str)):
                continue
            r = row(entry[0])
            r["accepted"] += 1
            weight = entry[2]
            # a weight that is not a finite count (a forged record) credits nothing
            ok = isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0
            r["samples"] += float(weight) if ok else 0.0
            if v.round is not None and (r["last"] is None or v.round > r["last"]):
                r["last"] = v.round
        for peer in _peers(merge.get("screened")):
            row(peer)["screened"] += 1
        for peer in _peers(merge.get("excluded")):
            row(peer)["excluded"] += 1
    board = [
        PeerCredit(peer, r["samples"], r["accepted"], r["screened"], r["excluded"], r["proposed"], r["last"])
        for peer, r in acc.items()
    ]
    board.sort(key=lambda c: (-c.samples_merged, -c.deltas_accepted, c.peer))
    return board
