"""The round state machine, one peer at a time: its table, each phase's moves, and the rules
that keep bad records out (wrong round or base, non-members, duplicates, equivocation).

Every test drives a real `RoundMachine` with hand-built events and messages; other peers are
simulated by constructing their signed-over messages directly. One file for one machine, in
sections (the table, entering, dropped records, proposing, voting and committing, rounds that
fit the peers, screening and repeat offenders);
whole-swarm properties under a simulated network are in test_round_sim.py."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from p2pmodel.protocols import signing
from p2pmodel.protocols.certificate import make_commit
from p2pmodel.protocols.errors import LocalProtocolError
from p2pmodel.protocols.messages import (
    Commit,
    DeltaAnnouncement,
    PeerAnnouncement,
    Proposal,
    ProposalDelta,
    Vote,
    decode,
    encode,
    message_hash,
)
from p2pmodel.protocols.round import (
    TRANSITIONS,
    CommitVersion,
    DeltaFetched,
    EnterRound,
    FetchDelta,
    KeepDelta,
    Merge,
    MergeDone,
    MergeFailed,
    MessageReceived,
    Phase,
    Publish,
    PublishCommit,
    RoundConfig,
    RoundFailed,
    RoundMachine,
    Start,
    StartTraining,
    Stop,
    SyncVersion,
    Tick,
    TrainingDone,
    VersionSynced,
    proposer_rank_key,
)
from p2pmodel.protocols.sim import sim_peer_info

R = 5  # the round every test runs (head committed in round 4)
BASE = "ab" * 32
# Most tests exercise the collect window and proposer rotation, so the window never closes early
# in them; the early-close tests use EARLY.
CFG = RoundConfig(collect_window=30.0, proposal_timeout=5.0, round_deadline=90.0, early_close=False)
EARLY = RoundConfig(collect_window=30.0, proposal_timeout=5.0, round_deadline=90.0)
PEERS = [sim_peer_info(i) for i in range(6)]
IDS = [p.peer_id for p in PEERS]
ELECTORATE = frozenset(IDS[:4])
# Peers of round R, best proposer first.
ORDER = sorted(IDS[:4], key=lambda p: proposer_rank_key(R, p))
INFO = {p.peer_id: p for p in PEERS}


def identity(pid: str) -> signing.PeerIdentity:
    """The key sim_peer_info(i) derives its peer id from."""
    i = IDS.index(pid)
    return signing.PeerIdentity.from_seed(hashlib.sha256(f"sim-peer-{i}".encode()).digest())


def open_plain(data: bytes):
    vote = decode(data, Vote)
    return vote, vote.voter


def machine(peer_id: str = ORDER[0], electorate: frozenset[str] = ELECTORATE, cfg=CFG, **kw) -> RoundMachine:
    m = RoundMachine(INFO[peer_id], cfg, open_vote=kw.pop("open_vote", open_plain))
    m.process(Start(0.0, BASE, R - 1, electorate))
    return m


def announce(pid: str, round_: int = R, now: float = 1.0) -> MessageReceived:
    p = INFO[pid]
    msg = PeerAnnouncement(
        peer_id=pid, public_key=p.public_key, libp2p_id=p.libp2p_id, addrs=p.addrs, capabilities={},
        event_hash=p.event_hash, round=round_, time=now,
    )  # fmt: skip
    return MessageReceived(now, msg, pid)


def delta_hash(pid: str) -> str:
    return (pid + "0" * 24)[:64]


def delta_ann(pid: str, base: str = BASE, round_: int = R, now: float = 2.0) -> MessageReceived:
    msg = DeltaAnnouncement(
        round=round_, base_version=base, peer_id=pid, delta_hash=delta_hash(pid), encoded_size=100, samples=10
    )
    return MessageReceived(now, msg, pid)


def proposal(proposer: str, members=None, deltas=None, base: str = BASE) -> Proposal:
    members = tuple(sorted(members or IDS[:4]))
    deltas = deltas if deltas is not None else [ProposalDelta(p, delta_hash(p), 10.0) for p in members]
    return Proposal(
        round=R, base_version=base, proposer=proposer, members=members, deltas=tuple(deltas), time=30.0,
        method="linear", params={},
    )  # fmt: skip


def vote(voter: str, prop: Proposal, version: str = "cd" * 32) -> Vote:
    return Vote(
        round=prop.round, base_version=prop.base_version, proposal_hash=message_hash(prop),
        version_id=version, voter=voter, metrics={},
    )  # fmt: skip


def of(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


def full_round_to_merge(m: RoundMachine, me: str, others=None):
    """All four members announce and publish deltas; returns the machine past its fetches."""
    for pid in others or [p for p in IDS[:4] if p != me]:
        m.process(announce(pid))
        for a in of(m.process(delta_ann(pid)), FetchDelta):
            m.process(DeltaFetched(3.0, a.delta_hash, True))
    m.process(TrainingDone(4.0, delta_hash(me), 10, 100))


def reach_vote(m: RoundMachine, me: str, prop: Proposal, version: str = "cd" * 32):
    """Feed `prop` (from a better rank) and finish its merge; returns the vote published."""
    acts = m.process(MessageReceived(31.0, prop, prop.proposer))
    merge = of(acts, Merge)
    assert merge, acts
    acts = m.process(MergeDone(32.0, merge[0].proposal_hash, version))
    return of(acts, Publish)[0].message


def commit_as(me: str, prop: Proposal) -> tuple[RoundMachine, list]:
    """`me` merges `prop` and votes; ORDER[0] and ORDER[1] vote too (with ours, 3 of 4: a
    quorum). Returns the machine and the actions the others' votes caused."""
    m = machine(me)
    full_round_to_merge(m, me)
    reach_vote(m, me, prop)
    return m, [a for v in ORDER[:2] for a in m.process(MessageReceived(33.0, vote(v, prop), v))]


