"""The node's local status API, its client, and the event-loop lag monitor.

- `StatusServer` answers `GET /status` with the node's state as JSON, `GET /metrics` with the
  same state as Prometheus metrics (`metrics.py`), and `GET /healthz` with `ok`, on 127.0.0.1
  only. Given the node's lineage it also serves the dashboard (`/dashboard/`) and its JSON API
  (`/api/...`, `lineage_api.py`). It is a tiny HTTP/1.1 server on asyncio streams: one request
  per connection, bounded header size and read time.
- `fetch_status(url)` reads it (blocking; for the CLI), `format_status(state)` renders it and
  `format_swarm(state)` its `swarm` section (every peer the node heard of: `status --swarm`);
  `status_url_from_home(home)` finds a running node's URL in `HOME/node.json`.
- `LagMonitor` measures how late the event loop wakes up from a short sleep; its worst value is
  part of the status, so a stalled loop (heavy work left on it) shows up immediately.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from prometheus_client import CollectorRegistry

from p2pmodel.daemon.lineage_api import ApiReply, LineageApi, dashboard_file, jsonable
from p2pmodel.daemon.logs import get_logger
from p2pmodel.daemon.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from p2pmodel.daemon.metrics import render_metrics, status_registry
from p2pmodel.errors import P2PModelError, UsageError
from p2pmodel.peers import REACHABILITY, display_name

if TYPE_CHECKING:
    from p2pmodel.lineage import LineageStore

__all__ = [
    "LagMonitor",
    "StatusServer",
    "StatusUnavailable",
    "dashboard_url",
    "fetch_status",
    "format_status",
    "format_swarm",
    "status_url_from_home",
]

logger = get_logger(__name__)

_MAX_HEADER = 8 * 1024  # bytes of request line + headers we read
_READ_TIMEOUT = 5.0  # seconds a client has to send its request
# The dashboard's page and API answer only requests addressed to loopback by name: a web page
# elsewhere that rebinds its DNS name to 127.0.0.1 sends its own Host and is refused.
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]")
_PAGE_HEADERS = (
    "Content-Security-Policy: default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:\r\n"
    "X-Content-Type-Options: nosniff\r\nCache-Control: no-cache\r\n"
)


class StatusUnavailable(P2PModelError):
    """No node answered at the status URL. Fields: `url`, `reason`."""

    def __init__(self, url: str, reason: str):
        self.url, self.reason = url, reason
        super().__init__(f"no node answers at {url} ({reason}); is `p2pmodel join` running?")


class LagMonitor:
    """Wakes every `interval` seconds and records how late it woke: the loop's lag.

    `worst` is the worst lag since start; `recent_worst()` the worst over the last `window`
    seconds. Lags are in seconds.
    """

    def __init__(self, interval: float = 0.1, window: float = 60.0):
        self.interval, self.window = interval, window
        self.worst = 0.0
        self.samples = 0
        self._total = 0.0
        self._recent: deque[tuple[float, float]] = deque()

    async def run(self) -> None:
        """Measure until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(self.interval)
            now = loop.time()
            self.record(max(0.0, now - start - self.interval), now)

    def record(self, lag: float, now: float) -> None:
        self.samples += 1
        self._total += lag
        self.worst = max(self.worst, lag)
        self._recent.append((now, lag))
        while self._recent and self._recent[0][0] < now - self.window:
            self._recent.popleft()

    def recent_worst(self) -> float:
        return max((lag for _, lag in self._recent), default=0.0)

    def snapshot(self) -> dict[str, float]:
        return {
            "worst_ms": round(self.worst * 1000, 2),
            "recent_worst_ms": round(self.recent_worst() * 1000, 2),
            "mean_ms": round(self._total / self.samples * 1000, 3) if self.samples else 0.0,
        }


