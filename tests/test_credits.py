"""The leaderboard credits each peer with what the lineage's merge specs record, and nothing else.

Guarantees: merged deltas count as accepted and their weights as samples merged; screened and
excluded deltas count as rejected, never as samples; a version seen twice counts once; the
board is sorted best first; records without a merge spec credit no deltas; malformed entries
(a forged record) credit nobody and do not raise.

What the node saw announced beside each version (`certificate["observed"]`): samples trained
are the announced samples (screened and late deltas included), else the merged weight; a
peer's display name is the newest one recorded, made safe to show; a malformed record of what
was observed credits nothing and names nobody.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from p2pmodel.credits import PeerCredit, leaderboard, observed_of
from p2pmodel.lineage import Version


def version(round_: int, deltas=(), screened=(), excluded=(), author: str = "prop", parent: str = "0" * 64) -> Version:
    merge = {"method": "linear", "params": {}, "deltas": [list(d) if isinstance(d, tuple) else d for d in deltas], "members": []}
    if screened:
        merge["screened"] = [list(s) for s in screened]
    if excluded:
        merge["excluded"] = [list(e) for e in excluded]
    return Version(parents=(parent,), tensors={}, message=f"round {round_}", time=1000.0 + round_,
                   author=author, round=round_, merge=merge, contributors=tuple(d[0] for d in deltas if isinstance(d, tuple) and d))


def by_peer(board: list[PeerCredit]) -> dict[str, PeerCredit]:
    return {c.peer: c for c in board}


def test_merged_deltas_count_as_accepted_and_their_weights_as_samples():
    board = by_peer(leaderboard([
        version(1, deltas=[("a", "h1", 64), ("b", "h2", 32)]),
        version(2, deltas=[("a", "h3", 16)]),
    ]))
    assert (board["a"].deltas_accepted, board["a"].samples_merged) == (2, 80.0)
    assert (board["b"].deltas_accepted, board["b"].samples_merged) == (1, 32.0)


def test_screened_and_excluded_deltas_count_as_rejected_not_as_samples():
    board = by_peer(leaderboard([
        version(1, deltas=[("a", "h1", 64)], screened=[("liar", "norm outlier")]),
        version(2, deltas=[("a", "h2", 64)], excluded=[("liar", "rejected at fetch")]),
    ]))
    liar = board["liar"]
    assert (liar.deltas_screened, liar.deltas_excluded, liar.deltas_rejected) == (1, 1, 2)
    assert (liar.deltas_accepted, liar.samples_merged, liar.last_round) == (0, 0.0, None)


def test_a_version_seen_twice_counts_once():
    v = version(1, deltas=[("a", "h1", 10)])
    assert leaderboard([v, v])[0].deltas_accepted == 1


def test_board_is_sorted_by_samples_then_accepted_then_peer():
    board = leaderboard([
        version(1, deltas=[("c", "h1", 5), ("b", "h2", 50), ("a", "h3", 5)]),
        version(2, deltas=[("c", "h4", 0)]),
    ])
    assert [c.peer for c in board[:3]] == ["b", "c", "a"]


def test_proposals_and_last_merged_round_are_recorded():
    board = by_peer(leaderboard([
        version(3, deltas=[("a", "h1", 1)], author="a"),
        version(7, deltas=[("a", "h2", 1)], author="b"),
    ]))
    assert (board["a"].versions_proposed, board["a"].last_round) == (1, 7)
    assert board["b"].versions_proposed == 1


def test_a_version_without_merge_spec_credits_no_deltas():
    seed = Version(parents=(), tensors={}, message="seed", time=1.0, author="founder")
    assert leaderboard([seed]) == []


def test_malformed_entries_credit_nobody():
    # Version refuses NaN, so a forged record arrives here as any object with the same fields
    forged = SimpleNamespace(id="f" * 64, round=1, author="prop", merge={
        "deltas": [["a", "h1", float("nan")], ["b", "h2", math.inf], ["c"], 7, ["d", "h3", -5]],
        "screened": [[], [3, "x"]],
    })
    board = by_peer(leaderboard([forged]))
    assert all(c.samples_merged == 0.0 for c in board.values())
    assert set(board) == {"a", "b", "d", "prop"}


def test_json_form_names_every_count():
    row = leaderboard([version(1, deltas=[("a", "h1", 2)], screened=[("a", "cosine")])])[0].to_json()
    assert row == {"peer": "a", "name": None, "samples_trained": 2.0, "samples_merged": 2.0, "deltas_accepted": 1,
                   "deltas_screened": 1, "deltas_excluded": 0, "deltas_rejected": 1, "versions_proposed": 0, "last_round": 1}


def test_samples_trained_are_what_peers_announced_screened_deltas_included():
    v = version(1, deltas=[("a", "h1", 64), ("b", "h2", 32)], screened=[("liar", "cosine")], author="a")
    board = by_peer(leaderboard([v], {v.id: {"samples": {"a": 100, "b": 32, "liar": 50, "late": 10}}}))
    assert {p: c.samples_trained for p, c in board.items()} == {"a": 100.0, "b": 32.0, "liar": 50.0, "late": 10.0}
    assert (board["a"].samples_merged, board["liar"].samples_merged, board["late"].deltas_accepted) == (64.0, 0.0, 0)


def test_without_an_observed_announcement_the_merged_weight_counts_as_trained():
    v1 = version(1, deltas=[("a", "h1", 64)])
    v2 = version(2, deltas=[("a", "h2", 16)])
    board = by_peer(leaderboard([v1, v2], {v2.id: {"samples": {"a": 20}}}))
    assert board["a"].samples_trained == 84.0


def test_a_peer_is_named_by_its_newest_recorded_name_made_safe():
    v1 = version(1, deltas=[("a", "h1", 1)])
    v2 = version(2, deltas=[("a", "h2", 1)], parent=v1.id)
    board = by_peer(leaderboard([v2, v1], {v1.id: {"names": {"a": "old"}}, v2.id: {"names": {"a": "new\x1b[31m"}}}))
    assert board["a"].name == "new [31m"


def test_names_alone_create_no_rows():
    v = version(1, deltas=[("a", "h1", 1)], author="a")
    assert [c.peer for c in leaderboard([v], {v.id: {"names": {"a": "alice", "ghost": "boo"}}})] == ["a"]


@pytest.mark.parametrize("observed", [
    "not a mapping", {"names": ["a"], "samples": 5}, {"names": {"a": 7}, "samples": {"a": float("nan"), 3: 1}},
    {"samples": {"a": -5}}, {"samples": {"a": True}},
])
def test_a_malformed_observed_record_credits_nothing_and_names_nobody(observed):
    v = version(1, deltas=[("a", "h1", 8)], author="a")
    (row,) = leaderboard([v], {v.id: observed})
    assert (row.peer, row.samples_trained, row.name) == ("a", 8.0, None)


def test_observed_of_reads_a_certificate_annotation():
    assert observed_of({"votes": [], "observed": {"names": {}}}) == {"names": {}}
    assert observed_of(None) is None and observed_of({"votes": []}) is None


# ------------------------------------------------------------------------------ `p2pmodel credits`

ALICE, BOB, LIAR = "a1" * 20, "b2" * 20, "ee" * 20


@pytest.fixture
def lineage(tmp_path):
    """A node's home: a seed and two rounds, with what the node saw announced beside each."""
    import torch

    from p2pmodel.lineage import LineageStore

    home = tmp_path / "home"
    with LineageStore.init(home / "lineage") as store:
        vid = store.commit({"w": torch.zeros(2)}, message="seed", time=0.0, author="seed").id
        for r, screened in ((1, []), (2, [[LIAR, "cosine -0.8 < 0.3"]])):
            merge = {"method": "linear", "params": {}, "deltas": [[ALICE, "a" * 64, 64], [BOB, "b" * 64, 32]],
                     "members": [ALICE, BOB, LIAR], **({"screened": screened} if screened else {})}
            vid = store.commit({"w": torch.full((2,), float(r))}, parents=[vid], message=f"round {r}", time=float(r),
                               author=ALICE, round=r, merge=merge, contributors=(ALICE, BOB)).id
            names = {ALICE: "alice", LIAR: "\x1b[2Jtotally-bob"}
            store.annotate(vid, certificate={"round": r, "votes": [], "observed": {"names": names, "samples": {ALICE: 70, BOB: 32, LIAR: 64}}})
    return home