# ---- the table -------------------------------------------------------------------------


def test_every_phase_has_a_row_and_every_target_is_a_phase():
    assert set(TRANSITIONS) == set(Phase)
    for row in TRANSITIONS.values():
        assert all(isinstance(target, Phase) for target in row.values())


def test_stopped_accepts_nothing():
    assert TRANSITIONS[Phase.STOPPED] == {}


@pytest.mark.parametrize(
    "event",
    [Tick(1.0), TrainingDone(1.0, "00" * 32, 1, 1), MergeDone(1.0, "00" * 32, "11" * 32), VersionSynced(1.0, "1" * 64, 1)],
)
def test_events_before_start_raise_and_leave_the_machine_idle(event):
    m = RoundMachine(PEERS[0], CFG, open_vote=open_plain)
    with pytest.raises(LocalProtocolError):
        m.process(event)
    assert m.phase is Phase.IDLE and m.round is None


def test_version_synced_that_was_never_asked_for_raises_and_leaves_state_unchanged():
    m = machine()
    counters = dict(m.counters)
    with pytest.raises(LocalProtocolError):
        m.process(VersionSynced(1.0, "cd" * 32, R))
    assert m.phase is Phase.COLLECTING and m.round == R and m.counters == counters


def test_merge_result_that_was_never_asked_for_raises():
    m = machine()
    with pytest.raises(LocalProtocolError):
        m.process(MergeDone(1.0, "ee" * 32, "cd" * 32))
    assert m.phase is Phase.COLLECTING


def test_fetch_result_that_was_never_asked_for_raises():
    m = machine()
    with pytest.raises(LocalProtocolError):
        m.process(DeltaFetched(1.0, "ee" * 32, True))


def test_second_training_done_without_a_training_raises():
    m = machine()
    m.process(TrainingDone(1.0, delta_hash(ORDER[0]), 10, 100))
    with pytest.raises(LocalProtocolError):
        m.process(TrainingDone(2.0, delta_hash(ORDER[0]), 10, 100))


def test_events_after_stop_raise():
    m = machine()
    m.process(Stop(1.0))
    with pytest.raises(LocalProtocolError):
        m.process(Tick(2.0))
    assert m.phase is Phase.STOPPED


def test_start_needs_an_electorate():
    m = RoundMachine(PEERS[0], CFG, open_vote=open_plain)
    with pytest.raises(LocalProtocolError):
        m.process(Start(0.0, BASE, None, frozenset()))
    assert m.phase is Phase.IDLE


# ---- entering, training, announcing -----------------------------------------------------


def test_start_enters_the_round_after_the_head_announces_and_trains():
    m = RoundMachine(PEERS[0], CFG, open_vote=open_plain)
    acts = m.process(Start(0.0, BASE, R - 1, ELECTORATE))
    assert of(acts, EnterRound) == [EnterRound(R, BASE)]
    assert isinstance(of(acts, Publish)[0].message, PeerAnnouncement)
    assert of(acts, StartTraining) == [StartTraining(R, BASE)]


def test_seed_head_enters_round_zero():
    m = RoundMachine(PEERS[0], CFG, open_vote=open_plain)
    m.process(Start(0.0, BASE, None, ELECTORATE))
    assert m.round == 0


def test_training_done_announces_the_delta_on_the_round_base():
    m = machine()
    acts = m.process(TrainingDone(1.0, delta_hash(ORDER[0]), 10, 100))
    (pub,) = of(acts, Publish)
    assert pub.message == DeltaAnnouncement(
        round=R, base_version=BASE, peer_id=ORDER[0], delta_hash=delta_hash(ORDER[0]), encoded_size=100, samples=10
    )


def test_a_delta_that_carries_earlier_work_says_how_many_of_its_samples_are_carried():
    m = machine()
    acts = m.process(TrainingDone(1.0, delta_hash(ORDER[0]), 30, 100, carried=20))
    (pub,) = of(acts, Publish)
    assert (pub.message.samples, pub.message.carried) == (30, 20)


def test_announced_deltas_of_members_are_prefetched():
    m = machine()
    m.process(announce(ORDER[1]))
    acts = m.process(delta_ann(ORDER[1]))
    assert of(acts, FetchDelta) == [FetchDelta(ORDER[1], delta_hash(ORDER[1]))]


# ---- dropped and counted ------------------------------------------------------------------


def test_record_for_another_base_is_dropped_and_counted():
    m = machine()
    m.process(announce(ORDER[1]))
    acts = m.process(delta_ann(ORDER[1], base="ef" * 32))
    assert not of(acts, FetchDelta) and m.counters["wrong_base"] == 1


def test_record_for_a_past_round_is_dropped_and_counted():
    m = machine()
    acts = m.process(delta_ann(ORDER[1], round_=R - 1))
    assert not acts and m.counters["wrong_round"] == 1


def test_record_from_a_non_member_is_dropped_and_counted():
    m = machine()
    acts = m.process(delta_ann(IDS[5]))  # not in the electorate, never announced
    assert not of(acts, FetchDelta) and m.counters["non_member"] == 1


def test_duplicate_announcement_is_counted_once():
    m = machine()
    m.process(announce(IDS[5]))
    m.process(announce(IDS[5]))
    assert m.counters["duplicate"] == 1