class StatusServer:
    """HTTP status endpoint on 127.0.0.1:`port`. `state()` is called per request, on the loop.

    `lineage` (the node's store) backs `/api/*`; without it those answer 503 and the dashboard
    shows the status alone. API calls run in a thread: they read SQLite and object files.
    """

    def __init__(
        self,
        state: Callable[[], dict[str, Any]],
        port: int = 0,
        host: str = "127.0.0.1",
        lineage: LineageStore | None = None,
    ):
        self._state = state
        self._host, self._port = host, port
        self._server: asyncio.base_events.Server | None = None
        self._metrics: CollectorRegistry = status_registry(state)  # this server's own, never the global one
        self._api = LineageApi(lineage)

    @classmethod
    async def create(
        cls, state: Callable[[], dict[str, Any]], port: int = 0, lineage: LineageStore | None = None
    ) -> StatusServer:
        """Start listening; `port=0` picks a free port (see `.port`).

        Args:
            state: returns the node's status dict (called on the loop, per request).
            port: TCP port on 127.0.0.1; 0 picks a free one.
            lineage: the node's lineage, read by the dashboard's API (None: API answers 503).

        Raises:
            StatusUnavailable: the port is taken.
        """
        self = cls(state, port, lineage=lineage)
        try:
            self._server = await asyncio.start_server(self._handle, self._host, port)
        except OSError as e:
            raise StatusUnavailable(self.url, f"cannot listen: {e.strerror or e}") from None
        self._port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self._port}/status"

    @property
    def dashboard_url(self) -> str:
        return dashboard_url(self.url)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT)
            if len(head) > _MAX_HEADER:
                return await self._reply(writer, 431, "text/plain", b"request header too large\n")
            parts = head.split(b"\r\n", 1)[0].split()
            if len(parts) != 3 or parts[0] != b"GET":
                if len(parts) == 3 and parts[1].startswith(b"/api/"):
                    return await self._reply_json(writer, ApiReply.error(405, "only GET is supported"))
                return await self._reply(writer, 405, "text/plain", b"only GET is supported\n")
            target = parts[1]
            path = target.split(b"?", 1)[0]
            if path.startswith((b"/api/", b"/dashboard")):
                if not _addressed_to_loopback(head):
                    return await self._reply_json(writer, ApiReply.error(403, "the dashboard answers only 127.0.0.1 or localhost"))
                if path.startswith(b"/api/"):
                    reply = await asyncio.to_thread(self._api.handle, target.decode("ascii", "replace"))
                    return await self._reply_json(writer, reply)
                return await self._reply_page(writer, path)
            if path == b"/healthz":
                return await self._reply(writer, 200, "text/plain", b"ok\n")
            if path in (b"/", b"/status"):
                body = json.dumps(jsonable(self._state()), sort_keys=True).encode()
                return await self._reply(writer, 200, "application/json", body)
            if path == b"/metrics":
                return await self._reply(writer, 200, METRICS_CONTENT_TYPE, render_metrics(self._metrics))
            await self._reply(writer, 404, "text/plain", b"not found; try /status, /metrics or /dashboard/\n")
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # a slow, broken or oversized request: just close
        finally:
            writer.close()

    async def _reply_page(self, writer: asyncio.StreamWriter, path: bytes) -> None:
        """A dashboard file, looked up by name in a fixed table (never a file system path)."""
        if path == b"/dashboard":  # relative links need the trailing slash
            return await self._reply(writer, 308, "text/plain", b"", extra="Location: /dashboard/\r\n")
        found = None
        if path.startswith(b"/dashboard/"):
            found = dashboard_file(path[len(b"/dashboard/"):].decode("ascii", "replace"))
        if found is None:
            return await self._reply(writer, 404, "text/plain", b"not found\n")
        body, ctype = found
        await self._reply(writer, 200, ctype, body, extra=_PAGE_HEADERS)

    async def _reply_json(self, writer: asyncio.StreamWriter, reply: ApiReply) -> None:
        await self._reply(writer, reply.status, reply.content_type, reply.body, extra="Cache-Control: no-store\r\n")

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, code: int, ctype: str, body: bytes, extra: str = "") -> None:
        reason = HTTPStatus(code).phrase
        writer.write(
            f"HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            f"{extra}Connection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None


def _addressed_to_loopback(head: bytes) -> bool:
    """Whether the request's Host header names loopback (any port); no Host header is refused."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"host":
            host = value.strip().decode("ascii", "replace")
            if host.startswith("["):
                host = host.split("]", 1)[0] + "]"
            else:
                host = host.split(":", 1)[0]
            return host.lower() in _LOCAL_HOSTS
    return False


def fetch_status(url: str, timeout: float = 5.0) -> dict[str, Any]:
    """GET a node's status JSON (blocking).

    Raises:
        StatusUnavailable: nothing answers, or the answer is not status JSON.
    """
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise StatusUnavailable(url, str(getattr(e, "reason", e))) from None


def status_url_from_home(home: str | Path) -> str:
    """The status URL a running node wrote to `HOME/node.json`.

    Raises:
        UsageError: no readable node.json there (no node has run with that home).
    """
    info = Path(home).expanduser() / "node.json"
    try:
        return str(json.loads(info.read_text())["status_url"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"no node.json in {info.parent}; pass --url or the node's --home") from None


def dashboard_url(status_url: str) -> str:
    """The dashboard's URL on the node whose status URL is `status_url`."""
    parts = urllib.parse.urlsplit(status_url)
    return urllib.parse.urlunsplit((parts.scheme or "http", parts.netloc, "/dashboard/", "", ""))


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def format_status(s: dict[str, Any]) -> str:
    """A readable, multi-line summary of a status dict."""
    lines = []
    head = s.get("head") or {}
    lines.append(f"node     {s.get('peer_id', '?')}  (libp2p {str(s.get('libp2p_id', '?'))[:20]}…)")
    lines.append(f"event    {s.get('event', '?')}   up {s.get('uptime_s', 0):.0f}s")
    lines.append(f"round    {s.get('round')}  phase {s.get('phase')}  rounds joined {s.get('rounds_joined', 0)}")
    loss = head.get("eval_loss")
    loss_text = f"{loss:.4f}" if isinstance(loss, (int, float)) else "-"
    lines.append(f"head     {str(head.get('id') or '-')[:16]}  round {head.get('round')}  eval_loss {loss_text}")
    tr = s.get("training") or {}
    if tr:
        lines.append(
            f"training {tr.get('device', '?')}  step {tr.get('step', 0)}/{tr.get('steps', 0)}  "
            f"loss {tr.get('loss') if tr.get('loss') is not None else '-'}  "
            f"{tr.get('samples_per_s', 0):.1f} samples/s"
        )
    reach = s.get("reachability") or {}
    if reach:
        conns = reach.get("connections") or {}
        relays = ", ".join(str(r)[:12] + "…" for r in reach.get("relayed_by") or []) or "none"
        lines.append(
            f"reach    {reach.get('mode', '?')} ({reach.get('decided_by', '?')}); relayed by {relays}; "
            f"connections {conns.get('direct', 0)} direct, {conns.get('relayed', 0)} relayed"
        )
    peers = s.get("peers") or []
    known = (s.get("swarm") or {}).get("known")
    lines.append(f"peers    {len(peers)} in the current round" + (f", {known} known (status --swarm)" if known is not None else ""))
    for p in peers[:12]:
        lines.append(f"  - {p}")
    counters = s.get("bytes") or {}
    if counters:
        lines.append("traffic  kind            sent        received")
        for kind, c in counters.items():
            lines.append(f"         {kind:<14}{_fmt_bytes(c.get('sent', 0)):>10}  {_fmt_bytes(c.get('received', 0)):>10}")
    lag = s.get("loop_lag") or {}
    lines.append(f"loop lag worst {lag.get('worst_ms', 0)} ms, last minute {lag.get('recent_worst_ms', 0)} ms")
    errors = s.get("errors") or []
    if errors:
        lines.append(f"errors   {len(errors)} recent")
        for e in errors[-5:]:
            when = time.strftime("%H:%M:%S", time.localtime(e.get("time", 0)))
            lines.append(f"  {when} {e.get('message')}")
    return "\n".join(lines)


def _ago(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}m" if seconds < 7200 else f"{seconds / 3600:.0f}h"


def _cell(x: Any) -> str:
    return "-" if x is None else str(x)


def format_swarm(s: dict[str, Any]) -> str:
    """The `swarm` section of a status dict as a table: one row per peer the node heard of.

    Every value is what the peer announced (name, device, addresses) or what this node saw of
    it (rounds, rate, our dial); peers of the event this node never heard from are not listed.
    """
    swarm = s.get("swarm")
    if not isinstance(swarm, dict):
        return "this node reports no swarm section (an older p2pmodel?); try `p2pmodel status`"
    rows = swarm.get("peers") or []
    lines = [
        f"swarm of {s.get('event', '?')}: {swarm.get('known', len(rows))} peers known to node {str(s.get('peer_id', '?'))[:12]}"
        f" (round {_cell(s.get('round'))}; DHT routing table {_cell(s.get('dht_peers'))} peers)"
    ]
    if not rows:
        lines.append("  no peer heard from yet")
        return "\n".join(lines)
    header = ("peer", "name", "device", "samples/s", "round", "delta", "merged", "reachability", "dial", "seen", "")
    table = []
    for p in rows:
        rate = p.get("samples_per_s")
        note = "this node" if p.get("self") else "departed" if p.get("departed") else ""
        table.append((
            # shown in a terminal: made safe again, whoever answered at the status URL
            display_name(str(p.get("peer_id", ""))[:12], 12) or "?", display_name(p.get("name")) or "-",
            display_name(p.get("device"), 24) or "?",
            f"{rate:.1f}" if isinstance(rate, (int, float)) else "-", _cell(p.get("round")), _cell(p.get("delta_round")),
            _cell(p.get("merged_round")), str(p.get("reachability", "unknown")), str(p.get("dial", "-")),
            _ago(p.get("last_seen_s")), note,
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in (header, *table)) for i in range(len(header))]
    numeric = {3, 4, 5, 6, 9}
    for r in (header, *table):
        cells = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  " + "  ".join(cells).rstrip())
    if swarm.get("truncated"):
        lines.append(f"  ... {swarm.get('known', 0) - len(rows)} more not shown")
    lines.append("round: latest round it announced; delta: latest round it delivered a delta for; merged: latest "
                 "round whose version, committed here, merged its delta; samples/s: its last delta's samples over "
                 "the time since its delta of the round before (as received here); dial: whether this node could "
                 "connect to its announced addresses")
    for kind in dict.fromkeys(str(r[7]) for r in table):
        lines.append(f"{kind}: {REACHABILITY.get(kind, 'unknown')}")
    return "\n".join(lines)
