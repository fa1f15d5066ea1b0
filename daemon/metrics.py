"""Prometheus metrics for the node, read from its status snapshot at scrape time.

`StatusCollector` turns the dict the status API serves (`Node.status()`) into metric families
each time `/metrics` is scraped: the status is the one source of truth, and no counter is kept
twice. Each `StatusServer` gets its own `CollectorRegistry` (`status_registry`), never
prometheus_client's global one: tests run several nodes in one process, and a second node
registering the same names in the global registry would raise.

Names follow Prometheus conventions: the `p2pmodel_` prefix, base units (`_seconds`, `_bytes`),
`_total` on counters (prometheus_client appends it to a counter family's samples). A value the
status does not have yet (no head eval, no committed round) is left out rather than served as 0:
an absent series says "unknown", a 0 would be a claim.

Counters are the node's own since it started (they restart from 0 with the node, which
Prometheus' `rate()` handles). `p2pmodel_last_round_*` are gauges of the latest committed round
in the status history (samples trained and merged, time split, traffic): the status keeps no
running totals of those, and summing its 10-round window would not make a counter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from p2pmodel.protocols.round import Phase

__all__ = ["CONTENT_TYPE", "StatusCollector", "render_metrics", "status_registry"]

# The classic text exposition format. Spelled out: prometheus_client's CONTENT_TYPE_LATEST is
# version=1.0.0 since 0.22, and every Prometheus server reads 0.0.4.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LAST = -1  # in a path: the last element of a list (the latest history entry)
_MS = 1e-3  # status field in milliseconds -> metric in seconds

# One number each: (name, type, path into the status, scale, help). Counter names lack `_total`.
_SCALARS: tuple[tuple[str, str, tuple[str | int, ...], float, str], ...] = (
    ("p2pmodel_uptime_seconds", "gauge", ("uptime_s",), 1, "Seconds since the node started."),
    ("p2pmodel_stopping", "gauge", ("stopping",), 1, "1 while the node is shutting down."),
    ("p2pmodel_dht_peers", "gauge", ("dht_peers",), 1, "Peers in the node's DHT routing table: the peers it knows."),
    ("p2pmodel_event_loop_lag_worst_seconds", "gauge", ("loop_lag", "worst_ms"), _MS, "Worst event-loop lag since start."),
    ("p2pmodel_event_loop_lag_recent_worst_seconds", "gauge", ("loop_lag", "recent_worst_ms"), _MS, "Worst lag, last minute."),
    ("p2pmodel_event_loop_lag_mean_seconds", "gauge", ("loop_lag", "mean_ms"), _MS, "Mean event-loop lag since start."),
    # training (this node's worker thread)
    ("p2pmodel_training_busy_seconds", "counter", ("training", "busy_s"), 1, "Seconds spent taking inner steps."),
    ("p2pmodel_training_step", "gauge", ("training", "step"), 1, "Inner step reached in the current round."),
    ("p2pmodel_training_steps", "gauge", ("training", "steps"), 1, "Inner steps planned for the current round."),
    ("p2pmodel_training_loss", "gauge", ("training", "loss"), 1, "Training loss of the latest inner step."),
    ("p2pmodel_training_samples_per_second", "gauge", ("training", "samples_per_s"), 1, "Training throughput, latest round."),
    # records and peers refused
    ("p2pmodel_dht_records_rejected", "counter", ("records_rejected",), 1, "DHT records dropped by the record validator."),
    ("p2pmodel_faults_injected", "counter", ("faults_injected",), 1, "Faults injected by a test transport (join --fault)."),
    ("p2pmodel_commits_refused", "counter", ("commits_refused",), 1, "Head commits refused: forged, or a chain that fails."),
    ("p2pmodel_records_refused", "counter", ("records_refused",), 1, "Records from peers outside a private event."),
    # rounds (the round machine's counters with a name of their own; the rest are round_events)
    ("p2pmodel_round", "gauge", ("round",), 1, "The round the node is in."),
    ("p2pmodel_rounds_joined", "counter", ("rounds_joined",), 1, "Rounds this node took part in that committed."),
    ("p2pmodel_rounds_committed", "counter", ("round_counters", "rounds_committed"), 1, "Rounds seen committed by a quorum."),
    ("p2pmodel_rounds_failed", "counter", ("round_counters", "rounds_failed"), 1, "Rounds that ended without a commit."),
    (
        "p2pmodel_deltas_rejected",
        "counter",
        ("round_counters", "rejected_deltas"),
        1,
        "Deltas that failed screening (decode, NaN).",
    ),
    ("p2pmodel_deltas_excluded", "counter", ("round_counters", "excluded_deltas"), 1, "Deltas left out of our proposals (norm)."),
    ("p2pmodel_merges_failed", "counter", ("round_counters", "failed_merges"), 1, "Adopted proposals whose merge or CI failed."),
    ("p2pmodel_samples_trained", "counter", ("totals", "samples_trained"), 1, "Samples announced by the swarm in rounds we committed."),
    ("p2pmodel_samples_merged", "counter", ("totals", "samples_merged"), 1, "Samples merged into versions we committed."),
    ("p2pmodel_deltas_screened", "counter", ("totals", "deltas_screened"), 1, "Listed deltas the merge's screen left out."),
    ("p2pmodel_disk_full", "gauge", ("disk", "full"), 1, "1 while the disk is too full to train (daemon/disk.py)."),
    ("p2pmodel_disk_free_bytes", "gauge", ("disk", "free_bytes"), 1, "Free bytes under the lineage, last checked."),
    ("p2pmodel_head_round", "gauge", ("head", "round"), 1, "Round of the head version (main)."),
    ("p2pmodel_head_eval_loss", "gauge", ("head", "eval_loss"), 1, "Eval loss of the head version (median of the voters')."),
    # the latest committed round (status history)
    ("p2pmodel_last_round_number", "gauge", ("history", _LAST, "round"), 1, "Round of the latest committed round."),
    ("p2pmodel_last_round_contributors", "gauge", ("history", _LAST, "contributors"), 1, "Contributors merged into it."),
    ("p2pmodel_last_round_eval_loss", "gauge", ("history", _LAST, "eval_loss"), 1, "Eval loss of its version."),
    ("p2pmodel_last_round_samples_trained", "gauge", ("history", _LAST, "samples_trained"), 1, "Samples the swarm trained."),
    ("p2pmodel_last_round_samples_merged", "gauge", ("history", _LAST, "samples_merged"), 1, "Samples merged into its version."),
    ("p2pmodel_last_round_sent_bytes", "gauge", ("history", _LAST, "bytes_sent"), 1, "Bytes this node sent in that round."),
    ("p2pmodel_last_round_received_bytes", "gauge", ("history", _LAST, "bytes_received"), 1, "Bytes this node received in it."),
)

# Round-machine counters served under a name of their own above; the others are labelled
# `p2pmodel_round_events_total{event=...}` (their meanings: `_COUNTERS` in protocols/round.py).
_NAMED_ROUND_COUNTERS = frozenset(path[1] for _, _, path, _, _ in _SCALARS if path[0] == "round_counters")

# Where a committed round's wall time went: its history entry has `{part}_s` for each part.
_ROUND_TIME_PARTS = ("total", "training", "communication", "merge", "waiting")


def _lookup(state: Any, path: tuple[str | int, ...]) -> Any:
    """`state[path[0]][path[1]]...`, or None where a step is missing or of the wrong type."""
    for key in path:
        if isinstance(key, int) and isinstance(state, list) and state:
            state = state[key]
        elif isinstance(key, str) and isinstance(state, Mapping):
            state = state.get(key)
        else:
            return None
    return state


def _items(state: Any, path: tuple[str | int, ...]) -> list[tuple[Any, Any]]:
    """The sorted items of the mapping at `path` (none if it is missing or not a mapping)."""
    found = _lookup(state, path)
    return sorted(found.items()) if isinstance(found, Mapping) else []


def _number(value: Any) -> float | None:
    """A metric value from a status field: numbers and bools as float, anything else None."""
    return float(value) if isinstance(value, (int, float)) else None


class StatusCollector(Collector):
    """A prometheus_client collector over `state()`, the node's status dict.

    `state` is called once per scrape, on the event loop like the JSON endpoint, so all metrics
    of one scrape come from one snapshot.
    """

    def __init__(self, state: Callable[[], Mapping[str, Any]]):
        self._state = state

    def collect(self) -> Iterator[Metric]:
        s = self._state()
        for name, kind, path, scale, doc in _SCALARS:
            value = _number(_lookup(s, path))
            if value is not None:
                family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
                yield family(name, doc, value=value * scale)
        yield from self._labelled(s)

    @staticmethod
    def _labelled(s: Mapping[str, Any]) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "p2pmodel_node_info", "Constant 1, labelled with the node's identity.", labels=["peer_id", "event", "device"]
        )
        info.add_metric([str(_lookup(s, p) or "") for p in (("peer_id",), ("event",), ("training", "device"))], 1.0)
        yield info

        phase = s.get("phase")
        if isinstance(phase, str):
            # every phase, 1 for the current one, so a dashboard can plot the time spent in each
            phases = ["starting", *(p.value for p in Phase)]  # "starting": before the round machine exists
            family = GaugeMetricFamily("p2pmodel_round_phase", "1 for the node's phase, 0 for the others.", labels=["phase"])
            for name in phases if phase in phases else [*phases, phase]:
                family.add_metric([name], 1.0 if name == phase else 0.0)
            yield family

        # list lengths: the lists are bounded windows, so these are gauges
        for name, path, doc in (
            ("p2pmodel_round_members", ("peers",), "Live members of the current round."),
            ("p2pmodel_round_excluded_deltas", ("exclusions", "this_round"), "Deltas left out of the current round."),
            ("p2pmodel_recent_errors", ("errors",), "Recoverable errors in the status API's recent list (at most 20)."),
        ):
            value = _lookup(s, path)
            if isinstance(value, (list, Mapping)):
                yield GaugeMetricFamily(name, doc, value=len(value))

        traffic = {
            key: CounterMetricFamily(f"p2pmodel_transport_{name}", doc, labels=["kind"])
            for key, name, doc in (
                ("sent", "sent_bytes", "Bytes sent, by message kind."),
                ("received", "received_bytes", "Bytes received, by message kind."),
                ("messages", "messages", "Messages sent or received, by kind."),
            )
        }
        for kind, counts in _items(s, ("bytes",)):
            for key, family in traffic.items():
                value = _number(_lookup(counts, (key,)))
                if value is not None:
                    family.add_metric([str(kind)], value)
        yield from traffic.values()

        events = CounterMetricFamily("p2pmodel_round_events", "Round-machine counters, by name.", labels=["event"])
        for key, value in _items(s, ("round_counters",)):
            if key not in _NAMED_ROUND_COUNTERS and _number(value) is not None:
                events.add_metric([str(key)], float(value))
        yield events

        last = _lookup(s, ("history", _LAST))
        if isinstance(last, Mapping):
            # the history records the merge's screen only when it left someone out: no key means none
            screened = _number(last.get("screened", 0)) or 0.0
            yield GaugeMetricFamily("p2pmodel_last_round_screened_deltas", "Deltas screened out of its version.", value=screened)
            times = GaugeMetricFamily(
                "p2pmodel_last_round_duration_seconds", "Latest committed round's wall time, by part.", labels=["part"]
            )
            for part in _ROUND_TIME_PARTS:
                value = _number(last.get(f"{part}_s"))
                if value is not None:
                    times.add_metric([part], value)
            yield times


def status_registry(state: Callable[[], Mapping[str, Any]]) -> CollectorRegistry:
    """A fresh registry holding one `StatusCollector` over `state` (nothing is read before a scrape)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(state))
    return registry


def render_metrics(registry: CollectorRegistry) -> bytes:
    """The registry's metrics in the text format named by `CONTENT_TYPE`."""
    return generate_latest(registry)