def test_equivocating_voter_counts_for_no_one():
    m = machine(ORDER[3])
    full_round_to_merge(m, ORDER[3])
    prop = proposal(ORDER[0])
    m.process(MessageReceived(31.0, prop, ORDER[0]))
    m.process(MessageReceived(31.0, vote(ORDER[1], prop), ORDER[1]))
    m.process(MessageReceived(31.0, vote(ORDER[1], prop, "ef" * 32), ORDER[1]))
    # ORDER[0] and ORDER[2] vote "cd..": with ORDER[1] excluded that is 2 of 4 < 3.
    m.process(MessageReceived(31.0, vote(ORDER[0], prop), ORDER[0]))
    acts = m.process(MessageReceived(31.0, vote(ORDER[2], prop), ORDER[2]))
    assert m.counters["equivocation"] == 1
    assert not of(acts, CommitVersion) and not of(acts, SyncVersion)


# ---- proposing ----------------------------------------------------------------------------


def test_best_ranked_member_proposes_at_the_collect_deadline_with_its_fetched_deltas():
    m = machine(ORDER[0])
    full_round_to_merge(m, ORDER[0])
    assert not of(m.process(Tick(29.9)), Publish)
    acts = m.process(Tick(30.0))
    (prop,) = [a.message for a in of(acts, Publish) if isinstance(a.message, Proposal)]
    assert prop.proposer == ORDER[0] and prop.members == tuple(sorted(IDS[:4]))
    assert [d.peer_id for d in prop.deltas] == sorted(IDS[:4])
    assert of(acts, Merge) and m.phase is Phase.MERGING


def test_best_ranked_member_proposes_as_soon_as_every_expected_delta_is_in():
    m = machine(ORDER[0], cfg=EARLY)
    acts = []
    for pid in [p for p in IDS[:4] if p != ORDER[0]]:
        m.process(announce(pid))
        for a in of(m.process(delta_ann(pid)), FetchDelta):
            acts = m.process(DeltaFetched(3.0, a.delta_hash, True))
        assert not of(acts, Publish)  # our own delta is still missing
    acts = m.process(TrainingDone(4.0, delta_hash(ORDER[0]), 10, 100))
    (prop,) = [a.message for a in of(acts, Publish) if isinstance(a.message, Proposal)]
    assert [d.peer_id for d in prop.deltas] == sorted(IDS[:4]) and prop.time == 4.0


def test_window_stays_open_while_an_electorate_member_has_not_delivered():
    m = machine(ORDER[0], cfg=EARLY)
    full_round_to_merge(m, ORDER[0], others=[ORDER[1], ORDER[2]])  # ORDER[3] is silent
    assert not of(m.process(Tick(29.9)), Publish)
    acts = m.process(Tick(30.0))
    (prop,) = [a.message for a in of(acts, Publish) if isinstance(a.message, Proposal)]
    assert ORDER[3] not in prop.members


def test_a_newcomer_that_joins_during_the_window_gets_a_whole_window_to_deliver():
    # a swarm's first round: the electorate is the founder's; joiners enter after their sync
    m = machine(ORDER[0])
    full_round_to_merge(m, ORDER[0])
    newcomer = IDS[4]  # outside the electorate
    m.process(announce(newcomer, now=20.0))
    assert not of(m.process(Tick(49.9)), Publish)  # not at 30: the newcomer has until 20 + 30
    (prop,) = [a.message for a in of(m.process(Tick(50.0)), Publish) if isinstance(a.message, Proposal)]
    assert newcomer in prop.members


def test_a_late_newcomer_extends_the_window_at_most_half_way_to_the_round_deadline():
    m = machine(ORDER[0])
    full_round_to_merge(m, ORDER[0])
    m.process(announce(IDS[4], now=29.0))  # would be 59; (30 + 90) / 2 = 60 bounds it
    m.process(announce(IDS[5], now=31.0))  # after the window: it waits for the next round
    assert m.next_deadline() == pytest.approx(59.0)


def test_an_electorate_member_announcing_late_does_not_extend_the_window():
    m = machine(ORDER[0])
    full_round_to_merge(m, ORDER[0], others=[ORDER[1], ORDER[2]])
    m.process(announce(ORDER[3], now=25.0))  # it had the whole window since the round began
    assert of(m.process(Tick(30.0)), Publish)


def test_complete_proposal_is_adopted_before_its_slot_opens():
    m = machine(ORDER[1], cfg=EARLY)
    full_round_to_merge(m, ORDER[1], others=[ORDER[0], ORDER[2]])  # ORDER[3]'s delta not yet fetched here
    m.process(announce(ORDER[3]))
    acts = m.process(MessageReceived(5.0, proposal(ORDER[0]), ORDER[0]))
    assert m.phase is Phase.MERGING and of(acts, FetchDelta)


def test_incomplete_proposal_waits_for_its_slot():
    m = machine(ORDER[1], cfg=EARLY)
    full_round_to_merge(m, ORDER[1], others=[ORDER[0], ORDER[2]])
    m.process(announce(ORDER[3]))  # a member whose delta nobody has yet
    members = tuple(sorted(IDS[:4]))
    partial = proposal(ORDER[0], deltas=[ProposalDelta(p, delta_hash(p), 10.0) for p in members if p != ORDER[3]])
    m.process(MessageReceived(5.0, partial, ORDER[0]))
    assert m.phase is Phase.COLLECTING
    assert of(m.process(Tick(30.0)), Merge)


def test_second_ranked_member_waits_one_proposal_timeout():
    m = machine(ORDER[1])
    full_round_to_merge(m, ORDER[1])
    assert m.next_deadline() == pytest.approx(CFG.collect_window + CFG.proposal_timeout)
    assert not [a for a in m.process(Tick(34.9)) if isinstance(a, Publish)]
    acts = m.process(Tick(35.0))
    assert any(isinstance(a.message, Proposal) for a in of(acts, Publish))


