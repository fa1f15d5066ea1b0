"""The partitioned reduction's pure half: slices of the parameters, their owners, a slice's merge.

Today every peer fetches every delta and merges the whole model, so its bytes per round grow as
N (docs/ARCHITECTURE.md, "Toward per-peer cost flat in N"). In a partitioned reduction each peer
owns some slices of the parameters: it fetches only those slices of the round's deltas and
merges them, and every peer fetches the merged slices it does not own. This module holds what
that needs and can be tested without a socket:

- `SlicePlan`: the parameters cut into `count` slices, each a contiguous range of the model's
  flat entries (tensors in name order, each flattened). A cut inside a tensor falls on a
  multiple of `align` entries of that tensor, so a codec's blocks (of `align` entries or a
  divisor of it) are the same in a slice as in the whole tensor and a slice encodes to the same
  values. The plan depends on the model's layout and `count` only: fixed for an event, so
  slices keep their numbers while peers come and go.
- `slice_owners`: who owns each slice, by rendezvous hashing of (key, slice, peer): a peer that
  leaves moves only the slices it owned, so owners stay put while the membership does (no state
  is tied to an owner: merged slices go back re-encoded without error feedback, which measured
  as well as with it; scripts/sweep_outer, preset partitioned).
- `merge_round_by_slices`: the round's merge as owners will compute it, in one process: each
  slice's screen sums, the screen decided on their totals, each slice merged, the slices
  assembled. It gives the version `merge_round` gives (the same id): the reference a
  distributed round must match.
- `merge_slice`: a slice's merge. For the methods registered `coordinatewise` (linear,
  task_arithmetic, median, trimmed_mean) it is that slice of the whole model's merge, bit for
  bit; TIES (a per-tensor magnitude quantile), DARE (a per-tensor random stream), SLERP and
  CenteredClip (per-tensor norms) need statistics of whole tensors that a slice does not hold,
  and are refused.

Not built yet: the daemon still fetches whole deltas and reduces the whole model; announcing a
hash per slice, the round's REDUCING phase, owners' results and audits are the next steps.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from p2pmodel.errors import UsageError
from p2pmodel.merge import METHODS
from p2pmodel.screening import DeltaScreen, ScreenSums, screen_from_sums, screen_sums
from p2pmodel.versioning import Contribution, RoundMerge, RoundSpec, merge_contributions

__all__ = ["PartitionError", "Piece", "SlicePlan", "slice_owners", "merge_slice", "merge_round_by_slices"]


class PartitionError(UsageError):
    """A slice plan or a slice's merge that cannot be made as asked (the message says why)."""


