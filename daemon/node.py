"""`Node`: one volunteer's daemon. Opens everything, runs every long-lived loop under one
supervisor, and shuts down in a fixed order.

Opening order (`Node.create`), closed in reverse by `shutdown`:

1. home folder: the Ed25519 identity (`identity.pem`), the libp2p key (`libp2p.key`), the
   lineage (`lineage/`); the event manifest the node joined (`event.json`) is written only
   once everything below has opened, so a failed start leaves the home free for any event
   (a lineage or model folder it created is removed again; the identity keys stay);
2. the transport (DHT node + p2pd), serving lineage objects and this node's deltas;
3. the event and its seed, checked by hash before anything else starts (daemon/joining.py):
   with only `--event-id`, the manifest is fetched from peers; a seed version the event names
   is fetched by id; one it does not name is built from the task (deterministic, so every
   peer derives the same id without syncing). The node then serves the manifest too;
4. the task (with this machine's options: `--data`, an hf event's model folder written from
   the seed version's files), the trainer (worker thread) and the status API (on the default
   port if free, else any free port: two nodes on one machine do not collide).

`run()` starts the loops (`rounds` — the `RoundRunner` driving `protocols.round`; `lag` — the
loop-lag monitor; `retention` — prunes old versions' tensors, `--keep-last`/`--keep-every`)
under one supervisor: a loop that returns or raises ends the node, and the
error is reported, never swallowed.

Shutdown (SIGINT/SIGTERM or `stop()`), STYLE.md §5:

1. stop accepting new work (the round runner enters no new round, training is asked to stop);
2. finish or abandon the current round, then publish a `Departure`;
3. close resources in reverse order of opening (status API, trainer, transport, lineage);
   steps 2-3 share one deadline, `shutdown_timeout` (p2pd is killed if it outlives it);
4. gather the errors of those steps into one `NodeShutdownError`;
5. cancel whatever is left.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import signal
import time
from collections import deque
from pathlib import Path
from typing import Any

from p2pmodel.daemon.certificates import serve_certificates
from p2pmodel.daemon.config import (
    DEFAULT_STATUS_PORT,
    ConfigError,
    EventConfig,
    NodeConfig,
    check_node_config,
    event_from_mapping,
    load_event,
)
from p2pmodel.daemon.identity import load_or_create_identity
from p2pmodel.daemon.joining import MODEL_FOLDER, fetch_event, peer_ids_of, task_options
from p2pmodel.daemon.logs import get_logger
from p2pmodel.daemon.status import LagMonitor, StatusServer, StatusUnavailable
from p2pmodel.daemon.sync import SyncError, fetch_seed
from p2pmodel.daemon.trainer import Trainer
from p2pmodel.daemon.transport import Transport
from p2pmodel.errors import P2PModelError
from p2pmodel.lineage import LineageError, LineageStore, RepositoryNotFound, RetentionPolicy, apply_retention
from p2pmodel.protocols.signing import PeerIdentity, signed_by
from p2pmodel.tasks import Task, load_task

__all__ = ["Node", "NodeError", "NodeShutdownError", "seed_version"]

logger = get_logger(__name__)

_MAX_ERRORS = 20  # recent errors kept for the status API
RETENTION_TICK = 2.0  # seconds between looks at the head for the retention loop


class NodeError(P2PModelError):
    """The node cannot start or keep running. Field: `reason`."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


class NodeShutdownError(NodeError):
    """One or more steps of the shutdown failed. Field: `errors` (in shutdown order)."""

    def __init__(self, errors: list[BaseException]):
        self.errors = errors
        super().__init__("shutdown had errors: " + "; ".join(f"{type(e).__name__}: {e}" for e in errors))


def seed_version(store: LineageStore, task: Task, event: EventConfig) -> str:
    """Commit the event's seed version on `main` if the lineage has none; returns main's id.

    An event that names its seed (`seed_version`, as `p2pmodel seed` writes it) must find it
    in the lineage (fetched from peers by `sync.fetch_seed`, or the founder's own). Otherwise
    the seed is a pure function of the event (the task builds its model deterministically;
    time is fixed at 0), so every peer computes the same seed id without talking to anyone.

    Raises:
        NodeError: the event names a seed version this lineage does not hold.
    """
    existing = store.branches().get("main")
    if existing is not None:
        return existing
    if event.seed_version:
        raise NodeError(f"the event's seed version {event.seed_version[:12]} is not in {store.root}; "
                        "join through --peers to fetch it")  # fmt: skip
    state = {k: v.detach().to("cpu") for k, v in task.build_model().state_dict().items()}
    version = store.commit(
        state,
        parents=[],
        message=f"seed of event {event.name}",
        time=0.0,
        author="seed",
        files={"event.json": event.to_json().encode()},
    )
    return version.id