def test_second_ranked_member_stays_quiet_when_the_best_proposed():
    m = machine(ORDER[1])
    full_round_to_merge(m, ORDER[1])
    m.process(MessageReceived(30.5, proposal(ORDER[0]), ORDER[0]))
    acts = m.process(Tick(35.0))
    assert not any(isinstance(a.message, Proposal) for a in of(acts, Publish))


def test_proposal_contradicting_an_announcement_is_bogus_and_the_next_rank_takes_over():
    m = machine(ORDER[1])
    full_round_to_merge(m, ORDER[1])
    members = tuple(sorted(IDS[:4]))
    # ORDER[2] announced delta_hash(ORDER[2]); the proposal lists another hash in its name.
    deltas = [ProposalDelta(p, delta_hash(p) if p != ORDER[2] else "99" * 32, 10.0) for p in members]
    prop = proposal(ORDER[0], deltas=deltas)
    m.process(MessageReceived(30.5, prop, ORDER[0]))
    assert m.counters["bogus_proposal"] == 1
    acts = m.process(Tick(35.0))
    assert any(isinstance(a.message, Proposal) and a.message.proposer == ORDER[1] for a in of(acts, Publish))


def test_proposal_whose_delta_cannot_be_fetched_is_abandoned():
    m = machine(ORDER[1])
    for pid in (ORDER[0], ORDER[2], ORDER[3]):
        m.process(announce(pid))
    m.process(TrainingDone(4.0, delta_hash(ORDER[1]), 10, 100))
    prop = proposal(ORDER[0], deltas=[ProposalDelta(ORDER[2], "77" * 32, 10.0)])
    acts = m.process(MessageReceived(30.5, prop, ORDER[0]))
    assert of(acts, FetchDelta) == [FetchDelta(ORDER[2], "77" * 32)] and m.phase is Phase.MERGING
    acts = m.process(DeltaFetched(31.0, "77" * 32, False))
    assert m.counters["unfetchable_proposal"] == 1 and m.phase is Phase.COLLECTING


# ---- voting and committing ----------------------------------------------------------------


def test_merge_done_publishes_one_vote():
    m = machine(ORDER[3])
    full_round_to_merge(m, ORDER[3])
    v = reach_vote(m, ORDER[3], proposal(ORDER[0]))
    assert isinstance(v, Vote) and v.voter == ORDER[3] and v.round == R and m.phase is Phase.VOTED


def test_double_quorum_commits_our_own_result():
    prop = proposal(ORDER[0])
    m, acts = commit_as(ORDER[3], prop)
    (c,) = of(acts, CommitVersion)
    assert (c.round, c.version_id, len(c.votes)) == (R, "cd" * 32, 3)
    assert m.round == R + 1 and m.head_version == "cd" * 32 and m.electorate == frozenset(prop.members)


def test_a_merged_delta_is_not_kept():
    m = machine(ORDER[3])
    full_round_to_merge(m, ORDER[3])
    prop = proposal(ORDER[0])
    reach_vote(m, ORDER[3], prop)
    m.process(MessageReceived(33.0, vote(ORDER[0], prop), ORDER[0]))
    acts = m.process(MessageReceived(33.0, vote(ORDER[1], prop), ORDER[1]))
    assert not of(acts, KeepDelta)


def test_an_unmerged_delta_is_kept_when_the_round_commits_without_it():
    m = machine(ORDER[3])
    full_round_to_merge(m, ORDER[3])
    prop = proposal(ORDER[0], deltas=[ProposalDelta(ORDER[0], delta_hash(ORDER[0]), 10.0)])
    reach_vote(m, ORDER[3], prop)
    m.process(MessageReceived(33.0, vote(ORDER[0], prop), ORDER[0]))
    acts = m.process(MessageReceived(33.0, vote(ORDER[1], prop), ORDER[1]))
    assert of(acts, KeepDelta) == [KeepDelta(delta_hash(ORDER[3]), R, BASE)]


def test_the_proposer_publishes_the_commit():
    m = machine(ORDER[0])
    full_round_to_merge(m, ORDER[0])
    acts = m.process(Tick(30.0))
    (merge,) = of(acts, Merge)
    m.process(MergeDone(31.0, merge.proposal_hash, "cd" * 32))
    prop = merge.proposal
    m.process(MessageReceived(33.0, vote(ORDER[1], prop), ORDER[1]))
    acts = m.process(MessageReceived(33.0, vote(ORDER[2], prop), ORDER[2]))
    assert of(acts, PublishCommit) and of(acts, CommitVersion)


def test_proposal_naming_less_than_two_thirds_of_the_electorate_is_bogus():
    m = machine(ORDER[3])
    full_round_to_merge(m, ORDER[3])
    small = proposal(ORDER[0], members=[ORDER[0], ORDER[1]], deltas=[])  # 2 of the electorate's 4 < 3
    acts = m.process(MessageReceived(31.0, small, ORDER[0]))
    assert m.counters["bogus_proposal"] == 1 and not of(acts, Merge)


def test_commit_signed_by_all_members_of_a_small_proposal_but_not_two_thirds_of_the_electorate_is_rejected():
    # The partition case: one side's proposal names only itself; 2 of 2 members signed,
    # but only 2 of the electorate's 4 (< 3). A quorum over the member list alone would accept it.
    m = machine(ORDER[3])
    small = proposal(ORDER[0], members=[ORDER[0], ORDER[1]], deltas=[])
    cert = tuple(encode(vote(pid, small)) for pid in (ORDER[0], ORDER[1]))
    acts = m.process(MessageReceived(40.0, make_commit(R, "cd" * 32, cert), ORDER[0]))
    assert not of(acts, SyncVersion) and m.counters["bad_commit"] == 1 and m.round == R


