"""The round protocol under a simulated network (protocols/sim.py), with hypothesis schedules.

Guarantees checked, for delays, drops, duplicates, partitions, crashes and a lying minority
(fewer than a third of the members):

- SAFETY: every honest peer that commits round r commits the same version id;
- LIVENESS: once partitions heal, rounds keep committing on every live honest peer;
- NO LOSS: every delta an honest peer trained is merged into a committed version, carried
  into a later delta of the same peer, or still pending at the end — never silently dropped;

plus determinism and a run with a few hundred peers.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from p2pmodel.protocols.sim import Fault, NetConfig, Partition, SimConfig, Simulation, WireModel

ROUND_DEADLINE = SimConfig().round.round_deadline


@st.composite
def schedules(draw, *, heal_by: float | None = None) -> SimConfig:
    """A swarm of 4..10 peers with fewer than a third faulty, and a hostile network."""
    n = draw(st.integers(4, 10))
    max_faulty = (n - 1) // 3
    order = draw(st.permutations(range(n)))
    n_liars = draw(st.integers(0, max_faulty))
    n_crashed = draw(st.integers(0, max_faulty - n_liars))
    faults = tuple((i, draw(st.sampled_from(list(Fault)))) for i in order[:n_liars])
    crashes = tuple((i, draw(st.floats(0.0, 200.0))) for i in order[n_liars : n_liars + n_crashed])
    net = NetConfig(
        delay_max=draw(st.floats(0.06, 1.5)),
        drop=draw(st.sampled_from([0.0, 0.05, 0.2])),
        duplicate=draw(st.sampled_from([0.0, 0.1])),
    )
    partitions: tuple[Partition, ...] = ()
    if draw(st.booleans()):
        start = draw(st.floats(0.0, 150.0))
        length = draw(st.floats(5.0, 200.0 if heal_by is None else max(5.0, heal_by - start)))
        cut = draw(st.integers(1, n - 1))
        shuffled = draw(st.permutations(range(n)))
        groups = (frozenset(shuffled[:cut]), frozenset(shuffled[cut:]))
        partitions = (Partition(start, start + length, groups),)
    heal = max((p.end for p in partitions), default=0.0)
    return SimConfig(
        n_peers=n, rounds=3, until=heal + 10 * ROUND_DEADLINE, seed=draw(st.integers(0, 2**16)),
        net=net, faults=faults, crashes=crashes, partitions=partitions,
    )  # fmt: skip


# The suite runs a fixed set of schedules (derandomized: CI must not fail by the draw of a
# seed); SIM_EXAMPLES=1500 runs a random soak (about 2 minutes) to look for new failures.
SOAK = "SIM_EXAMPLES" in os.environ
EXAMPLES = int(os.environ.get("SIM_EXAMPLES", "80"))
SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=not SOAK, suppress_health_check=[HealthCheck.too_slow]
)

# Found by a soak: a peer that missed an electorate member's announcement (sent before it
# started) left that member out of its proposal although it held its delta.
MISSED_ANNOUNCEMENTS = SimConfig(
    n_peers=10, rounds=3, until=900.0, seed=2, net=NetConfig(delay_min=0.05, delay_max=0.0625),
    faults=((0, Fault.WRONG_VOTE),), crashes=((1, 1.0), (4, 32.0)),
)  # fmt: skip


@SETTINGS
@given(schedules())
def test_honest_peers_never_commit_different_versions_in_one_round(cfg):
    result = Simulation(cfg).run()
    assert not result.errors
    split = {r: ids for r, ids in result.committed_ids().items() if len(ids) > 1}
    assert not split, f"round(s) with more than one committed id: {split}"


@SETTINGS
@given(schedules(heal_by=300.0))
@example(MISSED_ANNOUNCEMENTS)
def test_rounds_keep_committing_once_partitions_heal(cfg):
    result = Simulation(cfg).run()
    live = [p for p in result.honest if p not in result.crashed]
    behind = {p: len(result.commits[p]) for p in live if len(result.commits[p]) < cfg.rounds}
    assert not behind, f"live honest peers with fewer than {cfg.rounds} commits: {behind}"


@SETTINGS
@given(schedules())
def test_no_honest_delta_is_silently_dropped(cfg):
    result = Simulation(cfg).run()
    assert result.lost_deltas() == []


def test_simulation_is_deterministic():
    cfg = SimConfig(n_peers=7, seed=3, net=NetConfig(drop=0.1, duplicate=0.1), faults=((2, Fault.EQUIVOCATE),))
    a, b = Simulation(cfg).run(), Simulation(cfg).run()
    assert a.commits == b.commits and a.sent_bytes == b.sent_bytes


def test_minority_side_of_a_partition_syncs_the_majority_commits_after_healing():
    minority = frozenset({0, 1})
    cfg = SimConfig(
        n_peers=7, rounds=4, until=1000.0,
        partitions=(Partition(0.0, 200.0, (minority, frozenset(range(2, 7)))),),
    )  # fmt: skip
    result = Simulation(cfg).run()
    committed = result.committed_ids()
    assert all(len(ids) == 1 for ids in committed.values())
    # The majority (5 of 7 >= ceil(14/3) = 5) kept committing; the minority adopted its versions.
    assert all(len(result.commits[p]) >= 1 for p in minority)
    assert result.counters[0]["rounds_failed"] >= 1


def test_peer_that_joins_late_builds_on_the_current_head_and_commits():
    cfg = SimConfig(n_peers=6, rounds=4, joins=((5, 30.0),))
    result = Simulation(cfg).run()
    assert len(result.commits[5]) >= 1
    first = min(result.commits[5])
    assert result.commits[5][first] == result.commits[0][first]


def test_a_few_hundred_peers_with_a_lying_minority_commit_one_version():
    n = 200
    liars = tuple((i, [Fault.WRONG_VOTE, Fault.EQUIVOCATE, Fault.UNFETCHABLE][i % 3]) for i in range(0, n, 7))
    cfg = SimConfig(n_peers=n, rounds=1, seed=1, faults=liars, net=NetConfig(drop=0.01, duplicate=0.01))
    result = Simulation(cfg).run()
    assert not result.errors
    committed = result.committed_ids()
    assert len(committed) >= 1 and all(len(ids) == 1 for ids in committed.values())
    assert all(len(result.commits[p]) >= 1 for p in result.honest)


# ---- the byte model (what scripts/scale_study reports; checked against real daemons in the README)


def _per_round(res, table, kind: str) -> float:
    rounds = min(len(res.commits[p]) for p in res.honest)
    total = sum(v for p in res.honest for (k, r), v in table.get(p, {}).items() if k == kind and r < rounds)
    return total / (rounds * len(res.honest))


def test_a_record_push_costs_its_bytes_plus_the_push_overhead_at_every_other_peer():
    plain = Simulation(SimConfig(n_peers=5, rounds=3, seed=1, net=NetConfig(wire=WireModel(push_overhead=0)))).run()
    framed = Simulation(SimConfig(n_peers=5, rounds=3, seed=1, net=NetConfig(wire=WireModel(push_overhead=100)))).run()
    votes = _per_round(framed, framed.sent, "vote")
    assert votes >= 3.5  # each peer's vote goes to the 4 others (a peer's vote may be missing from a round)
    extra = _per_round(framed, framed.sent_bytes, "vote") - _per_round(plain, plain.sent_bytes, "vote")
    assert extra == 100 * votes


def test_live_peers_commit_from_pushed_votes_and_never_pay_for_a_certificate():
    res = Simulation(SimConfig(n_peers=6, rounds=4, seed=2)).run()
    assert _per_round(res, res.received_bytes, "certificate") == 0
    assert _per_round(res, res.sent, "commit") <= 1 / 6 + 1e-9  # one publisher per round stores it


def test_a_peer_that_missed_the_votes_fetches_the_commit_and_its_certificate():
    cut = Partition(0.0, 60.0, (frozenset({0, 1, 2, 3, 4}), frozenset({5})))
    res = Simulation(SimConfig(n_peers=6, rounds=4, seed=3, partitions=(cut,))).run()
    lagging = res.received_bytes[5]
    assert sum(v for (k, _), v in lagging.items() if k == "certificate") > 0
    assert all(sum(v for (k, _), v in res.received_bytes[p].items() if k == "certificate") == 0 for p in (0, 1, 2, 3, 4))


def test_dht_upkeep_is_charged_per_second_of_a_peer_s_time():
    def upkeep(train: float) -> float:
        runs = [
            Simulation(SimConfig(n_peers=4, rounds=3, seed=4, train_time=(train, train), net=NetConfig(wire=w))).run()
            for w in (WireModel(), WireModel(poll_every=float("inf"), roster_every=float("inf")))
        ]
        return _per_round(runs[0], runs[0].sent_bytes, "dht") - _per_round(runs[1], runs[1].sent_bytes, "dht")

    fast, slow = upkeep(5.0), upkeep(40.0)
    assert fast > 0 and slow > 2 * fast  # rounds about 3x longer: about 3x the background reads and stores