def _local_event(config: NodeConfig, home: Path, peer_id: str) -> EventConfig | None:
    """The event known without the network: from --event, else the one this home joined, else
    the default. None when only --event-id names it and this home has not joined it yet (the
    node then fetches it from peers: daemon/joining.py).

    `--seeder` fills the seeder of an --event file that names none; a node that founds a swarm
    (no --peers, no seeder) becomes the seeder itself. Writes nothing: `Node.create` records
    the event in the home only once the node has started.

    Raises:
        ConfigError: --event is not the event --event-id names, or --event-id without --peers.
        NodeError: the home belongs to another event, or joining needs a seeder.
    """
    stored = home / "event.json"
    before = event_from_mapping(json.loads(stored.read_text()), source=str(stored)) if stored.exists() else None
    if config.event_id and not config.event:
        if before is None:
            if not config.peers:
                raise ConfigError("--event-id", "needs --peers to fetch the event from (the join line has both)")
            return None
        if before.event_hash() != config.event_id:
            raise NodeError(f"{home} belongs to event {before.name} ({before.event_hash()[:12]}), not {config.event_id[:12]}; use another --home")
        return before
    if config.event:
        event = load_event(config.event)
    elif before is not None:
        event = before
    else:
        event = EventConfig()
    if config.seeder:
        event = dataclasses.replace(event, seeder=config.seeder)
    if not event.seeder:
        if config.peers:
            raise NodeError("joining needs the founder's id: pass --seeder, an --event naming it, or --event-id from the join line")
        event = dataclasses.replace(event, seeder=peer_id)
    if config.event_id and event.event_hash() != config.event_id:
        raise ConfigError("--event", f"{config.event} is event {event.event_hash()[:12]}, not the --event-id {config.event_id[:12]}")
    _check_home(home, before, event)
    return event


def _check_home(home: Path, before: EventConfig | None, event: EventConfig) -> None:
    if before is not None and before.event_hash() != event.event_hash():
        raise NodeError(f"{home} belongs to event {before.name} ({before.event_hash()[:12]}); use another --home")