def test_peer_whose_result_differs_syncs_the_committed_version():
    m = machine(ORDER[3])
    full_round_to_merge(m, ORDER[3])
    prop = proposal(ORDER[0])
    reach_vote(m, ORDER[3], prop, version="ee" * 32)  # our merge disagrees
    for pid in ORDER[:3]:
        acts = m.process(MessageReceived(33.0, vote(pid, prop), pid))
    (s,) = of(acts, SyncVersion)
    assert s.version_id == "cd" * 32 and set(s.from_peers) == set(ORDER[:3]) and m.phase is Phase.SYNCING
    acts = m.process(VersionSynced(40.0, "cd" * 32, R))
    assert of(acts, CommitVersion)[0].version_id == "cd" * 32 and m.round == R + 1


def _laggard_syncing(later: Proposal) -> RoundMachine:
    """A machine that synced a later round's commit without ever seeing its proposal."""
    m = machine(ORDER[3], open_vote=lambda d: signing.open_signed(d, Vote))
    cert = tuple(signing.sign(vote(pid, later), identity(pid)) for pid in ORDER[:2])
    m.process(MessageReceived(10.0, make_commit(later.round, "cd" * 32, cert), ORDER[0]))
    return m


def test_a_laggard_learns_the_members_from_the_synced_record_when_it_never_saw_the_proposal():
    later = dataclasses.replace(proposal(ORDER[0], base="ef" * 32), round=R + 2)  # pushed before we came
    m = _laggard_syncing(later)
    acts = m.process(VersionSynced(13.0, "cd" * 32, R + 2, message_hash(later), frozenset(later.members)))
    assert of(acts, CommitVersion)[0].version_id == "cd" * 32 and m.round == R + 3
    assert m.electorate == frozenset(later.members)


def test_members_a_synced_record_names_for_another_proposal_are_not_taken():
    later = dataclasses.replace(proposal(ORDER[0], base="ef" * 32), round=R + 2)
    m = _laggard_syncing(later)
    acts = m.process(VersionSynced(13.0, "cd" * 32, R + 2, "00" * 32, frozenset(later.members)))
    assert not of(acts, CommitVersion) and m.phase is Phase.SYNCING


def test_failed_round_keeps_the_head_keeps_the_delta_and_enters_the_next_round():
    m = machine(ORDER[2])
    m.process(TrainingDone(4.0, delta_hash(ORDER[2]), 10, 100))
    acts = m.process(Tick(CFG.round_deadline))
    assert of(acts, RoundFailed) == [RoundFailed(R, "deadline")]
    assert of(acts, KeepDelta) == [KeepDelta(delta_hash(ORDER[2]), R, BASE)]
    assert of(acts, StartTraining) == [StartTraining(R + 1, BASE)]
    assert m.round == R + 1 and m.head_version == BASE


def test_stale_training_result_after_a_commit_is_kept_and_training_restarts():
    m = machine(ORDER[3])
    for pid in ORDER[:3]:
        m.process(announce(pid))
    prop = proposal(ORDER[0], deltas=[ProposalDelta(ORDER[0], delta_hash(ORDER[0]), 10.0)])
    m.process(MessageReceived(31.0, prop, ORDER[0]))  # adopted; its delta is still being fetched
    for pid in ORDER[:3]:  # the round commits while our training is still running
        acts = m.process(MessageReceived(33.0, vote(pid, prop), pid))
    assert of(acts, SyncVersion)
    acts = m.process(VersionSynced(34.0, "cd" * 32, R))
    assert m.round == R + 1 and not of(acts, StartTraining)
    acts = m.process(TrainingDone(40.0, delta_hash(ORDER[3]), 10, 100))
    assert of(acts, KeepDelta) == [KeepDelta(delta_hash(ORDER[3]), R, BASE, announced=False)]  # its samples were never announced
    assert of(acts, StartTraining) == [StartTraining(R + 1, "cd" * 32)]


def test_commit_for_a_later_round_signed_by_a_weak_quorum_of_our_electorate_is_synced():
    m = machine(ORDER[3], open_vote=lambda d: signing.open_signed(d, Vote))
    later = proposal(ORDER[0], base="ef" * 32)
    later = dataclasses.replace(later, round=R + 2)
    cert = tuple(signing.sign(vote(pid, later), identity(pid)) for pid in ORDER[:2])  # 2 = 4 - ceil(8/3) + 1
    commit = make_commit(R + 2, "cd" * 32, cert)
    acts = m.process(MessageReceived(10.0, commit, ORDER[0]))
    assert of(acts, SyncVersion)[0].round == R + 2 and m.phase is Phase.SYNCING


def test_commit_certificate_with_a_forged_vote_is_not_counted():
    m = machine(ORDER[3], open_vote=lambda d: signing.open_signed(d, Vote))
    later = dataclasses.replace(proposal(ORDER[0], base="ef" * 32), round=R + 2)
    stranger = identity(IDS[5])
    # A vote naming ORDER[0] but signed by a stranger, and one not signed at all.
    impersonated = signing._pack_envelope(stranger.public_key, encode(vote(ORDER[0], later)), b"\0" * 64)
    cert = (impersonated, encode(vote(ORDER[1], later)))
    commit = make_commit(R + 2, "cd" * 32, cert)
    acts = m.process(MessageReceived(10.0, commit, ORDER[0]))
    assert not of(acts, SyncVersion) and m.phase is Phase.COLLECTING
    assert m.counters["bad_certificate_vote"] == 2 and m.counters["bad_commit"] == 1


def test_weak_quorum_of_the_electorate_in_a_later_round_makes_us_jump():
    m = machine(ORDER[3])
    m.process(delta_ann(ORDER[0], round_=R + 3, now=5.0))
    acts = m.process(delta_ann(ORDER[1], round_=R + 3, now=5.0))
    assert of(acts, RoundFailed) == [RoundFailed(R, "skipped")] and m.round == R + 3


def test_announcements_for_a_later_round_alone_do_not_make_us_jump():
    # A peer that catches up announces for the next round ahead of time; that is no sign the others moved on.
    m = machine(ORDER[3])
    for pid in ORDER[:3]:
        acts = m.process(announce(pid, round_=R + 1, now=5.0))
        assert not of(acts, RoundFailed)
    assert m.round == R


def test_next_deadline_is_never_in_the_past():
    m = machine(ORDER[1])
    full_round_to_merge(m, ORDER[1])
    m.process(MessageReceived(30.5, proposal(ORDER[0]), ORDER[0]))
    m.process(Tick(36.0))
    assert m.next_deadline() > 36.0


def test_window_stays_open_until_the_event_group_size_is_expected():
    cfg = RoundConfig(collect_window=30.0, proposal_timeout=5.0, round_deadline=90.0, min_members=5)
    m = machine(ORDER[0], cfg=cfg)
    full_round_to_merge(m, ORDER[0])  # all four of the electorate delivered, but the event wants five
    assert not of(m.process(Tick(29.9)), Publish)
    assert of(m.process(Tick(30.0)), Publish)


def test_a_peer_that_catches_up_also_announces_for_the_next_round():
    m = RoundMachine(INFO[ORDER[0]], EARLY, open_vote=open_plain)
    acts = m.process(Start(0.0, BASE, R - 1, ELECTORATE))
    rounds = sorted(a.message.round for a in of(acts, Publish) if isinstance(a.message, PeerAnnouncement))
    assert rounds == [R, R + 1]


def test_a_member_that_stays_in_the_electorate_does_not_announce_the_next_round():
    # its delta and vote show it is here; the others expect its delta as an electorate member
    m, acts = commit_as(ORDER[3], proposal(ORDER[0]))
    assert m.round == R + 1 and ORDER[3] in m.electorate
    assert not [a for a in of(acts, Publish) if isinstance(a.message, PeerAnnouncement)]
    assert m.announcement(40.0).round == R + 1  # what the shell writes into the roster when due


def test_a_member_left_out_of_the_commit_announces_the_next_round():
    left_out = proposal(ORDER[0], members=ORDER[:3], deltas=[ProposalDelta(p, delta_hash(p), 10.0) for p in sorted(ORDER[:3])])
    m, acts = commit_as(ORDER[3], left_out)
    assert m.round == R + 1 and ORDER[3] not in m.electorate
    # round R + 1 was announced on start (as "next"); entering it announces the one after
    assert [a.message.round for a in of(acts, Publish) if isinstance(a.message, PeerAnnouncement)] == [R + 2]


def test_a_member_whose_round_failed_announces_again():
    # a partition: announcements (pushed, or stored when a push fails) let the sides meet again
    m = machine(ORDER[3])
    assert ORDER[3] in m.electorate
    acts = m.process(Tick(CFG.round_deadline + 0.5)) + m.process(Tick(2 * CFG.round_deadline + 1.0))
    assert m.round == R + 2
    # R + 1 was announced on start (as "next"); R + 2 after the second failure
    assert [a.message.round for a in of(acts, Publish) if isinstance(a.message, PeerAnnouncement)] == [R + 2]


def test_no_proposal_without_a_delta_to_merge():
    m = machine(ORDER[0])
    for pid in IDS[:4]:
        if pid != ORDER[0]:
            m.process(announce(pid))
    assert not of(m.process(Tick(30.0)), Publish)  # nobody's training has finished
    acts = m.process(TrainingDone(31.0, delta_hash(ORDER[0]), 10, 100))
    (prop,) = [a.message for a in of(acts, Publish) if isinstance(a.message, Proposal)]
    assert [d.peer_id for d in prop.deltas] == [ORDER[0]]


def _commit_while_merging(version: str = "cd" * 32):
    """ORDER[3] merges ORDER[0]'s proposal; the other three commit `version` before it finishes."""
    m = machine(ORDER[3])
    full_round_to_merge(m, ORDER[3])
    prop = proposal(ORDER[0])
    (merge,) = of(m.process(MessageReceived(31.0, prop, ORDER[0])), Merge)
    acts = []
    for pid in ORDER[:3]:
        acts += m.process(MessageReceived(32.0, vote(pid, prop, version), pid))
    return m, merge, acts


def test_commit_while_our_merge_runs_waits_for_it_instead_of_fetching():
    m, merge, acts = _commit_while_merging()
    assert not of(acts, SyncVersion) and m.phase is Phase.SYNCING
    acts = m.process(MergeDone(33.0, merge.proposal_hash, "cd" * 32))
    assert of(acts, CommitVersion) and not of(acts, SyncVersion) and m.round == R + 1


def test_our_merge_giving_another_id_than_the_quorum_fetches_theirs():
    m, merge, _ = _commit_while_merging()
    acts = m.process(MergeDone(33.0, merge.proposal_hash, "ee" * 32))
    assert of(acts, SyncVersion) and m.counters["merge_differs"] == 1


def test_a_merge_slower_than_the_proposal_timeout_is_not_waited_for():
    m, merge, _ = _commit_while_merging()
    assert m.next_deadline() == pytest.approx(32.0 + CFG.proposal_timeout)
    assert of(m.process(Tick(32.0 + CFG.proposal_timeout)), SyncVersion)