def credits(*argv):
    from p2pmodel.cli import main

    return main(["credits", *map(str, argv)])


def test_the_command_prints_each_peer_with_its_name_samples_and_deltas(lineage, capsys):
    assert credits("--home", lineage) == 0
    out = capsys.readouterr().out
    alice = next(line for line in out.splitlines() if line.strip().startswith(ALICE[:12]))
    assert alice.split() == [ALICE[:12], "alice", "140", "128", "2", "0", "0", "2", "2"]
    liar = next(line for line in out.splitlines() if line.strip().startswith(LIAR[:12]))
    assert "\x1b" not in out and liar.split()[1:4] == ["[2Jtotally-bob", "128", "0"]
    assert out.splitlines()[0] == "credits over 3 versions of main"


def test_the_json_form_is_the_dashboards_leaderboard(lineage, capsys):
    assert credits("--repo", lineage / "lineage", "--json") == 0
    board = json.loads(capsys.readouterr().out)
    assert (board["branch"], board["versions"], board["truncated"]) == ("main", 3, False)
    rows = {p["peer"]: p for p in board["peers"]}
    assert rows[BOB] == {"peer": BOB, "name": None, "samples_trained": 64.0, "samples_merged": 64.0, "deltas_accepted": 2,
                         "deltas_screened": 0, "deltas_excluded": 0, "deltas_rejected": 0, "versions_proposed": 0, "last_round": 2}
    assert (rows[LIAR]["deltas_screened"], rows[LIAR]["samples_merged"]) == (1, 0.0)


