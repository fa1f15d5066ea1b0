"""What a node shows of its swarm's peers (p2pmodel/peers.py): safe names, honest reachability,
and a per-peer view built only from what the peers' records said.

Guarantees: a display name never carries control or format characters (terminal escapes, bidi
overrides, zero-width marks) and is at most 32 characters; our own `--name` is refused, not
trimmed, when it is not already such a name; reachability is read from announced multiaddrs
(public, then a relay circuit, then private over loopback; none announced is
"outbound-only", no announcement "unknown"); the view keeps the newest announcement, the latest
delta round, the latest merged round, a rate only over consecutive rounds, departures that are
not stale, and a bounded number of peers.
"""

from __future__ import annotations

import pytest

from p2pmodel.peers import MAX_NAME_CHARS, REACHABILITY, SwarmView, display_name, name_problem, reachability

A, B, C = "a" * 40, "b" * 40, "c" * 40


def announce(view: SwarmView, peer: str, round_: int, now: float = 100.0, addrs=("/ip4/127.0.0.1/tcp/1",), **caps):
    view.announced(peer, libp2p_id=f"Qm{peer[:4]}", addrs=addrs, capabilities=caps, round=round_, now=now)


# ------------------------------------------------------------------------------ names

@pytest.mark.parametrize("raw, shown", [
    ("alice", "alice"),
    ("  alice \t  lab ", "alice lab"),
    ("\x1b[2J\x1b[31mroot", "[2J [31mroot"),  # the escape byte goes: nothing repaints a terminal
    ("bob\u202egnp.exe", "bob gnp.exe"),  # a bidi override cannot reverse what follows
    ("a\u200bb", "a b"),  # nor does a zero-width space make two names look alike
    ("line\nbreak\r", "line break"),
    ("名前", "名前"),
])
def test_display_names_lose_control_and_format_characters(raw, shown):
    assert display_name(raw) == shown


def test_a_long_name_is_cut_to_the_bound():
    name = display_name("x" * 10_000)
    assert len(name) == MAX_NAME_CHARS and name.endswith("…")


@pytest.mark.parametrize("raw", [None, 7, b"bytes", "", "   ", "\x00\x07"])
def test_no_printable_name_is_no_name(raw):
    assert display_name(raw) is None


def test_our_own_name_is_refused_rather_than_trimmed():
    assert name_problem("") is None and name_problem("alice's gpu") is None
    assert "32 characters" in name_problem("x" * 33)
    assert name_problem("tab\there") and name_problem(" padded") and name_problem("esc\x1b[0m")


# ------------------------------------------------------------------------------ reachability

@pytest.mark.parametrize("addrs, kind", [
    (None, "unknown"),
    ((), "outbound-only"),
    (("/ip4/127.0.0.1/tcp/4001/p2p/QmX",), "loopback"),
    (("/ip6/::1/tcp/4001",), "loopback"),
    (("/ip4/192.168.1.7/tcp/4001", "/ip4/127.0.0.1/tcp/4001"), "private"),
    (("/ip4/10.0.0.2/udp/4001/quic",), "private"),
    (("/ip4/8.8.8.8/tcp/4001", "/ip4/10.0.0.2/tcp/4001"), "public"),
    (("/ip6/2001:4860::8888/tcp/4001",), "public"),
    (("/dns4/node.example.org/tcp/4001",), "public"),
    (("/ip4/8.8.8.8/tcp/4001/p2p/QmRelay/p2p-circuit/p2p/QmMe",), "relay"),
    (("/ip4/192.168.1.5/tcp/4001", "/ip4/8.8.8.8/tcp/4001/p2p/QmRelay/p2p-circuit/p2p/QmMe"), "relay"),  # a home behind NAT
    (("/ip4/8.8.8.8/tcp/4001/p2p/QmRelay/p2p-circuit", "/ip4/10.0.0.2/tcp/1"), "relay"),
    (("/ip4/0.0.0.0/tcp/4001", "garbage", "/ip4/999.1.1.1/tcp/1"), "unknown"),
])
def test_reachability_is_read_from_the_announced_addresses(addrs, kind):
    assert reachability(addrs) == kind
    assert kind in REACHABILITY


