"""What a peer has seen of the round it is in: the per-round view, the vote tallies, a sync target.

Plain state for `round.py`'s `RoundMachine`, which alone decides what to do with it (the h11
rule: every decision of the round lives there). The view is rebuilt on entering each round.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .messages import DeltaAnnouncement, Proposal, Vote

__all__ = ["RoundView", "Tally", "SyncTarget", "proposer_rank_key"]


def proposer_rank_key(round_: int, peer_id: str) -> bytes:
    """Proposers of a round are ranked by this key, lowest first: sha256(f"{round}:{peer_id}")."""
    return hashlib.sha256(f"{round_}:{peer_id}".encode()).digest()


class Tally:
    """Votes for one (proposal hash, version id): who signed, and how many count where."""

    __slots__ = ("voters", "in_members", "in_electorate")

    def __init__(self) -> None:
        self.voters: set[str] = set()
        self.in_members = 0
        self.in_electorate = 0


class RoundView:
    """What the machine has seen of the round it is in. Reset on entering a round."""

    def __init__(self, round_: int, base: str, t0: float) -> None:
        self.round, self.base, self.t0 = round_, base, t0
        self.members: set[str] = set()  # announced for this round
        self.departed: set[str] = set()
        self.deltas: dict[str, DeltaAnnouncement] = {}  # by peer id
        self.fetch: dict[str, bool | None] = {}  # delta hash -> None (asked), True, False
        self.proposals: dict[str, tuple[Proposal, str]] = {}  # proposer -> (proposal, hash)
        self.bad_proposers: set[str] = set()  # equivocated, bogus or unfetchable
        self.candidate: str | None = None  # hash of the adopted proposal
        self.merge_asked: set[str] = set()  # proposal hashes we asked to merge this round
        self.computed: dict[str, str] = {}  # version id -> proposal hash, from our merges
        self.vote: Vote | None = None
        self.votes: dict[str, Vote] = {}  # voter -> vote
        self.equivocators: set[str] = set()
        self.tallies: dict[tuple[str, str], Tally] = {}
        self.dirty: set[tuple[str, str]] = set()  # tallies changed since the last quorum check
        self.by_hash: dict[str, Proposal] = {}
        self.proposed = False
        self.fetch_proposal_asked: set[str] = set()
        self.helped = False  # republished our last Commit for a laggard this round
        self.keys: dict[str, bytes] = {}  # live member -> proposer rank key
        self.slots: dict[str, int] = {}  # proposer -> rank, cached until members change
        self.ahead_of_me = 0  # live members ranked before us (kept incrementally: asked every event)
        self.my_key = b""
        self.closed_at: float | None = None  # when every expected delta was in (early close)
        self.newcomer_at: float | None = None  # when the latest peer outside the electorate joined, within the window
        self.norms: dict[str, float] = {}  # delta hash -> L2 norm of the screened delta
        self.excluded: dict[str, str] = {}  # peer id -> why its delta is left out this round

    def add_member(self, peer_id: str) -> None:
        self.members.add(peer_id)
        self.keys[peer_id] = k = proposer_rank_key(self.round, peer_id)
        self.ahead_of_me += k < self.my_key
        self.slots.clear()

    def depart(self, peer_id: str) -> None:
        self.departed.add(peer_id)
        k = self.keys.pop(peer_id, None)
        if k is not None:
            self.ahead_of_me -= k < self.my_key
        self.slots.clear()

    def rank(self, peer_id: str, me: str) -> int:
        """How many live members rank before `peer_id` as proposer."""
        if peer_id == me:
            return self.ahead_of_me
        r = self.slots.get(peer_id)
        if r is None:
            key = proposer_rank_key(self.round, peer_id)
            r = self.slots[peer_id] = sum(1 for k in self.keys.values() if k < key)
        return r

    def proposer_order(self) -> list[str]:
        """Live members, best proposer rank first."""
        return sorted(self.keys, key=self.keys.__getitem__)


@dataclass
class SyncTarget:
    """A version a quorum committed that we must hold before going on (the SYNCING phase)."""

    round: int
    version_id: str
    proposal_hash: str
    base: str
    votes: tuple[Vote, ...]
    have_version: bool
    members: frozenset[str] | None  # of the committed proposal, once known
    await_merge_until: float | None = None  # our own merge of it is running: wait for it until then
