"""What a node needs before it starts, when the join line is all it has: the event and its seed.

A join line names bootstrap peers and an event id (`--event-id`, the sha256 of the event's
canonical manifest). Before anything else starts, the node

1. fetches the manifest by that id from peers (`fetch_event`): the peers of `--peers` first,
   then every DHT peer it knows. The transport checks the size bound and the hash as the
   bytes arrive; `manifest.event_from_manifest_bytes` decides the rest. A peer whose bytes
   fail is not trusted for this event and is not asked again; the next one is;
2. fetches the seed version the manifest names, by id, from the peer that served the
   manifest first (`sync.fetch_seed`: every object verified by its hash);
3. builds the task's local options (`task_options`): what the event leaves to each machine.
   An hf event's model folder is written from the seed version's files (`config.json`,
   tokenizer files) into the node's home; the text to train on is the volunteer's own
   (`--data`), never a path of the founder's.

Every peer serves the manifest of the event it joined (`Node.create` puts the bytes in the
transport's blobs, under their sha256: the event id), so any live peer can hand it on.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any, Sequence

from p2pmodel.daemon.config import ConfigError, EventConfig
from p2pmodel.daemon.logs import get_logger
from p2pmodel.daemon.manifest import ManifestRejected, event_from_manifest_bytes
from p2pmodel.daemon.transport import FetchError, HashMismatch, ObjectTooLarge, Transport
from p2pmodel.errors import P2PModelError
from p2pmodel.lineage import LineageStore
from p2pmodel.protocols.limits import MAX_MANIFEST

__all__ = ["EventUnavailable", "peer_ids_of", "fetch_event", "task_options", "MODEL_FOLDER"]

logger = get_logger(__name__)

FETCH_EVENT_TIMEOUT = 60.0  # seconds a joiner keeps asking peers for the manifest before giving up
_PER_PEER_TIMEOUT = 15.0  # seconds one peer gets to serve it
_RETRY_PAUSE = 1.0  # seconds between passes over the peers (a peer may still be starting)
MODEL_FOLDER = "model"  # under the node's home: the hf model folder written from the seed version


class EventUnavailable(P2PModelError):
    """No peer served a manifest that checks for this event id. Fields: `event_id`, `reasons`
    (one line per peer tried: why it could not serve, or why its bytes were refused)."""

    def __init__(self, event_id: str, reasons: Sequence[str]):
        self.event_id, self.reasons = event_id, list(reasons)
        tried = "; ".join(self.reasons[-4:]) or "no peer to ask (are --peers right?)"
        super().__init__(f"no peer served event {event_id[:12]}: {tried}")


def peer_ids_of(maddrs: Sequence[str]) -> list[str]:
    """The libp2p peer ids in multiaddrs ending in `/p2p/<id>` (as a join line prints them), in
    order and without repeats; addresses without one are left out."""
    out: list[str] = []
    for text in maddrs:
        _, sep, tail = str(text).strip().rpartition("/p2p/")
        tail = tail.strip("/")
        if sep and tail and "/" not in tail and tail not in out:
            out.append(tail)
    return out


async def fetch_event(transport: Transport, bootstrap: Sequence[str], event_id: str, *, timeout: float = FETCH_EVENT_TIMEOUT) -> tuple[EventConfig, list[str]]:
    """The event `event_id` names, from the first peer that serves bytes that check.

    Args:
        bootstrap: libp2p ids to ask first (the join line's peers); then every DHT peer known.
        timeout: seconds before giving up (peers are asked again, in passes, until then).

    Returns:
        `(event, peers)`: the event, and the peers to fetch its seed from (the one that served
        the manifest first, then the others asked).

    Raises:
        EventUnavailable: no peer served a manifest that checks before the deadline.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    untrusted: set[str] = set()
    reasons: list[str] = []
    me = transport.peer_id.to_base58()
    while True:
        candidates = [p for p in dict.fromkeys([*bootstrap, *transport.known_peers()]) if p != me and p not in untrusted]
        for peer in candidates:
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                data = await transport.call_fetch(
                    peer, event_id, max_size=MAX_MANIFEST, timeout=min(_PER_PEER_TIMEOUT, left), kind="manifest"
                )
                event = event_from_manifest_bytes(data, event_id)
            except (HashMismatch, ObjectTooLarge, ManifestRejected) as e:  # the peer misbehaved: never ask it again
                untrusted.add(peer)
                reasons.append(f"{peer[:16]}: {getattr(e, 'reason', e)}")
                logger.warning("manifest from an untrusted peer refused; trying another", peer=peer[:16], error=str(e))
                continue
            except FetchError as e:  # it does not have it (a stock DHT node), or is unreachable now
                reasons.append(f"{peer[:16]}: {e.reason}")
                logger.info("no manifest from this peer; trying another", peer=peer[:16], error=e.reason)
                continue
            except ValueError as e:  # not a libp2p id at all (a typo in --peers)
                untrusted.add(peer)
                reasons.append(f"{peer[:16]}: not a libp2p peer id ({e})")
                continue
            logger.info("fetched the event manifest", event=event.name, id=event_id[:12], peer=peer[:16])
            return event, [peer, *(p for p in candidates if p != peer and p not in untrusted)]
        if loop.time() + _RETRY_PAUSE >= deadline:
            raise EventUnavailable(event_id, reasons)
        del reasons[:-16]  # the latest per peer is what a user needs; passes repeat the rest
        await asyncio.sleep(_RETRY_PAUSE)


def task_options(event: EventConfig, data: Sequence[str], store: LineageStore, home: Path) -> dict[str, Any]:
    """The options to build the event's task with on this node: the event's `task_options`
    plus what is local to this machine.

    - `text_files`: `data` (the volunteer's `--data`); required for an hf event that does not
      name its own (an older event may), refused for charlm (its data is built in).
    - `model_dir` (hf events whose seed version holds `config.json`): the seed version's files,
      written to `home/model/`.

    Raises:
        ConfigError: `--data` missing, given where the event has no use for it, or given
            where the event names its own text.
    """
    options = dict(event.task_options)
    if data:
        if event.task == "charlm":
            raise ConfigError("--data", "the charlm task trains on its built-in data (the Python standard library's source); --data is for hf events")
        if "text_files" in options:
            raise ConfigError("--data", "this event names its own text files (task_options.text_files); leave --data out")
        options["text_files"] = [str(Path(p).expanduser()) for p in data]
    elif event.task == "hf" and "text_files" not in options:
        raise ConfigError("--data", "an hf event trains on each volunteer's own text: pass --data FILE_OR_FOLDER ...")
    if event.task == "hf" and "model_dir" not in options and event.seed_version:
        options["model_dir"] = str(_write_model_folder(store, event.seed_version, home / MODEL_FOLDER))
    return options


def _write_model_folder(store: LineageStore, seed: str, folder: Path) -> Path:
    """The seed version's files (config.json, tokenizer files) in `folder`, replaced whole: no
    weights (the node loads the lineage's), so the task builds the model from its config."""
    version = store.get_version(seed)
    if "config.json" not in version.files:
        raise ConfigError("event", f"the seed version {seed[:12]} has no config.json, so no hf model can be built from it", key="seed_version")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, oid in version.files.items():
        if Path(name).name == name and not name.startswith("."):  # plain names only: never a path out of the folder
            (tmp / name).write_bytes(store.get_file(oid, needed_by=seed))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder
