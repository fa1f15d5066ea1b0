"""The round's state machine: events in, actions out, no I/O, no clocks.

Everything that decides how a peer moves through a round lives in this file (the h11 rule).
The daemon feeds events (`Start`, `Tick`, `TrainingDone`, `MessageReceived`, ...) into
`RoundMachine.process()` and carries out the actions it returns (`Publish`, `FetchDelta`,
`Merge`, `CommitVersion`, ...). `next_deadline()` says when to send the next `Tick`.

Phase changes are data: `TRANSITIONS[phase][trigger type] -> phase`. A trigger is either an
external event or one of the internal decisions below (`ProposalAdopted`, `QuorumReached`,
...). An external event whose type is not in the current phase's row, or that contradicts
what the machine asked for (a `MergeDone` nobody requested), raises `LocalProtocolError`
before anything is changed. Remote input never raises: a record for the wrong round or
base, from a non-member, a duplicate or an equivocation is dropped and counted
(`RoundMachine.counters`).

The protocol is the one in docs/ARCHITECTURE.md ("The round"), with one safety fix:

*Double quorum.* A version commits only when at least ``ceil(2/3 * |M|)`` of the proposal's
members M **and** at least ``ceil(2/3 * |E|)`` of the round's electorate E signed the same id,
where E is the member list of the proposal that committed the head the round builds on
(for the genesis head, the electorate the caller passes to `Start`). Quorums over M alone
are not safe: two sides of a partition, or a liar who proposes with a tiny member list,
can each gather 2/3 of *their own* list and commit different ids. Two quorums of one fixed
E intersect in more than |E|/3 peers, so in an honest one that voted once (the joint
consensus argument of Raft's membership change). Corollaries:

- a commit for a round or base we cannot check fully (we fell behind) is adopted when at
  least ``|E| - ceil(2/3 |E|) + 1`` of *our* electorate signed it: one of them is honest;
- the same weak quorum of E publishing deltas or votes for a later round makes a peer jump
  to that round (announcements alone do not: a peer catching up announces a round ahead);
- if more than a third of E vanishes at once, rounds stop committing until they return.

Why one long file (~1,200 lines): every decision of the round lives here on purpose (the h11
rule); events and actions are in round_io.py, what the machine has seen of a round (the view,
vote tallies, a sync target) in round_view.py, the commit rule in certificate.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from fractions import Fraction
from typing import Callable

from .certificate import CertifiedCommit, commits, open_certificate, quorum, vouches, weak_quorum
from .errors import LocalProtocolError
from .round_io import (  # re-exported: the daemon and tests import them from here
    Action,
    CommitVersion,
    DeltaFetched,
    EnterRound,
    Event,
    FetchDelta,
    FetchProposal,
    KeepDelta,
    Merge,
    MergeDone,
    MergeFailed,
    MessageReceived,
    Publish,
    PublishCommit,
    RoundFailed,
    Start,
    StartTraining,
    Stop,
    SyncFailed,
    SyncVersion,
    Tick,
    TrainingDone,
    VersionSynced,
)
from .round_view import RoundView, SyncTarget, Tally, proposer_rank_key  # proposer_rank_key: re-exported
from .messages import (
    MAX_MEMBERS,
    DeltaAnnouncement,
    Departure,
    Message,
    PeerAnnouncement,
    Proposal,
    ProposalDelta,
    Vote,
    message_hash,
)

__all__ = [
    "Phase",
    "RoundConfig",
    "PeerInfo",
    "Start",
    "Tick",
    "TrainingDone",
    "MessageReceived",
    "DeltaFetched",
    "MergeDone",
    "MergeFailed",
    "VersionSynced",
    "SyncFailed",
    "Stop",
    "Publish",
    "StartTraining",
    "KeepDelta",
    "FetchDelta",
    "FetchProposal",
    "Merge",
    "CommitVersion",
    "PublishCommit",
    "SyncVersion",
    "EnterRound",
    "RoundFailed",
    "TRANSITIONS",
    "RoundMachine",
    "proposer_rank_key",
    "quorum",
    "weak_quorum",
]


class Phase(Enum):
    """Where a peer is in the current round. Local training runs beside these (a flag)."""

    IDLE = "idle"  # no head yet: waiting for Start
    COLLECTING = "collecting"  # in a round: announcing, fetching deltas, waiting for a proposal
    MERGING = "merging"  # adopted a proposal: fetching its deltas, merge asked for
    VOTED = "voted"  # our vote is out; waiting for a quorum
    SYNCING = "syncing"  # a quorum committed a version we do not hold: fetching it
    STOPPED = "stopped"  # left the swarm (Departure published); accepts nothing


@dataclass(frozen=True)
class RoundConfig:
    """Timing and quorum rules of the round; every peer of an event must use the same."""

    collect_window: float = 60.0  # seconds from entering a round to the first proposer's slot
    proposal_timeout: float = 10.0  # seconds each proposer rank waits before the next takes over
    round_deadline: float = 240.0  # seconds from entering a round until it fails if nothing committed
    early_close: bool = True  # close the collect window once every expected delta is in
    min_members: int = 1  # early close also waits until this many peers are expected (the event's group size)
    # Who stores each Commit in the DHT: the proposer, then the next best-ranked members. One is
    # enough (3 cost ~4 kB per peer per round at 3 nodes): live peers commit from pushed votes, a
    # member left on the replaced head gets the Commit republished (`_help_laggard`), and a lost
    # one is replaced by the next round's.
    commit_publishers: int = 1
    quorum: Fraction = Fraction(2, 3)  # share of members (and of the electorate) that must sign
    max_members: int = MAX_MEMBERS  # announcements accepted per round; later ones are dropped
    future_rounds: int = 8  # rounds ahead of ours whose records are buffered, not dropped
    future_buffer: int = 4 * MAX_MEMBERS  # records buffered for future rounds, in all
    proposal_cache: int = 64  # proposals of past rounds kept by hash (to learn an electorate)
    # Screening (with >= 3 deltas, where the median is honest while most peers are):
    max_norm_ratio: float = 4.0  # a delta whose norm exceeds this x the round's median is left out
    max_weight_ratio: float = 2.0  # a delta's merge weight is capped at this x the median samples
    # Repeat offenders (a delta rejected at fetch, a norm outlier, screened out by the merge):
    # one offence in the last `offence_window` rounds halves a peer's weight in our proposals,
    # `cooloff_offences` leave it out until the window has passed since its last offence.
    offence_window: int = 8
    cooloff_offences: int = 2
    method: str = "linear"  # merge method written into our proposals (p2pmodel.merge.METHODS)
    params: tuple[tuple[str, str | bool | int | float], ...] = ()  # its parameters

    def __post_init__(self) -> None:
        if not (0 < self.collect_window and 0 < self.proposal_timeout and self.collect_window < self.round_deadline):
            raise LocalProtocolError("RoundConfig needs 0 < collect_window < round_deadline and proposal_timeout > 0")
        if not Fraction(1, 2) < self.quorum <= 1:
            raise LocalProtocolError(f"RoundConfig.quorum must be in (1/2, 1], got {self.quorum}")


@dataclass(frozen=True)
class PeerInfo:
    """What our PeerAnnouncement says besides the round (see messages.PeerAnnouncement)."""

    peer_id: str  # hex sha256(public_key)[:20]
    public_key: bytes  # raw Ed25519 public key
    libp2p_id: str  # base58 libp2p peer id
    addrs: tuple[str, ...]  # multiaddrs
    event_hash: str  # sha256 hex of the event manifest
    capabilities: tuple[tuple[str, str | bool | int | float], ...] = ()  # informative


# --------------------------------------------------------------------------------------
# Internal triggers: decisions the machine takes while handling an event.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProposalAdopted:
    """We picked a proposal to merge (or switched to a better-ranked one before voting)."""


@dataclass(frozen=True)
class ProposalDropped:
    """The adopted proposal turned out invalid (unfetchable delta, merge failed)."""


@dataclass(frozen=True)
class VoteCast:
    """Our merge finished and our vote went out."""


@dataclass(frozen=True)
class QuorumReached:
    """A version committed and we hold it (or just synced it): enter the next round."""


@dataclass(frozen=True)
class NeedSync:
    """A version committed that we do not hold: fetch it before going on."""


@dataclass(frozen=True)
class RoundTimedOut:
    """round_deadline passed with nothing committed: head unchanged, next round."""


@dataclass(frozen=True)
class RoundSkipped:
    """A weak quorum of the electorate is in a later round: jump there."""


# --------------------------------------------------------------------------------------
# The table. External events that only change what the machine has seen keep the phase;
# the internal triggers move it.
# --------------------------------------------------------------------------------------

_SEEN = {
    Tick: None, TrainingDone: None, MessageReceived: None, DeltaFetched: None,
    MergeDone: None, MergeFailed: None, VersionSynced: None, SyncFailed: None,
}  # fmt: skip
# Results (fetch, merge, sync) may come back after the machine stopped waiting for them: the
# daemon cannot cancel them in time. They are legal wherever they can race, and counted as stale.


def _row(phase: Phase, moves: dict[type, Phase]) -> dict[type, Phase]:
    """A phase inside a round: it sees records, can stop, fail, commit or need a sync."""
    row: dict[type, Phase] = {t: phase for t in _SEEN}
    row.update({Stop: Phase.STOPPED, RoundTimedOut: Phase.COLLECTING, RoundSkipped: Phase.COLLECTING})
    row.update({NeedSync: Phase.SYNCING})
    row.update(moves)
    return row


TRANSITIONS: dict[Phase, dict[type, Phase]] = {
    Phase.IDLE: {Start: Phase.COLLECTING, Stop: Phase.STOPPED},
    Phase.COLLECTING: _row(Phase.COLLECTING, {ProposalAdopted: Phase.MERGING}),
    Phase.MERGING: _row(
        Phase.MERGING, {ProposalAdopted: Phase.MERGING, ProposalDropped: Phase.COLLECTING, VoteCast: Phase.VOTED}
    ),
    Phase.VOTED: _row(Phase.VOTED, {}),
    # While syncing, the round's deadline no longer applies: a quorum already decided it.
    Phase.SYNCING: {
        **{t: Phase.SYNCING for t in _SEEN},
        Stop: Phase.STOPPED,
        NeedSync: Phase.SYNCING,  # a later commit retargets the sync
        VersionSynced: Phase.SYNCING,  # QuorumReached follows once the electorate is known too
        SyncFailed: Phase.SYNCING,
        QuorumReached: Phase.COLLECTING,
    },
    Phase.STOPPED: {},
}

# --------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------


class RoundMachine:
    """One peer's view of the rounds. Pure and deterministic: same events, same actions.

    Args:
        peer: what our PeerAnnouncement says (id, keys, addresses, event).
        config: the round's timing and quorum rules.
        open_vote: opens one signed vote envelope of a Commit certificate into (Vote, signer),
            raising RemoteProtocolError when it does not verify. Default: `signing.open_signed`.
    """

    def __init__(
        self,
        peer: PeerInfo,
        config: RoundConfig = RoundConfig(),
        *,
        open_vote: Callable[[bytes], tuple[Vote, str]] | None = None,
    ) -> None:
        if open_vote is None:
            from .signing import open_signed

            def open_vote(data: bytes) -> tuple[Vote, str]:
                msg, signer = open_signed(data, Vote)
                return msg, signer  # type: ignore[return-value]

        self.peer, self.config, self._open_vote = peer, config, open_vote
        self._announcement(0, 0.0)  # a PeerInfo that cannot make a valid announcement fails here, not mid-round
        self.phase = Phase.IDLE
        self.head_version: str | None = None
        self.head_round: int | None = None
        self.electorate: frozenset[str] = frozenset()
        self._view: RoundView | None = None
        self._training: tuple[int, str] | None = None  # (round, base) of the running training
        self._my_delta: tuple[str, int, int, int, str] | None = None  # hash, samples, size, round, base
        self._sync: SyncTarget | None = None
        self._future: dict[int, list[tuple[Message, str]]] = {}
        self._future_count = 0
        self._future_announcers: dict[int, set[str]] = {}
        self._proposal_cache: dict[str, tuple[int, Proposal]] = {}
        # What we asked the daemon for, with the round we asked in: a result for something
        # never asked is a bug (raises); one asked in the last `future_rounds` rounds may
        # still be in flight and is only stale. Older entries are forgotten.
        self._fetch_asked: dict[str, int] = {}  # delta hash -> round
        self._merge_asked: dict[str, int] = {}  # proposal hash -> round
        self._sync_asked: dict[str, int] = {}  # version id -> round
        self._last_commit: tuple[str, int, str, tuple[Vote, ...]] | None = None  # (base, round, id, votes)
        self._announced_rounds: set[int] = set()  # rounds ahead of ours we already announced for
        self._offences: dict[str, list[int]] = {}  # peer -> rounds in which it offended (recent ones)
        self.counters: dict[str, int] = {k: 0 for k in _COUNTERS}
        self._now = float("-inf")  # latest event time: next_deadline only returns later times

    @property
    def _round_view(self) -> RoundView:
        """The view of the round we are in; every handler past `Start` runs in one.

        Raises LocalProtocolError (our bug) when there is none yet.
        """
        v = self._view
        if v is None:
            raise LocalProtocolError(f"internal: no round view in phase {self.phase.name}")
        return v

    # ---- public ------------------------------------------------------------------------

    @property
    def members(self) -> frozenset[str]:
        """Live members of the current round as this peer knows them (for status pages)."""
        v = self._view
        return frozenset() if v is None else frozenset(v.members - v.departed)

    def announcement(self, now: float) -> PeerAnnouncement:
        """Our announcement for the current round (round 0 before the first): what the shell
        writes into the event's roster when it is due, whether or not this round needed one."""
        return self._announcement(self._view.round if self._view is not None else 0, now)

    def only_we_are_missing(self) -> bool:
        """Every other expected peer announced its delta for this round, and ours is not out yet.

        The daemon then ends our training early (after at least one step): a slow peer takes
        fewer inner steps instead of holding the round or missing it, and the merge weighs its
        delta by the samples it did train. Never true for a peer alone (nobody to keep up with).
        """
        v = self._view
        if v is None or self.phase in (Phase.IDLE, Phase.STOPPED) or self.peer.peer_id in v.deltas:
            return False
        others = self._expected() - {self.peer.peer_id}
        if not others or len(others) + 1 < self.config.min_members:
            return False
        return all(p in v.deltas for p in others)

    @property
    def round(self) -> int | None:
        """The round we are in (None before Start)."""
        return self._view.round if self._view else None

    def process(self, event: Event) -> list[Action]:
        """Feed one event; return the actions to carry out, in order.

        Raises:
            LocalProtocolError: the event is illegal in this phase or contradicts what the
                machine asked for. The state is unchanged.
        """
        row = TRANSITIONS[self.phase]
        if type(event) not in row:
            raise LocalProtocolError(f"{type(event).__name__} is not allowed in phase {self.phase.name}")
        self._check_legal(event)
        self._now = max(self._now, event.now)
        out: list[Action] = []
        handler = getattr(self, "_on_" + type(event).__name__)
        handler(event, out)
        if self.phase not in (Phase.IDLE, Phase.STOPPED):
            self._advance(event.now, out)
        return out

    def next_deadline(self) -> float | None:
        """The time at which the next Tick must arrive (None: nothing is timed)."""
        v = self._view
        if self.phase is Phase.SYNCING and self._sync is not None:
            return self._sync.await_merge_until
        if v is None or self.phase in (Phase.IDLE, Phase.STOPPED, Phase.SYNCING):
            return None
        times = [v.t0 + self.config.round_deadline]
        if not v.proposed and v.vote is None:
            times.append(self._slot(self.peer.peer_id))
        if v.vote is None:
            times.extend(self._slot(p) for p in v.proposals if p not in v.bad_proposers)
        return min(t for t in times if t > self._now or t == times[0])

    # ---- legality ----------------------------------------------------------------------

    def _check_legal(self, event: Event) -> None:
        """Reject events that contradict what we asked for, before touching any state."""
        if isinstance(event, Start) and not event.electorate:
            raise LocalProtocolError("Start needs a non-empty electorate (the genesis one: the seeder)")
        if isinstance(event, TrainingDone) and self._training is None:
            raise LocalProtocolError("TrainingDone but no training was started")
        if isinstance(event, DeltaFetched) and event.delta_hash not in self._fetch_asked:
            raise LocalProtocolError(f"DeltaFetched for {event.delta_hash[:12]} that was never asked for")
        if isinstance(event, (MergeDone, MergeFailed)) and event.proposal_hash not in self._merge_asked:
            raise LocalProtocolError(f"{type(event).__name__} for proposal {event.proposal_hash[:12]} never merged")
        if isinstance(event, (VersionSynced, SyncFailed)) and event.version_id not in self._sync_asked:
            raise LocalProtocolError(f"{type(event).__name__} for {event.version_id[:12]} that was never asked for")

    def _move(self, trigger: type) -> None:
        try:
            self.phase = TRANSITIONS[self.phase][trigger]
        except KeyError:
            raise LocalProtocolError(f"internal: {trigger.__name__} in phase {self.phase.name}") from None

    def _count(self, what: str) -> None:
        self.counters[what] += 1

    # ---- event handlers ----------------------------------------------------------------

    def _on_Start(self, ev: Start, out: list[Action]) -> None:
        self.head_version, self.head_round, self.electorate = ev.head_version, ev.head_round, ev.electorate
        self._move(Start)
        self._enter(self._next_round_after(ev.head_round), ev.now, out, catching_up=True)

    def _on_Stop(self, ev: Stop, out: list[Action]) -> None:
        r = self._view.round if self._view else 0
        if self._view is not None:
            self._keep_my_delta(out)
            out.append(Publish(Departure(peer_id=self.peer.peer_id, round=r, time=max(ev.now, 0.0))))
        self._move(Stop)

    def _on_Tick(self, ev: Tick, out: list[Action]) -> None:
        pass  # _advance does the timed work

    def _on_TrainingDone(self, ev: TrainingDone, out: list[Action]) -> None:
        round_, base = self._training  # type: ignore[misc]
        self._training = None
        v = self._round_view
        if base != v.base:
            # Trained on a head that has since moved: the delta is stale; carry it and retrain.
            out.append(KeepDelta(ev.delta_hash, round_, base, announced=False))
            self._start_training(out)
            return
        self._my_delta = (ev.delta_hash, ev.samples, ev.encoded_size, v.round, v.base)
        if ev.norm is not None:
            v.norms[ev.delta_hash] = ev.norm
        ann = DeltaAnnouncement(
            round=v.round, base_version=v.base, peer_id=self.peer.peer_id,
            delta_hash=ev.delta_hash, encoded_size=ev.encoded_size, samples=ev.samples,
            carried=min(ev.carried, ev.samples),
        )  # fmt: skip
        out.append(Publish(ann))
        self._on_delta_announcement(ann, self.peer.peer_id, out)
        v.fetch[ev.delta_hash] = True  # our own delta is on disk already

    def _on_DeltaFetched(self, ev: DeltaFetched, out: list[Action]) -> None:
        v = self._round_view
        if ev.delta_hash not in v.fetch:
            self._count("stale_results")
            return
        v.fetch[ev.delta_hash] = ev.ok
        if ev.ok and ev.norm is not None:
            v.norms[ev.delta_hash] = ev.norm
        elif not ev.ok and ev.reason:
            self._count("rejected_deltas")
            for peer, ann in v.deltas.items():
                if ann.delta_hash == ev.delta_hash:
                    v.excluded[peer] = ev.reason
                    self._offend(peer, v.round)

    def _on_MergeDone(self, ev: MergeDone, out: list[Action]) -> None:
        v = self._round_view
        if ev.proposal_hash not in v.merge_asked:
            self._count("stale_results")
            return
        v.computed[ev.version_id] = ev.proposal_hash
        for peer in ev.screened:
            self._offend(peer, v.round)
        if self._merge_settles_sync(ev.proposal_hash, ev.version_id, out):
            return
        if ev.proposal_hash != v.candidate or v.vote is not None or self.phase is not Phase.MERGING:
            return  # superseded by a better proposal, or we already voted
        vote = Vote(
            round=v.round, base_version=v.base, proposal_hash=ev.proposal_hash,
            version_id=ev.version_id, voter=self.peer.peer_id, metrics=dict(ev.metrics),
        )  # fmt: skip
        v.vote = vote
        self._move(VoteCast)
        out.append(Publish(vote))
        self._add_vote(vote, self.peer.peer_id)

    def _on_MergeFailed(self, ev: MergeFailed, out: list[Action]) -> None:
        v = self._round_view
        if self._merge_settles_sync(ev.proposal_hash, None, out):
            return
        if ev.proposal_hash != v.candidate or self.phase is not Phase.MERGING:
            self._count("stale_results")
            return
        # The proposal does not merge for us (bad delta, CI gate): it is no longer live, so the
        # next proposer may speak; an honest one lists only deltas it screened.
        prop = self._proposal_by_hash(ev.proposal_hash)
        if prop is not None:
            v.bad_proposers.add(prop.proposer)
        self._count("failed_merges")
        self._drop_candidate()

    def _on_VersionSynced(self, ev: VersionSynced, out: list[Action]) -> None:
        s = self._sync
        if s is None or ev.version_id != s.version_id or s.have_version:
            self._count("stale_results")
            return
        s.have_version = True
        if s.members is None and ev.members and ev.proposal_hash == s.proposal_hash:
            # The quorum signed this record's id, and its merge spec names the proposal and its
            # members: a laggard need not wait for a proposal pushed before it came back (it
            # would wait forever: proposals reach the DHT only when a push missed).
            s.members = ev.members
        self._move(VersionSynced)

    def _on_SyncFailed(self, ev: SyncFailed, out: list[Action]) -> None:
        s = self._sync
        self._move(SyncFailed)
        if s is None or ev.version_id != s.version_id or s.have_version:
            self._count("stale_results")
            return
        out.append(SyncVersion(s.version_id, s.round, tuple(sorted({x.voter for x in s.votes}))))

    def _on_MessageReceived(self, ev: MessageReceived, out: list[Action]) -> None:
        msg, sender = ev.message, ev.sender
        if isinstance(msg, CertifiedCommit):  # a bare Commit names its votes by hash: the shell fetches them
            self._on_commit(msg, ev.now, out)
            return
        if isinstance(msg, Proposal):
            self._proposal_cache_put(msg)
            if self._sync is not None and self._sync.members is None:
                self._learn_members(msg)
        r = getattr(msg, "round", None)
        v = self._round_view
        if not isinstance(msg, (PeerAnnouncement, DeltaAnnouncement, Proposal, Vote, Departure)) or r is None:
            self._count("unexpected")
            return
        if r < v.round or (r == v.round and self.phase is Phase.SYNCING):
            self._count("wrong_round")
            self._help_laggard(msg, out)
            return
        if r > v.round:
            self._buffer_future(msg, sender, ev.now, out)
            return
        if isinstance(msg, PeerAnnouncement):
            self._on_peer_announcement(msg, sender, ev.now)
        elif isinstance(msg, Departure):
            if msg.peer_id in v.members or msg.peer_id in self.electorate:
                v.depart(msg.peer_id)
        elif msg.base_version != v.base:  # DeltaAnnouncement, Proposal, Vote
            self._count("wrong_base")
            self._help_laggard(msg, out)
        elif isinstance(msg, DeltaAnnouncement):
            self._on_delta_announcement(msg, sender, out)
        elif isinstance(msg, Proposal):
            self._on_proposal(msg, sender)
        else:
            self._on_vote(msg, sender)

    def _help_laggard(self, msg: Message, out: list[Action]) -> None:
        """A member still builds on the head our last commit replaced: it missed that Commit.

        Publish it again (once per round). Only a few peers publish each Commit, and a reader
        can miss them all; without this a group that missed one commit never catches up.
        """
        v = self._round_view
        prev = self._last_commit
        if prev is None or v.helped or getattr(msg, "base_version", None) != prev[0]:
            return
        if msg.round <= prev[1]:  # type: ignore[attr-defined]
            return  # a late record of the round we committed, not a laggard
        v.helped = True
        self.counters["commits_republished"] += 1
        out.append(PublishCommit(prev[1], prev[2], prev[3]))

    # ---- records of the current round --------------------------------------------------

    def _on_peer_announcement(self, msg: PeerAnnouncement, sender: str, now: float) -> None:
        v = self._round_view
        if msg.peer_id in v.members:
            self._count("duplicate")
        elif len(v.members) >= self.config.max_members:
            self._count("over_capacity")
        else:
            v.add_member(msg.peer_id)
            if msg.peer_id not in self.electorate and v.t0 <= now <= v.t0 + self.config.collect_window:
                v.newcomer_at = now if v.newcomer_at is None else max(v.newcomer_at, now)

    def _is_member(self, peer_id: str) -> bool:
        v = self._round_view
        return peer_id in v.members or peer_id in self.electorate

    def _on_delta_announcement(self, msg: DeltaAnnouncement, sender: str, out: list[Action]) -> None:
        v = self._round_view
        if not self._is_member(msg.peer_id):
            self._count("non_member")
            return
        prev = v.deltas.get(msg.peer_id)
        if prev is not None:
            self._count("duplicate" if prev == msg else "equivocation")
            return
        v.deltas[msg.peer_id] = msg
        if msg.peer_id not in v.members and len(v.members) < self.config.max_members:
            # An electorate member's delta stands for its announcement: we may have missed that
            # (it was sent before we started). Leaving a delivering peer out of the members
            # shrinks the next electorate to the peers we happened to hear, and with a liar and
            # two crashes among them the honest could no longer reach its quorum (found by
            # hypothesis: 10 peers, 1 liar, 2 crashes, every round after the first failed).
            v.add_member(msg.peer_id)
        if msg.peer_id != self.peer.peer_id:
            self._fetch(msg.peer_id, msg.delta_hash, out)  # prefetch: every peer merges every delta

    def _fetch(self, peer_id: str, delta_hash: str, out: list[Action]) -> None:
        v = self._round_view
        if delta_hash not in v.fetch:
            v.fetch[delta_hash] = None
            self._fetch_asked[delta_hash] = v.round
            out.append(FetchDelta(peer_id, delta_hash))

    def _on_proposal(self, msg: Proposal, sender: str) -> None:
        v = self._round_view
        if not self._is_member(msg.proposer):
            self._count("non_member")
            return
        h = message_hash(msg)
        prev = v.proposals.get(msg.proposer)
        if prev is not None:
            if prev[1] == h:
                self._count("duplicate")
            else:
                self._count("equivocation")
                v.bad_proposers.add(msg.proposer)
                if v.candidate == prev[1] and self.phase is Phase.MERGING:
                    self._drop_candidate()
            return
        v.proposals[msg.proposer] = (msg, h)
        if not self._proposal_is_sound(msg):
            self._count("bogus_proposal")
            v.bad_proposers.add(msg.proposer)
            return
        v.by_hash[h] = msg
        for key, tally in v.tallies.items():  # votes may have arrived before the proposal
            if key[0] == h:
                tally.in_members = sum(1 for x in tally.voters if x in msg.members)
                v.dirty.add(key)

    def _proposal_is_sound(self, p: Proposal) -> bool:
        """Checks a proposal can pass without fetching anything."""
        v = self._round_view
        members = set(p.members)
        if p.proposer not in members or list(p.members) != sorted(p.members):
            return False
        if len(p.members) > self.config.max_members:
            return False
        if len(members & self.electorate) < quorum(len(self.electorate), self.config.quorum):
            # The members become the next round's electorate: a list that drops more than a
            # third of this one (a partial view, or a liar's short list) could stall the swarm.
            return False
        peers = [d.peer_id for d in p.deltas]
        if len(set(peers)) != len(peers) or not set(peers) <= members:
            return False
        for d in p.deltas:  # a listed delta must be the one its owner announced, if we saw it
            ann = v.deltas.get(d.peer_id)
            if ann is not None and (ann.delta_hash != d.delta_hash or d.weight > ann.samples):
                return False
        cap = _weight_cap([d.weight for d in p.deltas], self.config.max_weight_ratio)
        return all(d.weight <= cap * (1 + 1e-9) for d in p.deltas)

    def _on_vote(self, vote: Vote, sender: str) -> None:
        if not self._is_member(vote.voter):
            self._count("non_member")
            return
        self._add_vote(vote, sender)

    def _add_vote(self, vote: Vote, sender: str) -> None:
        v = self._round_view
        if vote.voter in v.equivocators:
            self._count("equivocation")
            return
        prev = v.votes.get(vote.voter)
        if prev is not None:
            if (prev.proposal_hash, prev.version_id) == (vote.proposal_hash, vote.version_id):
                self._count("duplicate")
                return
            # Two votes from one voter: neither counts, ever (it may have shown each to half of us).
            self._count("equivocation")
            v.equivocators.add(vote.voter)
            self._untally(prev)
            return
        v.votes[vote.voter] = vote
        key = (vote.proposal_hash, vote.version_id)
        tally = v.tallies.get(key)
        if tally is None:
            tally = v.tallies[key] = Tally()
        tally.voters.add(vote.voter)
        v.dirty.add(key)
        prop = self._proposal_by_hash(vote.proposal_hash)
        if prop is not None and vote.voter in prop.members:
            tally.in_members += 1
        if vote.voter in self.electorate:
            tally.in_electorate += 1

    def _untally(self, vote: Vote) -> None:
        v = self._round_view
        tally = v.tallies[(vote.proposal_hash, vote.version_id)]
        tally.voters.discard(vote.voter)
        prop = self._proposal_by_hash(vote.proposal_hash)
        if prop is not None and vote.voter in prop.members:
            tally.in_members -= 1
        if vote.voter in self.electorate:
            tally.in_electorate -= 1

    def _proposal_by_hash(self, h: str) -> Proposal | None:
        v = self._round_view
        p = v.by_hash.get(h)
        if p is not None:
            return p
        cached = self._proposal_cache.get(h)
        return cached[1] if cached else None

    # ---- commits -----------------------------------------------------------------------

    def _on_commit(self, msg: CertifiedCommit, now: float, out: list[Action]) -> None:
        votes, bad = open_certificate(msg.certificate, self._open_vote)
        self.counters["bad_certificate_vote"] += bad
        keys = {(x.round, x.base_version, x.proposal_hash, x.version_id) for x in votes.values()}
        if len(keys) != 1 or next(iter(keys))[0] != msg.round or next(iter(keys))[3] != msg.version_id:
            self._count("bad_commit")
            return
        round_, base, ph, vid = next(iter(keys))
        if self._sync is not None and (round_, vid) == (self._sync.round, self._sync.version_id):
            self._count("duplicate")
            return
        if self.head_round is not None and round_ <= self.head_round:
            self._count("wrong_round")
            return
        if base == self.head_version:
            prop = self._proposal_by_hash(ph)
            members = None if prop is None else prop.members  # checked again once the proposal is known
            if not commits(votes, electorate=self.electorate, members=members, share=self.config.quorum):
                self._count("bad_commit")
                return
        elif not vouches(votes, self.electorate, self.config.quorum):
            self._count("bad_commit")  # cannot vouch for a chain we have not followed
            return
        self._commit(round_, vid, ph, base, tuple(votes[k] for k in sorted(votes)), now, out)

    def _commit(self, round_: int, vid: str, ph: str, base: str, votes: tuple[Vote, ...], now: float,
                out: list[Action]) -> None:  # fmt: skip
        """A quorum we accept committed `vid` in `round_`: adopt it, syncing it if we must."""
        v = self._round_view
        have = base == v.base and vid in v.computed
        prop = self._proposal_by_hash(ph)
        # Merging locally beats fetching every tensor: wait for our merge of this very proposal
        # if it runs, or start one when we hold every delta it lists (deltas are small).
        merge_locally = False
        if not have and base == v.base:
            if ph in v.merge_asked:
                merge_locally = ph not in v.computed.values()  # else our result differs: fetch
            elif prop is not None and prop.deltas and all(v.fetch.get(d.delta_hash) is True for d in prop.deltas):
                self._ask_merge(prop, ph, out)
                merge_locally = True
        self._sync = SyncTarget(round_, vid, ph, base, votes, have, frozenset(prop.members) if prop else None)
        if merge_locally:
            self._sync.await_merge_until = now + self.config.proposal_timeout
        elif not have:
            self._request_sync(out)
        if prop is None and ph not in v.fetch_proposal_asked:
            v.fetch_proposal_asked.add(ph)
            out.append(FetchProposal(round_, ph))
        self._move(NeedSync)

    def _request_sync(self, out: list[Action]) -> None:
        s = self._sync
        v = self._round_view
        assert s is not None
        s.await_merge_until = None
        self._sync_asked[s.version_id] = v.round
        out.append(SyncVersion(s.version_id, s.round, tuple(sorted({x.voter for x in s.votes}))))

    def _merge_settles_sync(self, proposal_hash: str, version_id: str | None, out: list[Action]) -> bool:
        """Our merge that a sync waits for finished (`version_id` None: it failed). True if it was that."""
        s = self._sync
        if s is None or s.await_merge_until is None or proposal_hash != s.proposal_hash:
            return False
        if version_id == s.version_id:
            s.await_merge_until = None
            s.have_version = True
        else:
            self._count("merge_differs")  # our result is not what the quorum signed: fetch theirs
            self._request_sync(out)
        return True

    def _learn_members(self, p: Proposal) -> None:
        s = self._sync
        assert s is not None
        if message_hash(p) == s.proposal_hash:
            s.members = frozenset(p.members)

    def _finish_sync(self, now: float, out: list[Action]) -> None:
        s = self._sync
        assert s is not None and s.have_version and s.members is not None
        v = self._round_view
        mine = self._my_delta
        out.append(CommitVersion(s.round, s.version_id, s.proposal_hash, s.votes))
        merged = False
        if mine is not None and s.base == mine[4]:
            prop = self._proposal_by_hash(s.proposal_hash)
            merged = prop is not None and any(d.delta_hash == mine[0] for d in prop.deltas)
        if not merged:
            self._keep_my_delta(out)
        self._my_delta = None
        self._last_commit = (s.base, s.round, s.version_id, s.votes)
        self.head_version, self.head_round, self.electorate = s.version_id, s.round, s.members
        self._sync = None
        self.counters["rounds_committed"] += 1
        self._move(QuorumReached)
        self._enter(max(s.round + 1, v.round), now, out, catching_up=True, committed=True)

    # ---- time and progress -------------------------------------------------------------

    def _advance(self, now: float, out: list[Action]) -> None:
        """Everything that follows from the state at `now`: proposing, adopting, quorums, deadlines."""
        if self.phase is Phase.SYNCING:
            s = self._sync
            assert s is not None
            if s.await_merge_until is not None and now >= s.await_merge_until:
                self._request_sync(out)  # our merge is late: fetch the committed version after all
            if s.have_version and s.members is not None:
                self._finish_sync(now, out)
            return
        v = self._round_view
        self._check_quorums(now, out)
        if self.phase is Phase.SYNCING:
            self._advance(now, out)
            return
        if now >= v.t0 + self.config.round_deadline:
            self._fail(now, "deadline", v.round + 1, RoundTimedOut, out)
            return
        if v.closed_at is None and self.config.early_close and self._everyone_delivered():
            v.closed_at = now
        if now < self._collect_end():
            self._maybe_adopt(now, out)  # only a complete proposal is eligible this early
            self._maybe_merge(out)
            return  # nobody may propose yet
        self._maybe_merge(out)  # may drop an unfetchable candidate ...
        self._maybe_propose(now, out)  # ... which lets a worse-ranked proposer speak
        self._maybe_adopt(now, out)
        self._maybe_merge(out)

    def _expected(self) -> set[str]:
        """Peers whose delta we wait for: the electorate and this round's members, less departures."""
        v = self._round_view
        return (self.electorate | v.members) - v.departed

    def _everyone_delivered(self) -> bool:
        """Every expected peer announced a delta we hold or refused: the collect window may close early.

        Waiting out `collect_window` is needed only for peers that are slow or gone; when all
        of the electorate and every announced member delivered, waiting adds nothing but idle
        time (it was most of the round before this rule). A crashed electorate member keeps
        the window open, so the rule never shortens a round that has someone to wait for.
        """
        v = self._round_view
        expected = self._expected()
        if len(expected) < self.config.min_members:
            return False
        for p in expected:
            a = v.deltas.get(p)
            if a is None or v.fetch.get(a.delta_hash) is None:
                return False  # not announced, or still being fetched (a rejected one is settled)
        return True

    def _collect_end(self) -> float:
        """When the first proposer's slot opens: `collect_window` after we entered the round, or
        after the latest newcomer (a peer outside the electorate) joined it within that window,
        so that it has a whole window to train: a swarm's first round is the founder's alone
        until the joiners have synced (8 nodes on 2 cores: 12 s of a 25 s window), and 7 of 8
        deltas missed it. At most half-way to the round deadline; an early close ends it."""
        v = self._round_view
        cfg = self.config
        end = v.t0 + cfg.collect_window
        if v.newcomer_at is not None:
            end = min(max(end, v.newcomer_at + cfg.collect_window), v.t0 + (cfg.collect_window + cfg.round_deadline) / 2)
        return end if v.closed_at is None else min(end, v.closed_at)

    def _is_complete(self, prop: Proposal) -> bool:
        """A proposal that merges a delta from every member, and names everyone we expect."""
        members = set(prop.members)
        return {d.peer_id for d in prop.deltas} >= members and members >= self._expected()

    def _slot(self, proposer: str) -> float:
        """When `proposer` may propose, by its rank among the members we know."""
        v = self._round_view
        rank = v.rank(proposer, self.peer.peer_id)
        return self._collect_end() + rank * self.config.proposal_timeout

    def _rank_key(self, proposer: str) -> bytes:
        v = self._round_view
        return proposer_rank_key(v.round, proposer)

    def _maybe_propose(self, now: float, out: list[Action]) -> None:
        v = self._round_view
        me = self.peer.peer_id
        if v.proposed or v.vote is not None or me not in v.members:
            return
        if now < self._slot(me):
            return
        for proposer in v.proposals:
            if proposer not in v.bad_proposers:
                # Any live proposal, even a worse-ranked one: proposing over it would split the
                # votes of peers that already merged it (seen after a crash and a late join,
                # where views of the ranking differ). Ranks only order proposers that race.
                return
        members = sorted(m for m in v.members if m not in v.departed)[: self.config.max_members]
        if len(self.electorate.intersection(members)) < quorum(len(self.electorate), self.config.quorum):
            return  # our view is too partial to propose (see _proposal_is_sound); wait for announcements
        fetched = [(p, a) for p, a in sorted(v.deltas.items()) if p in members and v.fetch.get(a.delta_hash) is True]
        deltas = self._screened(fetched)
        if not deltas:
            return  # nothing to merge yet (training slower than the window): propose when a delta is in
        prop = Proposal(
            round=v.round, base_version=v.base, proposer=me, members=tuple(members), deltas=deltas,
            time=max(now, 0.0), method=self.config.method, params=dict(self.config.params),
        )  # fmt: skip
        v.proposed = True
        out.append(Publish(prop))
        self._proposal_cache_put(prop)
        self._on_proposal(prop, me)

    def _median_norm(self) -> float | None:
        """Median L2 norm of the round's screened deltas (None below 3: no honest majority to trust)."""
        v = self._round_view
        norms = sorted(v.norms.values())
        return norms[len(norms) // 2] if len(norms) >= 3 else None

    def _norm_outlier(self, delta_hash: str) -> str:
        """Why this delta's norm is an outlier ("" when it is not, or cannot be told)."""
        v = self._round_view
        med, norm = self._median_norm(), v.norms.get(delta_hash)
        if norm is None:
            return ""
        if med is not None and norm > self.config.max_norm_ratio * med:
            return f"norm {norm:.3g} is over {self.config.max_norm_ratio:g} x the round's median {med:.3g}"
        # Too few norms for a median (a liar can propose early, listing few deltas): our own
        # delta's norm is one we trust; honest ones differ by the steps taken (a few x at most).
        mine = v.norms.get(self._my_delta[0]) if self._my_delta is not None else None
        bound = self.config.max_norm_ratio**2
        if mine and norm > bound * mine:
            return f"norm {norm:.3g} is over {bound:g} x our own delta's {mine:.3g}"
        return ""

    def _screened(self, fetched: list[tuple[str, DeltaAnnouncement]]) -> tuple[ProposalDelta, ...]:
        """What we propose: fetched deltas less norm outliers, weighed by samples capped at
        `max_weight_ratio` x the median (a peer announcing 10^4 x the samples gets 2 x)."""
        v = self._round_view
        kept = []  # (peer, announcement, its offences in the window)
        for p, a in fetched:
            why, n = self._norm_outlier(a.delta_hash), 0
            if why:
                self._offend(p, v.round)
            else:
                n = self._recent_offences(p, v.round)
                if n >= self.config.cooloff_offences:
                    why = f"cooling off: {n} offences in the last {self.config.offence_window} rounds"
            if why:
                v.excluded[p] = why
                self._count("excluded_deltas")
            else:
                kept.append((p, a, n))
        cap = _weight_cap([float(a.samples) for _, a, _ in kept], self.config.max_weight_ratio)
        return tuple(ProposalDelta(p, a.delta_hash, min(float(a.samples), cap) / (2.0 if n else 1.0)) for p, a, n in kept)

    def _offend(self, peer: str, round_: int) -> None:
        """Note an offence (once per round); forget offences older than the window."""
        rounds = self._offences.setdefault(peer, [])
        if round_ not in rounds:
            rounds.append(round_)
        del rounds[: max(0, len(rounds) - 4 * self.config.cooloff_offences)]
        if len(self._offences) > self.config.max_members:  # bounded: drop the stalest offender
            stalest = min(self._offences, key=lambda k: max(self._offences[k], default=-1))
            del self._offences[stalest]

    def _recent_offences(self, peer: str, round_: int) -> int:
        return sum(1 for r in self._offences.get(peer, ()) if round_ - self.config.offence_window < r <= round_)

    def offences(self, round_: int | None = None) -> dict[str, int]:
        """Peers with offences in the last `offence_window` rounds, and how many (for status pages)."""
        r = self.round if round_ is None else round_
        if r is None:
            return {}
        return {p: n for p in self._offences if (n := self._recent_offences(p, r))}

    @property
    def exclusions(self) -> dict[str, str]:
        """Peers whose delta is left out of the current round, and why (for status pages)."""
        v = self._view
        return {} if v is None else dict(v.excluded)

    def _maybe_adopt(self, now: float, out: list[Action]) -> None:
        """Adopt the best-ranked eligible proposal, or switch to a better one before voting."""
        v = self._round_view
        if v.vote is not None or self.phase not in (Phase.COLLECTING, Phase.MERGING):
            return
        best: tuple[bytes, str] | None = None
        for proposer, (p, h) in v.proposals.items():
            early = self.config.early_close and self._is_complete(p)
            if proposer in v.bad_proposers or (now < self._slot(proposer) and not early):
                continue
            cand = (self._rank_key(proposer), h)
            if best is None or cand < best:
                best = cand
        if best is None or best[1] == v.candidate:
            return
        if v.candidate is not None:
            cur = next(pr for pr, (_, h) in v.proposals.items() if h == v.candidate)
            if self._rank_key(cur) <= best[0]:
                return
            self._count("proposal_switches")
        v.candidate = best[1]
        self._move(ProposalAdopted)
        prop = self._proposal_by_hash(best[1])
        assert prop is not None
        for d in prop.deltas:
            if d.peer_id != self.peer.peer_id or self._my_delta is None or self._my_delta[0] != d.delta_hash:
                self._fetch(d.peer_id, d.delta_hash, out)

    def _maybe_merge(self, out: list[Action]) -> None:
        v = self._round_view
        if self.phase is not Phase.MERGING or v.candidate is None or v.candidate in v.merge_asked:
            return
        prop = self._proposal_by_hash(v.candidate)
        assert prop is not None
        states = [v.fetch.get(d.delta_hash) for d in prop.deltas]
        if any(s is False for s in states):
            self._count("unfetchable_proposal")
            v.bad_proposers.add(prop.proposer)
            self._drop_candidate()
            return
        if all(s is True for s in states):
            if any(self._norm_outlier(d.delta_hash) for d in prop.deltas):
                self._count("screened_proposal")  # lists a delta we screen out: not ours to sign
                v.bad_proposers.add(prop.proposer)
                self._drop_candidate()
                return
            self._ask_merge(prop, v.candidate, out)

    def _ask_merge(self, prop: Proposal, proposal_hash: str, out: list[Action]) -> None:
        v = self._round_view
        v.merge_asked.add(proposal_hash)
        self._merge_asked[proposal_hash] = v.round
        out.append(Merge(prop, proposal_hash))

    def _drop_candidate(self) -> None:
        v = self._round_view
        v.candidate = None
        self._move(ProposalDropped)

    def _tally_commits(self, key: tuple[str, str], tally: Tally) -> bool:
        prop = self._proposal_by_hash(key[0])
        if prop is None:
            return False
        return commits(tally.voters, electorate=self.electorate, members=prop.members, share=self.config.quorum)

    def _check_quorums(self, now: float, out: list[Action]) -> None:
        v = self._round_view
        dirty, v.dirty = v.dirty, set()
        for key in sorted(dirty):
            tally = v.tallies[key]
            if self._tally_commits(key, tally):
                prop = self._proposal_by_hash(key[0])
                assert prop is not None
                votes = tuple(v.votes[x] for x in sorted(tally.voters))
                # A few publishers, not all: a certificate is O(members) bytes, and every peer reads every one.
                publishers = [prop.proposer] + [m for m in v.proposer_order() if m != prop.proposer]
                if self.peer.peer_id in publishers[: self.config.commit_publishers]:
                    out.append(PublishCommit(v.round, key[1], votes))
                self._commit(v.round, key[1], key[0], v.base, votes, now, out)
                return
            if tally.in_electorate >= quorum(len(self.electorate), self.config.quorum):
                if key[0] not in v.fetch_proposal_asked and self._proposal_by_hash(key[0]) is None:
                    v.fetch_proposal_asked.add(key[0])
                    out.append(FetchProposal(v.round, key[0]))

    def _fail(self, now: float, reason: str, next_round: int, trigger: type, out: list[Action]) -> None:
        v = self._round_view
        out.append(RoundFailed(v.round, reason))
        self.counters["rounds_failed"] += 1
        self._move(trigger)
        self._enter(next_round, now, out)

    # ---- entering rounds ---------------------------------------------------------------

    def _next_round_after(self, head_round: int | None) -> int:
        return 0 if head_round is None else head_round + 1

    def _enter(self, round_: int, now: float, out: list[Action], catching_up: bool = False, committed: bool = False) -> None:
        """Enter `round_` on the current head.

        `catching_up`: we joined or synced a commit we did not vote on, so the others may
        close this round before our announcement reaches them (with early close, a fast
        swarm would then never wait for us). We also announce for the next round, where
        they will count us as an expected member and wait for our delta.
        `committed`: the last round committed the head we enter on (not a failure, not a
        start), which lets a member of its electorate skip its announcements.
        """
        assert self.head_version is not None
        # Results may come back many rounds later (a long sync while the swarm moved on): keep
        # what we asked for well past the future-record window, so they are stale, not illegal.
        horizon = round_ - max(self.config.future_rounds, ASKED_MEMORY_ROUNDS)
        for asked in (self._fetch_asked, self._merge_asked, self._sync_asked):
            for k in [k for k, r in asked.items() if r < horizon]:
                del asked[k]
        prev = self._view
        self._view = v = RoundView(round_, self.head_version, now)
        out.append(EnterRound(round_, v.base))
        # One announcement per round: a peer catching up announced this round already (as "next").
        # A member of the electorate that was in the round just committed needs none, for this
        # round or the next: every peer on this head expects its delta already (`_expected`), and
        # its delta or vote makes it a member (at 8 peers the announcements were a third of all
        # pushes). A peer that (re)starts, whose delta the commit left out, or whose last round
        # failed (a partition: the announcements, pushed or stored in the DHT when a push fails,
        # are how the sides find each other again) announces as before.
        implied = committed and prev is not None and prev.round == round_ - 1 and self.peer.peer_id in self.electorate
        if round_ not in self._announced_rounds and not implied:
            out.append(Publish(self._announcement(round_, now)))
        if catching_up and not implied:
            out.append(Publish(self._announcement(round_ + 1, now)))
            self._announced_rounds.add(round_ + 1)
        self._announced_rounds = {r for r in self._announced_rounds if r > round_}
        v.my_key = proposer_rank_key(round_, self.peer.peer_id)
        v.add_member(self.peer.peer_id)
        if prev is not None and prev.round == round_:
            # Re-entering the same round on a newer head (we synced a commit we had missed):
            # announcements name a round, not a base, so the members we saw still count.
            for m in prev.members - prev.departed - {self.peer.peer_id}:
                v.add_member(m)
        # Whatever happened to the last round, a delta it did not merge is carried, never dropped.
        self._keep_my_delta(out)
        if self._training is None:
            self._start_training(out)
        self._replay_future(now, out)

    def _announcement(self, round_: int, now: float) -> PeerAnnouncement:
        me = self.peer
        return PeerAnnouncement(
            peer_id=me.peer_id, public_key=me.public_key, libp2p_id=me.libp2p_id, addrs=me.addrs,
            capabilities=dict(me.capabilities), event_hash=me.event_hash, round=round_, time=max(now, 0.0),
        )  # fmt: skip

    def _keep_my_delta(self, out: list[Action]) -> None:
        if self._my_delta is not None:
            h, _, _, r, base = self._my_delta
            out.append(KeepDelta(h, r, base))
            self._my_delta = None

    def _start_training(self, out: list[Action]) -> None:
        v = self._round_view
        self._training = (v.round, v.base)
        out.append(StartTraining(v.round, v.base))

    # ---- records of later rounds -------------------------------------------------------

    def _buffer_future(self, msg: Message, sender: str, now: float, out: list[Action]) -> None:
        v = self._round_view
        r = msg.round  # type: ignore[attr-defined]
        if r > v.round + self.config.future_rounds or self._future_count >= self.config.future_buffer:
            self._count("too_far_ahead")
            return
        self._future.setdefault(r, []).append((msg, sender))
        self._future_count += 1
        self.counters["buffered_future"] += 1
        # Deltas and votes, not announcements: a peer that catches up announces for the next
        # round ahead of time (see `_enter`), which says nothing about where the others are.
        if isinstance(msg, (DeltaAnnouncement, Vote)) and sender in self.electorate:
            seen = self._future_announcers.setdefault(r, set())
            seen.add(sender)
            if len(seen) >= weak_quorum(len(self.electorate), self.config.quorum) and self.phase in (
                Phase.COLLECTING, Phase.MERGING, Phase.VOTED,
            ):  # fmt: skip
                self._fail(now, "skipped", r, RoundSkipped, out)

    def _replay_future(self, now: float, out: list[Action]) -> None:
        v = self._round_view
        for r in [r for r in self._future if r <= v.round]:
            items = self._future.pop(r)
            self._future_count -= len(items)
            self._future_announcers.pop(r, None)
            if r < v.round:
                self.counters["wrong_round"] += len(items)
                continue
            for msg, sender in items:
                self._on_MessageReceived(MessageReceived(now, msg, sender), out)

    def _proposal_cache_put(self, p: Proposal) -> None:
        h = message_hash(p)
        self._proposal_cache[h] = (p.round, p)
        if len(self._proposal_cache) > self.config.proposal_cache:
            oldest = min(self._proposal_cache, key=lambda k: self._proposal_cache[k][0])
            del self._proposal_cache[oldest]


def _weight_cap(weights: list[float], ratio: float) -> float:
    """The largest merge weight allowed: `ratio` x the median weight (no cap below 3 deltas)."""
    if len(weights) < 3:
        return float("inf")
    return ratio * sorted(weights)[len(weights) // 2]


ASKED_MEMORY_ROUNDS = 64  # rounds a fetch/merge/sync we asked for is remembered (ids only)

_COUNTERS = (
    "wrong_round",  # record for a round we are not in (past, or being synced past)
    "wrong_base",  # record for our round built on another head
    "non_member",  # record from a peer that did not announce itself this round
    "duplicate",  # the same record again
    "equivocation",  # a second, different record (vote, proposal, delta) from one peer
    "over_capacity",  # announcement past max_members
    "bogus_proposal",  # proposal that fails a check we can make without fetching
    "unfetchable_proposal",  # proposal whose deltas could not be fetched
    "bad_commit",  # commit whose certificate does not make a quorum we can check
    "bad_certificate_vote",  # certificate entry that does not verify
    "stale_results",  # fetch/merge/sync result we no longer need
    "unexpected",  # message type that does not belong in the DHT round keys
    "too_far_ahead",  # record for a round beyond the buffer
    "buffered_future",  # records kept for a later round
    "proposal_switches",  # adopted a better-ranked proposal before voting
    "commits_republished",  # our last Commit, published again for a peer still on the old head
    "rounds_committed",
    "rounds_failed",
    "merge_differs",  # our own merge of the committed proposal gave another id: fetched theirs
    "rejected_deltas",  # deltas that failed screening (do not decode, NaN/Inf)
    "excluded_deltas",  # deltas we left out of our proposal (norm outliers)
    "screened_proposal",  # proposals listing a delta we screen out
    "failed_merges",  # adopted proposals whose merge or CI gate failed for us
)