def test_commit_of_a_proposal_whose_deltas_we_hold_is_merged_locally_not_fetched():
    m = machine(ORDER[3])
    full_round_to_merge(m, ORDER[3])  # every delta fetched; no proposal adopted yet
    prop = proposal(ORDER[0])
    m.process(MessageReceived(4.5, prop, ORDER[0]))  # seen, but its slot (t=30) has not opened here
    assert m.phase is Phase.COLLECTING
    acts = []
    for pid in ORDER[:3]:
        acts += m.process(MessageReceived(5.0, vote(pid, prop), pid))
    assert of(acts, Merge) and not of(acts, SyncVersion)
    acts = m.process(MergeDone(6.0, message_hash(prop), "cd" * 32))
    assert of(acts, CommitVersion) and m.round == R + 1


def test_a_commit_record_without_its_fetched_certificate_is_not_acted_on():
    # The record names its votes by hash; only the shell can fetch them, so the machine never
    # commits on a bare record, however many signers it claims.
    m = machine(ORDER[3])
    prop = proposal(ORDER[0])
    signed = make_commit(R, "cd" * 32, [encode(vote(pid, prop)) for pid in ORDER[:3]])
    acts = m.process(MessageReceived(40.0, signed.commit, ORDER[0]))
    assert isinstance(signed.commit, Commit) and acts == [] and m.counters["unexpected"] == 1 and m.round == R


def test_commit_whose_id_differs_from_its_votes_is_rejected():
    m = machine(ORDER[3])
    prop = proposal(ORDER[0])
    cert = tuple(encode(vote(pid, prop)) for pid in ORDER[:3])  # the votes name "cd" * 32
    acts = m.process(MessageReceived(40.0, make_commit(R, "ee" * 32, cert), ORDER[0]))
    assert not of(acts, SyncVersion) and m.counters["bad_commit"] == 1


def test_a_better_ranked_member_does_not_propose_over_a_live_proposal():
    # Views of the ranking differ after crashes and joins; a late better-ranked proposal would
    # split the votes of peers that already merged the first one.
    m = machine(ORDER[0])
    full_round_to_merge(m, ORDER[0])
    m.process(MessageReceived(29.0, proposal(ORDER[1]), ORDER[1]))
    acts = m.process(Tick(30.0))
    assert not [a for a in of(acts, Publish) if isinstance(a.message, Proposal)]


# ---- rounds that fit the peers ---------------------------------------------------------


def test_a_slow_peer_is_told_to_finish_once_every_other_expected_peer_delivered():
    me = ORDER[0]
    m = machine(me)
    others = [p for p in IDS[:4] if p != me]
    for pid in others:
        m.process(announce(pid))
    for pid in others[:-1]:
        m.process(delta_ann(pid))
        assert not m.only_we_are_missing()  # someone else is still training too
    m.process(delta_ann(others[-1]))
    assert m.only_we_are_missing()
    m.process(TrainingDone(4.0, delta_hash(me), 10, 100))
    assert not m.only_we_are_missing()  # ours is out


def test_a_peer_alone_is_never_told_to_finish_early():
    me = IDS[0]
    m = machine(me, electorate=frozenset({me}))
    assert not m.only_we_are_missing()


# ---- screening -------------------------------------------------------------------------


def round_with_norms(me: str, norms: dict[str, float], samples: dict[str, int] | None = None) -> RoundMachine:
    """All four members deliver; each delta screened with the given norm (and samples)."""
    m = machine(me)
    samples = samples or {}
    for pid in IDS[:4]:
        if pid == me:
            continue
        m.process(announce(pid))
        msg = dataclasses.replace(delta_ann(pid).message, samples=samples.get(pid, 10))
        for a in of(m.process(MessageReceived(2.0, msg, pid)), FetchDelta):
            m.process(DeltaFetched(3.0, a.delta_hash, True, norm=norms[pid]))
    m.process(TrainingDone(4.0, delta_hash(me), samples.get(me, 10), 100, norm=norms[me]))
    return m


def proposed(m: RoundMachine) -> Proposal:
    (prop,) = [a.message for a in of(m.process(Tick(30.0)), Publish) if isinstance(a.message, Proposal)]
    return prop


def test_a_delta_whose_norm_is_far_past_the_median_is_left_out_and_the_reason_kept():
    liar = ORDER[2]
    m = round_with_norms(ORDER[0], {p: (100.0 if p == liar else 1.0) for p in IDS[:4]})
    prop = proposed(m)
    assert liar not in [d.peer_id for d in prop.deltas] and len(prop.deltas) == 3
    assert "median" in m.exclusions[liar] and m.counters["excluded_deltas"] == 1


def test_inflated_samples_are_capped_at_twice_the_median():
    liar = ORDER[3]
    m = round_with_norms(ORDER[0], dict.fromkeys(IDS[:4], 1.0), samples={p: (10**6 if p == liar else 32) for p in IDS[:4]})
    weights = {d.peer_id: d.weight for d in proposed(m).deltas}
    assert weights[liar] == 64.0 and {w for p, w in weights.items() if p != liar} == {32.0}