@dataclass(frozen=True)
class Piece:
    """The part of one tensor in a slice: its flat entries [start, stop)."""

    name: str
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class SlicePlan:
    """The model's flat entries cut into slices; `bounds[s]:bounds[s + 1]` is slice s."""

    shapes: tuple[tuple[str, tuple[int, ...]], ...]  # every tensor, in name order
    bounds: tuple[int, ...]  # count + 1 flat offsets, from 0 to the model's entry count

    @classmethod
    def of(cls, shapes: Mapping[str, Sequence[int]], count: int, align: int = 1024) -> SlicePlan:
        """Cut a model of `shapes` into `count` slices of nearly equal entry counts.

        Each cut is the flat offset nearest to `s * total / count` that is a tensor's boundary
        or a multiple of `align` inside a tensor; slices differ by at most ~`align` entries
        from an equal share (a slice may be empty when the model has fewer than
        `count * align` entries).

        Raises:
            PartitionError: `count` or `align` is not a positive integer, or the model is empty.
        """
        if not isinstance(count, int) or count < 1:
            raise PartitionError(f"slice count must be a positive integer, got {count!r}")
        if not isinstance(align, int) or align < 1:
            raise PartitionError(f"slice alignment must be a positive integer, got {align!r}")
        layout = tuple((name, tuple(int(d) for d in shapes[name])) for name in sorted(shapes))
        numels = [math.prod(shape) for _, shape in layout]
        total = sum(numels)
        if total == 0:
            raise PartitionError("the model has no entries to slice")
        starts = [0]
        for n in numels:
            starts.append(starts[-1] + n)
        bounds, t = [0], 0
        for s in range(1, count):
            target = s * total // count
            while starts[t + 1] <= target:  # the tensor holding entry `target`
                t += 1
            inside = target - starts[t]
            below = starts[t] + inside // align * align
            above = min(starts[t] + -(-inside // align) * align, starts[t + 1])
            cut = below if target - below <= above - target else above
            bounds.append(max(cut, bounds[-1]))
        bounds.append(total)
        return cls(shapes=layout, bounds=tuple(bounds))

    @property
    def count(self) -> int:
        return len(self.bounds) - 1

    def sizes(self) -> tuple[int, ...]:
        """Entries in each slice."""
        return tuple(b - a for a, b in zip(self.bounds, self.bounds[1:]))

    def pieces(self, s: int) -> tuple[Piece, ...]:
        """The tensors' parts in slice `s`, in name order (at most one piece per tensor)."""
        if not 0 <= s < self.count:
            raise PartitionError(f"slice {s} out of range (the plan has {self.count})")
        lo, hi = self.bounds[s], self.bounds[s + 1]
        out, start = [], 0
        for name, shape in self.shapes:
            stop = start + math.prod(shape)
            a, b = max(lo, start), min(hi, stop)
            if a < b:
                out.append(Piece(name, a - start, b - start))
            start = stop
        return tuple(out)

    def take(self, tensors: Mapping[str, torch.Tensor], s: int) -> dict[str, torch.Tensor]:
        """Slice `s` of `tensors`: tensor name -> its piece as a 1-D view (a tensor absent from
        `tensors` is absent from the slice: a delta without it is zero there)."""
        return {p.name: tensors[p.name].reshape(-1)[p.start : p.stop] for p in self.pieces(s) if p.name in tensors}

    def assemble(self, slices: Sequence[Mapping[str, torch.Tensor]], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The whole model from every slice's pieces (`slices[s]` as `take` gives it; a piece
        missing from a slice is zero).

        Raises:
            PartitionError: not one mapping per slice, or a piece of the wrong size.
        """
        if len(slices) != self.count:
            raise PartitionError(f"assemble needs {self.count} slices, got {len(slices)}")
        flat = {name: torch.zeros(math.prod(shape), dtype=dtype) for name, shape in self.shapes}
        for s, part in enumerate(slices):
            for p in self.pieces(s):
                if p.name not in part:
                    continue
                piece = part[p.name].reshape(-1)
                if piece.numel() != p.numel:
                    raise PartitionError(f"slice {s} holds {piece.numel()} entries of {p.name}, the plan {p.numel}")
                flat[p.name][p.start : p.stop] = piece
        return {name: flat[name].reshape(shape) for name, shape in self.shapes}


def slice_owners(count: int, members: Sequence[str], key: str, replicas: int) -> tuple[tuple[str, ...], ...]:
    """Each slice's owners: the `replicas` members (all of them if fewer) ranked highest by
    sha256(key, slice, member), best first (rendezvous hashing: a member that leaves or joins
    moves only the slices it owned or now ranks into).

    Raises:
        PartitionError: no members, or `replicas` < 1.
    """
    if not members:
        raise PartitionError("a slice needs an owner: no members")
    if replicas < 1:
        raise PartitionError(f"replicas must be at least 1, got {replicas!r}")
    unique = sorted(set(members))
    r = min(replicas, len(unique))

    def score(s: int, member: str) -> bytes:
        return hashlib.sha256(f"{key}\x00{s}\x00{member}".encode()).digest()

    return tuple(tuple(sorted(unique, key=lambda m: score(s, m), reverse=True)[:r]) for s in range(count))


def merge_slice(
    plan: SlicePlan,
    s: int,
    method: str,
    base: Mapping[str, torch.Tensor],
    contributions: Sequence[Contribution],
    *,
    seed: int,
    params: Mapping[str, object],
) -> dict[str, torch.Tensor]:
    """Merge slice `s` of the round's deltas: `contributions[i].delta` holds that slice only
    (as `plan.take` gives it), `base` the whole base model. Equal, bit for bit, to slice `s` of
    `merge_contributions` on the whole deltas.

    Raises:
        PartitionError: `method` is not coordinatewise (it needs whole tensors).
        TrainingError, MergeError: as `merge_contributions`.
    """
    m = METHODS.get(method)  # an unknown name fails in merge_contributions with its typed error
    if m is not None and not m.coordinatewise:
        raise PartitionError(f"merge method {method!r} needs whole tensors (not coordinatewise): it cannot be reduced by slices")
    return merge_contributions(method, plan.take(base, s), contributions, seed=seed, params=params)


def merge_round_by_slices(
    plan: SlicePlan,
    base: Mapping[str, torch.Tensor],
    spec: RoundSpec,
    contributions: Sequence[Contribution],
    screen: DeltaScreen | None = None,
) -> RoundMerge:
    """`versioning.merge_round`, slice by slice: two passes over the slices, as a partitioned
    round takes two exchanges (owners' screen sums, then owners' merged slices), because which
    deltas a slice merges depends on every slice's sums.

    Raises:
        PartitionError: the method is not coordinatewise.
        TrainingError, MergeError: as `merge_contributions`.
    """
    kept, screened = list(contributions), []
    if screen is not None and contributions:
        total: ScreenSums | None = None
        for s in range(plan.count):
            part = screen_sums([plan.take(c.delta, s) for c in contributions], screen)
            total = part if total is None else total + part
        assert total is not None
        result = screen_from_sums(total, screen)
        screened = [(contributions[i].peer_id, why) for i, why in result.excluded]
        kept = [contributions[i] for i in result.kept]
    parts = []
    for s in range(plan.count):
        sliced = [Contribution(c.peer_id, c.delta_hash, c.weight, plan.take(c.delta, s)) for c in kept]
        parts.append(merge_slice(plan, s, spec.method, base, sliced, seed=spec.round, params=spec.params))
    merged = plan.assemble(parts)
    return RoundMerge(tuple(kept), tuple(screened), merged)
