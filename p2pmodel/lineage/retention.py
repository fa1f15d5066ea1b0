"""Retention: which versions keep their tensors, so a long event does not fill a volunteer's disk.

Every round changes every tensor, so each version costs one model copy (two with outer
momentum: the optimizer state). Measured on 2 nodes with the built-in charlm (1.67 MiB
model): 48 versions in 2 min 10 s made 90 MiB of lineage per node, 80.2 MiB of it tensors.

The policy keeps *whole*:

- the newest `keep_last` versions of every branch and tag (the head and the versions a round
  in flight reads are among them: the head, its parent, the round's base);
- every `keep_every`-th round's version (checkpoints: `round % keep_every == 0`; the same
  rounds on every peer, so the swarm as a whole serves them);
- every branch and tag tip, every root (an event's seed: joiners fetch it by id), and the
  versions the caller protects (what the node is using right now).

Everything else reachable from a ref may be *pruned*: record, annotations and certificate
stay (log, credits and the commit chain a joiner verifies are whole), tensors and optimizer
state go (`LineageStore.prune`, then `gc` or `free_pruned`). Versions no ref reaches are not
the policy's business (`gc` removes them; a node holds a synced version there until it commits).

`plan_pruning` is pure (graph in, ids out); `apply_retention` runs it on a store.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

from p2pmodel.lineage.objects import LineageError

if TYPE_CHECKING:
    from p2pmodel.lineage.maintenance import GcReport
    from p2pmodel.lineage.store import LineageStore

__all__ = ["RetentionPolicy", "RetentionReport", "VersionFacts", "InvalidRetention", "plan_pruning", "apply_retention"]


class InvalidRetention(LineageError):
    """A retention setting that cannot work. Fields: setting, value, reason."""

    def __init__(self, setting: str, value: int, reason: str):
        self.setting, self.value, self.reason = setting, value, reason
        super().__init__(f"{setting}={value}: {reason}")


@dataclass(frozen=True)
class RetentionPolicy:
    """How many versions keep their tensors. `keep_last=0` turns retention off (keep all)."""

    keep_last: int = 16  # versions, newest first, kept whole on every branch and tag (0: all; else >= 2)
    keep_every: int = 1000  # rounds: a round's version with round % keep_every == 0 stays whole (0: none)

    def __post_init__(self) -> None:
        if self.keep_last < 0 or self.keep_last == 1:
            # the head and its parent: a round in flight may still read the parent after a commit
            raise InvalidRetention("keep_last", self.keep_last, "must be 0 (keep every version) or at least 2")
        if self.keep_every < 0:
            raise InvalidRetention("keep_every", self.keep_every, "must be 0 (no checkpoints) or a positive number of rounds")

    @property
    def off(self) -> bool:
        return self.keep_last == 0


@dataclass(frozen=True)
class VersionFacts:
    """What the policy needs of a version (a `VersionInfo` has these fields too)."""

    id: str
    parents: tuple[str, ...]
    round: int | None
    pruned: bool = False


def plan_pruning(
    versions: Iterable[VersionFacts], tips: Iterable[str], policy: RetentionPolicy, protect: Iterable[str] = ()
) -> list[str]:
    """Ids of the versions to prune now (not yet pruned, reachable from a tip, kept by no rule).

    Args:
        versions: every indexed version (any order); objects with `id`, `parents`, `round`
            and `pruned`, such as `VersionInfo`.
        tips: ids that branches and tags point to.
        policy: what to keep.
        protect: ids that must stay whole whatever the policy says (in use by the caller).

    Returns:
        The ids, sorted.
    """
    if policy.off:
        return []
    by_id: Mapping[str, VersionFacts] = {v.id: v for v in versions}
    tips = [t for t in dict.fromkeys(tips) if t in by_id]
    # distance from the nearest tip, counting parent edges: the newest keep_last of each branch
    # are those at distance < keep_last (a round's versions form a chain, so this is "newest K")
    dist: dict[str, int] = {t: 0 for t in tips}
    queue: deque[str] = deque(tips)
    while queue:
        vid = queue.popleft()
        for p in by_id[vid].parents:
            if p in by_id and p not in dist:
                dist[p] = dist[vid] + 1
                queue.append(p)
    keep = set(tips) | {vid for vid in protect}
    out = []
    for vid, d in dist.items():
        v = by_id[vid]
        if v.pruned or vid in keep or d < policy.keep_last or not v.parents:
            continue
        if policy.keep_every and v.round is not None and v.round % policy.keep_every == 0:
            continue
        out.append(vid)
    return sorted(out)


@dataclass(frozen=True)
class RetentionReport:
    """What `apply_retention` did."""

    pruned: tuple[str, ...]  # versions newly pruned
    freed: "GcReport"  # objects deleted and bytes freed


def apply_retention(
    store: "LineageStore", policy: RetentionPolicy, *, protect: Sequence[str] = (), grace_s: float = 0.0, full_gc: bool = False
) -> RetentionReport:
    """Prune what `policy` lets go, then free the objects only pruned versions needed.

    `full_gc=True` (the `gc --prune` command) then runs the whole `gc`, which also removes
    versions no ref reaches and leftovers of interrupted writes; without it only the newly
    pruned versions' objects are deleted (`free_pruned`: safe beside a running node).

    Raises:
        GcRefused: a record of a version kept whole cannot be read (nothing is deleted).
    """
    tips = set(store.index.refs().values())
    # what the refs reach, two queries per tip (versions() would ask for each one's parents)
    reached = {info.id: info for tip in tips for info in store.index.ancestry(tip)}
    ids = plan_pruning(reached.values(), tips, policy, protect)
    newly = store.prune(ids) if ids else []
    if full_gc:
        freed = store.gc(grace_s)
    else:
        freed = store.free_pruned(grace_s, newly) if newly else _empty_report()
    return RetentionReport(tuple(newly), freed)


def _empty_report() -> "GcReport":
    from p2pmodel.lineage.maintenance import GcReport

    return GcReport()
