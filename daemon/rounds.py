"""`RoundRunner`: the thin shell around `protocols.round.RoundMachine` (STYLE.md §4).

It does four things: take records pushed by peers (gossip.py) or read from the DHT (verifying
each signature) and feed them to the machine as events; feed it time (`Tick` at `next_deadline()`); carry out the actions it
returns; feed their results back as events. Every decision is the machine's.

| action          | what the runner does                                                         |
| --------------- | ---------------------------------------------------------------------------- |
| Publish         | sign with our identity, push to the peers we know (not a Commit); store under |
|                 | the round's DHT key only what a push missed (Commits, Departures: always);    |
|                 | an announcement also refreshes our roster entry now and then                  |
| StartTraining   | H inner steps in the trainer thread; add kept deltas; encode with error        |
|                 | feedback; serve the bytes by hash -> TrainingDone                             |
| KeepDelta       | keep that raw delta to add into the next one (and roll back error feedback)   |
| FetchDelta      | fetch the bytes over a libp2p stream, verify the hash -> DeltaFetched          |
| FetchProposal   | read the round's proposal key, feed the proposal with that hash               |
| Merge           | decode, merge per tensor, outer step, store tensors, eval + CI gate off the   |
|                 | loop -> MergeDone / MergeFailed                                               |
| CommitVersion   | index the version with its certificate, move `main`                           |
| PublishCommit   | serve the certificate (signed votes) by hash; publish Commit(version id,       |
|                 | certificate hash, signer count) under the head key                            |
| SyncVersion     | fetch the version and missing ancestors (sync.py) -> VersionSynced/SyncFailed |
| EnterRound, RoundFailed | log, status, bookkeeping                                              |

DHT keys (`P` = the event's prefix): `P/r/<round>/{members,deltas,proposal,votes}`, `P/head`, and
`P/peers` (the roster: each peer's latest announcement or departure, for discovery).

The version a merge produces is a pure function of the proposal and the base version (see
`_build_version`), so every honest peer derives the same id: parents, tensors, outer momentum,
the proposal's time and proposer, the merge spec (method, params, deltas with weights, members,
proposal hash) and the contributors (peers whose deltas were merged).

Why one long file: it is the I/O shell of one state machine; every action handler lives beside the
others so the table above stays true. The next seam to cut: records and polling (with gossip.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import math
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from p2pmodel.daemon.disk import DiskWatch
from p2pmodel.daemon.gossip import Gossip
from p2pmodel.daemon.logs import StatusLine, get_logger
from p2pmodel.daemon.trainer import PendingContribution, VersionJob
from p2pmodel.daemon.sync import (
    CertifiedVersion,
    ServedCertificates,
    SyncError,
    commit_signers,
    fetch_commit_certificate,
    sync_version,
    verify_by_chain,
    verify_commit,
)
from p2pmodel.daemon.transport import FetchError, ObjectNotFound, TransportError, expiration_in
from p2pmodel.errors import P2PModelError
from p2pmodel.ci import CIGate, median_metrics, run_gate
from p2pmodel.credits import samples_trained_since
from p2pmodel.lineage import Annotations, LineageError, LineageStore, Version
from p2pmodel.peers import SwarmView
from p2pmodel.protocols import round as rm
from p2pmodel.protocols.certificate import CertifiedCommit, make_commit, may_commit, weak_quorum
from p2pmodel.protocols.codec import CodecConfig, DeltaCodec
from p2pmodel.protocols.errors import LocalProtocolError, RemoteProtocolError
from p2pmodel.protocols.messages import (
    MAX_RECORD,
    Commit,
    DeltaAnnouncement,
    Departure,
    Message,
    PeerAnnouncement,
    Proposal,
    Vote,
    message_hash,
)
from p2pmodel.protocols.signing import open_signed, sign
from p2pmodel.screening import DeltaScreen

# Records of a round that live peers need only while it runs: pushed first, stored in the DHT
# only for peers the push missed (see `_publish`). Commits (heads) and Departures always go to
# the DHT too. Discovery does not need a DHT store per round: each peer keeps its announcement in
# the event's roster key (`{prefix}/peers`), written when its addresses change and refreshed
# long before it expires, which is where joiners and laggards look for peers.
PUSH_FIRST = (PeerAnnouncement, DeltaAnnouncement, Proposal, Vote)
from p2pmodel.versioning import OuterOptimizer, RoundSpec

if TYPE_CHECKING:
    from p2pmodel.daemon.config import EventConfig
    from p2pmodel.daemon.trainer import Trainer
    from p2pmodel.daemon.transport import Transport
    from p2pmodel.protocols.signing import PeerIdentity

__all__ = ["RoundRunner", "RoundTimes"]

logger = get_logger(__name__)

# Records reach live peers by push (gossip.py); the DHT is read to catch what a push missed, for
# late joiners, and before timed decisions. Measured on loopback (scripts/bench_control): one read
# of a key costs 2.4 kB on the wire with 3 peers and 11 kB with 8, empty or not; the round's four
# keys in one search 26 kB with 8. While pushes deliver everything a read finds nothing new, so
# the reads back off to one per 5 minutes: with 60 s (and a head read every 60 s) they were 18 of
# the 47 kB of control traffic per peer per round at 8 peers. A read that finds news (a push
# missed) brings them back to every POLL_MIN; deadlines and records from unknown peers still
# trigger reads of their own.
POLL_MIN = 10.0  # seconds between reads of the current round's keys after a read that found news
POLL_MAX = 300.0  # each read that finds nothing new doubles the interval, up to this
POLL_HEAD_EVERY = 300.0  # seconds between reads of the head key and the next round's members ...
POLL_HEAD_STALE = 60.0  # ... or this, while we have not committed for as long: a laggard that
# no one pushes to any more (its announcements name an old round) learns the head this way
POLL_BEFORE_DEADLINE = 2.0  # the round's keys are read this long before each machine deadline
POLL_TICK = 0.5  # seconds between checks of the above
DISK_CHECK_EVERY = 5.0  # seconds between free-space checks (daemon/disk.py)
DELTA_REFETCH_PAUSE = 1.0  # seconds before asking again for a delta no source had yet (they are fetching it)
DISK_MIN_FREE = 64 * 1024 * 1024  # bytes kept free besides three model copies (a version, deltas, a sync)
HEAD_TTL = 24 * 3600.0  # seconds a published Commit stays in the DHT
ROSTER_TTL = 30 * 60.0  # seconds our entry in the event's roster stays in the DHT ...
ROSTER_REFRESH = 10 * 60.0  # ... rewritten after this long, or at once when our addresses change
ROSTER_RETRY = 30.0  # seconds before a roster write that failed is tried again


@dataclass
class RoundTimes:
    """Where one round's wall time went (seconds), for the status API and the logs."""

    round: int
    entered: float
    training: float = 0.0
    communication: float = 0.0  # fetching deltas and syncing versions
    merge: float = 0.0  # decode + merge + outer step + store + eval
    total: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0

    @property
    def waiting(self) -> float:
        return max(0.0, self.total - self.training - self.communication - self.merge)

    def as_dict(self) -> dict[str, float]:
        return {
            "round": self.round,
            "total_s": round(self.total, 3),
            "training_s": round(self.training, 3),
            "communication_s": round(self.communication, 3),
            "merge_s": round(self.merge, 3),
            "waiting_s": round(self.waiting, 3),
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
        }


