"""A virtual-clock network simulator for `RoundMachine`: many peers, one process, no I/O.

Each simulated peer runs the real `RoundMachine`; the simulator plays the daemon around it
(training, fetching, merging, syncing take virtual time) and the network between them:

- the DHT is modelled as records every other peer reads after a per-read delay; a read
  that fails (`NetConfig.drop`) is retried `retry_interval` later, up to `max_retries`
  times, then that reader misses the record for good; reads can come back twice;
- partitions hold records between groups until the partition heals (the record is still
  in the DHT when the reader can reach it again);
- crashed peers stop at a time; lying peers (`Fault`) tamper with what they publish.

A merged version's id is sha256 of (base, ordered delta hashes, weights), so honest peers
agree and liars, who salt it, do not. Traffic is counted per peer and message type with real
encoded sizes (`messages.encode` + the signed envelope's overhead); delta payloads count
their announced size. Everything is seeded: the same `SimConfig` gives the same run.

Bytes follow what the daemon sends (`WireModel`): a record is pushed to each other peer (its
bytes plus a push's framing, counted once per receiver); a Commit is not pushed but stored once
in the DHT by its publisher, and only a peer that did not commit the round from the votes it
was pushed reads it and fetches its certificate; the DHT's background reads and roster stores
are charged per second of a peer's time. The per-operation costs were measured on loopback
(`scripts/bench_control --micro`), so the totals can be checked against real daemons.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .certificate import CertifiedCommit, make_commit
from .messages import SIGNED_OVERHEAD, Message, Proposal, Vote, decode, encode
from .round import (
    CommitVersion,
    DeltaFetched,
    EnterRound,
    FetchDelta,
    FetchProposal,
    KeepDelta,
    Merge,
    MergeDone,
    MessageReceived,
    PeerInfo,
    Phase,
    Publish,
    PublishCommit,
    RoundConfig,
    RoundFailed,
    RoundMachine,
    Start,
    StartTraining,
    SyncFailed,
    SyncVersion,
    Tick,
    TrainingDone,
    VersionSynced,
)

__all__ = ["Fault", "NetConfig", "Partition", "SimConfig", "Simulation", "SimResult", "WireModel", "sim_peer_info"]

GENESIS = hashlib.sha256(b"p2pmodel-sim-genesis").hexdigest()


class Fault(Enum):
    """How a lying peer misbehaves (it runs the honest machine and tampers with its output)."""

    WRONG_VOTE = "wrong_vote"  # its merges give a wrong version id, so it votes for it
    EQUIVOCATE = "equivocate"  # shows one half of the swarm its real vote, the other a made-up one
    BOGUS_PROPOSAL = "bogus_proposal"  # its proposals list a delta nobody has
    UNFETCHABLE = "unfetchable"  # announces deltas but never serves them


@dataclass(frozen=True)
class WireModel:
    """What the daemon's transport puts on the wire around the protocol's own bytes.

    Measured by `scripts/bench_control --micro` on loopback (2026-12-01, bytes of all peers):
    one 382 B record pushed to 2 peers 1,280 B; a 100,000 B object fetched 100,705 B; one DHT
    store 3,568 / 13,937 / 17,775 B and one search of 4 keys 4,968 / 16,394 / 26,174 B with
    3 / 6 / 8 nodes, modelled as a cost per other node (within 30% of each); past 8 nodes the
    DHT costs are extrapolated: up to the k nodes that a Kademlia store or search reaches.
    """

    push_overhead: int = 258  # bytes per record pushed to one peer besides the record (frame, answer, yamux/noise/TCP)
    fetch_overhead: float = 0.007  # of a fetched object's bytes (request, stream framing, ACKs)
    dht_store_per_node: int = 2_400  # bytes of one DHT store per other node in the swarm, up to dht_k
    dht_search_per_node: int = 3_600  # one search of a round's keys, likewise
    dht_k: int = 20
    poll_every: float = 300.0  # seconds between a peer's DHT reads while pushes deliver (rounds.POLL_MAX)
    roster_every: float = 600.0  # seconds between a peer's roster stores (rounds.ROSTER_REFRESH)

    def dht_store(self, n: int) -> int:
        return self.dht_store_per_node * (min(n, self.dht_k) - 1)

    def dht_search(self, n: int) -> int:
        return self.dht_search_per_node * (min(n, self.dht_k) - 1)


@dataclass(frozen=True)
class NetConfig:
    """The simulated network."""

    delay_min: float = 0.05  # seconds, one-way, per record read
    delay_max: float = 0.5  # seconds; delays are uniform in [delay_min, delay_max]
    drop: float = 0.0  # probability one read attempt fails
    retry_interval: float = 1.0  # seconds before a failed read is tried again
    max_retries: int = 3  # failed attempts after which the reader misses the record
    duplicate: float = 0.0  # probability a read returns the record a second time
    bandwidth: float = 12.5e6  # bytes/s of one payload stream (100 Mbit/s)
    wire: WireModel = WireModel()


@dataclass(frozen=True)
class Partition:
    """From `start` to `end`, peers in different `groups` cannot reach each other."""

    start: float  # virtual seconds
    end: float
    groups: tuple[frozenset[int], ...]  # peer indices; a peer in no group is alone

    def separates(self, a: int, b: int, t: float) -> bool:
        if not self.start <= t < self.end:
            return False
        return not any(a in g and b in g for g in self.groups)


@dataclass(frozen=True)
class SimConfig:
    """One simulated run."""

    n_peers: int = 8
    rounds: int = 3  # stop once every live honest peer has committed this many rounds
    until: float = 3600.0  # virtual seconds; hard stop
    seed: int = 0
    round: RoundConfig = RoundConfig(collect_window=30.0, proposal_timeout=5.0, round_deadline=90.0)
    net: NetConfig = NetConfig()
    train_time: tuple[float, float] = (10.0, 20.0)  # seconds, uniform per round and peer
    merge_time: float = 1.0  # seconds to merge + outer step + CI gate
    sync_time: float = 2.0  # seconds to fetch a version's tensors
    delta_size: int = 100_000  # bytes of an encoded delta
    record_size: int = 4096  # bytes of a version record (fetched by id when syncing)
    faults: tuple[tuple[int, Fault], ...] = ()  # (peer index, fault)
    crashes: tuple[tuple[int, float], ...] = ()  # (peer index, virtual time it dies)
    joins: tuple[tuple[int, float], ...] = ()  # (peer index, time it joins); others start at 0
    partitions: tuple[Partition, ...] = ()


def sim_peer_info(i: int) -> PeerInfo:
    """Deterministic identity of simulated peer `i` (a real Ed25519 key, so announcements validate)."""
    from .signing import PeerIdentity

    ident = PeerIdentity.from_seed(hashlib.sha256(f"sim-peer-{i}".encode()).digest())
    return PeerInfo(
        peer_id=ident.peer_id, public_key=ident.public_key, libp2p_id="12D3KooW" + _base58(i),
        addrs=(f"/ip4/127.0.0.1/tcp/{10000 + i}",), event_hash=GENESIS,
    )  # fmt: skip


def _base58(i: int) -> str:
    alphabet = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
    out = ""
    while True:
        i, d = divmod(i, 58)
        out = alphabet[d] + out
        if i == 0:
            return out


def _open_sim_vote(data: bytes) -> tuple[Vote, str]:
    """Simulated certificates hold plain encoded votes; the signer is the voter field."""
    vote = decode(data, Vote)
    return vote, vote.voter  # type: ignore[union-attr]


@dataclass
class _Peer:
    idx: int
    info: PeerInfo
    machine: RoundMachine
    fault: Fault | None = None
    crash_at: float | None = None
    kept: list[str] = field(default_factory=list)  # deltas carried into the next training
    ticks: set[float] = field(default_factory=set)
    commits: dict[int, str] = field(default_factory=dict)  # round -> version id
    started: bool = False
    inflight: str | None = None  # delta of the training in progress
    trainings: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class SimResult:
    """What a run produced; the tests' oracles read it."""

    config: SimConfig
    end_time: float
    honest: frozenset[int]  # peers with no fault
    crashed: frozenset[int]
    commits: dict[int, dict[int, str]]  # peer -> round -> version id
    commit_times: dict[int, dict[int, float]]  # peer -> round -> virtual time
    versions: dict[str, tuple[str, tuple[str, ...]]]  # honest version id -> (base, delta hashes)
    deltas: dict[str, tuple[int, int, tuple[str, ...]]]  # delta hash -> (owner, round, carried deltas)
    pending: dict[int, frozenset[str]]  # per peer: deltas kept, announced or in training at the end
    sent: dict[int, Counter]  # peer -> (message type, round) -> messages sent
    sent_bytes: dict[int, Counter]
    received: dict[int, Counter]
    received_bytes: dict[int, Counter]
    counters: dict[int, dict[str, int]]  # each machine's drop/duplicate/... counters
    failed_rounds: dict[int, int]  # peer -> RoundFailed count
    errors: list[str]  # LocalProtocolErrors raised by machines (a bug if non-empty)

    def committed_ids(self) -> dict[int, set[str]]:
        """round -> the version ids honest peers committed in it (safety: one each)."""
        out: dict[int, set[str]] = defaultdict(set)
        for p in self.honest:
            for r, vid in self.commits[p].items():
                out[r].add(vid)
        return dict(out)

    def lost_deltas(self) -> list[str]:
        """Deltas of honest peers neither merged into a committed version, carried, nor pending."""
        merged = {d for vid in set().union(*self.committed_ids().values(), set()) for d in self.versions[vid][1]}
        carried_by: dict[str, str] = {}
        for h, (_, _, carried) in self.deltas.items():
            for c in carried:
                carried_by[c] = h
        lost = []
        for h, (owner, _, _) in self.deltas.items():
            if owner not in self.honest:
                continue
            cur, seen = h, set()
            while cur not in merged and cur not in self.pending[owner] and cur in carried_by and cur not in seen:
                seen.add(cur)
                cur = carried_by[cur]
            if cur not in merged and cur not in self.pending[owner]:
                lost.append(h)
        return lost


