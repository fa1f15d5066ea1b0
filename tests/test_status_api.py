"""The local status API serves the node's state as JSON on 127.0.0.1, and the loop-lag monitor
sees a stalled event loop.

Guarantees: `GET /status` returns exactly the state the node reports (NaN/Inf as null, so any
JSON client parses it); unknown paths get 404; the server binds loopback only; the client
raises `StatusUnavailable` when no node answers; `format_status` names the head, round, phase
and traffic; a blocking call on the loop shows up as lag of at least its duration.

`GET /metrics` serves the same state in Prometheus' text format 0.0.4: every number agrees with
the JSON of the same moment, counters are typed `counter` and end in `_total`, units are seconds
and bytes, a value the node does not know yet is absent (not 0), and each server has a registry
of its own (nodes in one process never share, nor touch the global registry).

`format_swarm` (`status --swarm`) shows one row per peer the node heard of: name, device, rate,
rounds, reachability and our dial, with a legend for the reachability kinds it shows, and no
terminal escape a peer put in its name; `--watch` needs a positive interval, fails in one line
when no node ever answered, and otherwise prints every refresh until Ctrl-C, exit 0, saying so
while the node is away.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request

import pytest

from prometheus_client import REGISTRY
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from p2pmodel.daemon.status import LagMonitor, StatusServer, StatusUnavailable, fetch_status, format_status, format_swarm

STATE = {
    "peer_id": "ab" * 20,
    "round": 7,
    "phase": "training",
    "head": {"id": "f00d" * 16, "round": 6, "eval_loss": 2.5},
    "bytes": {"delta": {"sent": 2048, "received": 4096, "messages": 3}},
    "loop_lag": {"worst_ms": 1.5, "recent_worst_ms": 0.5},
    "training": {"device": "cpu", "step": 3, "steps": 20, "loss": float("nan"), "samples_per_s": 12.0},
}


async def test_status_endpoint_returns_the_reported_state():
    server = await StatusServer.create(lambda: STATE, port=0)
    try:
        got = await asyncio.to_thread(fetch_status, server.url)
    finally:
        await server.close()
    assert got["head"] == STATE["head"] and got["round"] == 7 and got["bytes"] == STATE["bytes"]


async def test_non_finite_numbers_are_served_as_null():
    server = await StatusServer.create(lambda: STATE, port=0)
    try:
        got = await asyncio.to_thread(fetch_status, server.url)
    finally:
        await server.close()
    assert got["training"]["loss"] is None


async def test_unknown_path_is_404():
    server = await StatusServer.create(lambda: STATE, port=0)
    url = server.url.replace("/status", "/nope")

    def get() -> int:
        try:
            urllib.request.urlopen(url, timeout=5)
        except urllib.error.HTTPError as e:
            return e.code
        return 200

    try:
        assert await asyncio.to_thread(get) == 404
    finally:
        await server.close()


async def test_server_listens_on_loopback_only():
    server = await StatusServer.create(lambda: STATE, port=0)
    try:
        assert server._server.sockets[0].getsockname()[0] == "127.0.0.1"
    finally:
        await server.close()


def test_client_reports_a_missing_node_as_status_unavailable():
    with pytest.raises(StatusUnavailable):
        fetch_status("http://127.0.0.1:9/status", timeout=2)  # port 9 (discard): nothing listens


def test_summary_names_head_round_phase_and_traffic():
    text = format_status(STATE)
    assert "f00df00d" in text and "round    7" in text and "training" in text and "delta" in text


async def test_lag_monitor_sees_a_blocking_call_on_the_loop():
    monitor = LagMonitor(interval=0.02)
    task = asyncio.create_task(monitor.run())
    try:
        await asyncio.sleep(0.05)
        time.sleep(0.3)  # the stall being measured: the loop cannot run while this blocks
        deadline = time.monotonic() + 5
        while monitor.worst < 0.25 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
    assert monitor.worst >= 0.25


# ---------------------------------------------------------------------------------- /metrics

# A node mid-round, shaped like a real `Node.status()` (trimmed from a 3-node run's final status).
LIVE = {
    "peer_id": "7085072b48eb6d6bdf97fae248e3e76235ff034d",
    "libp2p_id": "QmSNYFAGicBfHdfvsNZwVfgwpC5SBUHW5ss1AQht8LEk8T",
    "event": "demo (b7c785496f84)",
    "uptime_s": 35.25,
    "training": {
        "device": "cpu",
        "peer_seed": 1887766315,
        "busy_s": 25.5,
        "step": 27,
        "steps": 90,
        "loss": 2.5,
        "samples_per_s": 167.0,
    },
    "bytes": {
        "delta": {"sent": 838084, "received": 836048, "messages": 19},
        "gossip": {"sent": 9247, "received": 12302, "messages": 41},
    },
    "records_rejected": 2,
    "faults_injected": 0,
    "dht_peers": 5,
    "loop_lag": {"worst_ms": 407.0, "recent_worst_ms": 12.5, "mean_ms": 4.5},
    "errors": [{"time": 1.0, "message": "delta 0123 from 4567 rejected: not finite"}],
    "stopping": False,
    "round": 4,
    "phase": "collecting",
    "head": {"id": "64741c69" * 8, "round": 3, "eval_loss": 2.625},
    "peers": ["7085072b" * 5, "aa" * 20, "bb" * 20],
    "rounds_joined": 4,
    "round_counters": {
        "wrong_round": 2,
        "buffered_future": 12,
        "rounds_committed": 4,
        "rounds_failed": 1,
        "rejected_deltas": 1,
        "excluded_deltas": 3,
        "failed_merges": 0,
    },
    "commits_refused": 0,
    "records_refused": 6,
    "exclusions": {"this_round": {"cc" * 20: "norm 40x the median"}, "recent": []},
    "totals": {"samples_trained": 14_080, "samples_merged": 9_600, "deltas_screened": 2},
    "disk": {"full": True, "free_bytes": 50_000_000, "min_free_bytes": 70_000_000, "since": 1.0, "reason": "x"},
    "history": [
        {"round": 2, "contributors": 3, "eval_loss": 2.75, "samples_trained": 2816, "samples_merged": 2816},
        {
            "round": 3,
            "version": "64741c69" * 8,
            "contributors": 2,
            "eval_loss": 2.625,
            "samples_trained": 2880,
            "samples_merged": 1920,
            "screened": 1,
            "total_s": 6.25,
            "training_s": 5.5,
            "communication_s": 0.25,
            "merge_s": 0.5,
            "waiting_s": 0.0,
            "bytes_sent": 215994,
            "bytes_received": 209998,
        },
    ],
    "current_round_times": None,
}


def _get(url: str) -> tuple[str, bytes]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.headers["Content-Type"], response.read()


async def _scrape(server: StatusServer) -> tuple[str, dict[str, Metric]]:
    """(content type, {family name: family}) of one GET /metrics, parsed by prometheus_client."""
    ctype, body = await asyncio.to_thread(_get, server.url.replace("/status", "/metrics"))
    return ctype, {f.name: f for f in text_string_to_metric_families(body.decode())}


def _value(families: dict[str, Metric], name: str, **labels: str) -> float:
    """The value of the one sample named `name` (with these labels) among the parsed families."""
    found = [s.value for f in families.values() for s in f.samples if s.name == name and s.labels == labels]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
    return found[0]


async def test_metrics_are_served_in_the_prometheus_text_format():
    server = await StatusServer.create(lambda: LIVE, port=0)
    try:
        ctype, families = await _scrape(server)
    finally:
        await server.close()
    assert ctype.startswith("text/plain; version=0.0.4")
    assert families and all(name.startswith("p2pmodel_") for name in families)


async def test_metrics_agree_with_the_status_json_of_the_same_node():
    server = await StatusServer.create(lambda: LIVE, port=0)
    try:
        status = await asyncio.to_thread(fetch_status, server.url)
        _, families = await _scrape(server)
    finally:
        await server.close()
    head, training, last = status["head"], status["training"], status["history"][-1]
    counters = {  # counter samples end in _total; the family is typed counter
        "p2pmodel_rounds_committed_total": status["round_counters"]["rounds_committed"],
        "p2pmodel_rounds_failed_total": status["round_counters"]["rounds_failed"],
        "p2pmodel_deltas_rejected_total": status["round_counters"]["rejected_deltas"],
        "p2pmodel_deltas_excluded_total": status["round_counters"]["excluded_deltas"],
        "p2pmodel_rounds_joined_total": status["rounds_joined"],
        "p2pmodel_training_busy_seconds_total": training["busy_s"],
        "p2pmodel_dht_records_rejected_total": status["records_rejected"],
        "p2pmodel_records_refused_total": status["records_refused"],
        "p2pmodel_samples_trained_total": status["totals"]["samples_trained"],
        "p2pmodel_samples_merged_total": status["totals"]["samples_merged"],
        "p2pmodel_deltas_screened_total": status["totals"]["deltas_screened"],
    }
    gauges = {
        "p2pmodel_round": status["round"],
        "p2pmodel_head_round": head["round"],
        "p2pmodel_head_eval_loss": head["eval_loss"],
        "p2pmodel_dht_peers": status["dht_peers"],
        "p2pmodel_round_members": len(status["peers"]),
        "p2pmodel_round_excluded_deltas": len(status["exclusions"]["this_round"]),
        "p2pmodel_recent_errors": len(status["errors"]),
        "p2pmodel_uptime_seconds": status["uptime_s"],
        "p2pmodel_training_loss": training["loss"],
        "p2pmodel_training_samples_per_second": training["samples_per_s"],
        "p2pmodel_event_loop_lag_worst_seconds": status["loop_lag"]["worst_ms"] / 1000,  # ms in JSON, seconds here
        "p2pmodel_last_round_number": last["round"],
        "p2pmodel_last_round_contributors": last["contributors"],
        "p2pmodel_last_round_samples_trained": last["samples_trained"],
        "p2pmodel_last_round_samples_merged": last["samples_merged"],
        "p2pmodel_last_round_screened_deltas": last["screened"],
        "p2pmodel_last_round_sent_bytes": last["bytes_sent"],
        "p2pmodel_disk_full": 1,
        "p2pmodel_disk_free_bytes": status["disk"]["free_bytes"],
    }
    for name, want in {**counters, **gauges}.items():
        assert _value(families, name) == pytest.approx(want), name
    for name in counters:
        assert families[name.removesuffix("_total")].type == "counter", name
    for name in gauges:
        assert families[name].type == "gauge", name
    for kind, c in status["bytes"].items():
        assert _value(families, "p2pmodel_transport_sent_bytes_total", kind=kind) == c["sent"]
        assert _value(families, "p2pmodel_transport_received_bytes_total", kind=kind) == c["received"]
        assert _value(families, "p2pmodel_transport_messages_total", kind=kind) == c["messages"]
    assert _value(families, "p2pmodel_round_events_total", event="wrong_round") == 2
    assert _value(families, "p2pmodel_last_round_duration_seconds", part="training") == last["training_s"]
    assert _value(families, "p2pmodel_round_phase", phase="collecting") == 1
    assert _value(families, "p2pmodel_round_phase", phase="voted") == 0
    info = {"peer_id": status["peer_id"], "event": status["event"], "device": training["device"]}
    assert _value(families, "p2pmodel_node_info", **info) == 1


async def test_a_value_the_node_does_not_know_yet_is_absent_not_zero():
    starting = {
        "peer_id": "ab" * 20,
        "round": None,
        "phase": "starting",
        "head": {"id": "f00d" * 16, "round": 0, "eval_loss": None},
        "history": [],
        "round_counters": {},
    }
    server = await StatusServer.create(lambda: starting, port=0)
    try:
        _, families = await _scrape(server)
    finally:
        await server.close()
    assert _value(families, "p2pmodel_head_round") == 0  # known: the seed is round 0
    assert _value(families, "p2pmodel_round_phase", phase="starting") == 1
    for unknown in ("p2pmodel_round", "p2pmodel_head_eval_loss", "p2pmodel_last_round_number", "p2pmodel_rounds_committed"):
        assert unknown not in families


async def test_each_server_has_its_own_registry_and_reads_the_status_at_scrape_time():
    a_state = {"round": 1}
    a = await StatusServer.create(lambda: a_state, port=0)
    b = await StatusServer.create(lambda: {"round": 9}, port=0)
    try:
        _, a_first = await _scrape(a)
        a_state["round"] = 2  # the node moved on: the next scrape sees it, nothing is cached
        (_, a_next), (_, b_now) = await _scrape(a), await _scrape(b)
    finally:
        await a.close()
        await b.close()
    assert (_value(a_first, "p2pmodel_round"), _value(a_next, "p2pmodel_round"), _value(b_now, "p2pmodel_round")) == (1, 2, 9)
    assert REGISTRY.get_sample_value("p2pmodel_round") is None  # prometheus_client's global registry is untouched


# ------------------------------------------------------------------------------ status --swarm, --watch

ME, PEER, GONE = "1" * 40, "2" * 40, "3" * 40


def _row(peer: str, **kw) -> dict:
    row = {"peer_id": peer, "name": None, "self": False, "device": "cpu", "libp2p_id": "QmX", "addrs": [], "reachability": "unknown",
           "dial": "not tried", "round": 7, "delta_round": 6, "delta_samples": 64, "merged_round": 5, "samples_per_s": None,
           "last_seen_s": 3.0, "departed": False}
    return {**row, **kw}


SWARM_STATE = {
    **STATE, "peer_id": ME, "event": "demo (0123456789ab)", "dht_peers": 4,
    "swarm": {"known": 3, "truncated": False, "peers": [
        _row(ME, name="alice", self=True, dial="self", reachability="loopback", samples_per_s=48.25),
        _row(PEER, name="\x1b]0;pwned\x07bob\u202e", device="cuda:0", reachability="public", dial="ok", samples_per_s=120.0),
        _row(GONE, departed=True, reachability="outbound-only", dial="failed", merged_round=None, last_seen_s=600.0),
    ]},
}


def _line(text: str, peer: str) -> list[str]:
    return next(line for line in text.splitlines() if line.strip().startswith(peer[:12])).split()


def test_swarm_table_has_a_row_per_peer_with_what_it_announced_and_what_we_saw():
    text = format_swarm(SWARM_STATE)
    assert _line(text, ME) == [ME[:12], "alice", "cpu", "48.2", "7", "6", "5", "loopback", "self", "3s", "this", "node"]
    assert _line(text, PEER)[3:10] == ["cuda:0", "120.0", "7", "6", "5", "public", "ok"]  # its name is two words here
    assert _line(text, GONE)[1:] == ["-", "cpu", "-", "7", "6", "-", "outbound-only", "failed", "10m", "departed"]
    assert "3 peers known to node 111111111111" in text.splitlines()[0] and "DHT routing table 4 peers" in text


def test_swarm_table_explains_each_reachability_it_shows():
    text = format_swarm(SWARM_STATE)
    assert "public: announces a public address" in text and "outbound-only: announces no address" in text
    assert "relay:" not in text


def test_swarm_table_prints_no_terminal_escapes_from_a_name():
    text = format_swarm(SWARM_STATE)
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
    assert _line(text, PEER)[1:3] == ["]0;pwned", "bob"]  # the escape, bell and bidi override are gone


def test_a_status_without_a_swarm_section_says_so():
    assert "no swarm section" in format_swarm(STATE)


def test_status_counts_the_peers_it_knows():
    assert "3 known (status --swarm)" in format_status(SWARM_STATE)


def _status_cli(*argv: str) -> int:
    from p2pmodel.cli import main

    return main(["status", *argv])


async def test_status_swarm_json_prints_the_swarm_section(capsys):
    server = await StatusServer.create(lambda: SWARM_STATE, port=0)
    try:
        assert await asyncio.to_thread(_status_cli, "--swarm", "--json", "--url", server.url) == 0
    finally:
        await server.close()
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(SWARM_STATE["swarm"]))


@pytest.mark.parametrize("every", ["0", "-1", "nan", "inf"])
def test_watch_needs_a_positive_interval(every, capsys):
    assert _status_cli("--watch", every, "--url", "http://127.0.0.1:9/status") == 2
    assert "--watch takes a positive number of seconds" in capsys.readouterr().err


def test_watching_a_node_that_never_answered_fails_in_one_line(capsys):
    assert _status_cli("--swarm", "--watch", "0.1", "--url", "http://127.0.0.1:9/status") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no node answers" in err


async def test_watch_prints_each_refresh_and_keeps_going_when_the_node_goes_away(capsys, monkeypatch):
    # three refreshes, the node leaves after the first; then Ctrl-C (raised by the third sleep)
    from p2pmodel.cli import swarm as cli_swarm

    sleeps = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 1:
            asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
        if len(sleeps) == 3:
            raise KeyboardInterrupt

    loop = asyncio.get_running_loop()
    server = await StatusServer.create(lambda: SWARM_STATE, port=0)
    monkeypatch.setattr(cli_swarm.time, "sleep", sleep)
    try:
        assert await asyncio.to_thread(_status_cli, "--swarm", "--watch", "0.5", "--url", server.url) == 0
    finally:
        await server.close()
    out = capsys.readouterr().out
    assert sleeps == [0.5, 0.5, 0.5] and out.count("--- ") == 3
    assert out.count("3 peers known") == 1 and out.count("no node answers") == 2 and "retrying every 0.5 s" in out
