"""`RoundRunner`: the thin shell around `protocols.round.RoundMachine` (STYLE.md §4).

It does four things: read DHT records (verifying each signature) and feed them to the
machine as events; feed it time (`Tick` at `next_deadline()`); carry out the actions it
returns; feed their results back as events. Every decision is the machine's.

| action          | what the runner does                                                         |
| --------------- | ---------------------------------------------------------------------------- |
| Publish         | sign with our identity, store under the round's DHT key                       |
| StartTraining   | H inner steps in the trainer thread; add kept deltas; encode with error        |
|                 | feedback; serve the bytes by hash -> TrainingDone                             |
| KeepDelta       | keep that raw delta to add into the next one (and roll back error feedback)   |
| FetchDelta      | fetch the bytes over a libp2p stream, verify the hash -> DeltaFetched          |
| FetchProposal   | read the round's proposal key, feed the proposal with that hash               |
| Merge           | decode, merge per tensor, outer step, store tensors, eval + CI gate off the   |
|                 | loop -> MergeDone / MergeFailed                                               |
| CommitVersion   | index the version with its certificate, move `main`                           |
| PublishCommit   | publish Commit(version record, signed votes) under the head key               |
| SyncVersion     | fetch the version and missing ancestors (sync.py) -> VersionSynced/SyncFailed |
| EnterRound, RoundFailed | log, status, bookkeeping                                              |

DHT keys (`P` = the event's prefix): `P/r/<round>/{members,deltas,proposal,votes}` and `P/head`.

The version a merge produces is a pure function of the proposal and the base version (see
`_build_version`), so every honest peer derives the same id: parents, tensors, outer momentum,
the proposal's time and proposer, the merge spec (method, params, deltas with weights, members,
proposal hash) and the contributors (peers whose deltas were merged).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from p2pmodel.daemon.logs import Progress, get_logger
from p2pmodel.daemon.sync import CertifiedVersion, SyncError, commit_signers, sync_version, verify_commit
from p2pmodel.daemon.transport import FetchError, TransportError, expiration_in
from p2pmodel.errors import P2PModelError
from p2pmodel.lineage import Annotations, LineageError, Version
from p2pmodel.merge import METHODS, merge_deltas
from p2pmodel.protocols import round as rm
from p2pmodel.protocols.codec import CodecConfig, DeltaCodec
from p2pmodel.protocols.errors import RemoteProtocolError
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
from p2pmodel.training import outer_step

if TYPE_CHECKING:
    from p2pmodel.daemon.node import Node

__all__ = ["RoundRunner", "RoundTimes"]

logger = get_logger(__name__)

POLL_INTERVAL = 1.5  # seconds between reads of the current round's DHT keys
SLOW_POLL_EVERY = 3  # the head and the next round's members are read every this many polls
HEAD_TTL = 24 * 3600.0  # seconds a published Commit stays in the DHT


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
    last_round: int = -1


@dataclass
class _Candidate:
    """A version our merge produced, held until a quorum commits it (or another one)."""

    version: Version
    metrics: dict[str, float]
    proposal_hash: str


class RoundRunner:
    """Drives one RoundMachine for `node`. `run()` returns when the node stops or `max_rounds` is reached."""

    def __init__(self, node: "Node", head: str):
        self.node = node
        self.event = node.event
        self.prefix = node.event.dht_prefix()
        self.codec = DeltaCodec(CodecConfig(**node.event.codec))
        self.feedback = self.codec.feedback()
        cfg = rm.RoundConfig(
            collect_window=node.event.collect_window,
            proposal_timeout=node.event.proposal_timeout,
            round_deadline=node.event.round_deadline,
            min_members=node.event.min_members,
            method=node.event.merge_method,
            params=tuple(sorted(node.event.merge_params.items())),
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
        self.progress = Progress()
        self._accepting = True
        self._stop_sent = False
        self._tasks: set[asyncio.Task] = set()
        self._seen_records: set[bytes] = set()
        self._peers: dict[str, _Peer] = {}  # our peer ids -> libp2p reachability
        self._announced: dict[str, DeltaAnnouncement] = {}  # delta hash -> announcement
        self._delta_bytes: dict[str, tuple[int, bytes]] = {}  # delta hash -> (round, encoded bytes)
        self._own_raw: dict[str, tuple[dict[str, torch.Tensor], int]] = {}  # our hash -> (raw delta, samples)
        self._last_encoded: str | None = None
        self._kept: tuple[dict[str, torch.Tensor], int] | None = None  # carried delta, its samples
        self._vote_envelopes: dict[tuple[int, str], bytes] = {}  # (round, voter) -> signed vote
        self._candidates: dict[str, _Candidate] = {}
        self._eval_cache: dict[str, dict[str, float]] = {}
        self._bytes_mark = (0, 0)

    # ------------------------------------------------------------------------------ startup

    async def _initial_head(self) -> tuple[str, int | None, frozenset[str]]:
        """Our head, after catching up with the newest certified commit in the DHT."""
        store = self.node.store
        head = store.branches()["main"]
        version = await asyncio.to_thread(store.get_version, head)
        best = await self._newest_commit()
        if best is not None and (version.round is None or best.round > version.round):
            await self._learn_peers([best.round, best.round + 1])
            peers = self._libp2p_for(best.members)
            t0 = time.monotonic()
            await sync_version(self.node.transport, store, best, peers, branch="main")
            logger.info("caught up", head=best.id[:12], round=best.round, seconds=round(time.monotonic() - t0, 2))
            head, version = best.id, best.version
        return head, version.round, self._electorate_of(version)

    def _electorate_of(self, version: Version) -> frozenset[str]:
        members = (version.merge or {}).get("members") if version.round is not None else None
        return frozenset(members) if members else frozenset({self.event.seeder})

    async def _newest_commit(self) -> CertifiedVersion | None:
        """The newest commit in the DHT whose record a signer serves and whose certificate checks."""
        commits = []
        for value in (await self._fetch_key(f"{self.prefix}/head")).values():
            try:
                commits.append(open_signed(value, Commit)[0])
            except RemoteProtocolError as e:
                logger.debug("ignoring head record", error=str(e))
        for msg in sorted(commits, key=lambda c: c.round, reverse=True):
            await self._learn_peers([msg.round, msg.round + 1])
            peers = self._libp2p_for(commit_signers(msg))[:8]
            try:
                record = await self.node.transport.fetch_from_any(peers, msg.version_id, max_size=MAX_RECORD, kind="version", timeout=60)
                return verify_commit(msg, record)
            except (FetchError, SyncError) as e:
                logger.debug("ignoring head record", round=msg.round, version=msg.version_id[:12], error=str(e))
        return None

    async def _learn_peers(self, rounds: list[int]) -> None:
        for r in rounds:
            for value in (await self._fetch_key(f"{self.prefix}/r/{r}/members")).values():
                try:
                    msg, _ = open_signed(value)
                except RemoteProtocolError:
                    continue
                if isinstance(msg, PeerAnnouncement):
                    await self._note_peer(msg)

    async def _note_peer(self, msg: PeerAnnouncement) -> None:
        known = self._peers.get(msg.peer_id)
        if known is None or known.libp2p_id != msg.libp2p_id:
            self._peers[msg.peer_id] = _Peer(msg.libp2p_id, tuple(msg.addrs), msg.round)
            if msg.peer_id != self.node.identity.peer_id and msg.addrs:
                try:
                    await self.node.transport.connect(msg.libp2p_id, msg.addrs)
                except Exception as e:  # unreachable now; a later fetch retries through the DHT's routes
                    logger.debug("connect failed", peer=msg.peer_id[:12], error=repr(e))
        else:
            known.last_round = max(known.last_round, msg.round)

    def _libp2p_for(self, peer_ids) -> list[str]:
        """libp2p ids of these peers, then every other peer we know; most recently seen first."""
        me = self.node.identity.peer_id
        recent = sorted(((p.last_round, k) for k, p in self._peers.items() if k != me), reverse=True)
        wanted = set(peer_ids)
        first = [self._peers[k].libp2p_id for _, k in recent if k in wanted]
        rest = [self._peers[k].libp2p_id for _, k in recent if k not in wanted]
        return first + rest

    # ------------------------------------------------------------------------------ main loop

    async def run(self) -> None:
        head, head_round, electorate = await self._initial_head()
        self.head, self.head_round = head, head_round
        transport = self.node.transport
        me = self.node.identity
        peer = rm.PeerInfo(
            peer_id=me.peer_id,
            public_key=me.public_key,
            libp2p_id=transport.peer_id.to_base58(),
            addrs=tuple((await transport.visible_maddrs())[:16]),
            event_hash=self.event.event_hash(),
            capabilities=(("device", self.node.trainer.device),),
        )
        self.machine = rm.RoundMachine(peer, self.round_config)
        await self.node.trainer.start(await asyncio.to_thread(self.node.store.state_dict, head))
        self._spawn(self._poll_loop(), "poll")
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
            self.node.trainer.stop()
            m = self.machine
            if m is not None and m.phase in (rm.Phase.MERGING, rm.Phase.VOTED):
                self._spawn(self._stop_after_round(m.round, self.node.config.shutdown_timeout / 2), "finish round")
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
            await self._publish(Departure(peer_id=self.node.identity.peer_id, round=self.machine.round, time=time.time()))
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
        for action in self.machine.process(event):
            await self._execute(action)

    def _spawn(self, coro, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.node.record_error(f"{task.get_name()} failed: {task.exception()!r}")

    def _post(self, event) -> None:
        if self.machine is not None and self.machine.phase is not rm.Phase.STOPPED:
            self.events.put_nowait(event)

    # ------------------------------------------------------------------------------ records

    def _key_of(self, msg: Message) -> str:
        if isinstance(msg, Commit):
            return f"{self.prefix}/head"
        kind = {PeerAnnouncement: "members", Departure: "members", DeltaAnnouncement: "deltas", Proposal: "proposal", Vote: "votes"}[type(msg)]
        return f"{self.prefix}/r/{msg.round}/{kind}"

    async def _publish(self, msg: Message) -> None:
        envelope = sign(msg, self.node.identity)
        if isinstance(msg, Vote):
            self._vote_envelopes[(msg.round, msg.voter)] = envelope
        ttl = HEAD_TTL if isinstance(msg, Commit) else 3 * self.event.round_deadline
        key = self._key_of(msg)
        for attempt in range(3):
            try:
                ok = await self.node.transport.publish(key, self.node.identity.peer_id, envelope, expiration_in(ttl), kind=msg.TYPE)
                if ok:
                    return
            except TransportError as e:
                logger.debug("publish failed", key=key, error=str(e))
            await asyncio.sleep(0.5 * (attempt + 1))
        self.node.record_error(f"could not publish {msg.TYPE} to {key}")

    async def _fetch_key(self, key: str) -> dict[str, bytes]:
        try:
            return await self.node.transport.fetch(key, kind="record")
        except TransportError as e:
            logger.debug("dht read failed", key=key, error=str(e))
            return {}

    async def _poll_loop(self) -> None:
        """Read the current round's keys (and the next round's members, and the head) forever."""
        polls = 0
        while True:
            machine = self.machine
            r = machine.round if machine is not None else None
            if r is not None:
                keys = [f"{self.prefix}/r/{r}/{k}" for k in ("members", "deltas", "proposal", "votes")]
                if polls % SLOW_POLL_EVERY == 0:  # catching up and skipping ahead need no hurry
                    keys += [f"{self.prefix}/r/{r + 1}/members", f"{self.prefix}/head"]
                polls += 1
                results = await asyncio.gather(*(self._fetch_key(k) for k in keys))
                for records in results:
                    for subkey, value in records.items():
                        await self._receive(subkey, value)
            await asyncio.sleep(POLL_INTERVAL)

    async def _receive(self, subkey: str, value: bytes) -> None:
        digest = hashlib.sha256(value).digest()
        if digest in self._seen_records:
            return
        self._seen_records.add(digest)
        try:
            msg, signer = open_signed(value)
        except RemoteProtocolError as e:
            logger.debug("dropped record", signer=subkey[:12], error=str(e))
            return
        if isinstance(msg, PeerAnnouncement):
            if msg.event_hash != self.event.event_hash():
                return
            await self._note_peer(msg)
        elif isinstance(msg, DeltaAnnouncement):
            self._announced[msg.delta_hash] = msg
        elif isinstance(msg, Vote):
            self._vote_envelopes[(msg.round, msg.voter)] = value
        elif isinstance(msg, Commit):
            self._note_commit(msg)
        self._post(rm.MessageReceived(time.time(), msg, signer))

    # ------------------------------------------------------------------------------ actions

    async def _execute(self, a) -> None:
        if isinstance(a, rm.Publish):
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
            await self._commit_version(a)
        elif isinstance(a, rm.PublishCommit):
            self._spawn(self._publish_commit(a), f"commit r{a.round}")
        elif isinstance(a, rm.SyncVersion):
            self._spawn(self._sync(a), f"sync {a.version_id[:8]}")
        elif isinstance(a, rm.RoundFailed):
            logger.warning("round failed", round=a.round, reason=a.reason)
        else:  # a new action type is our bug, never something to skip quietly
            raise TypeError(f"unknown action {a!r}")

    def _enter_round(self, a: rm.EnterRound) -> None:
        counters = self.node.transport.counters
        self._bytes_mark = (counters.total_sent(), counters.total_received())
        self.times = RoundTimes(a.round, time.time())
        # forget payloads of rounds long gone; our own stay served for stragglers one round more
        for h, (r, _) in list(self._delta_bytes.items()):
            if r < a.round - 1:
                del self._delta_bytes[h]
                self.node.transport.drop_blob(h)
                self._own_raw.pop(h, None)
        for key in [k for k in self._vote_envelopes if k[0] < a.round - 16]:
            del self._vote_envelopes[key]
        logger.info("entered round", round=a.round, base=a.base_version[:12])

    async def _train(self, a: rm.StartTraining) -> None:
        node = self.node
        base = await asyncio.to_thread(node.store.state_dict, a.base_version)
        start, kept_samples = base, 0
        if self._kept is not None:
            # Continue from where our unmerged work left off (base + kept delta) instead of adding
            # the kept delta to a fresh one: two deltas trained from one base would count twice.
            kept, kept_samples = self._kept
            start = {k: base[k] + kept[k].to(base[k].dtype) for k in base}
        t0 = time.monotonic()
        result, delta = await node.trainer.train_round(start, self.event.inner_steps)
        if self.times is not None:
            self.times.training += time.monotonic() - t0
        samples = result.samples + kept_samples
        if self._kept is not None:
            delta = {k: delta[k] + self._kept[0][k] for k in delta}  # relative to the round's base
            self._kept = None
        if not all(torch.isfinite(t).all() for t in delta.values()):
            node.record_error(f"round {a.round}: training produced NaN/Inf; the delta is dropped")
            self.feedback.reset()
            delta = {k: torch.zeros_like(t) for k, t in delta.items()}
        encoded = await node.trainer.call(self.feedback.encode, delta)
        h = hashlib.sha256(encoded.data).hexdigest()
        self._delta_bytes[h] = (a.round, encoded.data)
        self._own_raw[h] = (delta, samples)
        self._last_encoded = h
        node.transport.put_blob(encoded.data, kind="delta_chunk")
        logger.info(
            "trained",
            round=a.round,
            steps=result.steps,
            loss=round(result.mean_loss, 4),
            seconds=round(result.seconds, 2),
            delta_bytes=len(encoded.data),
            ratio=round(encoded.ratio, 1),
        )
        self._post(rm.TrainingDone(time.time(), h, max(1, samples), len(encoded.data)))

    def _keep_delta(self, a: rm.KeepDelta) -> None:
        own = self._own_raw.get(a.delta_hash)
        if own is None:
            return
        if a.delta_hash == self._last_encoded:
            self.feedback.rollback()  # the kept delta will be encoded again inside the next one
        raw, samples = own
        if self._kept is None:
            self._kept = (raw, samples)
        else:
            kept, ks = self._kept
            self._kept = ({k: kept[k] + raw[k] for k in kept}, ks + samples)

    async def _fetch_delta(self, a: rm.FetchDelta) -> None:
        ok = a.delta_hash in self._delta_bytes
        if not ok:
            ann = self._announced.get(a.delta_hash)
            peers = self._libp2p_for([a.peer_id])
            t0 = time.monotonic()
            try:
                data = await self.node.transport.fetch_from_any(
                    peers[:4],
                    a.delta_hash,
                    max_size=self.event.max_delta_bytes,
                    expected_size=ann.encoded_size if ann is not None else None,
                    timeout=self.event.round_deadline / 2,
                    kind="delta_chunk",
                )
                self._delta_bytes[a.delta_hash] = (self.machine.round or 0, data)
                ok = True
            except FetchError as e:
                self.node.record_error(f"delta {a.delta_hash[:12]} from {a.peer_id[:12]}: {e.reason}")
            if self.times is not None:
                self.times.communication += time.monotonic() - t0
        self._post(rm.DeltaFetched(time.time(), a.delta_hash, ok))

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
            candidate = await self.node.trainer.call(self._build_version, a.proposal, a.proposal_hash)
            metrics = await self.node.trainer.evaluate(dict(candidate[1]))
            base_metrics = await self._eval_of(a.proposal.base_version)
        except (ValueError, P2PModelError) as e:  # codec, lineage, merge and training errors derive from it
            self.node.record_error(f"round {a.proposal.round}: merge of proposal {a.proposal_hash[:12]} failed: {e}")
            self._post(rm.MergeFailed(time.time(), a.proposal_hash, str(e)[:200]))
            return
        finally:
            if self.times is not None:
                self.times.merge += time.monotonic() - t0
        version = candidate[0]
        reason = self._ci_gate(metrics, base_metrics)
        if reason:
            self.node.record_error(f"round {a.proposal.round}: CI gate refused {version.id[:12]}: {reason}")
            self._post(rm.MergeFailed(time.time(), a.proposal_hash, reason))
            return
        self._candidates[version.id] = _Candidate(version, metrics, a.proposal_hash)
        self._eval_cache[version.id] = metrics
        logger.info("merged", round=a.proposal.round, version=version.id[:12], proposal=a.proposal_hash[:12], deltas=len(a.proposal.deltas), **{k: round(v, 4) for k, v in metrics.items()})
        self._post(rm.MergeDone(time.time(), a.proposal_hash, version.id, metrics))

    def _ci_gate(self, metrics: dict[str, float], base: dict[str, float]) -> str:
        if not all(math.isfinite(v) for v in metrics.values()):
            return f"non-finite metrics {metrics}"
        new, old = metrics.get("eval_loss"), base.get("eval_loss")
        if new is not None and old is not None and new > old * (1 + self.event.ci_max_regression):
            return f"eval_loss {new:.4f} regressed past {old:.4f} * (1 + {self.event.ci_max_regression})"
        return ""

    async def _eval_of(self, vid: str) -> dict[str, float]:
        if vid not in self._eval_cache:
            ann = await asyncio.to_thread(self.node.store.annotations, vid)
            if ann.metrics:
                self._eval_cache[vid] = dict(ann.metrics)
            else:
                state = await asyncio.to_thread(self.node.store.state_dict, vid)
                self._eval_cache[vid] = metrics = await self.node.trainer.evaluate(state)
                # measured locally; kept so `log` can show where the lineage started from
                await asyncio.to_thread(self.node.store.annotate, vid, metrics=metrics)
        return self._eval_cache[vid]

    def _build_version(self, p: Proposal, proposal_hash: str) -> tuple[Version, dict[str, torch.Tensor]]:
        """Deterministic merge of `p` on its base (runs in the trainer thread). Returns (version, params)."""
        if not p.deltas:
            raise ValueError("the proposal lists no deltas")
        store = self.node.store
        base_version = store.get_version(p.base_version)
        base = store.state_dict(p.base_version)
        decoded = [self.codec.decode(self._delta_bytes[d.delta_hash][1], base_version.tensors) for d in p.deltas]
        weights = [d.weight for d in p.deltas]
        method = METHODS.get(p.method)  # an unknown name fails in merge_deltas with its typed error
        weighted = method is not None and method.param("weights") is not None  # median & co. take no weights
        params = dict(p.params)
        merged = {}
        for name, t in base.items():
            # tensors absent from a payload are zero deltas (the codec's rule)
            parts = [d[name].to(torch.float32) if name in d else torch.zeros_like(t, dtype=torch.float32) for d in decoded]
            merged[name] = merge_deltas(p.method, parts, weights=weights if weighted else None, seed=p.round, name=name, **params)
            if not torch.isfinite(merged[name]).all():
                raise ValueError(f"merged delta of {name} is not finite")
        momentum = {k: store.get_tensor(e) for k, e in base_version.optimizer_state.items()} or None
        new_params, new_momentum = outer_step(base, merged, momentum, lr=self.event.outer_lr, mu=self.event.outer_momentum)
        new_params = {k: v.to(base[k].dtype) for k, v in new_params.items()}
        tensors = {k: store.put_tensor(v) for k, v in new_params.items()}
        optimizer_state = {k: store.put_tensor(v) for k, v in new_momentum.items()}
        version = Version(
            parents=(p.base_version,),
            tensors=tensors,
            message=f"round {p.round}: {p.method} of {len(p.deltas)} deltas",
            time=p.time,
            author=p.proposer,
            round=p.round,
            merge={
                "method": p.method,
                "params": params,
                "deltas": [[d.peer_id, d.delta_hash, d.weight] for d in p.deltas],
                "members": list(p.members),
                "proposal": proposal_hash,
                "outer": {"lr": self.event.outer_lr, "momentum": self.event.outer_momentum, "nesterov": True},
            },
            contributors=tuple(d.peer_id for d in p.deltas),
            optimizer_state=optimizer_state,
        )
        return version, new_params

    # ------------------------------------------------------------------------------ commits

    def _certificate(self, round_: int, votes) -> tuple[bytes, ...]:
        return tuple(self._vote_envelopes[(round_, v.voter)] for v in votes if (round_, v.voter) in self._vote_envelopes)

    async def _commit_version(self, a: rm.CommitVersion) -> None:
        store = self.node.store
        certificate = self._certificate(a.round, a.votes)
        metrics = _median_metrics(a.votes)
        ann = Annotations(metrics=metrics, certificate={"round": a.round, "proposal": a.proposal_hash, "votes": list(certificate)})
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
        if self.node.config.max_rounds and self.rounds_joined >= self.node.config.max_rounds:
            logger.info("max rounds reached", rounds=self.rounds_joined)
            self.node.stop()

    def _record_round(self, a: rm.CommitVersion, version: Version, metrics: dict[str, float]) -> None:
        counters = self.node.transport.counters
        t = self.times
        entry: dict[str, Any] = {
            "round": a.round,
            "version": a.version_id,
            "contributors": len(version.contributors),
            "eval_loss": metrics.get("eval_loss"),
        }
        if t is not None and t.round == a.round:
            t.total = time.time() - t.entered
            t.bytes_sent = counters.total_sent() - self._bytes_mark[0]
            t.bytes_received = counters.total_received() - self._bytes_mark[1]
            entry.update(t.as_dict())
        self.history.append(entry)
        del self.history[:-50]
        logger.info(
            "committed",
            round=a.round,
            version=a.version_id[:12],
            contributors=len(version.contributors),
            eval_loss=round(metrics.get("eval_loss", float("nan")), 4),
            **{k: v for k, v in entry.items() if k.endswith("_s") or k.startswith("bytes")},
        )

    def _note_commit(self, msg: Commit) -> None:
        """Keep a received Commit's signed votes: we may be asked to republish it."""
        for envelope in msg.certificate:
            try:
                vote, signer = open_signed(envelope, Vote)
            except RemoteProtocolError:
                continue
            if signer == vote.voter:
                self._vote_envelopes.setdefault((vote.round, vote.voter), envelope)

    async def _publish_commit(self, a: rm.PublishCommit) -> None:
        certificate = self._certificate(a.round, a.votes)
        await self._publish(Commit(round=a.round, version_id=a.version_id, certificate=certificate))

    async def _sync(self, a: rm.SyncVersion) -> None:
        t0 = time.monotonic()
        try:
            record = await self.node.transport.fetch_from_any(
                self._libp2p_for(a.from_peers)[:8], a.version_id, max_size=MAX_RECORD, kind="version", timeout=60
            )
            version = Version.from_bytes(record)
            target = CertifiedVersion(version, a.round, tuple((version.merge or {}).get("members") or ()), (), ())
            await sync_version(self.node.transport, self.node.store, target, self._libp2p_for(a.from_peers), branch=None)
        except (SyncError, FetchError, LineageError) as e:
            self.node.record_error(f"sync of {a.version_id[:12]} failed: {e}")
            self._post(rm.SyncFailed(time.time(), a.version_id))
            return
        finally:
            if self.times is not None:
                self.times.communication += time.monotonic() - t0
        self.feedback.reset()  # our residual was relative to what we would have merged
        self._post(rm.VersionSynced(time.time(), a.version_id, a.round))

    # ------------------------------------------------------------------------------ status

    async def _progress_loop(self) -> None:
        while True:
            p = self.node.trainer.progress
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
            "history": self.history[-10:],
            "current_round_times": self.times.as_dict() if self.times is not None else None,
        }


def _median_metrics(votes) -> dict[str, float]:
    names = sorted({k for v in votes for k in v.metrics})
    out = {}
    for k in names:
        xs = sorted(v.metrics[k] for v in votes if k in v.metrics)
        out[k] = xs[len(xs) // 2]
    return out