@dataclass
class _Peer:
    libp2p_id: str
    addrs: tuple[str, ...]
    last_round: int = -1  # the latest round we know it was in (-1: departed; pushes go to recent ones)

    def seen_in(self, round_: int) -> None:
        """It was in `round_` (its record, or the roster): keep it among our push targets. A
        departed peer comes back only with an announcement of its own (`_note_peer`)."""
        if self.last_round >= 0:
            self.last_round = max(self.last_round, round_)


@dataclass
class _Delivery:
    """How records travel besides the machine's say: when `_poll_loop` reads the DHT next
    (monotonic seconds), our recent records (pushed again to each peer we meet), warned peers."""

    interval: float = POLL_MIN
    next_read: float = 0.0  # 0: at once (a node that just started reads what it missed)
    last_head: float = -math.inf  # when the head key was last read (-inf: read at once)
    last_commit: float = field(default_factory=time.monotonic)  # when we last committed a round (or started)
    deadline_read: float | None = None  # the machine deadline we already read for
    last_read: float = 0.0
    head_due: bool = False  # a record showed a head newer than ours: read the head key soon
    read_due: bool = False  # a record came from (or named) a peer we cannot reach yet: read soon
    warned: set[str] = field(default_factory=set)  # peers whose failed connect was logged at warning level
    recent: deque = field(default_factory=lambda: deque(maxlen=16))  # (round, envelope) we published
    dht_stores_skipped: int = 0  # round records every known peer took by push: not stored in the DHT
    dht_reads: dict = field(default_factory=lambda: defaultdict(int))  # why we read the DHT -> how often
    roster_written: float = -math.inf  # monotonic time our roster entry was last stored
    roster_addrs: tuple[str, ...] = ()  # the addresses that entry announced


@dataclass
class _Candidate:
    """A version our merge produced, held until a quorum commits it (or another one)."""

    version: Version
    metrics: dict[str, float]
    proposal_hash: str