# ------------------------------------------------------------------------------ the view

def test_an_announcement_gives_name_device_addresses_and_round():
    view = SwarmView()
    announce(view, A, 3, name="alice\x1b[0m", device="cuda:0")
    row = view.snapshot(now=101.0)["peers"][0]
    assert (row["name"], row["device"], row["round"], row["reachability"], row["dial"]) == ("alice [0m", "cuda:0", 3, "loopback", "not tried")
    assert row["last_seen_s"] == 1.0


def test_an_older_announcement_read_back_from_the_dht_changes_nothing():
    view = SwarmView()
    announce(view, A, 5, name="new")
    announce(view, A, 4, name="old")
    assert (view.get(A).round, view.get(A).name) == (5, "new")


def test_a_restarted_peer_must_be_dialed_again():
    view = SwarmView()
    announce(view, A, 1)
    view.dialed(A, True)
    view.announced(A, libp2p_id="QmOther", addrs=(), capabilities={}, round=2, now=101.0)
    assert view.get(A).dial == "not tried"


def test_the_rate_is_samples_over_the_time_since_the_previous_rounds_delta():
    view = SwarmView()
    view.delta(A, 1, 64, now=100.0)
    assert view.get(A).samples_per_s is None  # one delta: no interval yet
    view.delta(A, 2, 80, now=110.0)
    assert view.get(A).samples_per_s == pytest.approx(8.0)
    view.delta(A, 2, 9999, now=111.0)  # the same round again (a DHT copy): no news
    view.delta(A, 5, 80, now=150.0)  # it missed rounds: the interval is not its speed
    assert (view.get(A).delta_round, view.get(A).delta_samples, view.get(A).samples_per_s) == (5, 80, None)


def test_merged_rounds_only_move_forward_and_only_for_known_peers():
    view = SwarmView()
    view.delta(A, 3, 1, now=1.0)
    view.merged(3, [A, B])
    view.merged(2, [A])
    assert view.get(A).merged_round == 3 and view.get(B) is None


def test_a_departure_marks_the_peer_until_it_announces_again():
    view = SwarmView()
    announce(view, A, 7)
    view.departed(A, 2, now=101.0)  # an old goodbye, from before its latest announcement
    assert not view.get(A).departed
    view.departed(A, 7, now=102.0)
    assert view.get(A).departed
    announce(view, A, 9)
    assert not view.get(A).departed


def test_snapshot_lists_peers_still_here_first_and_marks_ourselves():
    view = SwarmView()
    announce(view, A, 4)
    announce(view, B, 6)
    announce(view, C, 9)
    view.departed(C, 9, now=100.0)
    snap = view.snapshot(now=100.0, me=A)
    assert [r["peer_id"] for r in snap["peers"]] == [B, A, C]
    assert [r["self"] for r in snap["peers"]] == [False, True, False]
    assert snap["peers"][1]["dial"] == "self"


def test_names_are_given_only_for_peers_that_announced_one():
    view = SwarmView()
    announce(view, A, 1, name="alice")
    announce(view, B, 1)
    assert view.names([A, B, C]) == {A: "alice"}


def test_the_view_forgets_the_least_recently_heard_from_peer_when_full():
    view = SwarmView(max_peers=2)
    announce(view, A, 1, now=1.0)
    announce(view, B, 1, now=2.0)
    announce(view, C, 1, now=3.0)
    assert view.get(A) is None and len(view) == 2


def test_snapshot_bounds_its_rows_and_says_so():
    view = SwarmView()
    for i in range(5):
        announce(view, f"{i:040x}", i)
    snap = view.snapshot(now=100.0, limit=3)
    assert (len(snap["peers"]), snap["known"], snap["truncated"]) == (3, 5, True)


@pytest.mark.parametrize("name", ["x" * 33, "esc\x1b[31m"])
def test_join_refuses_a_bad_name_in_one_line_before_starting(name, tmp_path, capsys):
    from p2pmodel.cli import main

    assert main(["join", "--name", name, "--home", str(tmp_path / "home")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--name" in err and "\x1b" not in err  # the name is shown escaped
    assert not (tmp_path / "home").exists()