class Simulation:
    """Runs `SimConfig` to completion: `Simulation(cfg).run() -> SimResult`."""

    def __init__(self, config: SimConfig) -> None:
        self.cfg = config
        self.rng = random.Random(config.seed)
        self.now = 0.0
        self._queue: list[tuple[float, int, int, str, Any]] = []
        self._check_done = False  # set by a commit: only then can the run be over
        self._seq = 0
        faults = dict(config.faults)
        crashes = dict(config.crashes)
        self.peers = [
            _Peer(i, info, RoundMachine(info, config.round, open_vote=_open_sim_vote), faults.get(i), crashes.get(i))
            for i, info in ((i, sim_peer_info(i)) for i in range(config.n_peers))
        ]
        self.by_id = {p.info.peer_id: p for p in self.peers}
        self.versions: dict[str, tuple[str, tuple[str, ...]]] = {GENESIS: ("", ())}
        self.deltas: dict[str, tuple[int, int, tuple[str, ...]]] = {}
        self.proposals: dict[str, Proposal] = {}
        self.commit_times: dict[int, dict[int, float]] = defaultdict(dict)
        self.failed: Counter = Counter()
        self.sent: dict[int, Counter] = defaultdict(Counter)
        self.sent_bytes: dict[int, Counter] = defaultdict(Counter)
        self.received: dict[int, Counter] = defaultdict(Counter)
        self.received_bytes: dict[int, Counter] = defaultdict(Counter)
        self.latest: tuple[int, str, frozenset[str]] | None = None  # the DHT head key
        self._upkeep_from: dict[int, float] = {}  # peer -> time up to which its DHT upkeep was charged
        joins = dict(config.joins)
        self.electorate = frozenset(p.info.peer_id for p in self.peers if p.idx not in joins)
        for p in self.peers:
            self._push(joins.get(p.idx, self.rng.uniform(0.0, 0.1)), p.idx, "start", None)

    # ---- queue ------------------------------------------------------------------------

    def _push(self, t: float, peer: int, kind: str, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (t, self._seq, peer, kind, payload))

    def _alive(self, p: _Peer, t: float) -> bool:
        return p.crash_at is None or t < p.crash_at

    def _reachable(self, a: int, b: int, t: float) -> float:
        """Earliest time >= t at which a and b can talk (partitions heal)."""
        for part in self.cfg.partitions:
            if part.separates(a, b, t):
                t = part.end
        return t

    def run(self) -> SimResult:
        """Process events until every live honest peer committed `rounds` rounds, or `until`."""
        target = self.cfg.rounds
        while self._queue:
            t, _, idx, kind, payload = heapq.heappop(self._queue)
            if t > self.cfg.until:
                break
            self.now = t
            p = self.peers[idx]
            if not self._alive(p, t):
                continue
            if kind == "start":
                self._start(p)
            elif p.started:
                if kind == "tick":
                    p.ticks.discard(t)
                    self._feed(p, Tick(t))
                elif isinstance(payload, _Delivery):
                    if isinstance(payload.message, CertifiedCommit):
                        self._charge_commit_read(p, payload)
                    self._feed(p, MessageReceived(t, payload.message, payload.sender))
                else:
                    if isinstance(payload, TrainingDone):
                        p.inflight = None
                    self._feed(p, dataclasses.replace(payload, now=t))
            if self._check_done and self._done(target):
                break
            self._check_done = False
        return self._result()

    def _done(self, target: int) -> bool:
        live = [p for p in self.peers if p.fault is None and self._alive(p, self.now) and p.started]
        return bool(live) and all(len(p.commits) >= target for p in live) and len(live) >= 1

    # ---- a peer's daemon --------------------------------------------------------------

    def _start(self, p: _Peer) -> None:
        p.started = True
        self._upkeep_from[p.idx] = self.now
        if self.latest is None:
            head, head_round, electorate = GENESIS, None, self.electorate
        else:
            head_round, head, electorate = self.latest
        self._feed(p, Start(self.now, head, head_round, electorate))

    def _feed(self, p: _Peer, event: Any) -> None:
        from .errors import LocalProtocolError

        try:
            actions = p.machine.process(event)
        except LocalProtocolError as e:
            p.errors.append(f"t={self.now:.2f} peer {p.idx}: {e}")
            return
        for a in actions:
            self._act(p, a)
        d = p.machine.next_deadline()
        if d is not None and d not in p.ticks:
            p.ticks.add(d)
            self._push(max(d, self.now), p.idx, "tick", None)

    def _event_later(self, p: _Peer, delay: float, event: Any) -> None:
        self._push(self.now + delay, p.idx, "event", event)

    def _delay(self) -> float:
        return self.rng.uniform(self.cfg.net.delay_min, self.cfg.net.delay_max)

    def _act(self, p: _Peer, a: Any) -> None:
        cfg = self.cfg
        if isinstance(a, Publish):
            self._publish(p, a.message)
        elif isinstance(a, StartTraining):
            p.trainings += 1
            carried, p.kept = tuple(p.kept), []
            h = hashlib.sha256(f"delta:{p.idx}:{a.round}:{a.base_version}:{p.trainings}".encode()).hexdigest()
            self.deltas[h] = (p.idx, a.round, carried)
            p.inflight = h
            samples = 1000 + p.idx
            self._event_later(p, self.rng.uniform(*cfg.train_time), TrainingDone(0.0, h, samples, cfg.delta_size))
        elif isinstance(a, KeepDelta):
            p.kept.append(a.delta_hash)
        elif isinstance(a, FetchDelta):
            self._fetch(p, a)
        elif isinstance(a, FetchProposal):
            prop = self.proposals.get(a.proposal_hash)
            if prop is not None:
                self._deliver(p, self.by_id[prop.proposer].idx, prop, self._size(prop))
        elif isinstance(a, Merge):
            prop = a.proposal
            body = "|".join(f"{d.delta_hash}:{d.weight}" for d in prop.deltas)
            vid = hashlib.sha256(f"{prop.base_version}|{body}".encode()).hexdigest()
            if p.fault is None:
                self.versions[vid] = (prop.base_version, tuple(d.delta_hash for d in prop.deltas))
            else:  # liars compute (and vote for) a wrong version
                vid = hashlib.sha256(f"lie:{p.idx}:{vid}".encode()).hexdigest()
            self._event_later(p, cfg.merge_time, MergeDone(0.0, a.proposal_hash, vid, {"eval_loss": 1.0}))
        elif isinstance(a, CommitVersion):
            self._charge_upkeep(p, a.round)
            p.commits[a.round] = a.version_id
            self._check_done = True
            self.commit_times[p.idx][a.round] = self.now
            prop = self.proposals.get(a.proposal_hash)
            if p.fault is None and prop is not None and (self.latest is None or a.round > self.latest[0]):
                self.latest = (a.round, a.version_id, frozenset(prop.members))
        elif isinstance(a, PublishCommit):
            self._publish(p, make_commit(a.round, a.version_id, (encode(v) for v in a.votes)))
        elif isinstance(a, SyncVersion):
            self._sync(p, a)
        elif isinstance(a, RoundFailed):
            self.failed[p.idx] += 1
        elif isinstance(a, EnterRound):
            pass

    def _fetch(self, p: _Peer, a: FetchDelta) -> None:
        owner = self.by_id.get(a.peer_id)
        info = self.deltas.get(a.delta_hash)
        ok = (
            owner is not None and info is not None and info[0] == owner.idx and owner.fault is not Fault.UNFETCHABLE
            and self._alive(owner, self.now)
        )  # fmt: skip
        t = self._delay() + self._delay()
        if ok:
            assert owner is not None
            t = self._reachable(p.idx, owner.idx, self.now) - self.now + t + self.cfg.delta_size / self.cfg.net.bandwidth
            key = ("delta_payload", info[1])  # type: ignore[index]
            self.sent[owner.idx][key] += 1
            self.sent_bytes[owner.idx][key] += self.cfg.delta_size
            self.received[p.idx][key] += 1
            self.received_bytes[p.idx][key] += self.cfg.delta_size
            self._charge(owner.idx, p.idx, ("stream", info[1]), round(self.cfg.delta_size * self.cfg.net.wire.fetch_overhead), 0)  # type: ignore[index]
        else:
            t += self.cfg.net.retry_interval * self.cfg.net.max_retries  # the daemon gives up after retries
        self._event_later(p, t, DeltaFetched(0.0, a.delta_hash, ok))

    def _sync(self, p: _Peer, a: SyncVersion) -> None:
        sources = [self.by_id[x] for x in a.from_peers if x in self.by_id]
        live = [s for s in sources if self._alive(s, self.now) and s.fault is None]
        if a.version_id in self.versions and live:
            t = min(self._reachable(p.idx, s.idx, self.now) for s in live) - self.now
            ev: Any = VersionSynced(0.0, a.version_id, a.round)
            self._event_later(p, t + self.cfg.sync_time + self._delay(), ev)
            self.received_bytes[p.idx][("version_sync", a.round)] += self.cfg.record_size
            self.received[p.idx][("version_sync", a.round)] += 1
        else:
            self._event_later(p, self.cfg.net.retry_interval * 2, SyncFailed(0.0, a.version_id))

    def _size(self, msg: Message | CertifiedCommit) -> int:
        if isinstance(msg, CertifiedCommit):  # the record, and the certificate a reader fetches by its hash
            return len(encode(msg.commit)) + SIGNED_OVERHEAD + len(msg.blob())
        return len(encode(msg)) + SIGNED_OVERHEAD

    def _publish(self, p: _Peer, msg: Message) -> None:
        kind = msg.TYPE
        if isinstance(msg, Proposal):
            if p.fault is Fault.BOGUS_PROPOSAL:
                fake = hashlib.sha256(f"bogus:{p.idx}:{msg.round}".encode()).hexdigest()
                extra = type(msg.deltas[0])(p.info.peer_id, fake, 1.0) if msg.deltas else None
                deltas = tuple(d for d in msg.deltas if d.peer_id != p.info.peer_id)
                if extra is not None:
                    deltas = tuple(sorted(deltas + (extra,)))
                    msg = dataclasses.replace(msg, deltas=deltas)
            from .messages import message_hash

            self.proposals[message_hash(msg)] = msg
        variants = [msg]
        if isinstance(msg, Vote) and p.fault is Fault.EQUIVOCATE:
            fake = hashlib.sha256(f"equivocate:{p.idx}:{msg.round}".encode()).hexdigest()
            variants.append(dataclasses.replace(msg, version_id=fake))
        wire = self.cfg.net.wire
        key = (kind, msg.round)  # type: ignore[attr-defined]
        if isinstance(msg, CertifiedCommit):
            # Not pushed: stored once under the head key. Every peer gets it (the simulated DHT
            # read), but only one that did not commit the round pays for reading it.
            self._charge(p.idx, None, key, len(encode(msg.commit)) + SIGNED_OVERHEAD)
            self._charge(p.idx, None, ("dht", msg.round), wire.dht_store(self.cfg.n_peers), 0)
            for q in self.peers:
                if q is not p:
                    self._deliver(q, p.idx, msg, self._size(msg), charge=False)
            return
        if kind == "departure":
            self._charge(p.idx, None, ("dht", msg.round), wire.dht_store(self.cfg.n_peers), 0)  # type: ignore[attr-defined]
        sizes = [self._size(m) + wire.push_overhead for m in variants]
        for q in self.peers:
            if q is p:
                continue
            which = (q.idx % 2) if len(variants) == 2 else 0
            self._charge(p.idx, None, key, sizes[which])
            self._deliver(q, p.idx, variants[which], sizes[which])

    def _charge(self, src: int, dst: int | None, key: tuple[str, int], nbytes: int, messages: int = 1) -> None:
        """Count `nbytes` (and `messages`) sent by `src` and, when given, received by `dst`."""
        self.sent[src][key] += messages
        self.sent_bytes[src][key] += nbytes
        if dst is not None:
            self.received[dst][key] += messages
            self.received_bytes[dst][key] += nbytes

    def _charge_commit_read(self, q: _Peer, d: _Delivery) -> None:
        """A peer that did not commit the Commit's round itself reads the head key and fetches the
        certificate by its hash from the publisher (live peers commit from the votes pushed)."""
        msg = d.message
        assert isinstance(msg, CertifiedCommit)
        if msg.round in q.commits:
            return
        if q.machine.round == msg.round and q.machine.phase is Phase.VOTED:
            return  # it voted in this round: the others' votes are pushed to it (the sim's commit may just be faster)
        wire, src = self.cfg.net.wire, self.by_id[d.sender].idx
        self._charge(q.idx, None, ("dht", msg.round), wire.dht_search(self.cfg.n_peers), 0)
        self.received[q.idx][("commit", msg.round)] += 1
        self.received_bytes[q.idx][("commit", msg.round)] += len(encode(msg.commit)) + SIGNED_OVERHEAD
        blob = len(msg.blob())
        self._charge(src, q.idx, ("certificate", msg.round), blob + round(blob * wire.fetch_overhead))

    def _charge_upkeep(self, p: _Peer, round_: int) -> None:
        """The DHT reads (one search per poll_every) and roster stores (one per roster_every) a
        peer makes in the background, for the time since the last charge."""
        wire, n = self.cfg.net.wire, self.cfg.n_peers
        dt = self.now - self._upkeep_from.get(p.idx, self.now)
        self._upkeep_from[p.idx] = self.now
        cost = dt * (wire.dht_search(n) / wire.poll_every + wire.dht_store(n) / wire.roster_every)
        self._charge(p.idx, None, ("dht", round_), round(cost), 0)

    def _deliver(self, q: _Peer, src: int, msg: Message, size: int, charge: bool = True) -> None:
        net = self.cfg.net
        t = self._reachable(src, q.idx, self.now)
        for attempt in range(net.max_retries + 1):
            if net.drop and self.rng.random() < net.drop:
                t += net.retry_interval
                continue
            t += self._delay()
            # Counted when scheduled, so reads still in flight when the run stops are not lost.
            if charge:
                key = (msg.TYPE, msg.round)  # type: ignore[attr-defined]
                self.received[q.idx][key] += 1
                self.received_bytes[q.idx][key] += size
            self._push(t, q.idx, "event", _Delivery(msg, self.peers[src].info.peer_id, size))
            if net.duplicate and self.rng.random() < net.duplicate:
                self._push(t + self._delay(), q.idx, "event", _Delivery(msg, self.peers[src].info.peer_id, size))
            return

    # ---- results ------------------------------------------------------------------------

    def _result(self) -> SimResult:
        pending: dict[int, frozenset[str]] = {}
        for p in self.peers:
            m = p.machine
            held = set(p.kept)
            if m._my_delta is not None:  # announced this round, not yet decided
                held.add(m._my_delta[0])
            if p.inflight is not None:  # the running training's delta (it carries what was kept)
                held.add(p.inflight)
            pending[p.idx] = frozenset(held)
        return SimResult(
            config=self.cfg,
            end_time=self.now,
            honest=frozenset(p.idx for p in self.peers if p.fault is None),
            crashed=frozenset(p.idx for p in self.peers if p.crash_at is not None),
            commits={p.idx: dict(p.commits) for p in self.peers},
            commit_times={p.idx: dict(self.commit_times[p.idx]) for p in self.peers},
            versions=dict(self.versions),
            deltas=dict(self.deltas),
            pending=pending,
            sent=dict(self.sent),
            sent_bytes=dict(self.sent_bytes),
            received=dict(self.received),
            received_bytes=dict(self.received_bytes),
            counters={p.idx: dict(p.machine.counters) for p in self.peers},
            failed_rounds=dict(self.failed),
            errors=[e for p in self.peers for e in p.errors],
        )


@dataclass(frozen=True)
class _Delivery:
    message: Message
    sender: str
    size: int