class RoundRunner:
    """Drives one RoundMachine. `run()` returns when the node stops or `max_rounds` is reached.

    Its collaborators are passed in, not found through the node: the event (what every peer
    agrees on), our identity, the lineage store, the transport, the trainer, and two callbacks
    into the supervisor (`record_error` for the status page, `request_stop` to leave).
    """

    def __init__(
        self,
        *,
        event: "EventConfig",
        identity: "PeerIdentity",
        store: LineageStore,
        transport: "Transport",
        trainer: "Trainer",
        head: str,
        record_error: Callable[[str], None],
        request_stop: Callable[[], None],
        max_rounds: int = 0,
        shutdown_timeout: float = 10.0,
        display_name: str = "",
    ):
        self.event, self.identity, self.store, self.transport, self.trainer = event, identity, store, transport, trainer
        self.record_error, self.request_stop = record_error, request_stop
        self.max_rounds, self.shutdown_timeout = max_rounds, shutdown_timeout
        self.display_name = display_name  # announced in our capabilities (`join --name`); checked by config
        self.swarm = SwarmView()  # every peer we heard of, for the status's `swarm` section
        self.prefix = event.dht_prefix()
        self.codec = DeltaCodec(CodecConfig(**event.codec))
        self.feedback = self.codec.feedback()
        self.outer = OuterOptimizer(lr=event.outer_lr, momentum=event.outer_momentum, warmup_rounds=event.outer_warmup_rounds)
        self.screen = DeltaScreen(
            min_cosine=event.screen_min_cosine, relative_cosine=event.screen_relative_cosine, max_norm_ratio=event.screen_max_norm_ratio
        )
        model_bytes = sum(e.nbytes for e in store.get_version(head).tensors.values())
        self.disk = DiskWatch(store.root, DISK_MIN_FREE + 3 * model_bytes)
        self.gate = CIGate(
            max_regression=event.ci_max_regression, max_regression_best=event.ci_max_regression_best, window=event.ci_window
        )
        cfg = rm.RoundConfig(
            collect_window=event.collect_window,
            proposal_timeout=event.proposal_timeout,
            round_deadline=event.round_deadline,
            min_members=event.min_members,
            max_norm_ratio=event.screen_max_norm_ratio,
            method=event.merge_method,
            params=tuple(sorted(event.merge_params.items())),
        )
        self.machine: rm.RoundMachine | None = None
        self.round_config = cfg
        self.head = head
        self.head_round: int | None = None
        self.events: asyncio.Queue = asyncio.Queue()
        self.finished = False
        self.rounds_joined = 0
        self.history: list[dict[str, Any]] = []  # committed rounds: times, bytes, eval loss
        self.times: RoundTimes | None = None
        self.progress = StatusLine()
        self._accepting = True
        self._stop_sent = False
        self._tasks: set[asyncio.Task] = set()
        self._seen_records: set[bytes] = set()
        self._peers: dict[str, _Peer] = {}  # our peer ids -> libp2p reachability
        self._gossip, self._delivery = Gossip(transport, self._receive, targets=self._push_targets), _Delivery()
        self._announced: dict[str, DeltaAnnouncement] = {}  # delta hash -> announcement
        self._delta_bytes: dict[str, tuple[int, bytes]] = {}  # delta hash -> (round, encoded bytes)
        # our hash -> (raw delta, samples, of them those some earlier announcement of ours held)
        self._own_raw: dict[str, tuple[dict[str, torch.Tensor], int, int]] = {}
        self._last_encoded: str | None = None
        self._kept: tuple[dict[str, torch.Tensor], int, int] | None = None  # carried delta, its samples, of them announced
        self._vote_envelopes: dict[tuple[int, str], bytes] = {}  # (round, voter) -> signed vote
        self._certificates = ServedCertificates(transport)  # of the Commits we published or fetched
        self._candidates: dict[str, _Candidate] = {}
        self._eval_cache: dict[str, dict[str, float]] = {}
        self._bytes_mark = (0, 0)
        self.commits_refused = 0  # head commits a joiner refused (forged, or a chain that does not check)
        self._allowed = frozenset(event.allowed_peers)  # private event's peer ids (empty: open event)
        self.records_refused = 0  # records from peers outside a private event
        if self._allowed:
            transport.serve_only = self._serves
        self._decoded: dict[str, dict[str, torch.Tensor]] = {}  # delta hash -> screened, decoded delta
        self.exclusions: list[dict[str, Any]] = []  # recent deltas refused by screening: round, peer, reason
        # since start, over the rounds this node committed (history keeps only the last 50)
        self.totals: dict[str, int] = {"samples_trained": 0, "samples_merged": 0, "deltas_screened": 0}
        self._busy_mark = 0.0

    # ------------------------------------------------------------------------------ startup

    async def _initial_head(self) -> tuple[str, int | None, frozenset[str]]:
        """Our head, after catching up with the newest certified commit in the DHT."""
        store = self.store
        head = store.branches()["main"]
        version = await asyncio.to_thread(store.get_version, head)
        first = 0 if version.round is None else version.round + 1
        await self._learn_peers([], alive_at=first)  # the roster: push to the swarm from our first record on
        best = await self._newest_commit(head, self._electorate_of(version))
        if best is not None and (version.round is None or best.round > version.round):
            await self._learn_peers([best.round, best.round + 1], alive_at=best.round + 1)
            peers = self._libp2p_for(best.members)
            t0 = time.monotonic()
            await sync_version(self.transport, store, best, peers, branch="main")
            logger.info("caught up", head=best.id[:12], round=best.round, seconds=round(time.monotonic() - t0, 2))
            head, version = best.id, best.version
        return head, version.round, self._electorate_of(version)

    def _electorate_of(self, version: Version) -> frozenset[str]:
        members = (version.merge or {}).get("members") if version.round is not None else None
        return frozenset(members) if members else frozenset({self.event.seeder})

    async def _newest_commit(self, head: str, electorate: frozenset[str]) -> CertifiedVersion | None:
        """The newest commit in the DHT whose record a signer serves and that the commit rule accepts
        from where we stand (`head`, whose `electorate` we trust): see `sync.verify_commit`."""
        commits: list[tuple[Commit, str]] = []
        for value in (await self._fetch_key(f"{self.prefix}/head")).values():
            try:
                commits.append(open_signed(value, Commit))  # type: ignore[arg-type]
            except RemoteProtocolError as e:
                logger.debug("ignoring head record", error=str(e))
        for record_msg, publisher in sorted(commits, key=lambda c: c[0].round, reverse=True):
            await self._learn_peers([record_msg.round, record_msg.round + 1], alive_at=record_msg.round + 1)
            try:
                msg = await fetch_commit_certificate(self.transport, record_msg, self._certificate_sources(publisher))
            except SyncError as e:
                logger.info("ignoring head record", round=record_msg.round, error=str(e))
                continue
            peers = self._libp2p_for(commit_signers(msg))[:8]
            try:
                record = await self.transport.fetch_from_any(peers, msg.version_id, max_size=MAX_RECORD, kind="version", timeout=60)
            except FetchError as e:
                logger.debug("ignoring head record", round=msg.round, version=msg.version_id[:12], error=str(e))
                continue
            try:
                certified = verify_commit(msg, record, electorate=electorate, head=head)
            except SyncError:
                # not vouched for by peers we know: check every link from our head instead
                try:
                    certified = await verify_by_chain(
                        self.transport, msg, record, head=head, electorate=electorate,
                        peers=self._libp2p_for(commit_signers(msg)),
                    )  # fmt: skip
                except SyncError as e:
                    self.commits_refused += 1
                    logger.warning("refusing a head commit", round=msg.round, version=msg.version_id[:12], error=str(e))
                    continue
            self._certificates.serve(msg)  # other joiners may ask us
            return certified
        return None

    def _certificate_sources(self, publisher: str) -> list[str]:
        """libp2p ids to fetch a Commit's certificate from: its publisher, then peers we push to."""
        return [*self._libp2p_for([publisher]), *self._push_targets()][:8]

    async def _learn_peers(self, rounds: list[int], alive_at: int) -> None:
        """Meet the event's peers: the roster, and who announced itself for `rounds` by DHT.

        A roster entry names the round its peer was in when it was written (up to 10 minutes
        ago: members of the electorate announce nothing per round), so every peer met here
        counts as seen in `alive_at`, the round we are about to enter: our first records are
        pushed to them (`_push_targets`), and theirs come back once they know us.
        """
        keys = [f"{self.prefix}/peers", *(f"{self.prefix}/r/{r}/members" for r in rounds)]
        try:
            found = await self.transport.fetch_many(keys, kind="record")
        except TransportError as e:
            logger.debug("dht read failed", keys=len(keys), error=str(e))
            return
        for records in found.values():
            for value in records.values():
                try:
                    msg, _ = open_signed(value)
                except RemoteProtocolError:
                    continue
                if isinstance(msg, PeerAnnouncement) and msg.event_hash == self.event.event_hash():
                    await self._note_peer(msg)
                    if (peer := self._peers.get(msg.peer_id)) is not None:
                        peer.seen_in(alive_at)

    async def _note_peer(self, msg: PeerAnnouncement) -> None:
        self._observe(msg)
        known = self._peers.get(msg.peer_id)
        # A restarted peer keeps its libp2p id but listens on new ports: dial its new addresses
        # (else pushes to it fail and it learns the swarm's progress only from the DHT).
        if known is None or known.libp2p_id != msg.libp2p_id or known.addrs != tuple(msg.addrs):
            self._peers[msg.peer_id] = _Peer(msg.libp2p_id, tuple(msg.addrs), msg.round)
            if msg.peer_id != self.identity.peer_id and msg.addrs:
                try:
                    await self.transport.connect(msg.libp2p_id, msg.addrs)
                    self.swarm.dialed(msg.peer_id, True)
                except TransportError as e:  # unreachable now; pushes retry, fetches use the DHT's routes
                    self.swarm.dialed(msg.peer_id, False)
                    warned = self._delivery.warned
                    log = logger.debug if msg.peer_id in warned else logger.warning
                    warned.add(msg.peer_id)
                    log("connect failed", peer=msg.peer_id[:12], addrs=list(msg.addrs)[:2], error=str(e))
            if msg.peer_id != self.identity.peer_id:
                # What we published before we knew it went to the DHT only: push it our recent records.
                r = self.machine.round if self.machine is not None else None
                for round_, envelope in self._delivery.recent:
                    if r is None or round_ >= r - 1:
                        self._gossip.push(envelope, [msg.libp2p_id])
        else:
            known.last_round = max(known.last_round, msg.round)

    def _libp2p_for(self, peer_ids) -> list[str]:
        """libp2p ids of these peers, then every other peer we know; most recently seen first."""
        me = self.identity.peer_id
        recent = sorted(((p.last_round, k) for k, p in self._peers.items() if k != me), reverse=True)
        wanted = set(peer_ids)
        first = [self._peers[k].libp2p_id for _, k in recent if k in wanted]
        rest = [self._peers[k].libp2p_id for _, k in recent if k not in wanted]
        return first + rest

    # ------------------------------------------------------------------------------ main loop

    async def run(self) -> None:
        head, head_round, electorate = await self._initial_head()
        self.head, self.head_round = head, head_round
        transport = self.transport
        me = self.identity
        peer = rm.PeerInfo(
            peer_id=me.peer_id,
            public_key=me.public_key,
            libp2p_id=transport.peer_id.to_base58(),
            addrs=tuple((await transport.visible_maddrs())[:16]),
            event_hash=self.event.event_hash(),
            capabilities=(("device", self.trainer.device),) + ((("name", self.display_name),) if self.display_name else ()),
        )
        self.machine = rm.RoundMachine(peer, self.round_config)
        await self.trainer.start(await asyncio.to_thread(self.store.state_dict, head))
        await self._gossip.start()
        self._spawn(self._poll_loop(), "poll")
        self._spawn(self._disk_loop(), "disk")
        if self.progress.enabled:
            self._spawn(self._progress_loop(), "progress")
        await self._process(rm.Start(time.time(), head, head_round, electorate))
        while self.machine.phase is not rm.Phase.STOPPED:
            deadline = self.machine.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - time.time())
            try:
                event = await asyncio.wait_for(self.events.get(), timeout)
            except asyncio.TimeoutError:
                event = rm.Tick(time.time())
            await self._process(event)
        self.finished = True
        await self._drain()

    def stop_accepting(self) -> None:
        """Leave: the machine gets Stop (it publishes a Departure) and the loop ends.

        A round we already voted in (or are merging for) gets up to half the shutdown timeout
        to commit first, so that our vote still counts; training is abandoned at once.
        """
        if self._accepting:
            self._accepting = False
            self.trainer.stop()
            m = self.machine
            if m is not None and m.phase in (rm.Phase.MERGING, rm.Phase.VOTED):
                self._spawn(self._stop_after_round(m.round, self.shutdown_timeout / 2), "finish round")
            else:
                self.events.put_nowait(rm.Stop(time.time()))

    async def _stop_after_round(self, round_: int | None, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.machine is not None and self.machine.round == round_:
            await asyncio.sleep(0.1)
        logger.info("leaving", finished_round=self.machine is not None and self.machine.round != round_)
        self.events.put_nowait(rm.Stop(time.time()))

    async def depart(self) -> None:
        """Called by the node's shutdown: make sure a Departure went out, then stop background work."""
        if not self._stop_sent and self.machine is not None and self.machine.round is not None:
            self._stop_sent = True
            await self._publish(Departure(peer_id=self.identity.peer_id, round=self.machine.round, time=time.time()))
        await self._drain()

    async def _drain(self) -> None:
        # let records already handed to the DHT (the Departure above all) go out, briefly
        publishing = [t for t in self._tasks if t.get_name().startswith("publish")]
        if publishing:
            await asyncio.wait(publishing, timeout=5.0)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.progress.close()

    async def _process(self, event) -> None:
        assert self.machine is not None
        if self.machine.phase is rm.Phase.STOPPED:
            return  # results of work started before we left
        if isinstance(event, rm.Stop):
            self._stop_sent = True
        try:
            actions = self.machine.process(event)
        except LocalProtocolError as e:
            # A result the machine did not ask for is our bug, not the swarm's: say so loudly and
            # keep the node running (the machine's state is unchanged when it raises).
            self.record_error(f"dropped {type(event).__name__}: {e}")
            return
        for action in actions:
            await self._execute(action)
        if self.machine.only_we_are_missing():
            self.trainer.finish_early()  # the others are done: deliver what we have

    def _spawn(self, coro, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            if self.disk.on_error(task.exception()):
                self.trainer.finish_early()
            self.record_error(f"{task.get_name()} failed: {task.exception()!r}")

    def _post(self, event) -> None:
        if self.machine is not None and self.machine.phase is not rm.Phase.STOPPED:
            self.events.put_nowait(event)

    # ------------------------------------------------------------------------------ records

    def _key_of(self, msg: Message) -> str:
        if isinstance(msg, Commit):
            return f"{self.prefix}/head"
        kind = {PeerAnnouncement: "members", Departure: "members", DeltaAnnouncement: "deltas", Proposal: "proposal", Vote: "votes"}[type(msg)]
        return f"{self.prefix}/r/{msg.round}/{kind}"

    def _push_targets(self) -> list[str]:
        """libp2p ids our records are pushed to: peers seen in the last two rounds, not departed."""
        m = self.machine
        r = m.round if m is not None else None
        me = self.identity.peer_id
        return [p.libp2p_id for k, p in self._peers.items() if k != me and (r is None or p.last_round >= r - 2)]

    async def _publish(self, msg: Message) -> None:
        envelope = sign(msg, self.identity)
        self._seen_records.add(hashlib.sha256(envelope).digest())  # coming back from the DHT is no news
        if isinstance(msg, Vote):
            self._vote_envelopes[(msg.round, msg.voter)] = envelope
        if self._roster_due(msg):
            self._spawn(self._store(f"{self.prefix}/peers", envelope, ROSTER_TTL, msg.TYPE), "publish roster")
        if isinstance(msg, PUSH_FIRST):
            # A round's own records go to every peer we know at once; the DHT copy (3.5 kB of
            # DHT traffic per store at 3 nodes, more than the record) is written only when some
            # push failed or we know nobody yet, for the peers that missed it. A peer met later
            # gets our recent records on meeting (`_delivery.recent`).
            self._delivery.recent.append((msg.round, envelope))
            targets = self._push_targets()
            missed = await self._gossip.push_now([envelope], targets) if targets else []
            if targets and not missed:
                self._delivery.dht_stores_skipped += 1
                return
            if missed:
                self._gossip.push(envelope, missed)  # retried with backoff, besides the DHT copy
        elif not isinstance(msg, Commit):
            # One hop to every peer we know. A Commit is not pushed: live peers commit from the
            # votes they were pushed; it is for late joiners and laggards, who read the head key.
            self._delivery.recent.append((msg.round, envelope))
            self._gossip.push(envelope)
        ttl = HEAD_TTL if isinstance(msg, Commit) else 3 * self.event.round_deadline
        await self._store(self._key_of(msg), envelope, ttl, msg.TYPE)

    def _refresh_roster(self, machine: rm.RoundMachine) -> None:
        """Rewrite our roster entry when it is due: a peer that stays in the electorate
        announces itself only once (see `RoundMachine._enter`), so the entry is not kept
        fresh by per-round announcements."""
        ann = machine.announcement(time.time())
        if self._roster_due(ann):
            self._spawn(self._store(f"{self.prefix}/peers", sign(ann, self.identity), ROSTER_TTL, ann.TYPE), "publish roster")

    def _roster_due(self, msg: Message) -> bool:
        """Whether `msg` goes into our roster entry: a Departure always, an announcement when the
        entry is old or announced other addresses (one DHT store per ROSTER_REFRESH, not per round)."""
        d = self._delivery
        if isinstance(msg, Departure):
            return True
        if not isinstance(msg, PeerAnnouncement):
            return False
        now = time.monotonic()
        if tuple(msg.addrs) == d.roster_addrs and now - d.roster_written < ROSTER_REFRESH:
            return False
        d.roster_written, d.roster_addrs = now, tuple(msg.addrs)
        return True

    async def _store(self, key: str, envelope: bytes, ttl: float, kind: str) -> None:
        """Store our signed record under `key` in the DHT (3 tries), else report the failure."""
        for attempt in range(3):
            try:
                ok = await self.transport.publish(key, self.identity.peer_id, envelope, expiration_in(ttl), kind=kind)
                if ok:
                    return
            except TransportError as e:
                logger.debug("publish failed", key=key, error=str(e))
            await asyncio.sleep(0.5 * (attempt + 1))
        if key.endswith("/peers"):
            # try again with the next announcement, or in ROSTER_RETRY seconds
            self._delivery.roster_written = min(self._delivery.roster_written, time.monotonic() - ROSTER_REFRESH + ROSTER_RETRY)
        self.record_error(f"could not publish {kind} to {key}")

    async def _fetch_key(self, key: str) -> dict[str, bytes]:
        try:
            return await self.transport.fetch(key, kind="record")
        except TransportError as e:
            logger.debug("dht read failed", key=key, error=str(e))
            return {}

    async def _poll_loop(self) -> None:
        """Read the DHT for what pushes missed: the current round's keys in one search, at once on
        start, then every POLL_MIN seconds, backing off to POLL_MAX while reads bring nothing new,
        once shortly before each of the machine's deadlines (a timed decision should see every
        record), and soon after a record came from a peer whose announcement we missed; the head
        key and the next round's members every POLL_HEAD_EVERY seconds (POLL_HEAD_STALE while we
        have not committed for that long), or soon after a record showed a head newer than ours
        or a round of ours failed. On exit, queued pushes get 2 s to go out."""
        poll = self._delivery
        try:
            while True:
                machine = self.machine
                r = machine.round if machine is not None else None
                now = time.monotonic()
                if r is not None:
                    deadline = machine.next_deadline()
                    near = (
                        deadline is not None
                        and deadline != poll.deadline_read
                        and deadline - time.time() <= POLL_BEFORE_DEADLINE
                        and now - poll.last_read >= POLL_BEFORE_DEADLINE
                    )
                    every = POLL_HEAD_EVERY if now - poll.last_commit < POLL_HEAD_STALE else POLL_HEAD_STALE
                    head = now >= poll.last_head + every or (poll.head_due and now >= poll.last_head + POLL_MIN)
                    due = poll.read_due and now - poll.last_read >= POLL_BEFORE_DEADLINE
                    if near or head or due or now >= poll.next_read:
                        round_keys = [f"{self.prefix}/r/{r}/{k}" for k in ("members", "deltas", "proposal", "votes")]
                        keys = list(round_keys)
                        if head:
                            keys += [f"{self.prefix}/r/{r + 1}/members", f"{self.prefix}/head", f"{self.prefix}/peers"]
                            poll.last_head, poll.head_due = now, False
                        why = "deadline" if near else "head" if head else "missed_peer" if due else "interval"
                        poll.dht_reads[why] += 1
                        if near:
                            poll.deadline_read = deadline
                        poll.last_read, poll.read_due = now, False
                        new = await self._read_keys(keys)
                        # Only the round's records say a push missed something (or a head read that
                        # moved us on): a head read finds the Commit (stored, not pushed) and roster
                        # rewrites every time, and counting those reset the backoff after every head
                        # read (bench_control, 8 peers: 0.20 round-key searches per peer per round,
                        # 0.01 once they did not; control 23.9 -> 20.0 kB per peer per round).
                        missed = sum(new.get(k, 0) for k in round_keys)
                        moved = self.machine is not machine or machine.round != r or machine.phase is rm.Phase.SYNCING
                        poll.interval = POLL_MIN if missed or moved else min(2 * poll.interval, POLL_MAX)
                        poll.next_read = time.monotonic() + poll.interval
                    if now - poll.roster_written >= ROSTER_REFRESH:
                        self._refresh_roster(machine)
                await asyncio.sleep(POLL_TICK)
        finally:
            await self._gossip.close(timeout=2.0)

    async def _disk_loop(self) -> None:
        while True:
            self._check_disk()
            await asyncio.sleep(DISK_CHECK_EVERY)

    def _check_disk(self) -> None:
        if not self.disk.check():
            return
        if self.disk.full:
            self.record_error(f"disk full under {self.store.root}: {self.disk.reason}; training paused until space returns")
            self.trainer.finish_early()
        else:
            logger.warning("disk has room again; training resumes", free_bytes=self.disk.free)

    async def _read_keys(self, keys: list[str]) -> dict[str, int]:
        """Read `keys` in one DHT search and receive their records; returns, per key, how many were new."""
        try:
            found = await self.transport.fetch_many(keys, kind="record")
        except TransportError as e:
            logger.debug("dht read failed", keys=len(keys), error=str(e))
            return {}
        new: dict[str, int] = {}
        for key, records in found.items():
            for subkey, value in records.items():
                new[key] = new.get(key, 0) + await self._receive(subkey, value)
        return new

    async def _receive(self, subkey: str, value: bytes) -> bool:
        """Feed a record (from the DHT or a push) to the machine once; True if it was new and valid."""
        digest = hashlib.sha256(value).digest()
        if digest in self._seen_records:
            return False
        self._seen_records.add(digest)
        try:
            msg, signer = open_signed(value)
        except RemoteProtocolError as e:
            logger.debug("dropped record", signer=subkey[:12], error=str(e))
            return False
        if self._allowed and signer not in self._allowed:
            self.records_refused += 1  # a private event: not one of its peers
            return False
        base = getattr(msg, "base_version", None)
        current = self.machine.round if self.machine is not None else None
        if base is not None and base != self.head and current is not None and msg.round >= current:
            self._delivery.head_due = True  # its sender built on a head we do not have: read the head key soon
        named = set(msg.members if isinstance(msg, Proposal) else (signer,)) - {self.identity.peer_id}
        if not isinstance(msg, (PeerAnnouncement, Departure)) and not named <= self._peers.keys():
            self._delivery.read_due = True  # we missed its announcement: learn where to push to
        if isinstance(msg, PeerAnnouncement):
            if msg.event_hash != self.event.event_hash():
                return False
            await self._note_peer(msg)
        elif isinstance(msg, Departure):
            known = self._peers.get(msg.peer_id)
            if known is not None and msg.round >= known.last_round - 1:  # not an old one from the DHT
                known.last_round = -1  # no more pushes to it until it announces itself again
        elif isinstance(msg, DeltaAnnouncement):
            self._announced[msg.delta_hash] = msg
        elif isinstance(msg, Vote):
            self._vote_envelopes[(msg.round, msg.voter)] = value
        elif isinstance(msg, Commit):
            # Only a Commit that may move our head is worth its certificate (up to ~2 MB): live
            # peers commit from the votes they were pushed and never fetch one.
            if self._commit_news(msg):
                self._spawn(self._fetch_commit(msg, signer), f"certificate r{msg.round}")
            return True
        if not isinstance(msg, PeerAnnouncement):  # _note_peer observed those
            self._observe(msg)
            known = self._peers.get(signer)
            r = getattr(msg, "round", None)
            if known is not None and isinstance(r, int):
                # An electorate member announces itself only when it (re)joins: its deltas and
                # votes show it is still here.
                known.seen_in(r)
        self._post(rm.MessageReceived(time.time(), msg, signer))
        return True

    def _observe(self, msg: Message) -> None:
        """Tell the swarm view what a peer's record (or our own) said: for `status --swarm`."""
        now = time.time()
        if isinstance(msg, PeerAnnouncement):
            self.swarm.announced(msg.peer_id, libp2p_id=msg.libp2p_id, addrs=msg.addrs, capabilities=msg.capabilities, round=msg.round, now=now)
        elif isinstance(msg, DeltaAnnouncement):
            self.swarm.delta(msg.peer_id, msg.round, msg.samples, now)
        elif isinstance(msg, Departure):
            self.swarm.departed(msg.peer_id, msg.round, now)

    # ------------------------------------------------------------------------------ actions

    async def _execute(self, a) -> None:
        if isinstance(a, rm.Publish):
            if isinstance(a.message, DeltaAnnouncement):
                self._announced[a.message.delta_hash] = a.message
            self._observe(a.message)  # we are a peer of the swarm too
            self._spawn(self._publish(a.message), f"publish {a.message.TYPE}")
        elif isinstance(a, rm.EnterRound):
            self._enter_round(a)
        elif isinstance(a, rm.StartTraining):
            self._spawn(self._train(a), f"train r{a.round}")
        elif isinstance(a, rm.KeepDelta):
            self._keep_delta(a)
        elif isinstance(a, rm.FetchDelta):
            self._spawn(self._fetch_delta(a), f"fetch {a.delta_hash[:8]}")
        elif isinstance(a, rm.FetchProposal):
            self._spawn(self._fetch_proposal(a), f"fetch proposal r{a.round}")
        elif isinstance(a, rm.Merge):
            self._spawn(self._merge(a), f"merge r{a.proposal.round}")
        elif isinstance(a, rm.CommitVersion):
            self._delivery.last_commit = time.monotonic()
            await self._commit_version(a)
        elif isinstance(a, rm.PublishCommit):
            self._spawn(self._publish_commit(a), f"commit r{a.round}")
        elif isinstance(a, rm.SyncVersion):
            self._spawn(self._sync(a), f"sync {a.version_id[:8]}")
        elif isinstance(a, rm.RoundFailed):
            logger.warning("round failed", round=a.round, reason=a.reason)
            self._delivery.head_due = True  # the swarm may have moved on without us: read the head soon
        else:  # a new action type is our bug, never something to skip quietly
            raise TypeError(f"unknown action {a!r}")

    def _enter_round(self, a: rm.EnterRound) -> None:
        counters = self.transport.counters
        self._bytes_mark = (counters.total_sent(), counters.total_received())
        self._busy_mark = self.trainer.busy_seconds
        self.trainer.finish_early(False)
        self.times = RoundTimes(a.round, time.time())
        # forget payloads of rounds long gone; our own stay served for stragglers one round more
        for h, (r, _) in list(self._delta_bytes.items()):
            if r < a.round - 1:
                del self._delta_bytes[h]
                self._decoded.pop(h, None)
                self.transport.drop_blob(h)
                self._own_raw.pop(h, None)
        for h in [h for h, m in self._announced.items() if m.round < a.round - 2]:
            del self._announced[h]
        for key in [k for k in self._vote_envelopes if k[0] < a.round - 16]:
            del self._vote_envelopes[key]
        logger.info("entered round", round=a.round, base=a.base_version[:12])

    async def _train(self, a: rm.StartTraining) -> None:
        while self.disk.full:  # a full disk stops training; the round goes on without our delta
            await asyncio.sleep(POLL_TICK)
        base = await asyncio.to_thread(self.store.state_dict, a.base_version)
        start, kept_samples, kept_announced = base, 0, 0
        if self._kept is not None:
            # Continue from where our unmerged work left off (base + kept delta) instead of adding
            # the kept delta to a fresh one: two deltas trained from one base would count twice.
            kept, kept_samples, kept_announced = self._kept
            start = {k: base[k] + kept[k].to(base[k].dtype) for k in base}
        result, delta = await self.trainer.train_round(start, self._step_budget(), first_step=a.round * self.event.inner_steps)
        # Never idle while the swarm merges, nor while our delta is encoded (the encode and its
        # norm run in the other thread); bounded so a stalled swarm does not grow one delta forever.
        if self.event.train_ahead:
            self.trainer.train_ahead(3 * self.event.inner_steps)
        samples = result.samples + kept_samples
        if self._kept is not None:
            delta = {k: delta[k] + self._kept[0][k] for k in delta}  # relative to the round's base
            self._kept = None
        if not all(torch.isfinite(t).all() for t in delta.values()):
            self.record_error(f"round {a.round}: training produced NaN/Inf; the delta is dropped")
            self.feedback.reset()
            delta, samples = {k: torch.zeros_like(t) for k, t in delta.items()}, 0  # claims no work
        # samples an earlier announcement of ours held: the others counted them as trained then
        carried = min(kept_announced, samples)  # (a delta zeroed above claims no work, carried or not)
        own = (delta, samples, carried)  # what we keep if it is not merged (a liar keeps its honest work too)
        delta, samples = self._outgoing_delta(delta, samples)
        encoded = await self.trainer.encode(self.feedback, delta)
        encoded = dataclasses.replace(encoded, data=self._outgoing_bytes(encoded.data))
        h = hashlib.sha256(encoded.data).hexdigest()
        # our norm as the others will see it: of what they decode, not of the raw delta
        try:
            norm = await self.trainer.decoded_norm(self.codec, encoded.data, self.store.get_version(a.base_version).tensors)
        except (ValueError, P2PModelError):
            norm = None  # only bytes we tampered with fail here (see faults.py); the others judge them
        self._delta_bytes[h] = (a.round, encoded.data)
        self._own_raw[h] = own
        self._last_encoded = h
        self.transport.put_blob(encoded.data, kind="delta")
        logger.info(
            "trained",
            round=a.round,
            steps=result.steps,
            loss=round(result.mean_loss, 4),
            seconds=round(result.seconds, 2),
            delta_bytes=len(encoded.data),
            ratio=round(encoded.ratio, 1),
        )
        self._post(rm.TrainingDone(time.time(), h, max(1, samples), len(encoded.data), norm=norm, carried=carried))

    def _serves(self, libp2p_id: str) -> bool:
        """Private events serve objects only to the libp2p ids their allowed peers announced."""
        return any(p.libp2p_id == libp2p_id for k, p in self._peers.items() if k in self._allowed)

    def _outgoing_delta(self, delta: dict[str, torch.Tensor], samples: int) -> tuple[dict[str, torch.Tensor], int]:
        """What we send: our delta and samples, unchanged (daemon/faults.py's liars override this)."""
        return delta, samples

    def _outgoing_bytes(self, data: bytes) -> bytes:
        """The encoded delta we serve, unchanged (a liar in daemon/faults.py overrides it)."""
        return data

    def _step_budget(self) -> int:
        """Inner steps for this round: at most the event's H. A slower peer takes fewer: its
        training ends once every other expected peer delivered (`only_we_are_missing`)."""
        return self.event.inner_steps

    def _keep_delta(self, a: rm.KeepDelta) -> None:
        own = self._own_raw.get(a.delta_hash)
        if own is None:
            return
        if a.delta_hash == self._last_encoded:
            self.feedback.rollback()  # the kept delta will be encoded again inside the next one
        raw, samples, carried = own
        announced = samples if a.announced else carried  # a stale delta was never announced
        if self._kept is None:
            self._kept = (raw, samples, announced)
        else:
            kept, ks, ka = self._kept
            self._kept = ({k: kept[k] + raw[k] for k in kept}, ks + samples, ka + announced)

    async def _fetch_delta(self, a: rm.FetchDelta) -> None:
        ok = a.delta_hash in self._delta_bytes
        if not ok:
            ann = self._announced.get(a.delta_hash)
            t0 = time.monotonic()
            try:
                data = await self._fetch_delta_bytes(a, ann.encoded_size if ann is not None else None)
                self._delta_bytes[a.delta_hash] = (self.machine.round or 0, data)
                # served on (hash-checked, so from anyone): a peer that cannot dial the announcer gets it from us
                self.transport.put_blob(data, kind="delta")
                ok = True
            except FetchError as e:
                self.record_error(f"delta {a.delta_hash[:12]} from {a.peer_id[:12]}: {e.reason}")
            if self.times is not None:
                self.times.communication += time.monotonic() - t0
        if not ok:
            self._post(rm.DeltaFetched(time.time(), a.delta_hash, False, reason="unfetchable"))
            return
        ann = self._announced.get(a.delta_hash)
        base = ann.base_version if ann is not None else self.head
        norm, reason = await self._check_fetched(a.delta_hash, base)
        if reason:
            self.record_error(f"delta {a.delta_hash[:12]} from {a.peer_id[:12]} rejected: {reason}")
            self.exclusions.append({"round": self.machine.round, "peer": a.peer_id, "reason": reason})
            del self.exclusions[:-50]
        self._post(rm.DeltaFetched(time.time(), a.delta_hash, not reason, norm=norm, reason=reason))

    async def _fetch_delta_bytes(self, a: rm.FetchDelta, expected_size: int | None) -> bytes:
        """A delta's verified bytes from whoever serves them (`_delta_sources`), within half the
        round deadline. When no source has it yet (we cannot dial the announcer, and those who can
        are still fetching it), ask again after `DELTA_REFETCH_PAUSE`.

        Raises:
            FetchError: the last source's error once the time is up (or at once when it is not
            "not found": a bad hash, an oversized object).
        """
        deadline = time.monotonic() + self.event.round_deadline / 2
        while True:
            try:
                return await self.transport.fetch_from_any(
                    self._delta_sources(a.peer_id),
                    a.delta_hash,
                    max_size=self.event.max_delta_bytes,
                    expected_size=expected_size,
                    timeout=max(1.0, deadline - time.monotonic()),
                    kind="delta",
                )
            except ObjectNotFound:
                if time.monotonic() + DELTA_REFETCH_PAUSE >= deadline:
                    raise
            await asyncio.sleep(DELTA_REFETCH_PAUSE)

    def _delta_sources(self, announcer: str) -> list[str]:
        """libp2p ids to ask for a delta: its announcer, then this round's members (each fetches
        every delta and serves what it fetched), then anyone else we know; at most 6."""
        me, members = self.identity.peer_id, self.machine.members if self.machine else frozenset()
        recent = [k for _, k in sorted(((p.last_round, k) for k, p in self._peers.items() if k not in (me, announcer)), reverse=True)]
        recent.sort(key=lambda k: k not in members)  # stable: most recently seen first within each group
        order = ([announcer] if announcer in self._peers and announcer != me else []) + recent
        return [self._peers[k].libp2p_id for k in order][:6]

    async def _check_fetched(self, delta_hash: str, base: str) -> tuple[float | None, str]:
        """Decode a fetched delta and check it (in the merge thread): (L2 norm, "" or why it is unusable).

        The decoder validates every size before allocating; then the values are checked: all
        finite. The norm goes to the round machine, which compares it with the others'.
        """
        try:
            manifest = self.store.get_version(base).tensors
            data = self._delta_bytes[delta_hash][1]
        except (ValueError, P2PModelError) as e:
            return None, f"does not decode: {str(e)[:120]}"
        except KeyError:
            return None, "base version unknown"
        checked = await self.trainer.check_delta(self.codec, data, manifest)
        if checked.decoded is not None:
            self._decoded[delta_hash] = checked.decoded
        return checked.norm, checked.reason

    async def _fetch_proposal(self, a: rm.FetchProposal) -> None:
        for value in (await self._fetch_key(f"{self.prefix}/r/{a.round}/proposal")).values():
            try:
                msg, signer = open_signed(value, Proposal)
            except RemoteProtocolError:
                continue
            if message_hash(msg) == a.proposal_hash:
                self._post(rm.MessageReceived(time.time(), msg, signer))
                return

    # ------------------------------------------------------------------------------ merge

    async def _merge(self, a: rm.Merge) -> None:
        t0 = time.monotonic()
        try:
            version, params = await self._build_version(a.proposal, a.proposal_hash)
            metrics = await self.trainer.evaluate(params)
            parent, recent = await self._recent_metrics(a.proposal.base_version)
            report = await asyncio.to_thread(run_gate, self.gate, metrics, parent=parent, recent=recent, params=params)
        except (ValueError, P2PModelError, OSError) as e:  # codec, lineage, merge and training errors derive from P2PModelError
            if isinstance(e, OSError) and not self.disk.on_error(e):
                raise
            self.record_error(f"round {a.proposal.round}: merge of proposal {a.proposal_hash[:12]} failed: {e}")
            self._post(rm.MergeFailed(time.time(), a.proposal_hash, str(e)[:200]))
            return
        finally:
            if self.times is not None:
                self.times.merge += time.monotonic() - t0
        if not report.passed:
            self.record_error(f"round {a.proposal.round}: CI gate refused {version.id[:12]}: {report.reason}")
            self._post(rm.MergeFailed(time.time(), a.proposal_hash, report.reason[:200]))
            return
        self._candidates[version.id] = _Candidate(version, metrics, a.proposal_hash)
        self._eval_cache[version.id] = metrics
        logger.info("merged", round=a.proposal.round, version=version.id[:12], proposal=a.proposal_hash[:12], deltas=len(a.proposal.deltas), **{k: round(v, 4) for k, v in metrics.items()})
        screened = tuple(p for p, _ in (version.merge or {}).get("screened", ()))
        self._post(rm.MergeDone(time.time(), a.proposal_hash, version.id, metrics, screened=screened))

    async def _recent_metrics(self, vid: str) -> tuple[dict[str, float], list[dict[str, float]]]:
        """Metrics of `vid` (the parent) and of its recent ancestors, newest first, for the CI gate."""
        parent = await self._eval_of(vid)
        ids = [v.id for v in await asyncio.to_thread(self.store.log, vid, self.gate.window)]
        recent = []
        for i in ids:
            m = self._eval_cache.get(i)
            if m is None:
                m = dict((await asyncio.to_thread(self.store.annotations, i)).metrics or {})
            recent.append(m)
        return parent, recent

    async def _eval_of(self, vid: str) -> dict[str, float]:
        if vid not in self._eval_cache:
            ann = await asyncio.to_thread(self.store.annotations, vid)
            if ann.metrics:
                self._eval_cache[vid] = dict(ann.metrics)
            else:
                state = await asyncio.to_thread(self.store.state_dict, vid)
                self._eval_cache[vid] = metrics = await self.trainer.evaluate(state)
                # measured locally; kept so `log` can show where the lineage started from
                await asyncio.to_thread(self.store.annotate, vid, metrics=metrics)
        return self._eval_cache[vid]

    async def _build_version(self, p: Proposal, proposal_hash: str) -> tuple[Version, dict[str, torch.Tensor]]:
        """Build the proposal's version from its deltas (in the merge thread): see p2pmodel.versioning."""
        deltas = [
            PendingContribution(d.peer_id, d.delta_hash, d.weight, self._decoded.get(d.delta_hash) or self._delta_bytes[d.delta_hash][1])
            for d in p.deltas
        ]
        spec = RoundSpec(
            round=p.round, base_version=p.base_version, proposer=p.proposer, time=p.time, method=p.method,
            members=tuple(p.members), proposal_hash=proposal_hash, params=dict(p.params),
        )  # fmt: skip
        return await self.trainer.build_version(VersionJob(self.store, spec, deltas, self.codec, self.outer, self.screen))

    # ------------------------------------------------------------------------------ commits

    def _certificate(self, round_: int, votes) -> tuple[bytes, ...]:
        me = self.identity.peer_id
        if any(v.voter == me for v in votes) and (round_, me) not in self._vote_envelopes:
            # Our vote's publish task may not have run yet (we cast the last vote and commit in the
            # same step): without this the certificate we store lacks our own vote, often below a
            # quorum. Ed25519 is deterministic, so this is the envelope we publish.
            self._vote_envelopes[(round_, me)] = sign(next(v for v in votes if v.voter == me), self.identity)
        return tuple(self._vote_envelopes[(round_, v.voter)] for v in votes if (round_, v.voter) in self._vote_envelopes)

    async def _commit_version(self, a: rm.CommitVersion) -> None:
        store = self.store
        certificate = self._certificate(a.round, a.votes)
        metrics = median_metrics([v.metrics for v in a.votes])
        ann = Annotations(metrics=metrics, certificate={"round": a.round, "proposal": a.proposal_hash, "votes": list(certificate),
                                                        "observed": self._observed(a.round, a.votes[0].base_version if a.votes else "")})
        candidate = self._candidates.pop(a.version_id, None)
        if candidate is not None:
            await asyncio.to_thread(store.put_version, candidate.version, ann, "main")
        else:
            await asyncio.to_thread(store.annotate, a.version_id, metrics=metrics, certificate=ann.certificate)
            await asyncio.to_thread(store.set_ref, "main", a.version_id)
        self._candidates.clear()
        self.head, self.head_round = a.version_id, a.round
        self._eval_cache.setdefault(a.version_id, metrics)
        version = await asyncio.to_thread(store.get_version, a.version_id)
        self.rounds_joined += 1
        self._record_round(a, version, metrics)
        if self.max_rounds and self.rounds_joined >= self.max_rounds:
            logger.info("max rounds reached", rounds=self.rounds_joined)
            self.request_stop()

    def _observed(self, round_: int, base: str) -> dict[str, dict]:
        """What the round's peers announced themselves, as this node received it: their display
        names and the samples they trained for it (`samples_trained_since`). Kept beside the certificate (not
        part of it, nor of the version id: each peer saw its own) for `p2pmodel credits`; see
        p2pmodel/credits.py."""
        samples = samples_trained_since(self._announced.values(), round_, base)
        return {"names": self.swarm.names(samples.keys() | set(self.machine.members if self.machine else ())), "samples": samples}

    def _record_round(self, a: rm.CommitVersion, version: Version, metrics: dict[str, float]) -> None:
        counters = self.transport.counters
        t = self.times
        entry: dict[str, Any] = {
            "round": a.round,
            "version": a.version_id,
            "contributors": len(version.contributors),
            "eval_loss": metrics.get("eval_loss"),
            # what the swarm trained since the last commit (each sample once) vs what it merged
            "samples_trained": sum(samples_trained_since(self._announced.values(), a.round, version.parents[0]).values()),
            "samples_merged": int(sum(d[2] for d in (version.merge or {}).get("deltas", ()))),
        }
        if t is not None and t.round == a.round:
            t.total = time.time() - t.entered
            # steps taken ahead (while the last round merged) count: the thread was training
            t.training = min(t.total, self.trainer.busy_seconds - self._busy_mark)
            t.bytes_sent = counters.total_sent() - self._bytes_mark[0]
            t.bytes_received = counters.total_received() - self._bytes_mark[1]
            entry.update(t.as_dict())
        self.swarm.merged(a.round, (d[0] for d in (version.merge or {}).get("deltas", ())))
        screened = (version.merge or {}).get("screened", [])
        totals = self.totals
        totals["samples_trained"] += int(entry["samples_trained"] or 0)
        totals["samples_merged"] += int(entry["samples_merged"] or 0)
        totals["deltas_screened"] += len(screened)
        if screened:
            entry["screened"] = len(screened)
            for peer, why in screened:
                self.exclusions.append({"round": a.round, "peer": peer, "reason": f"merge screen: {why}"})
            del self.exclusions[:-50]
        self.history.append(entry)
        del self.history[:-50]
        logger.info(
            "committed",
            round=a.round,
            version=a.version_id[:12],
            contributors=len(version.contributors),
            eval_loss=round(metrics.get("eval_loss", float("nan")), 4),
            **{k: v for k, v in entry.items() if k.endswith("_s") or k.startswith(("bytes", "samples"))},
        )

    def _commit_news(self, msg: Commit) -> bool:
        """Whether a Commit read from the DHT is ahead of our head and claims enough signers to
        commit or vouch under our electorate (see `protocols.certificate.may_commit`)."""
        m = self.machine
        if m is None or (m.head_round is not None and msg.round <= m.head_round):
            return False
        return may_commit(msg.signers, m.electorate, self.round_config.quorum)

    async def _fetch_commit(self, msg: Commit, publisher: str) -> None:
        """Fetch the certificate a newer Commit names, then hand the commit to the machine."""
        m = self.machine
        need = weak_quorum(len(m.electorate), self.round_config.quorum) if m is not None else 1
        try:
            certified = await fetch_commit_certificate(self.transport, msg, self._certificate_sources(publisher), min_votes=need)
        except SyncError as e:  # each peer that served bad bytes was logged, and skipped, by the fetch
            logger.info("cannot use a head commit", round=msg.round, version=msg.version_id[:12], error=str(e))
            return
        self._note_commit(certified)
        self._certificates.serve(certified)  # laggards after us may ask us
        self._post(rm.MessageReceived(time.time(), certified, publisher))

    def _note_commit(self, msg: CertifiedCommit) -> None:
        """Keep a received Commit's signed votes: we may be asked to republish it."""
        for envelope in msg.certificate:
            try:
                vote, signer = open_signed(envelope, Vote)
            except RemoteProtocolError:
                continue
            if signer == vote.voter:
                self._vote_envelopes.setdefault((vote.round, vote.voter), envelope)

    async def _publish_commit(self, a: rm.PublishCommit) -> None:
        """Serve the certificate by hash, then publish the Commit that names it (a few hundred
        bytes at any number of signers: protocols/certificate.py)."""
        certified = make_commit(a.round, a.version_id, self._certificate(a.round, a.votes))
        self._certificates.serve(certified)
        await self._publish(certified.commit)

    async def _sync(self, a: rm.SyncVersion) -> None:
        t0 = time.monotonic()
        try:
            record = await self.transport.fetch_from_any(
                self._libp2p_for(a.from_peers)[:8], a.version_id, max_size=MAX_RECORD, kind="version", timeout=60
            )
            version = Version.from_bytes(record)
            target = CertifiedVersion(version, a.round, tuple((version.merge or {}).get("members") or ()), (), ())
            await sync_version(self.transport, self.store, target, self._libp2p_for(a.from_peers), branch=None)
        except (SyncError, FetchError, LineageError) as e:
            self.record_error(f"sync of {a.version_id[:12]} failed: {e}")
            self._post(rm.SyncFailed(time.time(), a.version_id))
            return
        finally:
            if self.times is not None:
                self.times.communication += time.monotonic() - t0
        self.feedback.reset()  # our residual was relative to what we would have merged
        proposal = (version.merge or {}).get("proposal")
        self._post(rm.VersionSynced(time.time(), a.version_id, a.round, proposal if isinstance(proposal, str) else "",
                                    frozenset(m for m in target.members if isinstance(m, str))))  # fmt: skip

    # ------------------------------------------------------------------------------ status

    async def _progress_loop(self) -> None:
        while True:
            p = self.trainer.progress
            m = self.machine
            phase = m.phase.value if m is not None else "starting"
            loss = f"{p.loss:.3f}" if p.loss is not None else "-"
            self.progress.update(
                f"round {m.round if m else '-'} | {phase} | train {p.step}/{p.steps} loss {loss} | head {self.head[:10]}"
            )
            await asyncio.sleep(0.5)

    def status(self) -> dict[str, Any]:
        m = self.machine
        members = []
        if m is not None:
            members = sorted(m.members)
        head_eval = self._eval_cache.get(self.head, {}).get("eval_loss")
        return {
            "round": m.round if m is not None else None,
            "phase": m.phase.value if m is not None else "starting",
            "head": {"id": self.head, "round": self.head_round, "eval_loss": head_eval},
            "peers": members,
            "rounds_joined": self.rounds_joined,
            "round_counters": dict(m.counters) if m is not None else {},
            "commits_refused": self.commits_refused,
            "records_refused": self.records_refused,
            "gossip": {
                **self._gossip.stats(),
                "dht_stores_skipped": self._delivery.dht_stores_skipped,
                "dht_reads": dict(sorted(self._delivery.dht_reads.items())),
            },
            "disk": self.disk.status(),
            "totals": dict(self.totals),
            "exclusions": {
                "this_round": m.exclusions if m is not None else {},
                "recent": self.exclusions[-10:],
                "offences": m.offences() if m is not None else {},  # recent, per peer: weight halved, then left out
            },
            "history": self.history[-10:],
            "current_round_times": self.times.as_dict() if self.times is not None else None,
            "swarm": self.swarm.snapshot(time.time(), me=self.identity.peer_id),
        }