class Node:
    """A swarm peer. Build with `await Node.create(config)`, then `await node.run()`."""

    def __init__(self, *, _created: bool = False):
        assert _created, "use `await Node.create(config)`"
        self.config: NodeConfig
        self.event: EventConfig
        self.identity: PeerIdentity
        self.store: LineageStore
        self.task: Task
        self.transport: Transport
        self.trainer: Trainer
        self.status_server: StatusServer | None = None
        self.lag = LagMonitor()
        self.started = time.time()
        self.errors: list[dict[str, Any]] = []
        self.runner: Any = None  # RoundRunner, set in create()
        self._stopping = asyncio.Event()
        self._closers: list[tuple[str, Any]] = []  # (name, async-or-sync close) in opening order
        self._close_deadline: float | None = None  # loop time by which shutdown must be done

    # ------------------------------------------------------------------------------ opening

    @classmethod
    async def create(cls, config: NodeConfig) -> "Node":
        """Open the home folder, lineage, transport, trainer and status API (in that order).

        Raises:
            NodeError / TransportError / ConfigError: something could not be opened; what was
            opened before it is closed again, and the home keeps only its identity keys and
            what it held before (nothing ties it to this event).
        """
        check_node_config(config)  # a bad flag (`--device cuda` without CUDA) fails before any I/O
        self = cls(_created=True)
        self.config = config
        home = config.home_path
        made: list[Path] = []  # what this start created in the home; removed again if it fails
        try:
            home.mkdir(parents=True, exist_ok=True)
            self.identity = load_or_create_identity(home / "identity.pem")
            event = _local_event(config, home, self.identity.peer_id)
            try:
                self.store = LineageStore.open(home / "lineage")
            except RepositoryNotFound:
                made.append(home / "lineage")
                self.store = LineageStore.init(home / "lineage")
            self._closers.append(("lineage", self.store.close))
            from p2pmodel.daemon.faults import transport_class

            self.transport = await transport_class(config.fault).create(
                initial_peers=config.peers,
                host_maddrs=config.host_maddrs,
                announce_maddrs=config.announce_maddrs,
                identity_path=str(home / "libp2p.key"),
                record_check=signed_by,  # DHT records are envelopes signed by their subkey
                limits=_transport_limits(config),
                relay_plan=_relay_plan(config),
            )
            self._closers.append(("transport", lambda: self.transport.shutdown(self._time_left(5.0))))
            self.transport.add_source(self._serve_lineage_object, kind="lineage")
            await serve_certificates(self.transport, self.store)  # joiners check the chain with them
            # the event and its seed, verified by hash before anything else starts (daemon/joining.py)
            sources = peer_ids_of(config.peers)
            if event is None:
                event, sources = await fetch_event(self.transport, sources, config.event_id)
                if not event.seeder:
                    raise NodeError(f"event {config.event_id[:12]} names no seeder, so no joiner can check its history")
            self.event = event
            if event.seed_version and not self.store.index.has_version(event.seed_version):
                try:
                    await fetch_seed(self.transport, self.store, event.seed_version, [*sources, *self.transport.known_peers()])
                except SyncError as e:
                    raise NodeError(f"cannot fetch the event's seed version: {e}") from None
            if not (home / MODEL_FOLDER).exists():
                made.append(home / MODEL_FOLDER)
            options = await asyncio.to_thread(task_options, event, config.data, self.store, home)
            self.task = await asyncio.to_thread(load_task, event.task, **options)
            head = await asyncio.to_thread(seed_version, self.store, self.task, event)
            self.transport.put_blob(event.manifest_bytes(), kind="manifest")  # any peer hands the event on
            self.trainer = Trainer(
                self.task,
                config.device,
                lr=self.event.inner_lr,
                lr_schedule=self.event.lr_schedule(),
                peer_seed=int(self.identity.peer_id[:8], 16),
                cpu_threads=config.cpu_threads,
            )
            self._closers.append(("trainer", self.trainer.close))
            from p2pmodel.daemon.faults import runner_class

            self.runner = runner_class(config.fault)(
                event=self.event,
                identity=self.identity,
                store=self.store,
                transport=self.transport,
                trainer=self.trainer,
                head=head,
                record_error=self.record_error,
                request_stop=self.stop,
                max_rounds=config.max_rounds,
                shutdown_timeout=config.shutdown_timeout,
                display_name=config.name,
            )
            self.status_server = await _open_status(self.status, config.status_port, self.store)
            self._closers.append(("status", self.status_server.close))
            if not (home / "event.json").exists():
                (home / "event.json").write_text(self.event.to_json())  # from now on, this home is this event's
            (home / "node.json").write_text(
                json.dumps({"pid": os.getpid(), "status_url": self.status_server.url, "peer_id": self.identity.peer_id})
            )
        except BaseException:
            await self._close_resources()
            for path in made:  # the seed of an event this home never joined, its model folder
                shutil.rmtree(path, ignore_errors=True)
            raise
        logger.info(
            "node ready",
            peer=self.identity.peer_id[:12],
            event=self.event.name,
            head=head[:12],
            device=self.trainer.device,
            status=self.status_server.url,
        )
        return self

    def _serve_lineage_object(self, oid: str) -> bytes | None:
        """Object source for peers that sync: version records and tensors, verified on read."""
        try:
            return self.store.read_object(oid) if self.store.has_object(oid) else None
        except LineageError:
            return None

    async def join_line(self) -> str:
        """The exact command others run to join this swarm: where to reach us, and the event id.
        Nothing else: the manifest and the seed version are fetched from us by hash."""
        addrs = " ".join(await self.transport.visible_maddrs())
        return f"p2pmodel join --peers {addrs} --event-id {self.event.event_hash()}"

    # ------------------------------------------------------------------------------ running

    def stop(self) -> None:
        """Ask the node to leave gracefully (idempotent; safe from a signal handler)."""
        if not self._stopping.is_set():
            logger.info("stopping")
            self._stopping.set()
            if self.runner is not None:
                self.runner.stop_accepting()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def record_error(self, message: str) -> None:
        """Remember a recoverable error for the status API (and log it)."""
        logger.warning(message)
        self.errors.append({"time": time.time(), "message": message})
        del self.errors[:-_MAX_ERRORS]

    async def run(self) -> None:
        """Run until stopped (signal, `stop()`, or `max_rounds`), then shut down.

        Raises:
            NodeError: a loop failed (after shutdown), or the shutdown itself had errors.
        """
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self.stop)
            except (NotImplementedError, RuntimeError):  # not the main thread (tests)
                pass
        loops = {
            "rounds": asyncio.create_task(self.runner.run(), name="rounds"),
            "lag": asyncio.create_task(self.lag.run(), name="lag"),
            "retention": asyncio.create_task(self._retention_loop(), name="retention"),
        }
        stop_wait = asyncio.create_task(self._stopping.wait(), name="stop")
        failure: BaseException | None = None
        try:
            done, _ = await asyncio.wait([stop_wait, *loops.values()], return_when=asyncio.FIRST_COMPLETED)
            for name, task in loops.items():
                if task in done:
                    exc = task.exception()
                    if exc is None and name == "rounds" and (self.stopping or self.runner.finished):
                        continue  # the round loop returns after max_rounds or on stop: expected
                    failure = exc or NodeError(f"loop {name!r} returned unexpectedly")
                    logger.error("loop failed", loop=name, error=repr(failure))
        finally:
            self.stop()
            errors = await self._shutdown(loops, stop_wait)
        if failure is not None:
            raise NodeError(f"loop failed: {failure!r}") from failure
        if errors:
            raise NodeShutdownError(errors)

    async def _retention_loop(self) -> None:
        """Prune old versions (p2pmodel/lineage/retention.py) every `keep_last // 2` commits, in a thread.

        Never pruned: the head, its parents and the last heads this loop saw (a round in flight
        reads its base, the head when it started, and its deltas were trained on that base);
        the policy also keeps the newest `keep_last` >= 2. Only objects that pruned versions
        alone need are deleted (`free_pruned`), so a version being synced is untouched. A peer
        that asks us for a pruned version's objects is answered NOT_FOUND (we no longer hold
        them) and asks another peer. Never returns (a loop that returns ends the node).
        """
        policy = RetentionPolicy(keep_last=self.config.keep_last, keep_every=self.config.keep_every)
        recent: deque[str] = deque(maxlen=4)
        done_at: int | None = None  # head round of the last pass
        while True:
            await asyncio.sleep(RETENTION_TICK)
            head, round_ = self.runner.head, self.runner.head_round
            if head not in recent:
                recent.append(head)
            if policy.off or round_ is None or (done_at is not None and round_ - done_at < max(1, policy.keep_last // 2)):
                continue
            done_at = round_
            protect = [*recent, *self.store.index.parents_of(head)]
            try:
                report = await asyncio.to_thread(apply_retention, self.store, policy, protect=protect)
            except LineageError as e:  # a damaged record: say so, keep running (verify finds it)
                self.record_error(f"retention skipped: {e}")
                continue
            if report.pruned:
                logger.info("pruned old versions", versions=len(report.pruned), freed_mib=round(report.freed.bytes_freed / 2**20, 1))

    def _time_left(self, default: float) -> float:
        """Seconds until the shutdown deadline (at least 0.5: a closer always gets a chance)."""
        if self._close_deadline is None:
            return default
        return max(0.5, self._close_deadline - asyncio.get_running_loop().time())

    async def _shutdown(self, loops: dict[str, asyncio.Task], stop_wait: asyncio.Task) -> list[BaseException]:
        errors: list[BaseException] = []
        self._close_deadline = asyncio.get_running_loop().time() + self.config.shutdown_timeout
        # 2. finish or abandon the round, then say goodbye; the round gets most of the
        # deadline, the goodbye and the closing of resources share what is left
        rounds = loops["rounds"]
        if not rounds.done():
            try:
                await asyncio.wait_for(asyncio.shield(rounds), 0.6 * self._time_left(0))
            except asyncio.TimeoutError:
                rounds.cancel()
            except Exception:
                pass  # reported by run() already
        try:
            await asyncio.wait_for(self.runner.depart(), min(5.0, 0.5 * self._time_left(0)))
        except asyncio.TimeoutError:  # our peers see us leave without it, only later
            logger.warning("departure not published before the shutdown deadline")
        except Exception as e:  # a failed goodbye must not stop the closing of resources
            errors.append(e)
        # 3.-4. close in reverse order, gathering errors
        errors.extend(await self._close_resources())
        # 5. cancel the rest
        for task in [*loops.values(), stop_wait]:
            if not task.done():
                task.cancel()
        await asyncio.gather(*loops.values(), stop_wait, return_exceptions=True)
        try:  # the last status, for whoever reads the node after it left (benchmarks, `status`)
            (self.config.home_path / "final_status.json").write_text(json.dumps(self.status(), default=str))
        except Exception as e:  # status of a half-closed node: best effort, never a reason to fail
            logger.debug("final status not written", error=repr(e))
        logger.info("stopped", errors=len(errors))
        return errors

    async def _close_resources(self) -> list[BaseException]:
        errors: list[BaseException] = []
        while self._closers:
            name, close = self._closers.pop()
            try:
                result = close()
                if asyncio.iscoroutine(result):
                    # each closer bounds itself by the deadline; this is the last resort
                    await asyncio.wait_for(result, self._time_left(15.0) + 1.0)
            except Exception as e:
                logger.warning("error while closing", resource=name, error=repr(e))
                errors.append(e)
        return errors

    # ------------------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        """The node's state for the status API (called on the loop; cheap)."""
        p = self.trainer.progress
        state = {
            "peer_id": self.identity.peer_id,
            "libp2p_id": self.transport.peer_id.to_base58(),
            "event": f"{self.event.name} ({self.event.event_hash()[:12]})",
            "uptime_s": time.time() - self.started,
            "training": {
                "device": self.trainer.device,
                "peer_seed": int(self.identity.peer_id[:8], 16),  # selects this node's data shard
                "busy_s": self.trainer.busy_seconds,
                "step": p.step,
                "steps": p.steps,
                "loss": p.loss,
                "samples_per_s": p.samples_per_s,
            },
            "bytes": self.transport.counters.snapshot(),
            "records_rejected": self.transport.validator.rejected,
            "faults_injected": getattr(self.transport, "faults_injected", 0),
            "dht_peers": self.transport.routing_table_size(),
            "reachability": self.transport.reachability(),
            "loop_lag": self.lag.snapshot(),
            "errors": list(self.errors),
            "stopping": self.stopping,
        }
        state.update(self.runner.status())
        return state



async def _open_status(state: Any, port: int, lineage: LineageStore | None = None) -> StatusServer:
    """The status API on `port`; when that is the default port and taken (another node on this
    machine has it), on any free port instead: `node.json` and the join output name it."""
    try:
        return await StatusServer.create(state, port, lineage=lineage)
    except StatusUnavailable as e:
        if port != DEFAULT_STATUS_PORT:
            raise NodeError(f"status port {port} is taken ({e.reason}); pass another --status-port, or 0 for any free port") from None
    server = await StatusServer.create(state, 0, lineage=lineage)
    logger.warning("default status port taken; using another", wanted=port, port=server.port)
    return server


def _relay_plan(config: NodeConfig):
    """Public (relay for others), private (reserve a relay slot) or local: daemon/reachability.py."""
    from p2pmodel.daemon.reachability import own_addresses, plan_relays

    try:
        plan = plan_relays(config.reachability, own_addresses(config.host_maddrs, config.announce_maddrs), config.relays or config.peers)
    except ValueError as e:
        raise ConfigError("--reachability", str(e)) from None
    logger.info("reachability", mode=plan.mode, why=plan.why, relays=len(plan.relays))
    return plan


def _transport_limits(config: NodeConfig):
    from p2pmodel.daemon.transport import TransportLimits

    # The largest record in the DHT is a Commit (version record + certificate): ~100 bytes per
    # tensor and ~250 per vote, so 1 MiB covers thousands of tensors and hundreds of voters.
    # hivemind's p2pd messages stop at 4 MiB; the wire limit for commits (8 MiB) does not fit.
    return TransportLimits(max_record_bytes=1024 * 1024)