def test_limit_counts_only_the_newest_versions(lineage, capsys):
    assert credits("--home", lineage, "--limit", 1, "--json") == 0
    board = json.loads(capsys.readouterr().out)
    assert (board["versions"], board["truncated"]) == (1, True)
    assert {p["peer"]: p["deltas_accepted"] for p in board["peers"]}[ALICE] == 1


def test_a_missing_lineage_is_one_line_and_a_bad_limit_a_usage_error(tmp_path, lineage, capsys):
    assert credits("--home", tmp_path / "nowhere") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere" in err
    assert credits("--home", lineage, "--limit", 0) == 2


def _ann(peer, round_, samples, carried=0, base="B"):
    from p2pmodel.protocols.messages import DeltaAnnouncement

    return DeltaAnnouncement(round_, base * 64, peer * 40, "d" * 63 + str(round_ % 10), 100, samples, carried)


def test_samples_trained_count_each_sample_once_when_a_delta_is_carried():
    """Round 3 committed without a's delta (a carries it into round 4); round 4 committed with it:
    round 4 counts a's new work only. A failed round's work counts with the next commit."""
    from p2pmodel.credits import samples_trained_since

    b3, b4 = "c" * 64, "e" * 64
    left_out = [_ann("a", 3, 100, base="c"), _ann("b", 3, 100, base="c")]  # round 3 on b3: b merged, a not
    carried = [_ann("a", 4, 220, carried=100, base="e"), _ann("b", 4, 120, base="e")]  # round 4 on b4
    a, b = "a" * 40, "b" * 40
    assert samples_trained_since(left_out + carried, 3, b3) == {a: 100, b: 100}
    assert samples_trained_since(left_out + carried, 4, b4) == {a: 120, b: 120}
    failed = [_ann("a", 5, 100, base="f"), _ann("a", 6, 210, carried=100, base="f")]  # round 5 failed on b5
    assert samples_trained_since(failed, 6, "f" * 64) == {a: 210}
