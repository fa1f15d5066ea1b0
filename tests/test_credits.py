"""The leaderboard credits each peer with what the lineage's merge specs record, and nothing else.

Guarantees: merged deltas count as accepted and their weights as samples merged; screened and
excluded deltas count as rejected, never as samples; a version seen twice counts once; the
board is sorted best first; records without a merge spec credit no deltas; malformed entries
(a forged record) credit nobody and do not raise.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

from p2pmodel.credits import PeerCredit, leaderboard
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
    assert row == {"peer": "a", "samples_merged": 2.0, "deltas_accepted": 1, "deltas_screened": 1,
                   "deltas_excluded": 0, "deltas_rejected": 1, "versions_proposed": 0, "last_round": 1}
