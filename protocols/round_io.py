"""The round machine's inputs and outputs: events the daemon feeds in, actions it carries out.

Plain data. Everything that decides what happens next lives in `round.py` (the h11 rule);
this file only names what crosses the boundary between the machine and the I/O shell.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from .certificate import CertifiedCommit
from .messages import Message, Proposal, Vote

# --------------------------------------------------------------------------------------
# Events (inputs). `now` is the caller's clock, in seconds; the machine never reads one.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Start:
    """Join the swarm on head `head_version` (committed in `head_round`, None for the seed)."""

    now: float
    head_version: str  # sha256 hex version id of the head
    head_round: int | None  # round that committed it; None for a seeded version
    electorate: frozenset[str]  # members of the proposal that committed the head (seed: the seeder)


@dataclass(frozen=True)
class Tick:
    """Time passed; sent at (or after) `next_deadline()`."""

    now: float


@dataclass(frozen=True)
class TrainingDone:
    """The training asked for by the last StartTraining finished; its delta is stored."""

    now: float
    delta_hash: str  # sha256 hex of the encoded delta
    samples: int  # training samples behind it
    encoded_size: int  # bytes of the encoded delta
    norm: float | None = None  # L2 norm of the decoded delta (screening compares it with the others')
    carried: int = 0  # of `samples`, those trained for earlier rounds (an unmerged delta carried into it)


@dataclass(frozen=True)
class MessageReceived:
    """A record read from the DHT, its envelope already verified; `sender` is the signer.

    Commits arrive as a `CertifiedCommit`: the shell fetched the certificate the record names
    by hash; its votes are opened by the machine itself (see RoundMachine's `open_vote`)."""

    now: float
    message: Message | CertifiedCommit
    sender: str  # peer id of the signer


@dataclass(frozen=True)
class DeltaFetched:
    """A FetchDelta finished: `ok` when the payload arrived and matched its hash."""

    now: float
    delta_hash: str
    ok: bool
    norm: float | None = None  # L2 norm of the decoded delta, once screened
    reason: str = ""  # why it is not usable: unfetchable, does not decode, NaN/Inf, ...


@dataclass(frozen=True)
class MergeDone:
    """A Merge finished and passed the CI gate; the version is stored locally."""

    now: float
    proposal_hash: str
    version_id: str
    metrics: dict[str, float] = field(default_factory=dict)
    screened: tuple[str, ...] = ()  # peers whose listed delta the merge's screen left out


@dataclass(frozen=True)
class MergeFailed:
    """A Merge failed (a delta did not decode, NaN/Inf, the CI gate refused it)."""

    now: float
    proposal_hash: str
    reason: str = ""


@dataclass(frozen=True)
class VersionSynced:
    """A SyncVersion finished: the version's record and tensors are stored and verified."""

    now: float
    version_id: str
    round: int
    proposal_hash: str = ""  # what the record's merge spec says it merged ...
    members: frozenset[str] = frozenset()  # ... and that proposal's members (the next electorate)


@dataclass(frozen=True)
class SyncFailed:
    """A SyncVersion could not get the version from any of the peers it tried."""

    now: float
    version_id: str


@dataclass(frozen=True)
class Stop:
    """Leave the swarm: publish a Departure and accept nothing more."""

    now: float


Event = Union[Start, Tick, TrainingDone, MessageReceived, DeltaFetched, MergeDone, MergeFailed, VersionSynced, SyncFailed, Stop]

# --------------------------------------------------------------------------------------
# Actions (outputs)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Publish:
    """Sign `message` and store it in the DHT under its round's key."""

    message: Message


@dataclass(frozen=True)
class StartTraining:
    """Train H inner steps from `base_version` for `round`; add every kept delta into the result."""

    round: int
    base_version: str


@dataclass(frozen=True)
class KeepDelta:
    """Our delta `delta_hash` (trained on `base_version`) was not merged: carry it into the next round."""

    delta_hash: str
    round: int  # round it was trained for
    base_version: str
    announced: bool = True  # False: trained on a head that moved on, never announced


@dataclass(frozen=True)
class FetchDelta:
    """Fetch delta `delta_hash` from `peer_id` (or anyone holding it) and verify its hash."""

    peer_id: str
    delta_hash: str


@dataclass(frozen=True)
class FetchProposal:
    """Read the proposal with hash `proposal_hash` from round `round`'s DHT key; feed it back."""

    round: int
    proposal_hash: str


@dataclass(frozen=True)
class Merge:
    """Merge `proposal`'s deltas (all fetched) on its base, outer step, CI gate; report MergeDone."""

    proposal: Proposal
    proposal_hash: str


@dataclass(frozen=True)
class CommitVersion:
    """Move the head to `version_id` (held locally), annotated with the certificate `votes`."""

    round: int
    version_id: str
    proposal_hash: str
    votes: tuple[Vote, ...]  # the daemon keeps each vote's signed envelope, by (round, voter)


@dataclass(frozen=True)
class PublishCommit:
    """Build and publish the Commit of `version_id`: its id and the signed `votes`."""

    round: int
    version_id: str
    votes: tuple[Vote, ...]


@dataclass(frozen=True)
class SyncVersion:
    """Fetch version `version_id` (committed in `round`) from one of `from_peers`; report VersionSynced."""

    version_id: str
    round: int
    from_peers: tuple[str, ...]


@dataclass(frozen=True)
class EnterRound:
    """We are now in `round`, building on `base_version` (for logs and the status API)."""

    round: int
    base_version: str


@dataclass(frozen=True)
class RoundFailed:
    """`round` ended without a commit we could accept; the head stays."""

    round: int
    reason: str  # "deadline" or "skipped"


Action = Union[
    Publish, StartTraining, KeepDelta, FetchDelta, FetchProposal, Merge, CommitVersion, PublishCommit,
    SyncVersion, EnterRound, RoundFailed,
]  # fmt: skip