def test_a_proposal_with_uncapped_weights_or_an_outlier_delta_is_not_merged():
    liar = ORDER[2]
    m = round_with_norms(ORDER[3], dict.fromkeys(IDS[:4], 1.0))
    greedy = proposal(ORDER[0], deltas=[ProposalDelta(p, delta_hash(p), 10.0 if p != liar else 10.0 * 9) for p in sorted(IDS[:4])])
    m.process(MessageReceived(31.0, greedy, ORDER[0]))
    assert m.counters["bogus_proposal"] == 1  # claims more samples than announced
    m = round_with_norms(ORDER[3], {p: (50.0 if p == liar else 1.0) for p in IDS[:4]})
    acts = m.process(MessageReceived(31.0, proposal(ORDER[0]), ORDER[0]))
    assert not of(acts, Merge) and m.counters["screened_proposal"] == 1 and m.phase is Phase.COLLECTING


def test_a_rejected_delta_is_never_proposed_and_a_failed_merge_lets_the_next_proposer_speak():
    me = ORDER[1]
    m = machine(me)
    for pid in (ORDER[0], ORDER[2], ORDER[3]):
        m.process(announce(pid))
        for a in of(m.process(delta_ann(pid)), FetchDelta):
            bad = pid == ORDER[2]
            m.process(DeltaFetched(3.0, a.delta_hash, not bad, reason="non-finite values" if bad else ""))
    m.process(TrainingDone(4.0, delta_hash(me), 10, 100))
    assert m.exclusions == {ORDER[2]: "non-finite values"}
    # the best rank proposes the bad delta anyway; our merge of it fails
    acts = m.process(MessageReceived(30.5, proposal(ORDER[0]), ORDER[0]))
    assert m.counters["unfetchable_proposal"] == 1 and not of(acts, Merge)
    # we take over at our slot, without the bad delta
    acts = m.process(Tick(35.0))
    (prop,) = [a.message for a in of(acts, Publish) if isinstance(a.message, Proposal)]
    assert [d.peer_id for d in prop.deltas] == sorted({ORDER[0], ORDER[1], ORDER[3]})
    assert of(acts, Merge)[0].proposal == prop and m.phase is Phase.MERGING
    # and a merge that fails (say the CI gate refuses it) makes the proposal dead, not live
    m.process(MergeFailed(36.0, message_hash(prop), "CI gate"))
    assert m.counters["failed_merges"] == 1 and m.phase is Phase.COLLECTING


def test_with_too_few_norms_for_a_median_our_own_delta_bounds_the_others():
    # a liar proposes early, listing only its own x100 delta and ours: no median to trust yet
    me, liar = ORDER[3], ORDER[0]
    m = machine(me)
    for pid in IDS[:4]:
        if pid != me:
            m.process(announce(pid))
    m.process(TrainingDone(4.0, delta_hash(me), 10, 100, norm=1.0))
    for a in of(m.process(delta_ann(liar)), FetchDelta):
        m.process(DeltaFetched(3.0, a.delta_hash, True, norm=100.0))
    prop = proposal(liar, deltas=[ProposalDelta(p, delta_hash(p), 10.0) for p in sorted([me, liar])])
    acts = m.process(MessageReceived(31.0, prop, liar))
    assert not of(acts, Merge) and m.counters["screened_proposal"] == 1


def _deliver_all(m: RoundMachine, me: str, round_: int, base: str, bad: str = "", now: float = 0.0) -> None:
    """Every member of round `round_` announces and delivers; `bad`'s delta is rejected at fetch."""
    for pid in IDS[:4]:
        if pid == me:
            continue
        m.process(announce(pid, round_, now + 1.0))
        for a in of(m.process(delta_ann(pid, base, round_, now + 2.0)), FetchDelta):
            m.process(DeltaFetched(now + 3.0, a.delta_hash, pid != bad, reason="non-finite values" if pid == bad else ""))
    m.process(TrainingDone(now + 4.0, delta_hash(me), 10, 100))


def _propose_and_commit(m: RoundMachine, me: str, t: float, screened: tuple[str, ...] = ()) -> tuple[Proposal, str]:
    """We propose at our slot, merge (the merge's screen leaving out `screened`), and commit."""
    acts = m.process(Tick(t))
    (prop,) = [a.message for a in of(acts, Publish) if isinstance(a.message, Proposal)]
    (merge,) = of(acts, Merge)
    version = hashlib.sha256(f"v{prop.round}".encode()).hexdigest()
    m.process(MergeDone(t + 1.0, merge.proposal_hash, version, screened=screened))
    for voter in [p for p in IDS[:4] if p != me][:2]:
        m.process(MessageReceived(t + 2.0, vote(voter, prop, version), voter))
    assert m.round == prop.round + 1, "the round committed"
    return prop, version


def test_a_repeat_offender_is_down_weighted_then_left_out_to_cool_off():
    me, liar = ORDER[0], ORDER[2]
    m = machine(me)
    # round R: the liar's delta does not decode (offence 1); we propose without it
    _deliver_all(m, me, R, BASE, bad=liar)
    prop, head = _propose_and_commit(m, me, 31.0)
    assert liar not in [d.peer_id for d in prop.deltas] and m.offences() == {liar: 1}
    # round R+1: its delta is fine, its weight halved; the merge's screen leaves it out (offence 2)
    _deliver_all(m, me, R + 1, head, now=40.0)
    prop, head = _propose_and_commit(m, me, 33.0 + 55.0, screened=(liar,))  # round R+1 began at 33
    weights = {d.peer_id: d.weight for d in prop.deltas}
    assert weights[liar] == 5.0 and {w for p, w in weights.items() if p != liar} == {10.0}
    assert m.offences() == {liar: 2}
    # round R+2: two offences in the window: left out, with the reason, until they age out
    _deliver_all(m, me, R + 2, head, now=95.0)
    prop, _ = _propose_and_commit(m, me, 90.0 + 55.0)  # round R+2 began at 90
    assert liar not in [d.peer_id for d in prop.deltas]
    assert m.counters["excluded_deltas"] >= 1
