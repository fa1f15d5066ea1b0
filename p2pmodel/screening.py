"""Which of a round's deltas the merge leaves out: a pure function of the listed deltas.

A delta that passed the wire checks (decoded, finite, norm not absurd) can still be a lie: a
sign-flipped update, noise of an honest norm, an empty delta announced with samples. The merge
screens them out by comparing each delta with the *sign vote of the other deltas*: for every
coordinate, how many of them push it up minus how many push it down. Each peer has one vote per
coordinate whatever its delta's size (signSGD's majority vote), so a liar x100 moves the
reference no more than an honest peer does, and a delta never votes on itself:

- its L2 norm must be non-zero and at most `max_norm_ratio` x the median norm;
- its cosine with that vote must not be low: under `min_cosine` *and* under `relative_cosine`
  x the round's median cosine (honest deltas point the way the others vote; a flipped one
  points away, noise is orthogonal).

Why this reference and a floor relative to the round (2026-12-02; before, the reference was the
coordinate-wise median of all deltas and the floor a fixed 0.3): how well honest deltas agree
falls as an event trains (the shared signal shrinks against each peer's own noise) and depends
on the codec, and the fixed floor left out honest deltas late in an event, each exclusion an
offence (protocols/round.py): a 6-node swarm ended up merging 2-3 deltas of 6. With itself in
the median a delta pulls the reference its own way (noise reached cosines of 0.2, inside the
honest range late in an event); leaving it out, a median of sparse (top-k) deltas is zero
wherever fewer than half of them kept a coordinate, and honest cosines fell to 0.01. The vote
keeps every coordinate any delta kept. `scripts/screen_study` has the measurements.

The screen's inputs are sums over coordinates (`ScreenSums`: each delta's dot with the others'
vote, the vote's and the delta's squared norms), so they add up slice by slice: a partitioned
reduction's owners sum their slices and every peer decides on the totals (`screen_from_sums`).

Every honest peer runs this on the same decoded deltas in the same order, so all derive the
same kept set and the same version id; the excluded peers and the reasons go into the version
(`merge["screened"]`). At most ``(n - 1) // 2`` deltas are excluded (the worst first): the
screen assumes an honest majority among a round's deltas and never lets a minority's view
overrule it. Below `min_deltas` there is no majority to compare with and nothing is screened.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

__all__ = ["DeltaScreen", "ScreenResult", "ScreenSums", "screen_deltas", "screen_sums", "screen_from_sums"]


@dataclass(frozen=True)
class DeltaScreen:
    """The event's screening rule (part of the event's identity: every peer must apply the same)."""

    # Chosen by measurement (scripts/screen_study, 6 peers, the default event over 20 rounds and
    # a top-k 5% event over 30; docs/ARCHITECTURE.md "Screening"): honest cosines with the vote
    # fell from 0.58 to 0.17 and from 0.32 to 0.01, flipped deltas -0.03 to -0.70, noise 0.00.
    # A quarter of the round's median cosine left out none of 1,050 honest deltas (50 rounds,
    # honest alone and beside each of 3 lies) and caught all 150 lies; half left out 6 honest
    # deltas late in the top-k event.
    min_cosine: float = 0.3  # a cosine at or above this always passes ...
    relative_cosine: float = 0.25  # ... below it, a delta under this x the round's median cosine is left out (0: the fixed floor alone)
    max_norm_ratio: float = 4.0
    min_deltas: int = 3

    def cosine_floor(self, cosines: Sequence[float]) -> float:
        """The cosine under which a delta of the round is left out (the median cosine is an
        honest delta's: the screen assumes an honest majority)."""
        if self.relative_cosine <= 0:
            return self.min_cosine
        return min(self.min_cosine, self.relative_cosine * statistics.median(cosines))


@dataclass(frozen=True)
class ScreenResult:
    """Indices of the deltas kept, and (index, reason) of those left out."""

    kept: tuple[int, ...]
    excluded: tuple[tuple[int, str], ...]
    cosines: tuple[float, ...]
    norms: tuple[float, ...]


@dataclass(frozen=True)
class ScreenSums:
    """Per delta, the sums the screen decides on, over some of the model's entries: each is a
    sum over coordinates, so the sums of slices add up to the whole model's (a partitioned
    reduction's owners each sum their slices; p2pmodel.partition)."""

    dots: tuple[float, ...]  # d_i . (the others' sign vote)
    ref_sq: tuple[float, ...]  # |the others' sign vote|^2
    sq: tuple[float, ...]  # |d_i|^2
    voted: bool  # whether the vote sums were taken (enough deltas for a majority)

    def __add__(self, other: ScreenSums) -> ScreenSums:
        if len(self.sq) != len(other.sq) or self.voted != other.voted:
            raise ValueError("screen sums of different rounds cannot be added")
        add = lambda a, b: tuple(x + y for x, y in zip(a, b))  # noqa: E731
        return ScreenSums(add(self.dots, other.dots), add(self.ref_sq, other.ref_sq), add(self.sq, other.sq), self.voted)


def screen_sums(deltas: Sequence[Mapping[str, torch.Tensor]], rule: DeltaScreen) -> ScreenSums:
    """The screen's sums over the entries `deltas` hold (decoded, same tensor names, or the same
    slice of them; a missing tensor is zero), tensor by tensor in name order, in float64."""
    n = len(deltas)
    voted = n >= rule.min_deltas
    names = sorted({name for d in deltas for name in d})
    sq = [0.0] * n
    dots = [0.0] * n
    ref_sq = [0.0] * n
    for name in names:
        like = next(d[name] for d in deltas if name in d)
        parts = [(d[name] if name in d else torch.zeros_like(like)).to(torch.float32).reshape(-1) for d in deltas]
        stacked = torch.stack(parts).double()
        if voted:
            # Delta i's reference is votes - sign(d_i), where votes sums every delta's signs, so
            # no n x size reference is built: d_i . ref_i = d_i . votes - |d_i|_1 and
            # |ref_i|^2 = |votes|^2 - 2 sign(d_i) . votes + nnz(d_i). Integer sums: exact.
            signs = stacked.sign()
            votes = signs.sum(dim=0)
            dots_t = (stacked @ votes - stacked.abs().sum(dim=1)).tolist()
            ref_t = (float(votes @ votes) - 2 * (signs @ votes) + signs.abs().sum(dim=1)).tolist()
            for i in range(n):
                dots[i] += dots_t[i]
                ref_sq[i] += ref_t[i]
        sq_t = stacked.square().sum(dim=1).tolist()
        for i in range(n):
            sq[i] += sq_t[i]
    return ScreenSums(tuple(dots), tuple(ref_sq), tuple(sq), voted)


def screen_deltas(deltas: Sequence[Mapping[str, torch.Tensor]], rule: DeltaScreen) -> ScreenResult:
    """Screen `deltas` (decoded, same tensor names; a missing tensor is zero): each against the
    sign vote of the others."""
    return screen_from_sums(screen_sums(deltas, rule), rule)


def screen_from_sums(sums: ScreenSums, rule: DeltaScreen) -> ScreenResult:
    """The screen's decision from its sums (over the whole model, or added up from its slices)."""
    n = len(sums.sq)
    dots, ref_sq = sums.dots, sums.ref_sq
    norms = tuple(math.sqrt(x) for x in sums.sq)
    if not sums.voted:
        return ScreenResult(tuple(range(n)), (), tuple(math.nan for _ in range(n)), norms)
    cosines = tuple(dots[i] / (norms[i] * math.sqrt(ref_sq[i])) if norms[i] > 0 and ref_sq[i] > 0 else 0.0 for i in range(n))
    med_norm = statistics.median(norms)
    floor = rule.cosine_floor(cosines)
    reasons: dict[int, tuple[float, str]] = {}  # index -> (badness for ordering, reason)
    for i in range(n):
        if norms[i] == 0.0:
            reasons[i] = (math.inf, "empty delta")
        elif norms[i] > rule.max_norm_ratio * med_norm:
            reasons[i] = (norms[i] / med_norm, f"norm {norms[i]:.3g} over {rule.max_norm_ratio:g} x the median {med_norm:.3g}")
        elif cosines[i] < floor:
            reasons[i] = (1.0 - cosines[i], f"cosine {cosines[i]:.2f} with the others' sign vote under {floor:.2g}")
    worst = sorted(reasons, key=lambda i: (-reasons[i][0], i))[: (n - 1) // 2]
    excluded = tuple((i, reasons[i][1]) for i in sorted(worst))
    kept = tuple(i for i in range(n) if i not in set(worst))
    return ScreenResult(kept, excluded, cosines, norms)
