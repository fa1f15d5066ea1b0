"""The local status API serves the node's state as JSON on 127.0.0.1, and the loop-lag monitor
sees a stalled event loop.

Guarantees: `GET /status` returns exactly the state the node reports (NaN/Inf as null, so any
JSON client parses it); unknown paths get 404; the server binds loopback only; the client
raises `StatusUnavailable` when no node answers; `format_status` names the head, round, phase
and traffic; a blocking call on the loop shows up as lag of at least its duration.
"""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request

import pytest

from p2pmodel.daemon.status import LagMonitor, StatusServer, StatusUnavailable, fetch_status, format_status

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
