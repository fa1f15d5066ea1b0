"""p2pmodel.daemon: the asyncio node that joins a swarm (installed from `daemon/`).

Map:

- `transport.py` — hivemind DHT records (`publish`/`fetch`), p2pd's lifecycle, stream handlers,
  connections; byte counters per message type. It inherits `object_streams.py` (libp2p object
  streams: `rpc_get_object`/`call_fetch`, resumable, hash-verified, streams reused) and
  re-exports `transport_errors.py`; `addresses.py` turns multiaddrs into what p2pd dials.
- `reachability.py` — who can dial this node: public (relays for others), private (behind NAT:
  reserves a relay slot, announces the circuit address) or local; `--reachability auto` decides.
- `node.py`      — `Node`: opens home, lineage, transport, trainer and status API; one supervisor
  over the node's loops; the fixed shutdown order.
- `rounds.py`    — `RoundRunner`: drives `protocols.round.RoundMachine` with real I/O (records,
  training, delta fetches, deterministic merge + outer step, votes, commits).
- `sync.py`      — commit certificate checks and copying versions from peers into the lineage.
- `joining.py`   — before a node starts: the event by its id (the manifest from peers, checked by
  hash), its seed version by id, and the task's options local to this machine (`--data`).
- `faults.py`    — fault-injecting transport for multi-process tests (`join --fault`).
- `trainer.py`   — runs the task's inner loop in a worker thread.
- `status.py`    — the local HTTP status API on 127.0.0.1, its client, and the loop-lag monitor.
- `metrics.py`   — Prometheus `/metrics` for the status API: a collector over the status snapshot.
- `config.py`    — `NodeConfig` (CLI flags are generated from it) and `EventConfig`, with
  `load_event` (TOML or JSON) and the event's full validation.
- `manifest.py`  — `event.toml` as `p2pmodel seed` writes it, `--set key=value` overrides, and
  the rules a manifest fetched by its id must pass (`event_from_manifest_bytes`).
- `identity.py`  — the peer identity's key file (`identity.pem`): `load_identity`, `save_identity`.
- `logs.py`      — structured one-line logs and the terminal status line (`StatusLine`).

Names are imported lazily: `import p2pmodel.daemon` stays cheap (the CLI imports it to build
its parser), and hivemind/torch load only when a transport or node is built.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Transport": "transport",
    "TransportLimits": "transport",
    "TransportError": "transport",
    "FetchError": "transport",
    "HashMismatch": "transport",
    "ObjectNotFound": "transport",
    "ObjectTooLarge": "transport",
    "FetchTimeout": "transport",
    "RecordRejected": "transport",
    "DHTTimeout": "transport",
    "Node": "node",
    "NodeError": "node",
    "NodeConfig": "config",
    "EventConfig": "config",
    "RoundRunner": "rounds",
    "SyncError": "sync",
    "sync_version": "sync",
    "verify_commit": "sync",
    "StatusServer": "status",
    "LagMonitor": "status",
    "fetch_status": "status",
    "Trainer": "trainer",
    "get_logger": "logs",
    "configure_logging": "logs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
